"""Count host-syncing ops (and all ops) that reach the dispatcher.

    with count_syncs() as counts:
        loss = sum(model(images, targets).values()); loss.backward()
    print(counts.syncs, counts.ops, counts.sync_ops)

An op "syncs" when its result decides something on the host, so a GPU must finish all queued
work first: ``.item()`` / ``int(t)`` / ``bool(t)`` (``aten._local_scalar_dense``), ``nonzero``,
``masked_select``, ``unique*``, ``is_nonzero``, ``equal``, indexing with a boolean mask, and
``repeat_interleave`` without ``output_size``, and blocking device-to-host copies (``.cpu()``,
``.tolist()``, ``.numpy()``). Apart from those copies, which only exist on a GPU run, a CPU run
reports the syncs a GPU run would make. Backward ops are counted too: the autograd engine
carries the dispatch mode into its threads.
"""
from __future__ import annotations

import collections
import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_PACKETS = {
    "_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
    "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "unique_dim_consecutive",
    "argwhere",
}
_INDEX_PACKETS = {"index", "index_put", "_index_put_impl", "index_put_"}


@dataclass
class SyncCounts:
    syncs: int = 0
    ops: int = 0
    sync_ops: collections.Counter = field(default_factory=collections.Counter)
    op_counts: collections.Counter = field(default_factory=collections.Counter)
    # where each sync came from (innermost frames outside torch), for fixing them
    sync_sites: list = field(default_factory=list)
    # tensors made from host data (``torch.tensor``/``as_tensor`` of Python or numpy values) and copies
    # between devices: either breaks CUDA-graph capture of a step, even where nothing syncs
    host_data: int = 0
    host_data_sites: list = field(default_factory=list)

    def __str__(self) -> str:
        detail = ", ".join(f"{k} x{v}" for k, v in self.sync_ops.most_common())
        return f"{self.syncs} host syncs, {self.ops} dispatched ops" + (f" ({detail})" if detail else "")


def _is_sync(func, args, kwargs) -> str | None:
    packet = func._overloadpacket.__name__
    if packet in _SYNC_PACKETS:
        return packet
    if packet in _INDEX_PACKETS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{packet} (boolean mask)"
    if packet == "_to_copy" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and not kwargs.get("non_blocking", False):
            return "device-to-host copy"
    if packet == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if src.device.type != "cpu" and dst.device.type == "cpu" and not non_blocking:
            return "device-to-host copy"
    if packet == "repeat_interleave":
        has_size = kwargs.get("output_size") is not None
        # repeat_interleave.self_int (a Python int repeat) needs no sync
        if not has_size and not isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), int):
            return "repeat_interleave (no output_size)"
    return None


def _host_data(func, args, kwargs) -> str | None:
    packet = func._overloadpacket.__name__
    if packet in ("lift_fresh", "lift_fresh_copy"):  # what torch.tensor(data) dispatches
        return "tensor from host data"
    if packet == "_to_copy" and isinstance(args[0], torch.Tensor) and kwargs.get("device") is not None:
        if torch.device(kwargs["device"]).type != args[0].device.type:
            return "cross-device copy"
    if packet == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        if args[0].device.type != args[1].device.type:
            return "cross-device copy"
    return None


class _Counter(TorchDispatchMode):
    def __init__(self, counts: SyncCounts, record_sites: bool):
        super().__init__()
        self.counts, self.record_sites = counts, record_sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts.ops += 1
        self.counts.op_counts[func._overloadpacket.__name__] += 1
        made = _host_data(func, args, kwargs)
        if made is not None:
            self.counts.host_data += 1
            if self.record_sites:
                self.counts.host_data_sites.append((made, _call_site()))
        why = _is_sync(func, args, kwargs)
        if why is not None:
            self.counts.syncs += 1
            self.counts.sync_ops[why] += 1
            if self.record_sites:
                self.counts.sync_sites.append((why, _call_site()))
        return func(*args, **kwargs)


def _call_site() -> list[str]:
    """The innermost frames outside torch (and outside this module) of the op being dispatched."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename]
    return [f"{f.filename}:{f.lineno} {f.name}" for f in frames[-4:]]


@contextlib.contextmanager
def count_syncs(record_sites: bool = True) -> Iterator[SyncCounts]:
    """Count dispatched ops and host-syncing ops inside the block; yields a live :class:`SyncCounts`."""
    counts = SyncCounts()
    with _Counter(counts, record_sites):
        yield counts
