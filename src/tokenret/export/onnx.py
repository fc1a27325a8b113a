"""ONNX export of a global model's single-scale descriptor network.

The graph takes a batch of images already sized and normalised in the model's input convention
(:mod:`tokenret.models.convention`), float32 (B, 3, H, W) with dynamic batch, height and width, and gives

- ``descriptors``: the L2-normalised single-scale descriptors (B, D), what ``model(images)`` gives;
- ``features``: the same before their L2 normalisation (``model.forward_features``), what the scale
  combination reads for models whose convention pools un-normalised outputs (SuperGlobal).

The model's name and arguments, its input convention (channel order, mean, std, max size, test scales, how
scales are resized and combined) and the output names are written as JSON into the file's
``metadata_props`` under the key ``tokenret`` (:func:`read_onnx_metadata`, ``tokenret info model.onnx``).

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used: it records the ResNet
trunks, GeM, the adaptive pooling and the attention of every exportable model with symbolic height and width
(checked: :func:`export_onnx` runs the file at two other sizes and compares with PyTorch). The few
operations whose shape arithmetic is Python code are replaced while tracing by equivalents made of tensor
operations: SuperGlobal's rGeM padding, and R-MAC's region grid (the regions of ``rmac_regions``, computed
in the graph with its rounding, and masked maxima over them), so every registry global model exports; an
operation that could not be replaced would be refused with the reason (``_REFUSED``).

Example:
    >>> model = tokenret.create_model("token_r101", checkpoint="R101-Token.pth")   # doctest: +SKIP
    >>> meta = export_onnx(model, "token_r101.onnx")                                # doctest: +SKIP
    >>> meta["input_convention"]["channel_order"]                                   # doctest: +SKIP
    'RGB'
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenret.models.convention import input_convention
from tokenret.models.pooling import RMAC, RMAC_STEPS, l2n
from tokenret.models.superglobal import RegionalGeM
from tokenret.models.token import SetTokenModel

__all__ = [
    "DEFAULT_OPSET",
    "METADATA_KEY",
    "ExportError",
    "OnnxRuntimeMissingError",
    "export_onnx",
    "format_onnx_metadata",
    "read_onnx_metadata",
    "require_onnxruntime",
]

#: ONNX opset of exported files (ONNX Runtime 1.14 and later run it).
DEFAULT_OPSET = 17
#: The ``metadata_props`` key holding tokenret's JSON.
METADATA_KEY = "tokenret"
#: Version of the metadata's layout.
METADATA_FORMAT = "tokenret-onnx/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("descriptors", "features")
#: The largest difference from PyTorch's descriptors accepted by the check after export.
CHECK_TOLERANCE = 1e-4
_TRACE_SHAPE = (2, 3, 128, 96)
_CHECK_SHAPES = ((1, 3, 96, 144), (3, 3, 160, 112))


class ExportError(RuntimeError):
    """A model cannot be written as an ONNX graph; the message says which operation and why."""


class OnnxRuntimeMissingError(ImportError):
    """The optional ``onnxruntime`` (or ``onnx``) package is not installed."""


def require_onnxruntime(what: str = "onnxruntime") -> Any:
    """Import ``onnxruntime`` (or ``onnx``), or raise an error naming the extra that installs it."""
    try:
        if what == "onnx":
            import onnx

            return onnx
        import onnxruntime

        return onnxruntime
    except ImportError:
        raise OnnxRuntimeMissingError(
            f"the ONNX export and the onnxruntime engine need the package {what!r}: "
            "pip install 'tokenret[onnx]' (onnx and onnxruntime)"
        ) from None


# ----------------------------------------------------------------------------------- export-friendly parts


def _positions(line: Tensor) -> Tensor:
    """0 .. n-1 as float32 for a 1-d slice ``line`` of length n: a cumulative sum, so that the graph's length
    stays symbolic (an arange to ``x.shape[i]`` is recorded with the traced length)."""
    return torch.ones_like(line, dtype=torch.float32).cumsum(0) - 1


def _pad_index(position: Tensor, pad: int, reflect: Tensor) -> Tensor:
    """Source positions of a ``pad``-padded axis with ``position`` 0 .. n-1: reflected where ``reflect``
    (``F.pad(mode="reflect")``), else replicated."""
    last = position[-1:]
    before = torch.arange(-pad, 0, dtype=torch.float32, device=position.device)
    after = last + torch.arange(1, pad + 1, dtype=torch.float32, device=position.device)
    idx = torch.cat([before, position, after])
    reflected = last - (last - idx.abs()).abs()
    replicated = torch.minimum(idx.clamp(min=0), last)
    return torch.where(reflect, reflected, replicated).long()


class _TraceableRegionalGeM(nn.Module):
    """:class:`RegionalGeM` with its padding as an index gather, so that the choice between reflection and
    replication (made in Python from the map's size in the original: reflection where both sides exceed
    the padding) is part of the graph."""

    def __init__(self, original: RegionalGeM) -> None:
        super().__init__()
        self.p, self.size = original.p, original.size

    def forward(self, x: Tensor) -> Tensor:
        pad = (self.size - 1) // 2
        scaled = x / (self.size**2) ** (1.0 / self.p)
        rows, cols = _positions(x[0, 0, :, 0]), _positions(x[0, 0, 0, :])
        reflect = torch.minimum(rows[-1:], cols[-1:]) >= pad  # min(h, w) > pad
        padded = scaled.index_select(-2, _pad_index(rows, pad, reflect))
        padded = padded.index_select(-1, _pad_index(cols, pad, reflect))
        pooled = F.lp_pool2d(padded, self.p, self.size, stride=1)
        return 0.5 * pooled + 0.5 * x


#: The most regions ``rmac_regions`` adds along the longer side of a level (``idx + 1``).
_RMAC_MAX_EXTRA = len(RMAC_STEPS)


def _rmac_grid(h: Tensor, w: Tensor, levels: int, overlap: float = 0.4) -> list[tuple[Tensor, ...]]:
    """The regions of :func:`tokenret.models.pooling.rmac_regions` for an ``h`` x ``w`` map given as
    float32 tensors (shape (1,)), as tensors: per level ``(tops, top_valid, lefts, left_valid, side)``.

    A level has ``level + 6`` candidate starts along each axis (float32, shape (level + 6,)); those with
    ``*_valid`` false are not regions (their start is 0), and the level's regions are every valid top with
    every valid left, squares of ``side`` (float32, shape (1,); a level of side 0 has no valid candidate).
    The arithmetic is that of ``rmac_regions``, in the same precision: float32 where it computes with
    float32 tensors (the choice of the number of regions, the start offsets), float64 where it computes
    with Python numbers (the side, its half, the step between starts, rounded to float32 when it multiplies
    the float32 positions as torch does with a Python float), so the regions are the same for every size.
    """
    side, longest = torch.minimum(h, w), torch.maximum(h, w)
    # RMAC_STEPS are consecutive: an arange of them (torch.tensor of constants would warn while tracing)
    steps = torch.arange(RMAC_STEPS[0], RMAC_STEPS[-1] + 1, dtype=torch.float32, device=h.device)
    b = torch.reciprocal(steps - 1) * (longest - side)  # Python's number / tensor: Tensor.__rdiv__
    square = side * side
    idx = torch.argmin(torch.abs((square - side * b) / square - overlap))  # the first minimum, as argmin
    extra = (idx + 1).to(torch.float32)
    zero = torch.zeros_like(h)
    extra_h, extra_w = torch.where(h > w, extra, zero), torch.where(h < w, extra, zero)
    side64 = side.to(torch.float64)
    grid = []
    for level in range(1, levels + 1):
        wl = torch.floor(2 * side64 / (level + 1))
        wl2 = torch.floor(wl / 2 - 1)
        wl32, wl2_32 = wl.to(torch.float32), wl2.to(torch.float32)
        candidate = torch.arange(level + _RMAC_MAX_EXTRA, dtype=torch.float32, device=h.device)
        axes = []
        for dim, more in ((h, extra_h), (w, extra_w)):
            n = more + level  # float32, exact
            step = (dim.to(torch.float64) - wl) / torch.clamp(n.to(torch.float64) - 1, min=1)
            step = torch.where(n > 1, step.to(torch.float32), torch.zeros_like(n))
            start = torch.floor(wl2_32 + candidate * step) - wl2_32
            valid = (candidate < n) & (wl32 > 0)
            axes += [torch.where(valid, start, torch.zeros_like(start)), valid]
        grid.append((*axes, wl32))
    return grid


class _TraceableRMAC(nn.Module):
    """:class:`RMAC` with its region grid (:func:`_rmac_grid`) as tensor operations: the region maxima are
    masked maxima over every candidate region of a level (along the columns, then the rows), the invalid
    candidates' L2-normalised vectors replaced by zeros before the sum. The regions and their maxima are
    exact; only the order of the sum differs from the original's loop."""

    def __init__(self, original: RMAC) -> None:
        super().__init__()
        self.levels, self.eps = original.levels, original.eps

    def forward(self, x: Tensor) -> Tensor:
        rows, cols = _positions(x[0, 0, :, 0]), _positions(x[0, 0, 0, :])
        v = l2n(x.amax(dim=(-2, -1)), self.eps)
        low = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
        for tops, top_valid, lefts, left_valid, side in _rmac_grid(rows[-1:] + 1, cols[-1:] + 1, self.levels):
            side = torch.clamp(side, min=1)  # a level of side 0 has no valid candidate
            in_col = (cols >= lefts[:, None]) & (cols < lefts[:, None] + side)  # (K, w)
            in_row = (rows >= tops[:, None]) & (rows < tops[:, None] + side)  # (K, h)
            col_max = torch.where(in_col, x[..., None, :], low).amax(dim=-1)  # (B, C, h, K lefts)
            maxima = torch.where(in_row[:, :, None], col_max[:, :, None], low).amax(dim=-2)  # (B, C, K, K)
            r = l2n(maxima.permute(0, 2, 3, 1), self.eps)  # (B, K tops, K lefts, C)
            valid = top_valid[:, None, None] & left_valid[None, :, None]
            v = v + torch.where(valid, r, torch.zeros_like(r)).sum(dim=(1, 2))
        return v


