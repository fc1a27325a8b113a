"""Two processes under torchrun (gloo, CPU) train exactly like one process on the combined batch."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from synthetic_landmarks import write_class_folders
from torch import nn

from tokenret.train.config import load_config
from tokenret.train.distributed import CPUSyncBatchNorm, GlobalBatchSampler, convert_sync_batchnorm
from tokenret.train.hooks import HookBase
from tokenret.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


class DumpWeights(HookBase):
    """After every step: rank 0 saves all weights (parameters and buffers, flattened) and whether every rank
    holds exactly the same ones."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)

    def after_step(self) -> None:
        t = self.trainer
        flat = torch.cat([v.detach().double().flatten() for v in t.model.state_dict().values()])
        same, max_diff = True, 0.0
        if t.ctx.distributed:
            every = [torch.empty_like(flat) for _ in range(t.ctx.world_size)]
            dist.all_gather(every, flat)
            same = all(torch.equal(every[0], e) for e in every[1:])
            max_diff = max(float((every[0] - e).abs().max()) for e in every[1:])
        if t.ctx.is_main:
            torch.save(flat, self.out / f"step{t.step}.pt")
            info = {"same": same, "max_diff": max_diff, "world": t.ctx.world_size}
            (self.out / f"step{t.step}.json").write_text(json.dumps(info))


# float64 weights: the only differences left between 1 and 2 processes are rounding errors far below the
# changes training makes, even through BatchNorm's cancellations (ArcFace still computes in float32).
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_train_distributed import DumpWeights
    from tokenret.train.config import load_config
    from tokenret.train.distributed import init_distributed, shutdown_distributed
    from tokenret.train.loop import Trainer

    torch.set_default_dtype(torch.float64)
    cfg = load_config(None, sys.argv[3:])
    ctx = init_distributed("cpu")
    try:
        Trainer(cfg, ctx=ctx, hooks=[DumpWeights(sys.argv[2])], default_hooks=False).train()
    finally:
        shutdown_distributed()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(data: Path, out: Path) -> list[str]:
    return [
        "model.name=token_r50",
        "model.backbone_weights=null",
        "model.kwargs={backbone: resnet18, dim: 32, num_heads: 4, out_dim: 16}",
        "model.kwargs.drop=0",  # no dropout or drop-path: both runs compute the same function
        "model.kwargs.attn_drop=0",
        "model.kwargs.drop_path=0",
        "loss.s=8",
        "data.format=folders",
        f"data.root={data}",
        "data.val_fraction=0",
        "data.image_size=32",
        "data.num_workers=0",
        "optim.base_lr=0.5",  # peak 0.5 * 8 / 256; large enough that the weights move visibly
        "optim.warmup_epochs=0",
        "train.epochs=1",
        "train.batch_size=8",
        "train.sync_bn=true",
        f"train.stop_after_steps={STEPS}",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.output_dir={out / 'run'}",
        "train.device=cpu",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_equal_to_one_process_on_the_combined_batch(tmp_path):
    data = tmp_path / "data"
    write_class_folders(data, n_landmarks=4, views=6, size=40, seed=3)  # 24 images: 3 global batches of 8
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        f"--master_port={_free_port()}", str(worker), str(Path(__file__).parent), str(two),
        *_overrides(data, two),
    ]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # The same run in this process, alone.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        Trainer(
            load_config(None, _overrides(data, one)), hooks=[DumpWeights(one)], default_hooks=False
        ).train()
    finally:
        torch.set_default_dtype(default_dtype)

    previous = None
    for step in range(1, STEPS + 1):
        info = json.loads((two / f"step{step}.json").read_text())
        assert info["world"] == 2
        assert info["same"], f"ranks differ after step {step} (max |diff| {info['max_diff']})"
        assert json.loads((one / f"step{step}.json").read_text())["world"] == 1
        w2 = torch.load(two / f"step{step}.pt", weights_only=True)
        w1 = torch.load(one / f"step{step}.pt", weights_only=True)
        err = float((w2 - w1).abs().max())
        assert torch.allclose(w2, w1, rtol=1e-6, atol=1e-7), (
            f"step {step}: max |2 ranks - 1 process| = {err:.3g}"
        )
        # Meaningful only if each step moves the weights by far more than the tolerance.
        if previous is not None:
            assert float((w1 - previous).abs().max()) > 1e-3
        previous = w1


def test_global_batch_sampler_splits_each_global_batch_among_ranks_and_accumulation_steps():
    n, g = 50, 12
    one = list(GlobalBatchSampler(n, g, seed=5))
    assert len(one) == n // g and all(len(b) == g for b in one)
    for world, accum in ((2, 1), (2, 3), (3, 2)):
        per_rank = [list(GlobalBatchSampler(n, g, world, r, accum, seed=5)) for r in range(world)]
        for k in range(n // g):
            union = [i for r in range(world) for a in range(accum) for i in per_rank[r][k * accum + a]]
            assert sorted(union) == sorted(one[k])
    s = GlobalBatchSampler(n, g, seed=5)
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != one  # reshuffled every epoch (the release never called set_epoch)
    s.set_start(2)
    assert list(s) == epoch1[2:]
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(n, 10, world_size=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)


def test_cpu_sync_batchnorm_is_plain_batchnorm_in_one_process_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 5), nn.BatchNorm1d(5)
    )
    ref = copy.deepcopy(net)
    converted = convert_sync_batchnorm(copy.deepcopy(net), torch.device("cpu"))
    assert isinstance(converted[1], CPUSyncBatchNorm) and isinstance(converted[4], CPUSyncBatchNorm)
    assert list(converted.state_dict()) == list(net.state_dict())
    assert not dist.is_initialized()
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(converted(x), ref(x))
    torch.testing.assert_close(converted.state_dict(), ref.state_dict())
