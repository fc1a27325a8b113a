"""Descriptor extraction: the engine under evaluation, indexing and every other command.

Images are loaded by DataLoader workers (robust loading, resize, query crop), grouped into batches of
equal size, run at several scales and combined as the release does: each scale's L2-normalised
descriptor is summed, divided by the number of scales and L2-normalised again. Resizing for a scale s
is ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` on the normalised tensor.

With ``out_dir`` the descriptors are written in shards (``shard_00000.npy`` ...) beside a manifest; an
interrupted run resumes without recomputing finished shards, and under ``torchrun`` each process takes
every world_size-th shard, then all processes read the merged result.

Example:
    >>> model = tokenret.create_model("token_r101", checkpoint="R101-Token.pth")      # doctest: +SKIP
    >>> result = extract_descriptors(model, ["a.jpg", "b.jpg"], out_dir="cache/db")    # doctest: +SKIP
    >>> result.descriptors.shape                                                        # doctest: +SKIP
    (2, 1024)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tokenret.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, load_image, to_tensor
from tokenret.models.fuse import fold_batchnorm, fuse_activations

log = logging.getLogger(__name__)

#: The release's test scales.
RELEASE_SCALES = (1.0, 2**0.5, 2**-0.5)

Box = tuple[float, float, float, float]


@dataclass
class ExtractionConfig:
    """How descriptors are computed. Everything that changes a descriptor is part of its fingerprint.

    Args:
        max_size: longest image side after loading (never enlarged); queries keep their scale in the image.
        scales: multi-scale factors applied to the loaded image.
        batch_size: images of equal size run together (results equal one-by-one in eval mode).
        num_workers: DataLoader processes that decode images.
        amp: "off", "bf16" (CPU or GPU) or "fp16" (GPU only) autocast for the forward pass.
        channels_last: NHWC memory format (1.3-1.9x faster convolutions on CPU and GPU).
        fold_batchnorm: run an inference copy with BatchNorms folded into the convolutions (same
            descriptors to float rounding; about 1.2x faster end to end on CPU, see ``tokenret.models.fuse``).
        fuse_activations: on CPU in float32 (amp "off"), also run each ReLU and residual add of the folded
            copy as a post-op of the oneDNN convolution before it (same results; ~1.05-1.09x on the trunk).
        compile: also ``torch.compile`` the copy's trunk (dynamic shapes, weights frozen into the graph): a
            one-off compilation (about a minute on a 2-core CPU, kept for later calls with the same weights),
            then ~1.15x faster on CPU; needs a C++ compiler.
        streams: CPU only: batches run by this many threads at once, torch's threads shared out among them
            (2 streams x 1 thread instead of 1 x 2: each convolution's thread team waits less for the
            slowest thread; same descriptors to float rounding). 0 (default) picks 2 when torch has 2 or
            more threads, else 1; 1 turns it off. Always 1 on GPU and with ``compile``.
        winograd: with ``fuse_activations``, a stream running on one torch thread (the default on a 2-core
            CPU) computes the ResNet blocks' 3x3 stride-1 convolutions with NNPACK's fast kernels (fewer
            multiplies; 1.15-2.6x faster per convolution, 1.10-1.13x end to end for token_r101 on the
            development CPU). The trunk's features then differ from oneDNN's by float32 rounding (relative
            ~1e-5; descriptors within cosine 0.99999). Off where NNPACK is missing or fails its check. With
            more threads than streams it is not used; ``streams`` equal to torch's thread count gets it on
            larger CPUs (not measured there; one batch in memory per stream).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        shard_size: images per shard file when writing to disk.
    """

    max_size: int | None = 1024
    scales: tuple[float, ...] = RELEASE_SCALES
    batch_size: int = 8
    num_workers: int = 2
    amp: str = "off"
    channels_last: bool = True
    fold_batchnorm: bool = True
    fuse_activations: bool = True
    compile: bool = False
    streams: int = 0
    winograd: bool = True
    device: str | None = None
    shard_size: int = 1000

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        check_streams(self.streams)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_streams(self, device: torch.device) -> int:
        """Concurrent forward passes: 1 with ``compile``, else :func:`resolve_streams`."""
        return 1 if self.compile else resolve_streams(self.streams, device)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change descriptors (not batch size, workers, device, shard size)."""
        return {"max_size": self.max_size, "scales": [round(s, 6) for s in self.scales], "amp": self.amp}