#: Modules replaced by an export-friendly equivalent while tracing.
_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    RegionalGeM: _TraceableRegionalGeM,
    RMAC: _TraceableRMAC,
}
#: Modules that cannot be exported with dynamic height and width, and why (none at present: every registry
#: global model exports; :func:`check_exportable` still refuses any module listed here, naming it).
_REFUSED: dict[type[nn.Module], str] = {}


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` for a model that takes no images or holds an operation refused above."""
    name = getattr(model, "model_name", type(model).__name__)
    if not callable(getattr(model, "forward_features", None)) or not hasattr(model, "descriptor_dim"):
        raise ExportError(f"{name}: not a global image model (no forward_features/descriptor_dim)")
    if isinstance(model, SetTokenModel):
        raise ExportError(
            f"{name}: it aggregates sets of local descriptors, not images; only global image models export"
        )
    for sub_name, module in model.named_modules():
        why = _REFUSED.get(type(module))
        if why is not None:
            raise ExportError(f"{name} cannot be exported: {why} (module {sub_name!r})")


@contextlib.contextmanager
def _export_friendly(model: nn.Module) -> Iterator[None]:
    """Swap in :data:`_REPLACEMENTS` for the duration (the model is put back as it was)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            replacement = _REPLACEMENTS.get(type(child))
            if replacement is not None:
                swapped.append((parent, child_name, child))
                setattr(parent, child_name, replacement(child))
    try:
        yield
    finally:
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)


class _DescriptorGraph(nn.Module):
    """What is exported: images -> (L2-normalised descriptors, un-normalised head output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_features(images)
        return F.normalize(features, dim=-1), features


# ------------------------------------------------------------------------------------------------ export


def onnx_metadata(model: nn.Module, opset: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON written under :data:`METADATA_KEY`: what the graph computes and how to feed it."""
    from tokenret import __version__

    conv = input_convention(model)
    power = getattr(model, "multiscale_power", None)
    meta: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "model": getattr(model, "model_name", type(model).__name__),
        "model_kwargs": getattr(model, "model_kwargs", {}),
        "descriptor_dim": int(model.descriptor_dim),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, "height", "width"],
            "dtype": "float32",
            "pixels": "RGB values / 255, channels reordered to channel_order, minus mean, divided by std "
            "(mean and std in channel_order)",
        },
        "input_convention": conv.describe(),
        "multiscale_power": None if power is None else float(power),
        "outputs": {
            "descriptors": "L2-normalised single-scale descriptors (batch, descriptor_dim)",
            "features": "the same before L2 normalisation (what scale_pool combines when "
            "pool_unnormalised is true)",
        },
        "opset": int(opset),
        "exporter": f"torch.onnx.export (TorchScript-based), torch {torch.__version__}",
        "tokenret_version": __version__,
    }
    meta.update(extra or {})
    return json.loads(json.dumps(meta, default=str))  # plain JSON values (tuples as lists)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the single-scale descriptor network of ``model`` to ``path`` as ONNX.

    Args:
        model: a global image model (any registry model but the ``token_set_*`` aggregators).
        path: the ``.onnx`` file (written whole, then renamed into place).
        opset: ONNX opset version.
        check: run the file with ONNX Runtime at two sizes other than the traced one and compare with
            PyTorch (max abs difference <= 1e-4); skipped when onnxruntime is not installed.
        metadata: more keys for the JSON (e.g. the checkpoint it came from).

    Returns:
        The metadata written.

    Raises:
        ExportError: the model cannot be exported (which operation, and why), or the exported graph does
            not reproduce the model.
        OnnxRuntimeMissingError: ``onnx`` is not installed.

    Example:
        >>> model = create_model("gem_r50", backbone="resnet18")            # doctest: +SKIP
        >>> export_onnx(model, "gem.onnx")["descriptor_dim"]                 # doctest: +SKIP
        512
    """
    onnx = require_onnxruntime("onnx")
    check_exportable(model)
    name = getattr(model, "model_name", type(model).__name__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    try:
        sample = torch.randn(*_TRACE_SHAPE, device=device)
        with _export_friendly(model), warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*Constant folding.*")
            try:
                torch.onnx.export(
                    _DescriptorGraph(model).eval(),  # a new module is in training mode
                    (sample,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes={
                        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                        **{o: {0: "batch"} for o in OUTPUT_NAMES},
                    },
                    opset_version=opset,
                    dynamo=False,
                )
            except Exception as e:
                raise ExportError(
                    f"{name}: torch.onnx.export failed at opset {opset}: {_first_line(e)}"
                ) from e
        traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        if traced:
            w = traced[0]
            raise ExportError(
                f"{name}: {Path(w.filename).name}:{w.lineno} turns a tensor into a Python value while "
                f"tracing ({_first_line(w.message)}), so the graph would hold a constant of the traced size"
            )
        proto = onnx.load(str(tmp))
        meta = onnx_metadata(model, opset, metadata)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
        onnx.save(proto, str(tmp))
        if check:
            _check_parity(model, tmp, name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return meta


def _check_parity(model: nn.Module, path: Path, name: str) -> None:
    try:
        ort = require_onnxruntime()
    except OnnxRuntimeMissingError:
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    device = next(model.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(0)
    for shape in _CHECK_SHAPES:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = model(x.to(device)).float().cpu().numpy()
        try:
            got = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x.numpy()})[0]
            diff = float(np.abs(got - expected).max())
        except Exception as e:  # onnxruntime's errors have no public class; a shape error is the usual one
            diff, why = float("nan"), _first_line(e)
        else:
            why = f"max abs difference {diff:.3g} > {CHECK_TOLERANCE}"
        if not diff <= CHECK_TOLERANCE:
            raise ExportError(
                f"{name}: the exported graph does not reproduce the model at {shape[2]}x{shape[3]} pixels "
                f"({why}): an operation's shape arithmetic was fixed at the traced size"
            )


def _first_line(e: object) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------- reading


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """tokenret's metadata of an exported file (through onnxruntime, else onnx).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tokenret metadata (not exported by ``tokenret export``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        ort = require_onnxruntime()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        props = dict(session.get_modelmeta().custom_metadata_map)
    except OnnxRuntimeMissingError:
        onnx = require_onnxruntime("onnx")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # onnxruntime's own errors are not exceptions of a public class
        raise ValueError(f"{path}: not a readable ONNX file ({_first_line(e)})") from None
    if METADATA_KEY not in props:
        raise ValueError(f"{path}: no tokenret metadata (not written by `tokenret export`)")
    return json.loads(props[METADATA_KEY])


def format_onnx_metadata(path: str | Path, meta: Mapping[str, Any]) -> str:
    """The metadata for a person (``tokenret info model.onnx``)."""
    conv = meta.get("input_convention", {})
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    scales = ", ".join(f"{s:.4g}" for s in conv.get("scales", []))
    lines = [
        f"file:        {path}",
        f"size:        {size / 2**20:.1f} MiB, ONNX opset {meta.get('opset')}, {meta.get('exporter', '?')}",
        f"model:       {meta.get('model')} {meta.get('model_kwargs', {})}",
        f"descriptor:  {meta.get('descriptor_dim')}-d, outputs {', '.join(meta.get('outputs', {}))}",
        f"input:       {INPUT_NAME} (batch, 3, height, width) float32, {conv.get('channel_order')}, "
        f"mean {tuple(conv.get('mean', ()))}, std {tuple(conv.get('std', ()))}",
        f"images:      longest side {conv.get('max_size') or 'as the file'}, scales {scales} "
        f"(resized by {conv.get('scale_resize')}), combined by {conv.get('scale_pool')}"
        + (" of the un-normalised outputs" if conv.get("pool_unnormalised") else ""),
    ]
    if meta.get("multiscale_power") is not None:
        lines.append(f"gem power:   {meta['multiscale_power']:.4g} (scale_pool gem)")
    for key in ("checkpoint", "checkpoint_sha256", "model_sha256"):
        if meta.get(key):
            lines.append(f"{key + ':':<12} {meta[key]}")
    return "\n".join(lines)
