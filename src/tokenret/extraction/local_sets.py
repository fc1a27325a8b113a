"""Local descriptor sets of many images: extracted once, stored in shards, reused by every aggregator.

The engine for local features, beside :mod:`tokenret.extraction.descriptors` for global descriptors,
sharing its image loading (robust decoding, resize to ``max_size``, query-box crop): each image goes through
the model's ``extract_local`` (HOW, DELF: a multi-scale pyramid and the top-N strongest features) and its
set is written, with the attention strengths, into shard stores (:class:`LocalDescriptorStore`) beside a
manifest. An interrupted run resumes without recomputing finished shards; under ``torchrun`` each process
takes every world_size-th shard. Unreadable images keep their place as empty sets and are reported.

Example:
    >>> model = create_local_model("how_r50", checkpoint="how_r50-.pth")                  # doctest: +SKIP
    >>> sets = extract_local_sets(model, ["a.jpg", "b.jpg"], out_dir="cache/db").store   # doctest: +SKIP
    >>> sets.get(0).shape                                                                # doctest: +SKIP
    (1000, 128)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tokenret.data.images import IMAGENET_MEAN, IMAGENET_STD
from tokenret.data.local_store import STORE_DTYPES, LocalDescriptorStore
from tokenret.extraction.descriptors import model_fingerprint
from tokenret.extraction.image_list import Box, ExtractionError, ImageList, collate_one, list_fingerprint
from tokenret.extraction.network import LastCopy, weights_state
from tokenret.extraction.shards import (
    ShardStore,
    atomic_write_text,
    extract_unsharded,
    failures_json,
    read_failures_json,
)
from tokenret.extraction.streams import check_streams, resolve_device, resolve_streams, run_streams
from tokenret.models.fuse import fold_batchnorm, fuse_activations

log = logging.getLogger(__name__)

#: Model run-time settings that change which features an image gives, so cached sets depend on them.
SELECTION_RUNTIME_KEYS = ("score_threshold",)


@dataclass
class LocalExtractionConfig:
    """How descriptor sets are computed; unset fields take the model's own test-time defaults.

    Args:
        max_size: longest image side after loading (HOW and DELG use 1024).
        scales: image pyramid (None: the model's, e.g. HOW's 2 ... 0.25).
        topk: strongest features kept per image over all scales (None: the model's, 1000).
        num_workers: image decoding processes.
        streams: CPU only: images run by this many threads at once, sharing torch's threads (0: 2 when
            torch has 2 or more threads; 1: off), as in :class:`tokenret.extraction.ExtractionConfig`.
        device: "cpu", "cuda", ... (default: cuda when available).
        shard_size: images per shard.
        dtype: how the sets are kept: "float16" (half the space) or "float32" (the extractor's own
            values: published ASMK numbers to the last decimal; a float16 rounding can flip the sign bit
            of a near-zero residual sum).
        fast_trunk: on CPU, run the model's trunk (``model.features``) as an inference copy: BatchNorms
            folded, ReLUs and residual adds fused into oneDNN's convolutions, channels_last, and NNPACK's
            3x3 convolutions in one-thread streams (as :func:`tokenret.extraction.inference_network` does for
            global descriptors), for the same gains as there (measured: bench/README.md,
            "extract_local"). The same features are selected and their values agree to
            float rounding (relative ~1e-6). None (default): on, except with ``dtype="float32"``, which
            asks for the extractor's own values.
    """

    max_size: int | None = 1024
    scales: tuple[float, ...] | None = None
    topk: int | None = None
    num_workers: int = 2
    streams: int = 0
    device: str | None = None
    shard_size: int = 500
    dtype: str = "float16"
    fast_trunk: bool | None = None

    def __post_init__(self) -> None:
        if self.scales is not None:
            self.scales = tuple(float(s) for s in self.scales)
            if not self.scales or any(s <= 0 for s in self.scales):
                raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.topk is not None and int(self.topk) < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        check_streams(self.streams)
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")

    def resolved(self, model: nn.Module) -> tuple[tuple[float, ...], int]:
        runtime = getattr(model, "runtime", {})
        scales = self.scales if self.scales is not None else tuple(runtime.get("scales", (1.0,)))
        topk = int(self.topk if self.topk is not None else runtime.get("features_num", 1000))
        return tuple(float(s) for s in scales), topk

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        """The settings that change the sets (not workers, device or shard size)."""
        scales, topk = self.resolved(model)
        mean, std = normalisation(model)
        fingerprint = {
            "max_size": self.max_size,
            "scales": [round(s, 6) for s in scales],
            "topk": topk,
            "mean_std": [[round(v, 6) for v in mean], [round(v, 6) for v in std]],
        }
        # run-time settings of the model that select features (DELF's attention threshold): the weights'
        # hash does not see them
        runtime = getattr(model, "runtime", {})
        for key in SELECTION_RUNTIME_KEYS:
            if runtime.get(key) is not None:
                fingerprint[key] = round(float(runtime[key]), 6)
        if self.dtype != "float16":  # (float16 sets, the default, were cached before the option existed)
            fingerprint["dtype"] = self.dtype
        return fingerprint

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def uses_fast_trunk(self) -> bool:
        return self.dtype != "float32" if self.fast_trunk is None else bool(self.fast_trunk)


#: The fast copy of :func:`local_inference_model`.
_FAST_CACHE = LastCopy()


class ChannelsLastTrunk(nn.Module):
    """A trunk run in channels_last; takes and returns default-format tensors (the rest of the model is
    written for them)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.contiguous(memory_format=torch.channels_last)).contiguous()


