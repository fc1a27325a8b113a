"""R-MAC's export-friendly pooling (tokenret.export.onnx._TraceableRMAC): the same regions as
:func:`tokenret.models.pooling.rmac_regions` and the same descriptor as :class:`RMAC` at every map size,
in PyTorch and, exported with dynamic height and width, in ONNX Runtime."""

from __future__ import annotations

import warnings

import pytest
import torch

from tokenret.export.onnx import _rmac_grid, _TraceableRMAC
from tokenret.models.pooling import RMAC, rmac_regions

#: Every map from 1x1 to 40x40, and long thin ones.
SIZES = [(h, w) for h in range(1, 41) for w in range(1, 41)] + [
    (1, 90),
    (90, 1),
    (2, 77),
    (3, 200),
    (200, 3),
    (11, 47),  # the float32 rounding of rmac_regions' step choice decides the number of regions here
    (47, 11),
    (32, 100),
    (100, 32),
    (64, 48),
    (45, 64),
    (96, 128),
]
#: The grid for the quick loop (`-m "not slow"`): every 9th size; the slow runs take all.
EVERY_SIZE = [
    pytest.param(SIZES[::9], id="some-sizes"),
    pytest.param(SIZES, id="every-size", marks=pytest.mark.slow),
]


def _grid_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """The regions of :func:`_rmac_grid` as (top, left, side), in rmac_regions' order."""
    regions = []
    grid = _rmac_grid(torch.tensor([float(h)]), torch.tensor([float(w)]), levels)
    for tops, top_valid, lefts, left_valid, side in grid:
        lefts_kept = [int(x) for x, keep in zip(lefts.tolist(), left_valid.tolist(), strict=True) if keep]
        for top, keep in zip(tops.tolist(), top_valid.tolist(), strict=True):
            regions += [(int(top), left, int(side)) for left in lefts_kept if keep]
    return regions


@pytest.mark.parametrize("levels", [3, 1, 5])
def test_grid_is_rmac_regions(levels):
    """Every size for the default 3 levels (rmac_r101's), some for the others."""
    sizes = SIZES if levels == 3 else SIZES[::11]
    wrong = [(h, w) for h, w in sizes if _grid_regions(h, w, levels) != rmac_regions(h, w, levels)]
    assert not wrong, f"regions differ from rmac_regions at {wrong[:10]}"


def _relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("sizes", EVERY_SIZE)
def test_traceable_rmac_is_rmac_at_every_size(sizes):
    """On signed maps (the first two of a batch) and non-negative ones (ReLU outputs, the last two)."""
    generator = torch.Generator().manual_seed(0)
    original = RMAC()
    traceable = _TraceableRMAC(original)
    worst = 0.0
    for h, w in sizes:
        x = torch.randn(2, 8, h, w, generator=generator)
        maps = torch.cat([x, x.relu()])
        diff = _relative_difference(traceable(maps), original(maps))
        assert diff <= 1e-5, f"{h}x{w}: relative difference {diff:.3g}"
        worst = max(worst, diff)
    print(f"largest relative difference {worst:.3g}")


@pytest.mark.parametrize("sizes", EVERY_SIZE)
def test_onnx_rmac_is_rmac_at_every_size(sizes, tmp_path):
    """Exported once (traced at 7x5 maps), the pooling gives RMAC's descriptor at every other size."""
    pytest.importorskip(
        "onnx", reason="optional dependency onnx (pip install -e .[onnx]; .ci/run installs it)"
    )
    ort = pytest.importorskip(
        "onnxruntime", reason="optional dependency onnxruntime (pip install -e .[onnx]; .ci/run installs it)"
    )
    original = RMAC()
    path = tmp_path / "rmac.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no Python value taken from a tensor
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            _TraceableRMAC(original),
            (torch.randn(2, 8, 7, 5),),
            str(path),
            input_names=["maps"],
            output_names=["pooled"],
            dynamic_axes={"maps": {0: "batch", 2: "height", 3: "width"}, "pooled": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for h, w in sizes:
        x = torch.randn(1 + (h + w) % 3, 8, h, w, generator=generator)
        maps = torch.cat([x, x.relu()])  # signed and non-negative maps
        got = torch.from_numpy(session.run(None, {"maps": maps.numpy()})[0])
        diff = _relative_difference(got, original(maps))
        assert diff <= 1e-5, f"{h}x{w}: relative difference {diff:.3g}"
        worst = max(worst, diff)
    print(f"largest relative difference {worst:.3g}")
