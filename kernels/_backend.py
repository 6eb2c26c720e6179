"""Which implementation runs an op, and the input checks every launcher shares.

Backend rule (every op in ``kernels/`` follows it):

* CUDA tensors                          -> the compiled Triton kernel.
* CPU tensors with ``TRITON_INTERPRET=1`` -> the same Triton kernel, in Triton's interpreter.
* CPU tensors otherwise                 -> the op's vectorized PyTorch implementation.

There is no silent fallback on CUDA: if Triton cannot run there, the error surfaces.
``use_backend("torch")`` forces the PyTorch implementation explicitly (tests and benchmarks
use it to check the fallback against torchvision).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_forced: str | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"triton"`` or ``"torch"`` inside the block, whatever the device."""
    global _forced
    if name not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {name!r}")
    prev, _forced = _forced, name
    try:
        yield
    finally:
        _forced = prev


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for a tensor on ``t.device``, following the rule above."""
    if _forced is not None:
        return _forced
    if t.device.type == "cuda":
        return "triton"
    if t.device.type == "cpu":
        return "triton" if interpreting() else "torch"
    raise TypeError(f"unsupported device {t.device}: maskrcnn-fast kernels run on CUDA or CPU")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=None, last_dim: int | None = None) -> None:
    """Shape/dtype checks that raise at once and never touch tensor values (no host sync)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {desc}")


def assert_in_range(values: torch.Tensor, low: int, high: int, msg: str) -> None:
    """Value check without a host sync in the dispatcher's eyes: ``torch._assert_async`` is checked
    asynchronously on CUDA and immediately on CPU (where it raises ``ValueError(msg)``).

    Kernels still clamp or mask indices themselves, so a failing value can never make them
    read or write out of bounds before the asynchronous assert fires.
    """
    if values.numel() == 0:
        return
    ok = ((values >= low) & (values < high)).all()
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
        return
    try:
        torch._assert_async(ok, msg)
    except RuntimeError:
        raise ValueError(msg) from None