def resolve_device(device: str | None) -> torch.device:
    """The given device, else ``$TOKENRET_DEVICE`` (e.g. "cpu" to keep a GPU machine's GPU free), else this
    process's GPU under torchrun, else cuda when available, else cpu."""
    device = device or os.environ.get("TOKENRET_DEVICE") or None
    if device:
        return torch.device(device)
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_streams(streams: int) -> None:
    """The ``streams`` setting is 0 (automatic) or a positive count."""
    if streams < 0:
        raise ValueError(f"streams must be 0 (automatic) or a positive count, got {streams}")


def resolve_streams(streams: int, device: torch.device) -> int:
    """Concurrent forward passes on ``device``: 1 off the CPU; ``streams`` if set; else 2 when torch has 2 or
    more threads (measured: 2 streams x 1 thread beat 1 x 2 threads on a 2-core CPU), else 1."""
    check_streams(streams)
    if device.type != "cpu":
        return 1
    if streams:
        return streams
    return 2 if torch.get_num_threads() >= 2 else 1


class ExtractionError(RuntimeError):
    """Some images could not be read; ``failures`` maps image index -> (path, reason)."""

    def __init__(self, failures: dict[int, tuple[str, str]]) -> None:
        self.failures = failures
        lines = [f"  {path}: {reason}" for path, reason in list(failures.values())[:20]]
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        super().__init__(f"{len(failures)} image(s) could not be read:\n" + "\n".join(lines) + more)


@dataclass
class ExtractionResult:
    descriptors: np.ndarray  # (n, D) float32; rows of failed images are NaN
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's architecture arguments and every weight (identifies cached descriptors)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [getattr(model, "model_name", type(model).__name__), getattr(model, "model_kwargs", {})],
            sort_keys=True,
            default=str,
        ).encode()
    )
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def multiscale_descriptor(model: nn.Module, images: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, D) L2-normalised mean of per-scale descriptors (float32).

    The mean is plain (Token's release, and every model by default). A model with a ``multiscale_power``
    attribute p != 1 (cirtorch's GeM networks without a whitening layer) gets cirtorch's generalised mean
    over more than one scale instead: (mean of d_s^p)^(1/p), then L2-normalised.
    """
    msp = float(getattr(model, "multiscale_power", 1.0)) if len(scales) > 1 else 1.0
    total = None
    for s in scales:
        x = (
            images
            if s == 1.0
            else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        )
        if images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        d = F.normalize(model(x).float(), dim=-1)
        if msp != 1.0:
            d = d.pow(msp)
        total = d if total is None else total + d
    total = total / len(scales)
    return F.normalize(total.pow(1.0 / msp) if msp != 1.0 else total, dim=-1)


class ImageList(Dataset):
    """Loads (and for queries crops) images; a failure is returned, not raised, so the loop can record it."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        boxes: Sequence[Box | None] | None,
        max_size: int | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.paths = [str(p) for p in paths]
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        if len(self.boxes) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.boxes)} boxes")
        self.max_size = max_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.paths[i], self.max_size, self.boxes[i])
            return i, to_tensor(image, self.mean, self.std), None
        except ImageLoadError as e:
            return i, None, str(e.reason) if hasattr(e, "reason") else str(e)


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: cannot tell
        return True


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a GPU (fp16 compute is very slow on CPUs); use amp='bf16'")
    if amp == "bf16" and device.type == "cpu" and not _cpu_has_native_bf16():
        log.warning(
            "this CPU has no native bfloat16 (avx512_bf16): bf16 autocast will be far slower than fp32"
        )
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _batches(loader: DataLoader, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor | None, list]]:
    """Group loaded images of equal size into batches; failures pass through one by one."""
    buckets: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, tensor, error in loader:
        if tensor is None:
            yield [i], None, [error]
            continue
        bucket = buckets.setdefault(tuple(tensor.shape), [])
        bucket.append((i, tensor))
        if len(bucket) >= batch_size:
            del buckets[tuple(tensor.shape)]
            yield [j for j, _ in bucket], torch.stack([t for _, t in bucket]), []
    for bucket in buckets.values():
        yield [j for j, _ in bucket], torch.stack([t for _, t in bucket]), []


