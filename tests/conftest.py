"""Shared fixtures.

Real benchmark files (revisitop ground truth, the mini-RPar photos) are found through one fixture:
$TOKENRET_TEST_DATA if set, else ../shared/data relative to the repository. Tests that need them skip,
with that reason, only where they are absent.
"""

from __future__ import annotations

import os
import shutil

# numpy's BLAS thread pool has the same problem as torch's (below): one thread unless asked otherwise.
# Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ.get("TOKENRET_TEST_THREADS", "1"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The tests compare CPU numerics (float32, no TF32) and assume CPU-only paths: on a GPU machine extraction
# would default to cuda. TOKENRET_DEVICE=cuda runs them there (tolerances are CPU ones).
os.environ.setdefault("TOKENRET_DEVICE", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

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
