"""What machine a benchmark ran on: one description for every bench script's JSON.

The bench scripts run as ``python bench/X.py``, so this folder is on ``sys.path`` and they import it as
``from machine import describe_machine``.

Example:
    >>> describe_machine(threads=2)["cpus"] > 0
    True
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(threads: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The machine, the software versions and the load, as plain JSON values.

    Args:
        threads: the threads the benchmark runs on (None: ``torch.get_num_threads()``).
        device: the device the benchmark runs on; a CUDA device adds its name under ``"gpu"`` (which
            initialises CUDA, so it is only looked up when asked for).

    Keys: ``cpu`` (model name), ``cpus`` (``os.cpu_count()``), ``threads``, ``platform``, ``python``,
    ``numpy``, ``torch``, ``tokenret``, ``faiss`` (its version where the benchmark imported it, else None),
    ``OMP_WAIT_POLICY``, ``loadavg_start`` (1, 5, 15 min) and ``loadavg_1min_start`` (its first value), and
    ``gpu`` for a CUDA ``device``.
    """
    import numpy as np
    import torch

    try:
        import tokenret

        tokenret_version = tokenret.__version__
    except ImportError:
        tokenret_version = None
    faiss = sys.modules.get("faiss")  # not imported here: a benchmark without FAISS does not load it
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "tokenret": tokenret_version,
        "faiss": getattr(faiss, "__version__", None),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": load,
        "loadavg_1min_start": load[0] if load else None,
    }
    if device is not None and str(device).startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(describe_machine(), indent=2))