def local_inference_model(model: nn.Module, config: LocalExtractionConfig, device: torch.device) -> nn.Module:
    """What extraction runs: ``model`` itself, or (CPU, ``config.uses_fast_trunk()``, a model whose trunk is
    an ``nn.Sequential`` called ``features``, as HOW's and DELF's are) a copy with a folded, fused,
    channels_last trunk. The caller's model is never modified."""
    trunk = getattr(model, "features", None)
    if device.type != "cpu" or not config.uses_fast_trunk() or type(trunk) is not nn.Sequential:
        return model
    # the last copy is reused while the model and its weights (and run-time settings) are unchanged: one
    # query at a time (search, serve) does not pay a copy each
    key = (weights_state(model), repr(getattr(model, "runtime", None)))
    cached = _FAST_CACHE.get(model, key)
    if cached is not None:
        return cached
    fast_trunk = fold_batchnorm(trunk)
    fuse_activations(fast_trunk, winograd=True)
    fast = copy.deepcopy(model, memo={id(trunk): trunk})  # the trunk is not copied twice: it is replaced
    fast.features = ChannelsLastTrunk(fast_trunk)
    return _FAST_CACHE.put(model, key, fast.eval())


@dataclass
class LocalExtractionResult:
    store: LocalDescriptorStore  # one set per image, strengths = attention; failed images hold empty sets
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a local model expects its input normalised with (``runtime['mean_std']``)."""
    mean_std = getattr(model, "runtime", {}).get("mean_std")
    if not mean_std:
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    mean, std = mean_std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _check_model(model: nn.Module) -> int:
    if not callable(getattr(model, "extract_local", None)):
        raise TypeError(
            f"{type(model).__name__} is not a local-feature model (no extract_local); "
            "build one with tokenret.models.local.create_local_model"
        )
    return int(model.output_dim)


def _extract_range(
    model: nn.Module,
    dataset: ImageList,
    indices: Sequence[int],
    config: LocalExtractionConfig,
    device: torch.device,
    bar: tqdm,
) -> tuple[LocalDescriptorStore, dict[int, tuple[str, str]]]:
    dim = int(model.output_dim)
    scales, topk = config.resolved(model)
    sets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    failures: dict[int, tuple[str, str]] = {}
    loader = DataLoader(
        torch.utils.data.Subset(dataset, list(indices)),
        batch_size=None,
        num_workers=config.num_workers if len(indices) > 1 else 0,
        collate_fn=collate_one,
    )

    def run(item: tuple[int, torch.Tensor | None, str | None]) -> None:
        i, tensor, error = item
        if tensor is None:
            failures[i] = (dataset.paths[i], error)
        else:
            out = model.extract_local(tensor.to(device), scales, topk)
            sets[i] = (out["descriptors"].float().cpu().numpy(), out["attention"].float().cpu().numpy())
        bar.update(1)

    run_streams(iter(loader), run, min(resolve_streams(config.streams, device), len(indices)))
    store = LocalDescriptorStore(dim, with_strengths=True, dtype=config.dtype)
    empty = (np.empty((0, dim), np.float32), np.empty(0, np.float32))
    for i in indices:
        desc, att = sets.get(i, empty)
        store.add(desc, att)
    return store, failures


def extract_local_sets(
    model: nn.Module,
    paths: Sequence[str | Path],
    boxes: Sequence[Box | None] | None = None,
    config: LocalExtractionConfig | None = None,
    out_dir: str | Path | None = None,
    on_error: str = "raise",
    progress: bool = True,
    desc: str = "local features",
) -> LocalExtractionResult:
    """Local descriptor sets of images, optionally sharded on disk and resumable.

    Args:
        model: a local-feature model (:func:`tokenret.models.local.create_local_model`).
        paths: image files; boxes: per image None or a query box (x1, y1, x2, y2) cropped before resizing.
        config: extraction settings.
        out_dir: shard directory; finished shards are reused when the manifest matches.
        on_error: "raise" (after every readable image is done, raise ExtractionError naming the unreadable
            ones) or "record" (return them in ``failures``; their sets are empty).

    Returns:
        LocalExtractionResult: the sets in input order (with attention strengths) and the failures.
    """
    config = config or LocalExtractionConfig()
    if on_error not in ("raise", "record"):
        raise ValueError("on_error must be 'raise' or 'record'")
    _check_model(model)
    device = config.resolved_device()
    model = model.eval().to(device)
    mean, std = normalisation(model)
    dataset = ImageList(paths, boxes, config.max_size, mean, std)
    n = len(dataset)
    # the sets are identified by the model as given (manifest below); the forward passes may use a copy
    network = local_inference_model(model, config, device)

    def extract_range(indices: Sequence[int], bar: tqdm):
        return _extract_range(network, dataset, indices, config, device, bar)

    if out_dir is None:
        return _finish(LocalExtractionResult(*extract_unsharded(n, extract_range, progress, desc)), on_error)
    shards = LocalShardStore(Path(out_dir), n, config.shard_size)
    manifest = {
        "n": n,
        "dim": int(model.output_dim),
        "shard_size": shards.shard_size,
        "extraction": config.fingerprint(model),
        "model": model_fingerprint(model),
        "images": list_fingerprint(dataset),
    }
    shards.fill(manifest, extract_range, progress=progress, desc=desc)
    return _finish(shards.read_all(), on_error)


def _finish(result: LocalExtractionResult, on_error: str) -> LocalExtractionResult:
    if result.failures and on_error == "raise":
        raise ExtractionError(result.failures)
    empty = int((result.store.lengths == 0).sum()) - len(result.failures)
    if empty > 0:
        log.warning(
            "%d of %d readable images gave no local feature (DELF keeps only scores >= its threshold; "
            "untrained attention scores ~0.7 against a default threshold of 100)",
            empty,
            len(result.store) - len(result.failures),
        )
    return result


class LocalShardStore(ShardStore):
    """Shards of descriptor sets: ``manifest.json``, ``shard_XXXXX/`` (a store) and its failures JSON.

    A shard directory appears only once completely written (written under a temporary name, then renamed),
    so an interruption loses at most the shard in progress.
    """

    def _dir(self, s: int) -> Path:
        return self.root / f"shard_{s:05d}"

    def is_done(self, s: int) -> bool:
        return (self._dir(s) / "store.json").is_file()

    def write(self, s: int, store: LocalDescriptorStore, failures: dict[int, tuple[str, str]]) -> None:
        self.write_failures(s, failures)
        tmp = self.root / f"{self._dir(s).name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        store.save(tmp)
        if self._dir(s).exists():
            shutil.rmtree(self._dir(s))
        os.replace(tmp, self._dir(s))

    def piece_done(self, path: Path) -> bool:
        return (path / "store.json").is_file()

    def write_piece(
        self, s: int, part: range, store: LocalDescriptorStore, failures: dict[int, tuple[str, str]]
    ) -> None:
        path = self._piece(s, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path.with_name(path.name + ".failures.json"), failures_json(failures))
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        store.save(tmp)
        os.replace(tmp, path)

    def read_piece(self, s: int, part: range) -> tuple[LocalDescriptorStore, dict[int, tuple[str, str]]]:
        path = self._piece(s, part)
        failures = read_failures_json(path.with_name(path.name + ".failures.json"))
        return LocalDescriptorStore.load(path, mmap=False), failures

    def merge(self, pieces: list[tuple[LocalDescriptorStore, dict]]) -> tuple[LocalDescriptorStore, dict]:
        return LocalDescriptorStore.concatenate([p[0] for p in pieces]), {
            k: v for p in pieces for k, v in p[1].items()
        }

    def read_all(self) -> LocalExtractionResult:
        stores = [LocalDescriptorStore.load(self._dir(s)) for s in range(self.n_shards)]
        if not stores:
            manifest = json.loads((self.root / "manifest.json").read_text())
            dtype = manifest.get("extraction", {}).get("dtype", "float16")
            empty = LocalDescriptorStore(int(manifest["dim"]), with_strengths=True, dtype=dtype)
            return LocalExtractionResult(empty, self.read_failures())
        return LocalExtractionResult(LocalDescriptorStore.concatenate(stores), self.read_failures())


__all__ = [
    "LocalExtractionConfig",
    "LocalExtractionResult",
    "LocalShardStore",
    "extract_local_sets",
    "normalisation",
]
