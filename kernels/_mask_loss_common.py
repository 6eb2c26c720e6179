"""What the sigmoid-BCE mask loss (``kernels/mask_loss.py``) and the fused mask predictor
(``kernels/mask_predictor.py``) share: the per-pixel BCE maths and target reads in Triton, the launchers'
argument preparation, the PyTorch fallback of the loss, and the input checks.

Plane addressing (why the kernels compile to 128-bit accesses)
    Every [.., M, M] operand is addressed as ``base + p * s_p`` with ``p`` the flat pixel index in
    [0, P), P = M*M passed as an argument: its planes must be *flat* (stride(H) == M * stride(W)), which
    contiguous (NCHW) and channels_last tensors both are. The JIT then sees ``s_p == 1`` as a constant
    and ``P`` (784 for 28x28), the other strides and the pointers as multiples of 16, so the compiler can
    prove 16-byte runs and aligned bases. The launchers copy the rare other layouts (``_flat_planes``).
    ``p // M`` and ``p % M`` remain only where pixel coordinates are needed (in-kernel targets).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._backend import FLOAT_DTYPES, InputError, assert_in_range, check_tensor, compute_dtype
from kernels.mask_targets import GtMaskTargets, _projected_target, project_masks_on_boxes


@triton.jit
def _bce_and_dbce(x, t):
    """Per-element stable BCE-with-logits and sigmoid(x) - t, in x's dtype (fp32 or fp64)."""
    e = tl.exp(-tl.abs(x))
    # log1p(e) without libdevice (not in every Triton)
    if x.dtype == tl.float64:
        # log(u) * e / (u - 1), u = 1 + e: the rounding of u cancels (a few ulps for any e in [0, 1])
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    else:
        # the series is exact to fp32 for small e
        log1p_e = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
    loss = tl.maximum(x, 0.0) - x * t + log1p_e
    sig = tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
    return loss, sig - t


@triton.jit
def _roi_scale(rw_ptr, norm_ptr, r, inv_count, P, has_weight):
    # runtime flags (uniform branches) rather than constexprs: half as many kernels to build.
    # rw_ptr (the weights, or a dummy) is in the compute dtype.
    if rw_ptr.dtype.element_ty == tl.float64:
        # a float argument arrives as fp32: fp64 kernels take 1/(R*P) from the grid (R programs on axis 0)
        scale = 1.0 / (tl.num_programs(0).to(tl.float64) * P)
    else:
        scale = inv_count
    if has_weight != 0:
        scale = tl.load(rw_ptr + r) / (tl.load(norm_ptr) * P)
    return scale


@triton.jit
def _load_target(t_ptr, r, p, pm, M, s0, s1, s2, boxes_ptr, idx_ptr, G, H, W, x, FROM_GT: tl.constexpr):
    """Target pixels p of RoI r in x's dtype: loaded from the flat [R, P] planes (strides s0, s1), or
    (FROM_GT) projected from gt mask idx[r] (t_ptr, strides s0, s1, s2 = mask, row, column; the launcher
    passes the boxes in x's dtype, which the projection computes in)."""
    if FROM_GT:
        t = _projected_target(t_ptr, boxes_ptr, idx_ptr, r, p, pm, M, G, H, W, s0, s1, s2).to(x.dtype)
    else:
        t = tl.load(t_ptr + r * s0 + p * s1, mask=pm, other=0.0).to(x.dtype)
    return t


@triton.jit
def _store_loss_and_grad(x, r, pb, p, pm, P, t_ptr, M, s0, s1, s2, boxes_ptr, idx_ptr, G, H, W,
                         rw_ptr, norm_ptr, inv_count, has_weight, partial_ptr, grad_ptr, write_grad,
                         FROM_GT: tl.constexpr):
    """The tail both forward kernels share, from the label-channel logits x of bins p of RoI r: the
    targets, this program's scaled loss partial (one per program, summed by the launcher) and, when
    write_grad, the scaled d(loss)/dx of its bins to the compact [R, P] gradient."""
    t = _load_target(t_ptr, r, p, pm, M, s0, s1, s2, boxes_ptr, idx_ptr, G, H, W, x, FROM_GT)
    loss, dx = _bce_and_dbce(x, t)
    scale = _roi_scale(rw_ptr, norm_ptr, r, inv_count, P, has_weight)
    tl.store(partial_ptr + r * tl.num_programs(1) + pb, tl.sum(tl.where(pm, loss, 0.0), axis=0) * scale)
    if write_grad != 0:
        tl.store(grad_ptr + r * P + p, dx * scale, mask=pm)


# ----------------------------------------------------------------------------------------------
# Launcher helpers (inputs already validated by the public functions)
# ----------------------------------------------------------------------------------------------
def _has_flat_planes(t: torch.Tensor) -> bool:
    """Whether the last two dims [M, M] of ``t`` are one stride-s_p run of M*M pixels."""
    return t.shape[-1] <= 1 or t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1] * t.stride(-1)