def _collate_one(item):
    return item


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _extract_range(
    model: nn.Module,
    dataset: ImageList,
    indices: Sequence[int],
    config: ExtractionConfig,
    device: torch.device,
    dim: int,
    bar: tqdm,
) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    out = np.full((len(indices), dim), np.nan, dtype=np.float32)
    failures: dict[int, tuple[str, str]] = {}
    where = {idx: row for row, idx in enumerate(indices)}
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(
        subset,
        batch_size=None,
        num_workers=config.num_workers if len(indices) > 1 else 0,
        collate_fn=_collate_one,
        pin_memory=device.type == "cuda",
    )
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    streams = min(config.resolved_streams(device), len(indices))
    # several streams need several batches: no batch larger than an even share of the range
    batch_size = min(config.batch_size, max(1, math.ceil(len(indices) / streams)))

    def run(item: tuple[list[int], torch.Tensor | None, list]) -> None:
        idxs, batch, errors = item
        if batch is None:
            failures[idxs[0]] = (dataset.paths[idxs[0]], errors[0])
        else:
            x = batch.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with _autocast(device, config.amp):
                d = multiscale_descriptor(model, x, config.scales)
            out[[where[i] for i in idxs]] = d.cpu().numpy()
        bar.update(len(idxs))

    run_streams(_batches(loader, batch_size), run, streams)
    return out, failures


def run_streams(items: Iterator, fn: Callable[[Any], None], streams: int) -> None:
    """``fn(item)`` for every item under inference mode, by ``streams`` threads that share torch's threads.

    Each thread takes the next item when it is free; the first exception stops the others (after their
    current item) and is raised here, as is a KeyboardInterrupt, once every thread has stopped. torch's
    thread count is restored afterwards."""
    if streams <= 1:
        with torch.inference_mode():
            for item in items:
                fn(item)
        return
    total = torch.get_num_threads()
    shares = [total // streams + (k < total % streams) for k in range(streams)]
    lock, stop = threading.Lock(), threading.Event()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        # torch sets a new thread's OpenMP team from the last process-wide setting on its first parallel op:
        # trigger that first, then give this thread its share (a per-thread setting from then on)
        torch.get_num_threads()
        torch.set_num_threads(max(1, shares[k]))
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    with lock:
                        item = next(items, _END)
                    if item is _END:
                        return
                    fn(item)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=worker, args=(k,), name=f"tokenret-{k}") for k in range(streams)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()  # an interrupt in join: the others finish their current item and stop
        for t in threads:
            if t.is_alive():
                t.join()
        torch.set_num_threads(total)
    if errors:
        raise errors[0]


_END = object()


class LastCopy:
    """The last inference copy made from a model, kept with a weak reference to that model and a key (its
    weights' state and the settings the copy depends on): consecutive extractions with the same model and
    weights (database then queries, every query of a server) reuse it instead of copying (~0.4 s for
    ResNet-101) or compiling (a minute) again."""

    def __init__(self) -> None:
        self._made_from: Any = None
        self._key: Any = None
        self._network: nn.Module | None = None

    def get(self, model: nn.Module, key: Any) -> nn.Module | None:
        made_from = self._made_from() if self._made_from is not None else None
        return self._network if made_from is model and self._key == key else None

    def put(self, model: nn.Module, key: Any, network: nn.Module) -> nn.Module:
        """Keep ``network`` (a copy of ``model``; ``model`` itself is not kept: nothing to reuse)."""
        self._made_from, self._key, self._network = None, None, None
        if network is not model:
            self._made_from, self._key, self._network = weakref.ref(model), key, network
        return network


#: The global-descriptor network (folded, fused and/or compiled) of :func:`inference_network`.
_CACHE = LastCopy()


