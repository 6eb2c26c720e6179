"""Input handling and gradient accumulation shared by the RoI pooling ops (roi_align, roi_pool).

Deterministic backward by fixed-point atomics
---------------------------------------------
A float atomic add is order-dependent (rounding depends on arrival order), so repeated runs of a
scatter-style backward differ in the last bits. Integer addition is associative, so atomics into
an int64 buffer give the same bits in any order. The deterministic backward therefore scales every
contribution by a power of two ``scale``, rounds it to int64 and adds it atomically; a final pass
divides by ``scale``. The scale is chosen on the device (no host sync) so that no sum can overflow:
every output element of an RoI op spreads ``|g|`` over weights that sum to at most 1, so any input
element receives at most ``n_contrib * max|g|`` in magnitude, and ``scale = 2**(61 - ceil(log2 of
that bound))`` keeps every partial sum below 2**62. The rounding error per contribution is at most
``0.5 / scale``, i.e. about ``2**-61 * bound`` -- far below fp32 resolution of the result.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton.language as tl

from kernels._backend import (FLOAT_DTYPES, BoxesShapeError, InputError, assert_in_range, check_same_device,
                              check_tensor, compute_dtype)

MAX_GRID = 1024  # cap on RoIAlign's adaptive sampling grid per axis, so absurd boxes cannot run forever


def tl_compute_dtype(dtype: torch.dtype):
    """The kernels' ``ACC`` constexpr for features of ``dtype``: :func:`compute_dtype` as a Triton dtype."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def pair(output_size, name: str = "output_size") -> tuple[int, int]:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if (not isinstance(output_size, (tuple, list)) or len(output_size) != 2
            or not all(isinstance(v, int) for v in output_size)):
        raise InputError(f"{name} must be an int or a pair of ints, got {output_size!r}")
    if output_size[0] <= 0 or output_size[1] <= 0:
        raise InputError(f"{name} must be positive, got {tuple(output_size)}")
    return int(output_size[0]), int(output_size[1])


def rois_from_boxes(boxes, like: torch.Tensor) -> torch.Tensor:
    """``Tensor[K,5]`` (batch index, x1, y1, x2, y2), from either that or a list of ``Tensor[L,4]``.

    Boxes of any float dtype are accepted, as torchvision (under autocast) does; the ops compute in
    fp32 (fp64 for fp64 features). A wrong shape raises :class:`BoxesShapeError` (a ValueError and,
    as in torchvision, an AssertionError)."""
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            check_tensor(b, f"boxes[{i}]", ndim=2, last_dim=4, dtypes=FLOAT_DTYPES, shape_error=BoxesShapeError)
        if len(boxes) == 0:
            return like.new_zeros((0, 5))
        dtype = torch.promote_types(boxes[0].dtype, torch.float32) if len({b.dtype for b in boxes}) > 1 \
            else boxes[0].dtype
        # batch indices built per image without repeat_interleave, so no host sync
        idx = [torch.full_like(b[:, :1], i, dtype=dtype) for i, b in enumerate(boxes)]
        return torch.cat([torch.cat(idx, 0), torch.cat([b.to(dtype) for b in boxes], 0)], dim=1)
    check_tensor(boxes, "boxes", ndim=2, last_dim=5, dtypes=FLOAT_DTYPES, shape_error=BoxesShapeError)
    return boxes


def check_rois(features: Sequence[torch.Tensor], rois: torch.Tensor, op: str) -> None:
    """Shape/dtype/device checks (raise at once) and the batch-index range check (no host sync)."""
    if len(features) == 0:
        raise InputError(f"{op}: needs at least one feature map")
    first = features[0]
    for i, f in enumerate(features):
        check_tensor(f, f"{op}: input" if len(features) == 1 else f"{op}: features[{i}]", ndim=4,
                     dtypes=FLOAT_DTYPES)
        if f.dtype != first.dtype or f.shape[:2] != first.shape[:2]:
            raise InputError(f"{op}: feature maps must share dtype, batch size and channels; "
                             f"got {tuple(first.shape)} {first.dtype} and {tuple(f.shape)} {f.dtype}")
        check_same_device(input=f, boxes=rois)
    assert_in_range(rois[:, 0], 0, first.shape[0],
                    f"{op}: batch index in boxes[:, 0] must be in [0, {first.shape[0]})")


def fixed_point_scale(grad: torch.Tensor, n_contrib: int) -> torch.Tensor:
    """Power-of-two scale (float64, 1 element, on grad's device) for the int64 accumulation above."""
    bound = grad.detach().abs().amax().double().clamp_min(1e-300) * max(n_contrib, 1)
    scale = torch.exp2(61.0 - torch.ceil(torch.log2(bound)))
    # non-finite gradients have no meaningful fixed-point form: the result is NaN (see from_fixed_point)
    return scale.reshape(1)


def from_fixed_point(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                     grad: torch.Tensor) -> torch.Tensor:
    out = acc.double() / scale
    finite = torch.isfinite(grad.detach().abs().amax())
    return torch.where(finite, out, torch.full_like(out, float("nan"))).to(dtype)
