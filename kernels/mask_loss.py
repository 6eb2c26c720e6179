"""Mask R-CNN's per-class sigmoid BCE mask loss (the fused mask predictor + loss is in
``kernels/mask_predictor.py``; its public names are importable from here too).

Maths
    x[r, p] = logits[r, label_r, p] (p over the P = M*M pixels), t = target in [0, 1]
    bce(x, t) = max(x, 0) - x*t + log1p(exp(-|x|))         (stable for any |x|; 1e4 is fine)
    loss = sum_r s_r * sum_p bce(x[r,p], t[r,p]),   s_r = 1/(R*P), or with ``roi_weight``
           s_r = w_r / (max(sum w, 1) * P)  (the mean over real RoIs of a padded, sync-free batch)
    dloss/dx[r,p] = s_r * (sigmoid(x) - t)  -- written by the forward kernel into a compact [R, P]
    buffer, so the backward only scales it by grad_output.
    Precision: fp16/bf16/fp32 inputs are computed in fp32 (loss, compact gradient and partial sums fp32);
    fp64 inputs in fp64 throughout (the kernels take the compute dtype from the logits pointer).

The dense input gradient: autograd needs a gradient of the logits' full shape [R,K,M,M], which is zero
except in the labelled channel. It cannot be avoided for an unfused predictor (the conv backward
consumes it), so the backward kernel writes it in one pass, each element exactly once (no memset +
scatter); the fused predictor never creates it.

Kernels: ``_sigmoid_bce_fwd_kernel`` (grid R x ceil(P / BLOCK_P): loss partials and compact gradient)
and ``_sigmoid_bce_bwd_kernel`` (grid R*K x ceil(P / BLOCK_P): the dense gradient). Planes are read as
flat runs of P pixels (see ``kernels/_mask_loss_common.py``): for contiguous 28x28 logits every plane
access compiles to 128-bit loads/stores.

Bytes moved (e = logits element size, et = targets'; 128 RoIs x 80 classes x 28x28 fp32 in brackets)
    forward : R*P*e (selected logits only) + R*P*et (targets) + R*8 (labels)
              + R*P*4 (compact grad) + R*ceil(P/BLOCK_P)*4 (partials) [0.4 + 0.4 + 0.4 MB]
    backward: R*P*4 (compact grad) + R*K*P*e (dense grad, written once) [0.4 + 32 MB]
    torchvision: gather + BCE + mean fwd/bwd make ~10 R*P-sized passes (~4 MB) over 6+ launches, plus
              zeros R*K*P*e and an R*P scatter. Both are dominated by the 32 MB dense gradient; the
              fusion saves the launches and the R*P intermediates, the fused predictor the 32 MB.
    targets in the kernel (mask_targets_from_gt): the R*P*et target read becomes <= 4*grid^2 texel reads
              per pixel of the (uint8) gt masks, mostly L2 hits; see kernels/mask_targets.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._backend import FLOAT_DTYPES, InputError, backend_for, check_same_device, check_tensor, \
    compute_dtype, no_autocast
from kernels._mask_loss_common import (_check_labels, _check_roi_weight, _check_targets, _check_values,
                                       _flat_planes, _need_grad, _plane_strides, _scales, _store_loss_and_grad,
                                       _target_args, _torch_bce, _torch_targets)


@triton.jit
def _sigmoid_bce_fwd_kernel(
    x_ptr, labels_ptr, t_ptr, boxes_ptr, idx_ptr, rw_ptr, norm_ptr, partial_ptr, grad_ptr,
    K, P, M, G, H, W, sx_r, sx_k, sx_p, s0, s1, s2, inv_count, has_weight, write_grad,
    FROM_GT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    cdt = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32  # compute dtype
    r = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    # a bad label is reported by the launcher; clamping keeps this read inside the logits
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1).to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + label * sx_k + p * sx_p, mask=pm, other=0.0).to(cdt)
    _store_loss_and_grad(x, r, pb, p, pm, P, t_ptr, M, s0, s1, s2, boxes_ptr, idx_ptr, G, H, W,
                         rw_ptr, norm_ptr, inv_count, has_weight, partial_ptr, grad_ptr, write_grad, FROM_GT)


@triton.jit
def _sigmoid_bce_bwd_kernel(grad_ptr, gout_ptr, labels_ptr, out_ptr, K, P, BLOCK_P: tl.constexpr):
    """Dense d(logits): every element written once, the labelled channel from the compact grad."""
    rk = tl.program_id(0).to(tl.int64)
    r = rk // K
    k = rk - r * K
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1)
    # the compact gradient is in the compute dtype (fp32, or fp64 for fp64 logits)
    g = tl.load(grad_ptr + r * P + p, mask=pm & (k == label), other=0.0) * \
        tl.load(gout_ptr).to(grad_ptr.dtype.element_ty)
    tl.store(out_ptr + rk * P + p, g.to(out_ptr.dtype.element_ty), mask=pm)


_LOSS_CONFIGS = [
    {"BLOCK_P": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK_P": 256, "num_warps": 2, "num_stages": 1},
    {"BLOCK_P": 512, "num_warps": 4, "num_stages": 1},
    {"BLOCK_P": 2048, "num_warps": 8, "num_stages": 1},
]


def get_configs(kind: str = "loss") -> list[dict]:
    """``kind``: "loss" (sigmoid_bce fwd/bwd) or "predictor" (fused predictor fwd/bwd, logits)."""
    return _config.collapse(_LOSS_CONFIGS if kind == "loss" else _PREDICTOR_CONFIGS)


# ----------------------------------------------------------------------------------------------
# Launchers (inputs already validated by the public function)
# ----------------------------------------------------------------------------------------------
def _launch_loss_fwd(logits, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad):
    R, K, M, _ = logits.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
    logits = _flat_planes(logits)  # a copy only for layouts other than NCHW / channels_last (rare)
    P = M * M
    cdt = compute_dtype(logits.dtype)  # the kernel's: partial sums and compact gradient are in it
    grad = torch.empty((R, P) if need_grad else (0,), dtype=cdt, device=logits.device)
    cfg = _config.pick("sigmoid_bce_mask_loss_fwd", f"p{P}", get_configs("loss"))
    meta, opts = _config.launch_kwargs(cfg)
    n_pb = triton.cdiv(P, meta["BLOCK_P"])
    partials = torch.empty((R, n_pb), dtype=cdt, device=logits.device)
    if R > 0:
        w, norm, inv = _scales(roi_weight, R, P, cdt)
        (t, boxes, idx, G, H, W, *st), from_gt = _target_args(targets, gt_boxes, gt_idx, logits, labels, partials)
        _sigmoid_bce_fwd_kernel[(R, n_pb)](
            logits, labels, t, boxes, idx, w if w is not None else partials, norm if norm is not None else partials,
            partials, grad if need_grad else partials, K, P, M, G, H, W, *_plane_strides(logits), *st, inv,
            int(w is not None), int(need_grad), FROM_GT=from_gt, **meta, **opts)
    return partials.sum(), grad


def _launch_loss_bwd(grad_loss, grad, labels, K, dtype):
    R, P = grad.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
    out = torch.empty((R, K, P), dtype=dtype, device=grad.device)
    if R > 0 and K > 0:
        cfg = _config.pick("sigmoid_bce_mask_loss_bwd", f"p{P}", get_configs("loss"))
        meta, opts = _config.launch_kwargs(cfg)
        _sigmoid_bce_bwd_kernel[(R * K, triton.cdiv(P, meta["BLOCK_P"]))](
            grad, grad_loss, labels, out, K, P, **meta, **opts)
    return out


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (same maths, vectorized, in compute_dtype: fp32, or fp64 for fp64 inputs)
# ----------------------------------------------------------------------------------------------
def _torch_loss_fwd(logits, labels, targets, roi_weight, need_grad):
    R, K = logits.shape[:2]
    lab = labels.clamp(0, max(K - 1, 0))
    P = logits.shape[2] * logits.shape[3]
    cdt = compute_dtype(logits.dtype)
    x = logits[torch.arange(R, device=logits.device), lab].reshape(R, P).to(cdt)
    return _torch_bce(x, targets.reshape(R, P).to(cdt), roi_weight, need_grad)


def _torch_loss_bwd(grad_loss, grad, labels, K, dtype):
    R, P = grad.shape
    out = grad.new_zeros((R, K, P), dtype=dtype)
    lab = labels.clamp(0, max(K - 1, 0)).view(R, 1, 1).expand(R, 1, P)
    return out.scatter_(1, lab, (grad * grad_loss.to(grad.dtype)).to(dtype).view(R, 1, P))


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
# ``targets`` is [R,M,M], or with gt_boxes [R,4] / gt_idx [R] given, the gt masks [G,H,W] to project.
# Every op body runs under no_autocast: the ops have no autocast rule, so without it CPU/CUDA autocast
# would lower the PyTorch code inside (einsum, sums) to bf16/fp16. Outputs: loss and compact gradient
# in compute_dtype(logits dtype).
@torch.library.custom_op("maskrcnn_fast::sigmoid_bce_mask_loss", mutates_args=())
def _loss_op(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, gt_boxes: Optional[torch.Tensor],
             gt_idx: Optional[torch.Tensor], roi_weight: Optional[torch.Tensor],
             need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with no_autocast(logits.device):
        if backend_for(logits) == "triton":
            return _launch_loss_fwd(logits, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad)
        targets = _torch_targets(targets, gt_boxes, gt_idx, logits)
        return _torch_loss_fwd(logits, labels, targets, roi_weight, need_grad)


@_loss_op.register_fake
def _(logits, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad):
    R, P = logits.shape[0], logits.shape[2] * logits.shape[3]
    cdt = compute_dtype(logits.dtype)
    return logits.new_empty((), dtype=cdt), logits.new_empty((R, P) if need_grad else (0,), dtype=cdt)


@torch.library.custom_op("maskrcnn_fast::sigmoid_bce_mask_loss_backward", mutates_args=())
def _loss_bwd_op(grad_loss: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, K: int,
                 dtype: torch.dtype) -> torch.Tensor:
    with no_autocast(grad.device):
        fn = _launch_loss_bwd if backend_for(grad) == "triton" else _torch_loss_bwd
        return fn(grad_loss, grad, labels, K, dtype)


@_loss_bwd_op.register_fake
def _(grad_loss, grad, labels, K, dtype):
    return grad.new_empty((grad.shape[0], K, grad.shape[1]), dtype=dtype)


def _loss_setup(ctx, inputs, output):
    logits, labels = inputs[0], inputs[1]
    ctx.save_for_backward(output[1], labels)
    ctx.shape, ctx.dtype = tuple(logits.shape), logits.dtype


def _loss_backward(ctx, grad_loss, _grad_of_grad):
    grad, labels = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError("sigmoid_bce_mask_loss: backward through a call made without grad")
    K = ctx.shape[1]
    return _loss_bwd_op(grad_loss, grad, labels, K, ctx.dtype).view(ctx.shape), None, None, None, None, None, None


torch.library.register_autograd("maskrcnn_fast::sigmoid_bce_mask_loss", _loss_backward, setup_context=_loss_setup)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def sigmoid_bce_mask_loss(mask_logits: torch.Tensor, labels: torch.Tensor, mask_targets: torch.Tensor, *,
                          roi_weight: Optional[torch.Tensor] = None, check_targets: bool = True) -> torch.Tensor:
    """``F.binary_cross_entropy_with_logits(mask_logits[arange(R), labels], mask_targets)`` (mean), in fp32
    (fp64 for fp64 ``mask_logits``, computed in fp64 on both backends).

    ``mask_logits`` ``[R,K,M,M]`` fp32/fp16/bf16/fp64, ``labels`` ``[R]`` int64 in ``[0,K)``,
    ``mask_targets`` ``[R,M,M]`` float in [0, 1] (soft targets allowed; checked on the device unless
    ``check_targets=False``), or ``kernels.mask_targets_from_gt(gt_masks, boxes, matched_idxs)`` to
    project the targets inside the kernel (never materialized). ``roi_weight`` ``[R]`` (optional, not
    differentiated): the loss becomes
    ``sum_r w_r * mean_pixels(bce_r) / max(sum_r w_r, 1)``. Only the labelled channel is read.
    Not differentiable with respect to the targets. R = 0 gives 0 with a zero gradient.
    """
    op = "sigmoid_bce_mask_loss"
    check_tensor(mask_logits, f"{op}: mask_logits", ndim=4, dtypes=FLOAT_DTYPES)
    R, K, M, M2 = mask_logits.shape
    if M != M2:
        raise InputError(f"{op}: mask_logits must be [R, K, M, M], got {tuple(mask_logits.shape)}")
    _check_labels(labels, R, K, op)
    targets = _check_targets(mask_targets, R, M, op)
    _check_roi_weight(roi_weight, R, op)
    check_same_device(mask_logits=mask_logits, labels=labels, mask_targets=targets[0],
                      **({} if roi_weight is None else {"roi_weight": roi_weight}))
    _check_values(labels, K, targets, op, check_targets)
    return _loss_op(mask_logits, labels, *targets, roi_weight, _need_grad(mask_logits))[0]


# the fused predictor's public names (and configs, for the tuner) stay importable from here
from kernels.mask_predictor import _PREDICTOR_CONFIGS, class_mask_logits, mask_predictor_loss  # noqa: E402,F401
