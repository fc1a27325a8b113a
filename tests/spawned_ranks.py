"""What each rank that `run_ranks` (conftest.py) spawns runs: a plain module, which the children import."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def run_in_gloo_group(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    """Join a gloo group of `world` ranks on 127.0.0.1:`port`, run `fn(rank, *args)` in one thread, leave."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()
