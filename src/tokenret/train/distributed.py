"""Process-group set-up, the global-batch sampler, and BatchNorm synchronised across processes.

Launch with ``torchrun`` (one process per GPU, or several CPU processes); the environment variables it
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) select distributed mode. NCCL is used on GPUs,
gloo on CPUs.

Data order does not depend on the number of processes: :class:`GlobalBatchSampler` shuffles the whole
dataset once per epoch from ``(seed, epoch)``, cuts it into global batches, and gives each process a fixed
slice of each global batch (further cut into gradient-accumulation micro-batches). A run on 1 process and
a run on N processes therefore see the same images in each optimizer step, and a resumed run continues at
the exact global batch where it stopped.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors; :class:`CPUSyncBatchNorm` computes the same thing with
gloo all-reduces (autograd flows through them), so CPU runs of several processes train with global-batch
statistics as GPU runs do.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

__all__ = [
    "CPUSyncBatchNorm",
    "DistributedContext",
    "GlobalBatchSampler",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "convert_sync_batchnorm",
    "init_distributed",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: rank, world size, its device, and the backend in use (None alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(preference: str, local_rank: int, distributed: bool) -> torch.device:
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if distributed else 0)
        return torch.device("cpu")
    dev = torch.device(preference)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no GPU is visible to PyTorch; use train.device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if distributed else 0)
    return dev


def init_distributed(device: str = "auto", timeout_minutes: float = 60.0) -> DistributedContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else return a 1-process context.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:N"; under torchrun "auto"/"cuda" take the LOCAL_RANK-th GPU.
        timeout_minutes: collective timeout.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(device=_pick_device(device, 0, False))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank, True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistributedContext(rank, world, local_rank, dev, backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (any picklable object)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """The list of every rank's ``obj``, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """In-place sum over ranks (returns ``t``)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------------------------------------ sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches of index lists, global batch after global batch.

    Epoch ``e`` shuffles ``range(n)`` with ``numpy.random.default_rng([seed, e])`` and keeps
    ``n // global_batch`` full global batches (an incomplete last batch is dropped; it differs each
    epoch). Global batch ``k`` covers positions ``[k*G, (k+1)*G)`` of the permutation; within it,
    micro-step ``a`` of rank ``r`` takes the ``m = G / (world_size * grad_accum)`` positions starting at
    ``(a * world_size + r) * m``.

    Args:
        n: dataset size.
        global_batch: images per optimizer step over all processes and accumulation steps.
        world_size, rank: process layout.
        grad_accum: micro-batches per optimizer step per process.
        seed: shuffling seed.

    Position: ``set_epoch(e)`` then ``set_start(k)`` to begin at global batch ``k`` (resume).
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
    ) -> None:
        if global_batch % (world_size * grad_accum):
            raise ValueError(
                f"global batch {global_batch} is not divisible by world_size ({world_size}) x grad_accum "
                f"({grad_accum}); choose train.batch_size as a multiple of {world_size * grad_accum}"
            )
        if n < global_batch:
            raise ValueError(
                f"the training split has {n} images, fewer than one global batch ({global_batch}); "
                "lower train.batch_size or add images"
            )
        self.n, self.global_batch = n, global_batch
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.micro = global_batch // (world_size * grad_accum)
        self.epoch = 0
        self.start = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, batch: int) -> None:
        """Begin the current epoch at global batch ``batch`` (the ones before it were done)."""
        if not 0 <= batch <= self.steps_per_epoch:
            raise ValueError(f"start batch {batch} outside [0, {self.steps_per_epoch}]")
        self.start = int(batch)

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def global_batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """All indices of global batch ``batch`` of ``epoch`` (every rank's micro-batches together)."""
        return self.permutation(epoch)[batch * self.global_batch : (batch + 1) * self.global_batch]

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation(self.epoch)
        for k in range(self.start, self.steps_per_epoch):
            base = k * self.global_batch
            for a in range(self.grad_accum):
                lo = base + (a * self.world_size + self.rank) * self.micro
                yield perm[lo : lo + self.micro].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start) * self.grad_accum

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "n": self.n}


# ------------------------------------------------------------------------------------- synchronised BN


class _SyncState:
    """A process group reserved for BatchNorm statistics, so BN collectives never interleave with DDP's."""

    group: Any = None
    key: tuple[int, int] | None = None

    @classmethod
    def get(cls) -> Any:
        key = (id(dist.group.WORLD), dist.get_world_size())
        if cls.key != key:
            cls.group = dist.new_group(backend="gloo")
            cls.key = key
        return cls.group


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over the whole global batch, for CPU (gloo) processes.

    In training mode with more than one process, per-channel sums are all-reduced (differentiably, via
    an autograd all-reduce): mean = sum(x) / N, var = sum((x - mean)^2) / N over all processes' rows;
    running statistics use the unbiased variance, as BatchNorm does. Otherwise it is plain BatchNorm.
    Accepts (N, C), (N, C, L), (N, C, H, W) inputs. The state dict keys equal BatchNorm's.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        group = _SyncState.get()
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        local_count = x.numel() // c
        stats = torch.cat([xf.sum(dims), xf.new_tensor([float(local_count)])])
        stats = _AllReduceSum.apply(stats, group)
        count = stats[c]
        mean = stats[:c] / count
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise every BatchNorm*d: ``nn.SyncBatchNorm`` on GPUs, :class:`CPUSyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if _active():
        _SyncState.get()  # new_group is collective: create it now, while every process runs this line
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
