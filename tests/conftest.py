"""Shared fixtures.

Real benchmark files (revisitop ground truth, the mini-RPar photos) are found through one fixture:
$TOKENRET_TEST_DATA if set, else ../shared/data relative to the repository. Tests that need them skip,
with that reason, only where they are absent (`revisitop_dir` and `rparis6k_subset_dir` go through it).

Also here: the tiny Token model most tests build (`tiny_token_model`), random-pixel image files
(`write_random_images`), a free TCP port (`free_port`) and gloo process groups of spawned ranks
(`run_ranks`, with `spawned_ranks.py`). Heavy tests carry `@pytest.mark.slow`; `pytest -m "not slow"` is the
quick loop.
"""

from __future__ import annotations

import os
import shutil
import socket

# numpy's BLAS thread pool has the same problem as torch's (below): one thread unless asked otherwise.
# Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ.get("TOKENRET_TEST_THREADS", "1"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The tests compare CPU numerics (float32, no TF32) and assume CPU-only paths: on a GPU machine extraction
# would default to cuda. TOKENRET_DEVICE=cuda runs them there (tolerances are CPU ones).
os.environ.setdefault("TOKENRET_DEVICE", "cpu")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tokenret  # noqa: E402
from spawned_ranks import run_in_gloo_group  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("TOKENRET_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data (revisitop/, rparis6k_subset/)."""
    root = _shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set TOKENRET_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def revisitop_dir(shared_data: Path) -> Path:
    """The real revisitop ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl)."""
    return shared_data / "revisitop"


@pytest.fixture(scope="session")
def rparis6k_subset_dir(shared_data: Path) -> Path:
    """The mini-RPar: 250 Paris6k photos under jpg/ and gnd_rparis6k_subset.json."""
    return shared_data / "rparis6k_subset"


# The small Token model of the extraction, evaluation, fusion, serving and training tests: a ResNet-18 trunk,
# 32-d tokens, 4 heads, a 16-d descriptor.
TINY_TOKEN_KWARGS = {"backbone": "resnet18", "dim": 32, "num_heads": 4, "out_dim": 16}


@pytest.fixture
def tiny_token_kwargs() -> dict:
    """`create_model` arguments of the tiny `token_r50` (a copy: a test may change it)."""
    return dict(TINY_TOKEN_KWARGS)


@pytest.fixture
def tiny_token_model() -> Callable[..., torch.nn.Module]:
    """Factory of tiny `token_r50` models (`TINY_TOKEN_KWARGS`); keyword arguments override those.

    A factory, not a model, so that each test draws the weights where it did before (after its own seeding)
    and can build several.

    Example:
        model = tiny_token_model(backbone="resnet50").eval()
    """

    def make(**overrides) -> torch.nn.Module:
        return tokenret.create_model("token_r50", **{**TINY_TOKEN_KWARGS, **overrides})

    return make


# The small Token head over sets of HOW's 128-d local descriptors (no trunk): 32-d tokens, 4 heads, 24-d out.
TINY_SET_TOKEN_KWARGS = {"dim": 32, "num_heads": 4, "out_dim": 24}


@pytest.fixture
def tiny_set_token_model() -> Callable[..., torch.nn.Module]:
    """Factory of tiny `token_set_how_r50` heads (`TINY_SET_TOKEN_KWARGS`); keywords override those."""

    def make(**overrides) -> torch.nn.Module:
        return tokenret.create_model("token_set_how_r50", **{**TINY_SET_TOKEN_KWARGS, **overrides})

    return make


@pytest.fixture
def write_random_images() -> Callable[..., list[Path]]:
    """Factory that writes images of uniformly random pixels and returns their paths, in order.

    The factory's arguments: `folder` (made if missing); `sizes`, one (width, height) an image; `seed` of the
    pixels; `suffix`, the file type (".png", ".jpg"); `high`, pixel values are drawn from [0, high); and
    Pillow's save options (e.g. `quality=90`). Files are named img_000<suffix>, img_001<suffix>, ...

    Example:
        paths = write_random_images(tmp_path / "imgs", [(96, 72)] * 3, suffix=".jpg", quality=90)
    """

    def write(
        folder: Path, sizes, *, seed: int = 0, suffix: str = ".png", high: int = 256, **save_options
    ) -> list[Path]:
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, high, (height, width, 3), dtype=np.uint8)
            paths.append(folder / f"img_{i:03d}{suffix}")
            Image.fromarray(pixels).save(paths[-1], **save_options)
        return paths

    return write


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (the OS's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run_ranks(free_port: int) -> Callable[..., None]:
    """Runs `fn(rank, *args)` in `world` spawned processes joined in one gloo group on `free_port`.

    `fn` must be a module-level function (the children import it by name); each rank computes with one thread.
    A rank's exception fails the test.

    Example:
        run_ranks(_worker, paths, str(out_dir), world=2)
    """

    def run(fn: Callable, *args, world: int = 2) -> None:
        torch.multiprocessing.spawn(run_in_gloo_group, args=(world, free_port, fn, args), nprocs=world)

    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    # One intra-op thread by default: on a shared 2-core machine a second OpenMP thread that waits for a busy
    # core makes small convolutions 20x slower. TOKENRET_TEST_THREADS raises it.
    torch.set_num_threads(int(os.environ.get("TOKENRET_TEST_THREADS", "1")))
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never read or write the user's real weight caches during tests."""
    home = tmp_path_factory.mktemp("tokenret_home")
    monkeypatch.setenv("TOKENRET_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    yield
    shutil.rmtree(home, ignore_errors=True)  # cached weights: tens of MB per test