def _flat_planes(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its planes are flat (contiguous and channels_last tensors are), else a copy."""
    return t if _has_flat_planes(t) else t.contiguous()


def _plane_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a flat-plane tensor [..., M, M] with the two pixel dims merged into one."""
    return (*t.stride()[:-2], t.stride(-1) if t.shape[-1] > 1 else t.stride(-2) if t.shape[-2] > 1 else 1)


def _target_args(targets, gt_boxes, gt_idx, like, labels, dummy):
    """(pointer, boxes, idx, G, H, W, 3 strides) for _load_target; gt masks when gt_boxes is given.
    The boxes go in the compute dtype of ``like``, which the in-kernel projection computes in."""
    if gt_boxes is None:
        # kernels are built for targets in the logits' dtype or fp32; others (rare) cost an R*M*M cast
        targets = _flat_planes(targets if targets.dtype in (like.dtype, torch.float32) else targets.float())
        return (targets, dummy, labels, 1, 1, 1, *_plane_strides(targets), 1), False
    cdt = compute_dtype(like.dtype)
    if targets.dtype not in (torch.uint8, torch.float32, cdt):  # mask_targets_from_gt did this already
        targets = targets.view(torch.uint8) if targets.dtype == torch.bool else targets.float()
    return (targets, gt_boxes.to(cdt).contiguous(), gt_idx.long().contiguous(), *targets.shape,
            *targets.stride()), True


def _scales(roi_weight, R, P, dtype):
    """(weights, their clamped sum, 1/(R*P)); the fp64 kernels recompute 1/(R*P) in fp64 themselves."""
    if roi_weight is None:
        return None, None, 1.0 / max(R * P, 1)
    w = roi_weight.to(dtype).contiguous()
    return w, w.sum().clamp(min=1.0).reshape(1), 1.0


# ----------------------------------------------------------------------------------------------
# PyTorch fallback of the loss (same maths, vectorized, in the compute dtype)
# ----------------------------------------------------------------------------------------------
def _torch_bce(x, t, roi_weight, need_grad):
    """Loss and compact gradient in x's dtype (x, t: [R, P] in the compute dtype)."""
    R, P = x.shape
    if roi_weight is None:
        scale = x.new_full((R, 1), 1.0 / max(R * P, 1))
    else:
        w = roi_weight.to(x.dtype)
        scale = (w / (w.sum().clamp(min=1.0) * P)).view(R, 1)
    e = torch.exp(-x.abs())
    loss = ((x.clamp(min=0) - x * t + torch.log1p(e)).sum(1, keepdim=True) * scale).sum()
    if not need_grad:
        return loss, x.new_empty((0,))
    sig = torch.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return loss, (sig - t) * scale


def _torch_targets(targets, gt_boxes, gt_idx, like):
    """Targets [R,M,M]; from gt masks, projected in ``like``'s compute dtype, as the kernels' in-kernel
    projection does (fp64 for fp64 logits/features whatever the boxes' dtype)."""
    if gt_boxes is None:
        return targets
    return project_masks_on_boxes(targets, gt_boxes.to(compute_dtype(like.dtype)), gt_idx, like.shape[-1])


# ----------------------------------------------------------------------------------------------
# Input checks (shapes and dtypes at once; values without a host sync on CUDA)
# ----------------------------------------------------------------------------------------------
def _check_labels(labels, R, K, op):
    check_tensor(labels, f"{op}: labels", ndim=1, dtypes=(torch.int64,))
    if labels.shape[0] != R:
        raise InputError(f"{op}: {R} RoIs but labels has shape {tuple(labels.shape)}")
    if K == 0 and R > 0:
        raise InputError(f"{op}: no classes (K = 0) for {R} RoIs")


def _check_targets(targets, R, M, op):
    """(tensor, gt_boxes, gt_idx) for the ops: targets [R,M,M], or gt masks from mask_targets_from_gt."""
    if isinstance(targets, GtMaskTargets):  # validated (values too) by mask_targets_from_gt
        if targets.boxes.shape[0] != R:
            raise InputError(f"{op}: {R} RoIs but mask_targets_from_gt got {targets.boxes.shape[0]} boxes")
        return targets
    check_tensor(targets, f"{op}: mask_targets", ndim=3, dtypes=FLOAT_DTYPES)
    if tuple(targets.shape) != (R, M, M):
        raise InputError(f"{op}: mask_targets must have shape {(R, M, M)}, got {tuple(targets.shape)}")
    return targets, None, None


def _check_values(labels, K, targets, op, check_targets):
    """Value checks, after every shape/dtype/device check: no host sync on CUDA."""
    assert_in_range(labels, 0, K, f"{op}: labels must be in [0, {K})")
    if check_targets and targets is not None and targets[1] is None and targets[0].numel():
        targets = targets[0]
        ok = ((targets >= 0) & (targets <= 1)).all()  # NaN fails too
        msg = f"{op}: mask_targets must be in [0, 1]"
        if targets.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(ok, msg)  # checked on the device, no host sync
        elif not bool(ok):
            raise InputError(msg)


def _check_roi_weight(roi_weight, R, op):
    if roi_weight is not None:
        check_tensor(roi_weight, f"{op}: roi_weight", ndim=1, dtypes=FLOAT_DTYPES)
        if roi_weight.shape[0] != R:
            raise InputError(f"{op}: roi_weight must have shape ({R},), got {tuple(roi_weight.shape)}")


def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
