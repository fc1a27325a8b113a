"""Descriptor extraction: the engine under evaluation, indexing and every other command.

Images are loaded by DataLoader workers (robust loading, resize, query crop), grouped into batches of
equal size, run at several scales and combined. Each model's input convention
(:mod:`tokenret.models.convention`) says how: channel order and mean/std, how query boxes are cut, how a
scale is resized and how the scales combine. Token and the cirtorch baselines (the release's protocol):
RGB, each scale by ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` on the
normalised tensor, the scales' L2-normalised descriptors summed, divided by their number and
L2-normalised again. SuperGlobal: BGR, torchvision's tensor resize, sGeM. :meth:`ExtractionConfig.for_model`
takes the image size and scales from the model too.

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

import copy
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tokenret.extraction.image_list import (
    Box,
    ExtractionError,
    ImageList,
    collate_one,
    equal_size_batches,
    list_fingerprint,
)
from tokenret.extraction.multiscale import multiscale_descriptor
from tokenret.extraction.network import LastCopy, check_compiler, weights_state
from tokenret.extraction.onnx_engine import ENGINES, onnx_network
from tokenret.extraction.shards import ShardStore, extract_unsharded
from tokenret.extraction.streams import autocast, check_streams, resolve_device, resolve_streams, run_streams
from tokenret.models.convention import CIRTORCH_SCALES, InputConvention, input_convention, parse_scale_pool
from tokenret.models.fuse import fold_batchnorm, fuse_activations

log = logging.getLogger(__name__)

#: The release's test scales.
RELEASE_SCALES = CIRTORCH_SCALES

__all__ = [
    "RELEASE_SCALES",
    "ExtractionConfig",
    "ExtractionResult",
    "extract_descriptors",
    "inference_network",
    "model_fingerprint",
    "multiscale_descriptor",
]


@dataclass
class ExtractionConfig:
    """How descriptors are computed. Everything that changes a descriptor is part of its fingerprint.

    Args:
        max_size: longest image side after loading (never enlarged); queries keep their scale in the image.
        scales: multi-scale factors applied to the loaded image.
        batch_size: images of equal size run together (results equal one-by-one in eval mode).
        num_workers: DataLoader processes that decode images.
        amp: "off", "bf16" (CPU or GPU) or "fp16" (GPU only) autocast for the forward pass.
        channels_last: NHWC memory format, the layout oneDNN's and cuDNN's fastest convolution kernels read
            directly (no reorder per layer).
        fold_batchnorm: run an inference copy with BatchNorms folded into the convolutions (same
            descriptors to float rounding; one pass over each feature map less per BatchNorm, see
            ``tokenret.models.fuse``).
        fuse_activations: on CPU in float32 (amp "off"), also run each ReLU (SuperGlobal's ReLU+ too) and
            residual add of the folded copy as a post-op of the oneDNN convolution before it (same results;
            those feature maps are not read and written once more).
        compile: also ``torch.compile`` the copy's trunk (dynamic shapes, weights frozen into the graph so
            inductor pre-packs them): a one-off compilation, kept for later calls with the same weights,
            that pays off only over many images; needs a C++ compiler (measured: bench/README.md,
            "extract").
        streams: CPU only: batches run by this many threads at once, torch's threads shared out among them
            (2 streams x 1 thread instead of 1 x 2: each convolution's thread team waits less for the
            slowest thread; same descriptors to float rounding). 0 (default) picks 2 when torch has 2 or
            more threads, else 1; 1 turns it off. Always 1 on GPU and with ``compile``. A stream that finds
            no batch left hands its threads to a busy one, which uses them from its next scale on.
        winograd: with ``fuse_activations``, a stream running on one torch thread (the default on a 2-core
            CPU) computes the ResNet blocks' 3x3 stride-1 convolutions with NNPACK's fast kernels (fewer
            multiplies than oneDNN's direct convolution; measured: bench/README.md, "extract"). The
            trunk's features then differ from oneDNN's by float32 rounding (relative
            ~1e-5; descriptors within cosine 0.99999). Off where NNPACK is missing or fails its check. With
            more threads than streams it is not used; ``streams`` equal to torch's thread count gets it on
            larger CPUs (not measured there; one batch in memory per stream).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        shard_size: images per shard file when writing to disk.
        scale_pool: how the scales combine (:data:`~tokenret.models.convention.SCALE_POOLS`); "model"
            (default): the model's own (mean for Token, the generalised mean of cirtorch's GeM networks,
            sGeM for SuperGlobal).
        engine: what runs the forward passes: "torch" (default), or "onnxruntime", the model's exported
            descriptor network in ONNX Runtime (``tokenret.extraction.onnx_engine``; exported once per
            weights into ``$TOKENRET_HOME/onnx``; float32 only, no ``compile``; the same descriptors to the
            export's parity bound, max abs difference 1e-4). Part of the fingerprint when not "torch", so
            that the two engines' descriptors are cached apart.

    ``max_size`` and ``scales`` default to the Token release's; :meth:`for_model` takes them from a model's
    input convention instead (what ``extract_descriptors(model, paths)`` does without a config, and the
    command line without ``--max-size`` / ``--scales``).
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
    scale_pool: str = "model"
    engine: str = "torch"

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        if self.scale_pool != "model":
            parse_scale_pool(self.scale_pool)
        check_streams(self.streams)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "onnxruntime" and (self.amp != "off" or self.compile):
            raise ValueError(
                "the onnxruntime engine runs the exported float32 graph: leave out --amp/--compile"
            )

    @classmethod
    def for_model(cls, model: nn.Module, **settings: Any) -> ExtractionConfig:
        """The settings of ``model``'s input convention (image size, scales), with ``settings`` on top.

        Example:
            >>> model = create_model("superglobal_r101")                         # doctest: +SKIP
            >>> config = ExtractionConfig.for_model(model, batch_size=1)         # doctest: +SKIP
            >>> config.max_size, config.scales                                   # doctest: +SKIP
            (None, (0.7071, 1.0, 1.4142))
        """
        conv = input_convention(model)
        return cls(**{"max_size": conv.max_size, "scales": conv.scales, **settings})

    @classmethod
    def from_fingerprint(cls, fingerprint: dict[str, Any], **runtime: Any) -> ExtractionConfig:
        """The config whose :meth:`fingerprint` is ``fingerprint``, with run-time settings added."""
        known = {"max_size", "scales", "amp", "scale_pool", "engine"}
        unknown = set(fingerprint) - known
        if unknown:
            raise ValueError(f"extraction settings {sorted(unknown)} are unknown to this tokenret")
        given = {k: v for k, v in fingerprint.items() if k in known}
        if "scales" in given:
            given["scales"] = tuple(given["scales"])
        # a run-time engine of None: the recorded one (an engine other than the recorded one makes a config
        # whose fingerprint differs, refused where descriptors are compared)
        runtime = {k: v for k, v in runtime.items() if not (k == "engine" and v is None)}
        return cls(**{**given, **runtime})

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_streams(self, device: torch.device) -> int:
        """Concurrent forward passes: 1 with ``compile`` or the onnxruntime engine (whose own thread pool
        takes the cores), else :func:`resolve_streams`."""
        return 1 if self.compile or self.engine != "torch" else resolve_streams(self.streams, device)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change descriptors (not batch size, workers, device, shard size).

        ``scale_pool`` appears only when it is not the model's own, and ``engine`` only when it is not
        "torch", so that fingerprints recorded before they existed still match. (The model's convention
        is part of the model, fingerprinted with it.)
        """
        out: dict[str, Any] = {
            "max_size": self.max_size,
            "scales": [round(s, 6) for s in self.scales],
            "amp": self.amp,
        }
        if self.scale_pool != "model":
            out["scale_pool"] = self.scale_pool
        if self.engine != "torch":
            out["engine"] = self.engine
        return out


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


def _extract_range(
    model: nn.Module,
    dataset: ImageList,
    indices: Sequence[int],
    config: ExtractionConfig,
    device: torch.device,
    dim: int,
    bar: tqdm,
    convention: InputConvention,
) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    out = np.full((len(indices), dim), np.nan, dtype=np.float32)
    failures: dict[int, tuple[str, str]] = {}
    where = {idx: row for row, idx in enumerate(indices)}
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(
        subset,
        batch_size=None,
        num_workers=config.num_workers if len(indices) > 1 else 0,
        collate_fn=collate_one,
        pin_memory=device.type == "cuda",
    )
    # ONNX Runtime reads NCHW arrays: channels_last would only add a copy per scale
    fmt = (
        torch.channels_last if config.channels_last and config.engine == "torch" else torch.contiguous_format
    )
    streams = min(config.resolved_streams(device), len(indices))
    # several streams need several batches: no batch larger than an even share of the range
    batch_size = min(config.batch_size, max(1, math.ceil(len(indices) / streams)))

    def run(item: tuple[list[int], torch.Tensor | None, list]) -> None:
        idxs, batch, errors = item
        if batch is None:
            failures[idxs[0]] = (dataset.paths[idxs[0]], errors[0])
        else:
            x = batch.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast(device, config.amp):
                d = multiscale_descriptor(model, x, config.scales, config.scale_pool, convention)
            out[[where[i] for i in idxs]] = d.cpu().numpy()
        bar.update(len(idxs))

    run_streams(equal_size_batches(loader, batch_size), run, streams)
    return out, failures


#: The global-descriptor network (folded, fused and/or compiled) of :func:`inference_network`.
_CACHE = LastCopy()


def inference_network(model: nn.Module, config: ExtractionConfig) -> nn.Module:
    """What the forward passes run: ``model`` itself, or a copy with folded BatchNorms, channels_last and an
    optionally compiled trunk, or with the onnxruntime engine its exported network in ONNX Runtime. The
    caller's model is never modified (apart from ``.to(device)``)."""
    device = next(model.parameters(), torch.empty(0)).device
    if config.engine == "onnxruntime":
        key = (weights_state(model), "onnxruntime", str(device))
        cached = _CACHE.get(model, key)
        if cached is None:
            cached = _CACHE.put(model, key, onnx_network(model, model_fingerprint(model), device))
        return cached
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
    key = (weights_state(model), config.fold_batchnorm, config.channels_last, config.compile, fuse, winograd)
    cached = _CACHE.get(model, key)
    if cached is not None:
        return cached
    network = fold_batchnorm(model) if config.fold_batchnorm else model
    if fuse:
        fuse_activations(network, winograd=winograd)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if config.compile:
        check_compiler(device)
        if network is model:
            network = copy.deepcopy(model)
        trunk = getattr(network, "backbone", None)
        # "freezing": the weights are constants of the compiled graph (the copy is for inference only), so
        # inductor pre-packs them for oneDNN's convolutions; compiling without it gained nothing on the
        # trunk (bench/README.md, "extract")
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
    bar: tqdm | None = None,
) -> ExtractionResult:
    """Multi-scale global descriptors of images, optionally sharded on disk and resumable.

    Args:
        model: a retrieval model mapping (B, 3, H, W) to L2-normalised (B, D).
        paths: image files.
        boxes: per image None or a query box (x1, y1, x2, y2) to crop before resizing.
        config: extraction settings (scales, max_size, AMP, ...); None: ``ExtractionConfig.for_model(model)``.
        out_dir: shard directory; finished shards are reused when the manifest matches.
        on_error: "raise" (after every readable image is done, raise ExtractionError listing the unreadable
            ones) or "record" (return them in ``failures``, their rows NaN).
        progress: show a progress bar (rank 0 only under torchrun).
        bar: without ``out_dir``, a progress bar to advance batch by batch instead of a new one (a caller's,
            over several calls: the folder index's commits).

    Returns:
        ExtractionResult with descriptors (n, D) float32 and the failures.
    """
    config = config or ExtractionConfig.for_model(model)
    if on_error not in ("raise", "record"):
        raise ValueError("on_error must be 'raise' or 'record'")
    device = config.resolved_device()
    model = model.eval().to(device)
    # the descriptors are identified by the model as given; the forward passes may use a folded copy
    network = inference_network(model, config)
    dim = int(model.descriptor_dim)
    convention = input_convention(model)
    dataset = ImageList.for_convention(paths, boxes, config.max_size, convention)
    n = len(dataset)

    def extract_range(indices: Sequence[int], bar: tqdm):
        return _extract_range(network, dataset, indices, config, device, dim, bar, convention)

    if out_dir is None:
        return _finish(ExtractionResult(*extract_unsharded(n, extract_range, progress, desc, bar)), on_error)
    store = ShardStore(Path(out_dir), n, config.shard_size)
    manifest = {
        "n": n,
        "dim": dim,
        "shard_size": config.shard_size,
        "extraction": config.fingerprint(),
        "model": model_fingerprint(model),
        "images": list_fingerprint(dataset),
    }
    store.fill(manifest, extract_range, progress=progress, desc=desc)
    return _finish(ExtractionResult(*store.read_all(dim)), on_error)


def _finish(result: ExtractionResult, on_error: str) -> ExtractionResult:
    if result.failures and on_error == "raise":
        raise ExtractionError(result.failures)
    return result
