"""Processes and devices: torchrun's rank/world, the device of a rank, and the coalesced collectives
of graph-mode training (``train --cuda-graphs`` with several processes).

Eager training wraps the model in ``DistributedDataParallel``. A captured step cannot use DDP's
autograd hooks as they are (they need 11 eager warm-up steps and DDP built on a side stream), so graph
mode does what DDP does by hand, inside the step: rank 0's buffers are broadcast before the forward
(``broadcast_buffers=True``), and after the backward one all-reduce averages every gradient together
with the logged loss values. NCCL collectives can be captured in a CUDA graph (NCCL >= 2.9.6); on CPU
the same calls run on gloo, so CI tests the logic with two processes.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from maskrcnn_fast.errors import UserError


class Dist:
    """Rank/world from torchrun's environment; one process group per run."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.host_group = host_group() if self.world > 1 else None
        self.before_close: list = []  # called first by close(), e.g. to free CUDA graphs holding NCCL work

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def all_true(self, flag: bool) -> bool:
        """``flag`` and'ed over the ranks, on the host (gloo): for decisions every rank must take alike."""
        if self.world == 1:
            return flag
        return same_on_all_ranks(int(flag), self.host_group) and flag

    def close(self) -> None:
        for release in self.before_close:  # also after an exception, whose traceback keeps their owners alive
            release()
        if self.owns_group:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # nothing of ours (a replayed graph's collectives) still in flight
            dist.destroy_process_group()


def pick_device(name: str | None, local_rank: int) -> torch.device:
    if name is None:
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def process_group_world() -> int:
    """The default process group's size, or 0 when there is none (a plain single-process run)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def host_group():
    """A gloo group over every rank, for small host-side agreements (an NCCL group would need the GPU);
    a collective call: every rank makes it at the same point."""
    return dist.new_group(backend="gloo")


def same_on_all_ranks(value: int, group) -> bool:
    """Whether every rank passed the same ``value`` (one host all-reduce of two integers)."""
    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t[0]) == -int(t[1])


def _coalesced(tensors, collective) -> None:
    """Apply ``collective`` to one flat copy of ``tensors`` per dtype and write the result back:
    one collective per dtype instead of one per tensor (any memory format; ``copy_`` restores it)."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view(t.shape))


@torch.no_grad()
def broadcast_from_rank0(tensors) -> None:
    """Every rank gets rank 0's values (DDP's start-up parameter sync and ``broadcast_buffers``)."""
    _coalesced(list(tensors), lambda flat: dist.broadcast(flat, 0))


@torch.no_grad()
def average_across_ranks(tensors) -> None:
    """Sum over ranks, divided by the world size, in place (DDP's gradient averaging)."""
    world = dist.get_world_size()
    _coalesced(list(tensors), lambda flat: (dist.all_reduce(flat), flat.div_(world)))
