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


_INTERPRETED = interpreting()  # as @triton.jit saw it when it decorated our kernels (the same import)


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
    """``"triton"`` or ``"torch"`` for a tensor on ``t.device``, following the rule above. Called on
    every op, so it reads the interpreter flag as it was when the kernels were decorated (at import,
    which is when ``@triton.jit`` reads it too) instead of the environment (~1 us a call)."""
    if _forced is not None:
        return _forced
    if t.is_cuda:
        return "triton"
    if t.is_cpu:
        return "triton" if _INTERPRETED else "torch"
    raise TypeError(f"unsupported device {t.device}: maskrcnn-fast kernels run on CUDA or CPU")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every op computes and accumulates in for inputs of ``dtype``: fp64 for fp64, else fp32
    (fp16/bf16 are up-cast in registers, never copied)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Errors are what we document *and* what torchvision raises for the same input, so that code
# written against either keeps working: torchvision's C++ checks raise RuntimeError, its Python
# box-shape check (torch._assert) raises AssertionError.
class InputError(ValueError, RuntimeError):
    """A bad shape, size or value (a ``ValueError``; torchvision raises ``RuntimeError``)."""


class InputTypeError(TypeError, RuntimeError):
    """A bad dtype or argument type (a ``TypeError``; torchvision raises ``RuntimeError``)."""


class BoxesShapeError(InputError, AssertionError):
    """Boxes of the wrong shape for an RoI op (torchvision's ``check_roi_boxes_shape`` asserts)."""


def no_autocast(device: torch.device | str):
    """Op bodies compute in fp32 (fp64 for fp64 input) whatever autocast says: without this, the
    PyTorch ops inside a custom op would be autocast to bf16/fp16 (the op itself has no autocast rule)."""
    dev = torch.device(device).type
    return torch.autocast(dev if dev in ("cpu", "cuda") else "cpu", enabled=False)


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=None, last_dim: int | None = None,
                 shape_error: type[InputError] = InputError) -> None:
    """Shape/dtype checks that raise at once and never touch tensor values (no host sync)."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise shape_error(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise shape_error(f"{name} must have last dimension {last_dim}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InputTypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: torch.Tensor) -> None:
    first, *rest = tensors.values()
    if all(t.device == first.device for t in rest):
        return
    desc = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
    raise InputError(f"tensors must be on one device: {desc}")


def assert_in_range(values: torch.Tensor, low: int, high: int, msg: str) -> None:
    """Value check without a host sync in the dispatcher's eyes: ``torch._assert_async`` is checked
    asynchronously on CUDA and immediately on CPU (where it raises ``InputError(msg)``, a ValueError).

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
        raise InputError(msg) from None