def _weights_state(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (optimizer steps included)."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code is C++ built on the fly: fail before any work when no compiler is found."""
    if device.type != "cpu" or os.environ.get("CXX"):
        return
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError(
            "compile=True (--compile) on CPU needs a C++ compiler: torch.compile builds its kernels with "
            "it, and none was found (g++, c++ or clang++ on PATH, or $CXX). Install one (e.g. apt install "
            "g++) or run without --compile (descriptors are the same, about 1.15x slower)."
        )


def inference_network(model: nn.Module, config: ExtractionConfig) -> nn.Module:
    """What the forward passes run: ``model`` itself, or a copy with folded BatchNorms, channels_last and an
    optionally compiled trunk. The caller's model is never modified (apart from ``.to(device)``)."""
    device = next(model.parameters(), torch.empty(0)).device
    # oneDNN post-op fusion: CPU float32 eager only (autocast would not reach the fused ops; inductor fuses
    # on its own), on the folded copy (never the caller's model)
    fuse = (
        config.fuse_activations
        and config.fold_batchnorm
        and device.type == "cpu"
        and config.amp == "off"
        and not config.compile
    )
    winograd = fuse and config.winograd
    key = (_weights_state(model), config.fold_batchnorm, config.channels_last, config.compile, fuse, winograd)
    cached = _CACHE.get(model, key)
    if cached is not None:
        return cached
    network = fold_batchnorm(model) if config.fold_batchnorm else model
    if fuse:
        fuse_activations(network, winograd=winograd)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if config.compile:
        _check_compiler(device)
        if network is model:
            network = copy.deepcopy(model)
        trunk = getattr(network, "backbone", None)
        # "freezing": the weights are constants of the compiled graph (the copy is for inference only), so
        # inductor pre-packs them for oneDNN's convolutions: 1.16x on token_r101's trunk on a 2-vCPU Zen 4,
        # where compiling without it gained nothing (bench/README.md "extract")
        options = {"freezing": True}
        if isinstance(trunk, nn.Module):
            network.backbone = torch.compile(trunk, dynamic=True, options=options)
        else:
            network = torch.compile(network, dynamic=True, options=options)
    return _CACHE.put(model, key, network)


def extract_descriptors(
    model: nn.Module,
    paths: Sequence[str | Path],
    boxes: Sequence[Box | None] | None = None,
    config: ExtractionConfig | None = None,
    out_dir: str | Path | None = None,
    on_error: str = "raise",
    progress: bool = True,
    desc: str = "extract",
) -> ExtractionResult:
    """Multi-scale global descriptors of images, optionally sharded on disk and resumable.

    Args:
        model: a retrieval model mapping (B, 3, H, W) to L2-normalised (B, D).
        paths: image files.
        boxes: per image None or a query box (x1, y1, x2, y2) to crop before resizing.
        config: extraction settings (scales, max_size, AMP, ...).
        out_dir: shard directory; finished shards are reused when the manifest matches.
        on_error: "raise" (after every readable image is done, raise ExtractionError listing the unreadable
            ones) or "record" (return them in ``failures``, their rows NaN).
        progress: show a progress bar (rank 0 only under torchrun).

    Returns:
        ExtractionResult with descriptors (n, D) float32 and the failures.
    """
    config = config or ExtractionConfig()
    if on_error not in ("raise", "record"):
        raise ValueError("on_error must be 'raise' or 'record'")
    device = config.resolved_device()
    model = model.eval().to(device)
    # the descriptors are identified by the model as given; the forward passes may use a folded copy
    network = inference_network(model, config)
    dim = int(model.descriptor_dim)
    dataset = ImageList(paths, boxes, config.max_size)
    n = len(dataset)

    def extract_range(indices: Sequence[int], bar: tqdm):
        return _extract_range(network, dataset, indices, config, device, dim, bar)

    if out_dir is None:
        return _finish(ExtractionResult(*extract_unsharded(n, extract_range, progress, desc)), on_error)
    store = ShardStore(Path(out_dir), n, config.shard_size)
    manifest = {
        "n": n,
        "dim": dim,
        "shard_size": config.shard_size,
        "extraction": config.fingerprint(),
        "model": model_fingerprint(model),
        "images": _list_fingerprint(dataset),
    }
    store.fill(manifest, extract_range, progress=progress, desc=desc)
    return _finish(store.read_all(dim), on_error)


def extract_unsharded(
    n: int, extract_range: Callable[[Sequence[int], tqdm], tuple[Any, dict]], progress: bool, desc: str
) -> tuple[Any, dict]:
    """All ``n`` images in this process, without shards (refused under torchrun: nothing to merge through)."""
    if _dist_info()[1] > 1:
        raise ValueError("distributed extraction needs out_dir (shards are merged through the file system)")
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        return extract_range(range(n), bar)


def _finish(result: ExtractionResult, on_error: str) -> ExtractionResult:
    if result.failures and on_error == "raise":
        raise ExtractionError(result.failures)
    return result


def _list_fingerprint(dataset: ImageList) -> str:
    h = hashlib.sha256()
    for p, b in zip(dataset.paths, dataset.boxes, strict=True):
        h.update(f"{p}\t{b}\n".encode())
    return h.hexdigest()


class ShardStore:
    """Descriptor shards in a directory: ``manifest.json``, ``shard_XXXXX.npy`` and its failures JSON.

    A shard exists only once completely written (temporary file, then rename), so an interruption loses at
    most the shard in progress.
    """

    def __init__(self, root: Path, n: int, shard_size: int) -> None:
        self.root, self.n, self.shard_size = root, n, max(1, int(shard_size))
        self.n_shards = max(1, math.ceil(n / self.shard_size)) if n else 0

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min(self.n, (s + 1) * self.shard_size))

    def _npy(self, s: int) -> Path:
        return self.root / f"shard_{s:05d}.npy"

    def _failures(self, s: int) -> Path:
        return self.root / f"shard_{s:05d}.failures.json"

    def open(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != manifest:
                changed = sorted(k for k in manifest if old.get(k) != manifest[k])
                log.warning("%s holds descriptors made differently (%s); starting afresh", self.root, changed)
                for f in self.root.glob("shard_*"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
        _atomic_write_text(path, json.dumps(manifest, indent=1))

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        on_disk = json.loads((self.root / "manifest.json").read_text())
        if on_disk != manifest:
            raise RuntimeError(f"{self.root}: processes disagree on what to extract (different image lists?)")

    def is_done(self, s: int) -> bool:
        return self._npy(s).exists()

    def fill(
        self,
        manifest: dict[str, Any],
        extract_range: Callable[[Sequence[int], tqdm], tuple[Any, dict]],
        *,
        progress: bool,
        desc: str,
    ) -> None:
        """Extract and write every unfinished shard of this process. Rank 0 records the manifest (clearing
        shards made differently); under torchrun each process takes every world_size-th shard, and all wait
        for the others at the end, so that each can then read every shard."""
        rank, world = _dist_info()
        if rank == 0:
            self.open(manifest)
        if world > 1:
            dist.barrier()
            self.check_manifest(manifest)
        mine = [s for s in range(self.n_shards) if s % world == rank]
        todo = [s for s in mine if not self.is_done(s)]
        total = sum(len(self.shard_range(s)) for s in mine)
        done = total - sum(len(self.shard_range(s)) for s in todo)
        with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress or rank != 0) as bar:
            for s in todo:
                self.write(s, *extract_range(self.shard_range(s), bar))
        if world > 1:
            dist.barrier()

    def write_failures(self, s: int, failures: dict[int, tuple[str, str]]) -> None:
        _atomic_write_text(self._failures(s), json.dumps({str(k): list(v) for k, v in failures.items()}))

    def read_failures(self) -> dict[int, tuple[str, str]]:
        """Unreadable images of every shard: image index -> (path, reason)."""
        failures: dict[int, tuple[str, str]] = {}
        for s in range(self.n_shards):
            if self._failures(s).exists():
                for k, v in json.loads(self._failures(s).read_text()).items():
                    failures[int(k)] = (v[0], v[1])
        return failures

    def write(self, s: int, arr: np.ndarray, failures: dict[int, tuple[str, str]]) -> None:
        self.write_failures(s, failures)
        tmp = self._npy(s).with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, self._npy(s))

    def read_all(self, dim: int) -> ExtractionResult:
        out = np.empty((self.n, dim), dtype=np.float32)
        for s in range(self.n_shards):
            r = self.shard_range(s)
            out[r.start : r.stop] = np.load(self._npy(s))
        return ExtractionResult(out, self.read_failures())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = [
    "ExtractionConfig",
    "ExtractionError",
    "ExtractionResult",
    "ImageList",
    "RELEASE_SCALES",
    "ShardStore",
    "asdict",
    "extract_descriptors",
    "extract_unsharded",
    "inference_network",
    "model_fingerprint",
    "multiscale_descriptor",
]
