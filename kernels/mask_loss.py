"""Mask R-CNN's per-class sigmoid BCE mask loss, and the mask predictor (1x1 conv) fused with it.

Maths
    x[r, p] = logits[r, label_r, p] (p over the M*M pixels), t = target in [0, 1]
    bce(x, t) = max(x, 0) - x*t + log1p(exp(-|x|))         (stable for any |x|; 1e4 is fine)
    loss = sum_r s_r * sum_p bce(x[r,p], t[r,p]),   s_r = 1/(R*M*M), or with ``roi_weight``
           s_r = w_r / (max(sum w, 1) * M*M)  (the mean over real RoIs of a padded, sync-free batch)
    dloss/dx[r,p] = s_r * (sigmoid(x) - t)  -- written by the forward kernel into a compact [R, M*M]
    buffer, so the backward only scales it by grad_output.
    Precision: fp16/bf16/fp32 inputs are computed in fp32 (loss, compact gradient and partial sums fp32);
    fp64 inputs in fp64 throughout (the kernels take the compute dtype from the logits/features pointer).
    Fused predictor: x[r,p] = sum_c W[label_r, c] * F[r,c,p] + b[label_r]; only the label row of the
    K logit planes is ever computed. With g = grad_output * dloss/dx:
        dF[r,c,p] = g[r,p] * W[label_r,c];  G[r,c] = sum_p g[r,p] F[r,c,p]
        dW[k,c] = sum_{r: label_r = k} G[r,c];  db[k] = sum_{r: label_r = k} sum_p g[r,p]
    (dW, db as a one-hot [R,K]^T matmul: deterministic and sync-free, R*K*C flops.)

The dense input gradient of ``sigmoid_bce_mask_loss``: autograd needs a gradient of the logits'
full shape [R,K,M,M], which is zero except in the labelled channel. It cannot be avoided for an
unfused predictor (the conv backward consumes it), so the backward kernel writes it in one pass,
each element exactly once (no memset + scatter); the fused predictor never creates it.

Bytes moved (e = logits/features element size, P = M*M; 128 RoIs x 80 classes x 28x28 fp32 in brackets)
    loss forward : R*P*e (selected logits only) + R*P*et (targets) + R*8 (labels)
                   + R*P*4 (compact grad) + R*ceil(P/BLOCK_P)*4 (partials) [0.4 + 0.4 + 0.4 MB]
    loss backward: R*P*4 (compact grad) + R*K*P*e (dense grad, written once) [0.4 + 32 MB]
    torchvision  : gather + BCE + mean fwd/bwd make ~10 R*P-sized passes (~4 MB) over 6+ launches, plus
                   zeros R*K*P*e and an R*P scatter. Both are dominated by the 32 MB dense gradient; the
                   fusion saves the launches and the R*P intermediates, the fused predictor the 32 MB.
    fused predictor fwd: R*C*P*e (features, once) + K*C*4 + R*P*(et + 4);  bwd: R*C*P*e read (features)
                   + R*C*P*e written (dF) + R*P*4 + R*C*4 (G). The unfused conv1x1 also writes and reads
                   the R*K*P*e logits and their gradient: 4 x 32 MB at the sizes above (C = 256: F is 103 MB).
    targets in the kernel (mask_targets_from_gt): the R*P*et target read becomes <= 4*grid^2 texel reads
                   per pixel of the (uint8) gt masks, mostly L2 hits; see kernels/mask_targets.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._backend import (FLOAT_DTYPES, InputError, assert_in_range, backend_for, check_same_device,
                              check_tensor, compute_dtype, no_autocast)
from kernels._compile import TORCH_TO_TRITON, CompileSpec
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
def _load_target(t_ptr, r, p, pm, M, st_r, st_h, st_w, boxes_ptr, idx_ptr, G, H, W, x, FROM_GT: tl.constexpr):
    """Target pixels p of RoI r in x's dtype: loaded, or (FROM_GT) projected from gt mask idx[r] (t_ptr,
    strides st_*; the launcher passes the boxes in x's dtype, which the projection computes in)."""
    if FROM_GT:
        t = _projected_target(t_ptr, boxes_ptr, idx_ptr, r, p, pm, M, G, H, W, st_r, st_h, st_w).to(x.dtype)
    else:
        t = tl.load(t_ptr + r * st_r + (p // M) * st_h + (p % M) * st_w, mask=pm, other=0.0).to(x.dtype)
    return t


@triton.jit
def _sigmoid_bce_fwd_kernel(
    x_ptr, labels_ptr, t_ptr, boxes_ptr, idx_ptr, rw_ptr, norm_ptr, partial_ptr, grad_ptr,
    K, M, G, H, W, sx_r, sx_k, sx_h, sx_w, st_r, st_h, st_w, inv_count, has_weight, write_grad,
    FROM_GT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    cdt = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32  # compute dtype
    r = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    P = M * M
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    ph = p // M
    pw = p % M
    # a bad label is reported by the launcher; clamping keeps this read inside the logits
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1).to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + label * sx_k + ph * sx_h + pw * sx_w, mask=pm, other=0.0).to(cdt)
    t = _load_target(t_ptr, r, p, pm, M, st_r, st_h, st_w, boxes_ptr, idx_ptr, G, H, W, x, FROM_GT)
    loss, dx = _bce_and_dbce(x, t)
    scale = _roi_scale(rw_ptr, norm_ptr, r, inv_count, P, has_weight)
    tl.store(partial_ptr + r * tl.num_programs(1) + pb, tl.sum(tl.where(pm, loss, 0.0), axis=0) * scale)
    if write_grad != 0:
        tl.store(grad_ptr + r * P + p, dx * scale, mask=pm)


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


@triton.jit
def _mask_predictor_fwd_kernel(
    f_ptr, w_ptr, b_ptr, labels_ptr, t_ptr, boxes_ptr, idx_ptr, rw_ptr, norm_ptr, partial_ptr, out_ptr,
    C, K, M, G, H, W, sf_r, sf_c, sf_h, sf_w, st_r, st_h, st_w, inv_count, has_weight, write_grad,
    LOGITS_ONLY: tl.constexpr, FROM_GT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Label-row logits (LOGITS_ONLY: stored to out) or their loss partials and gradient."""
    cdt = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32  # compute dtype (of w, b too)
    r = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    P = M * M
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    f_pix = r * sf_r + (p // M) * sf_h + (p % M) * sf_w
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_P,), dtype=cdt)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        w = tl.load(w_ptr + label * C + c, mask=cm, other=0.0)
        f = tl.load(f_ptr + f_pix[None, :] + c[:, None].to(tl.int64) * sf_c, mask=cm[:, None] & pm[None, :],
                    other=0.0).to(cdt)
        acc += tl.sum(f * w[:, None], axis=0)
    x = acc + tl.load(b_ptr + label)
    if LOGITS_ONLY:
        tl.store(out_ptr + r * P + p, x.to(out_ptr.dtype.element_ty), mask=pm)
    else:
        t = _load_target(t_ptr, r, p, pm, M, st_r, st_h, st_w, boxes_ptr, idx_ptr, G, H, W, x, FROM_GT)
        loss, dx = _bce_and_dbce(x, t)
        scale = _roi_scale(rw_ptr, norm_ptr, r, inv_count, P, has_weight)
        tl.store(partial_ptr + r * tl.num_programs(1) + pb, tl.sum(tl.where(pm, loss, 0.0), axis=0) * scale)
        if write_grad != 0:
            tl.store(out_ptr + r * P + p, dx * scale, mask=pm)


@triton.jit
def _mask_predictor_bwd_kernel(
    g_ptr, gout_ptr, f_ptr, w_ptr, labels_ptr, df_ptr, gw_ptr,
    C, K, M, sf_r, sf_c, sf_h, sf_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dF[r, c, :] = g[r, :] * W[label, c] and G[r, c] = <g[r, :], F[r, c, :]>, features read once."""
    cdt = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32  # compute dtype (of g, w, gw)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    P = M * M
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1).to(tl.int64)
    w = tl.load(w_ptr + label * C + c, mask=cm, other=0.0)
    gout = tl.load(gout_ptr).to(cdt)
    c64 = c[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_C,), dtype=cdt)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        m = cm[:, None] & pm[None, :]
        g = tl.load(g_ptr + r * P + p, mask=pm, other=0.0) * gout
        f = tl.load(f_ptr + r * sf_r + c64 * sf_c + ((p // M) * sf_h + (p % M) * sf_w)[None, :], mask=m,
                    other=0.0).to(cdt)
        acc += tl.sum(f * g[None, :], axis=1)
        tl.store(df_ptr + r * C * P + c64 * P + p[None, :], (w[:, None] * g[None, :]).to(df_ptr.dtype.element_ty),
                 mask=m)
    tl.store(gw_ptr + r * C + c, acc, mask=cm)


_LOSS_CONFIGS = [
    {"BLOCK_P": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK_P": 256, "num_warps": 2, "num_stages": 1},
    {"BLOCK_P": 512, "num_warps": 4, "num_stages": 1},
    {"BLOCK_P": 2048, "num_warps": 8, "num_stages": 1},
]
_PREDICTOR_CONFIGS = [
    {"BLOCK_C": 16, "BLOCK_P": 256, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 32, "BLOCK_P": 128, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 8, "BLOCK_P": 512, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 32, "BLOCK_P": 256, "num_warps": 8, "num_stages": 1},
]


def get_configs(kind: str = "loss") -> list[dict]:
    """``kind``: "loss" (sigmoid_bce fwd/bwd) or "predictor" (fused predictor fwd/bwd, logits)."""
    return _config.collapse(_LOSS_CONFIGS if kind == "loss" else _PREDICTOR_CONFIGS)


# ----------------------------------------------------------------------------------------------
# Launchers (inputs already validated by the public functions)
# ----------------------------------------------------------------------------------------------
def _targets_for(targets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # kernels are built for targets in the logits' dtype or fp32; others (rare) cost an R*M*M cast
    return targets if targets.dtype in (like.dtype, torch.float32) else targets.float()


def _target_args(targets, gt_boxes, gt_idx, like, labels, dummy):
    """(pointer, boxes, idx, G, H, W, 3 strides) for _load_target; gt masks when gt_boxes is given.
    The boxes go in the compute dtype of ``like``, which the in-kernel projection computes in."""
    if gt_boxes is None:
        targets = _targets_for(targets, like)
        return (targets, dummy, labels, 1, 1, 1, *targets.stride()[-3:]), False
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


def _launch_loss_fwd(logits, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad):
    R, K, M, _ = logits.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
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
            partials, grad if need_grad else partials, K, M, G, H, W, *logits.stride(), *st, inv, int(w is not None),
            int(need_grad), FROM_GT=from_gt, **meta, **opts)
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


def _launch_predictor_fwd(features, weight, bias, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad,
                          logits_only):
    R, C, M, _ = features.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
    P = M * M
    cfg = _config.pick("mask_predictor_fwd", f"p{P}", get_configs("predictor"))
    meta, opts = _config.launch_kwargs(cfg)
    n_pb = triton.cdiv(P, meta["BLOCK_P"])
    dev = features.device
    cdt = compute_dtype(features.dtype)  # the kernel's: weight, bias, partial sums, compact gradient
    if logits_only:
        out, partials, targets = torch.empty((R, M, M), dtype=features.dtype, device=dev), None, features
    else:
        out = torch.empty((R, P) if need_grad else (0,), dtype=cdt, device=dev)
        partials = torch.empty((R, n_pb), dtype=cdt, device=dev)
    if R > 0:
        w, norm, inv = _scales(roi_weight, R, P, cdt)
        dummy = partials if partials is not None else torch.empty(1, dtype=cdt, device=dev)
        (t, boxes, idx, G, H, W, *st), from_gt = _target_args(targets, gt_boxes, gt_idx, features, labels, dummy)
        _mask_predictor_fwd_kernel[(R, n_pb)](
            features, weight.to(cdt).contiguous(), bias.to(cdt).contiguous(), labels, t, boxes, idx,
            w if w is not None else dummy, norm if norm is not None else dummy,
            dummy, out if out.numel() else dummy, C, weight.shape[0], M, G, H, W, *features.stride(),
            *st, inv, int(w is not None), int(need_grad), LOGITS_ONLY=logits_only, FROM_GT=from_gt, **meta, **opts)
    return out if logits_only else (partials.sum(), out)


def _launch_predictor_bwd(grad_loss, grad, features, weight, labels):
    R, C, M, _ = features.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
    cdt = compute_dtype(features.dtype)
    df = torch.empty((R, C, M, M), dtype=features.dtype, device=features.device)
    gw = torch.empty((R, C), dtype=cdt, device=features.device)
    if R > 0 and C > 0:
        cfg = _config.pick("mask_predictor_bwd", f"p{M * M}", get_configs("predictor"))
        meta, opts = _config.launch_kwargs(cfg)
        _mask_predictor_bwd_kernel[(R, triton.cdiv(C, meta["BLOCK_C"]))](
            grad, grad_loss, features, weight.to(cdt).contiguous(), labels, df, gw, C, weight.shape[0], M,
            *features.stride(), **meta, **opts)
    return df, gw


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (same maths, vectorized, in compute_dtype: fp32, or fp64 for fp64 inputs)
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


def _torch_label_logits(features, weight, bias, labels):
    R, C, M, _ = features.shape
    lab = labels.clamp(0, weight.shape[0] - 1)
    cdt = compute_dtype(features.dtype)
    x = torch.einsum("rcp,rc->rp", features.reshape(R, C, M * M).to(cdt), weight[lab].to(cdt))
    return x + bias[lab].to(cdt).view(R, 1)


def _torch_predictor_bwd(grad_loss, grad, features, weight, labels):
    R, C, M, _ = features.shape
    g = grad * grad_loss.to(grad.dtype)  # grad is in the compute dtype
    w = weight[labels.clamp(0, weight.shape[0] - 1)].to(g.dtype)
    df = (g.view(R, 1, M * M) * w.view(R, C, 1)).view(R, C, M, M).to(features.dtype)
    return df.contiguous(), torch.einsum("rcp,rp->rc", features.reshape(R, C, M * M).to(g.dtype), g)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
def _torch_targets(targets, gt_boxes, gt_idx, like):
    """Targets [R,M,M]; from gt masks, projected in ``like``'s compute dtype, as the kernels' in-kernel
    projection does (fp64 for fp64 logits/features whatever the boxes' dtype)."""
    if gt_boxes is None:
        return targets
    return project_masks_on_boxes(targets, gt_boxes.to(compute_dtype(like.dtype)), gt_idx, like.shape[-1])


# ``targets`` is [R,M,M], or with gt_boxes [R,4] / gt_idx [R] given, the gt masks [G,H,W] to project.
# Every op body runs under no_autocast: the ops have no autocast rule, so without it CPU/CUDA autocast
# would lower the PyTorch code inside (einsum, sums) to bf16/fp16. Outputs: loss and compact gradient
# in compute_dtype(logits/features dtype).
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


@torch.library.custom_op("maskrcnn_fast::mask_predictor_loss", mutates_args=())
def _predictor_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                  targets: torch.Tensor, gt_boxes: Optional[torch.Tensor], gt_idx: Optional[torch.Tensor],
                  roi_weight: Optional[torch.Tensor], need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with no_autocast(features.device):
        if backend_for(features) == "triton":
            return _launch_predictor_fwd(features, weight, bias, labels, targets, gt_boxes, gt_idx, roi_weight,
                                         need_grad, False)
        targets = _torch_targets(targets, gt_boxes, gt_idx, features)
        x = _torch_label_logits(features, weight, bias, labels)
        return _torch_bce(x, targets.reshape(x.shape).to(x.dtype), roi_weight, need_grad)


@_predictor_op.register_fake
def _(features, weight, bias, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad):
    R, P = features.shape[0], features.shape[2] * features.shape[3]
    cdt = compute_dtype(features.dtype)
    return features.new_empty((), dtype=cdt), features.new_empty((R, P) if need_grad else (0,), dtype=cdt)


@torch.library.custom_op("maskrcnn_fast::mask_predictor_loss_backward", mutates_args=())
def _predictor_bwd_op(grad_loss: torch.Tensor, grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with no_autocast(features.device):
        fn = _launch_predictor_bwd if backend_for(features) == "triton" else _torch_predictor_bwd
        return fn(grad_loss, grad, features, weight, labels)


@_predictor_bwd_op.register_fake
def _(grad_loss, grad, features, weight, labels):
    return torch.empty_like(features, memory_format=torch.contiguous_format), \
        features.new_empty(features.shape[:2], dtype=compute_dtype(features.dtype))


def _predictor_setup(ctx, inputs, output):
    features, weight, bias, labels = inputs[:4]
    ctx.save_for_backward(output[1], features, weight, labels)
    ctx.bias_dtype = bias.dtype


def _predictor_backward(ctx, grad_loss, _grad_of_grad):
    grad, features, weight, labels = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError("mask_predictor_loss: backward through a call made without grad")
    d_features, per_roi = _predictor_bwd_op(grad_loss, grad, features, weight, labels)
    K = weight.shape[0]
    # segmented sums over RoIs of each class as a one-hot matmul: deterministic, no host sync; in the
    # compute dtype even when backward() is called under autocast (which would make the matmuls bf16)
    with no_autocast(grad.device):
        onehot = (labels.view(-1, 1) == torch.arange(K, device=labels.device)).to(grad.dtype)
        d_weight = (onehot.t() @ per_roi).to(weight.dtype)
        d_bias = (onehot.t() @ (grad.sum(1) * grad_loss.to(grad.dtype))).to(ctx.bias_dtype)
    return d_features, d_weight, d_bias, None, None, None, None, None, None


torch.library.register_autograd("maskrcnn_fast::mask_predictor_loss", _predictor_backward,
                                setup_context=_predictor_setup)


@torch.library.custom_op("maskrcnn_fast::class_mask_logits", mutates_args=())
def _class_logits_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    with no_autocast(features.device):
        if backend_for(features) == "triton":
            return _launch_predictor_fwd(features, weight, bias, labels, None, None, None, None, False, True)
        return _torch_label_logits(features, weight, bias, labels) \
            .view(features.shape[0], *features.shape[2:]).to(features.dtype)


@_class_logits_op.register_fake
def _(features, weight, bias, labels):
    return features.new_empty((features.shape[0], *features.shape[2:]))


# ----------------------------------------------------------------------------------------------
# Public API
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


def _predictor_inputs(op, mask_features, weight, bias, labels):
    check_tensor(mask_features, f"{op}: mask_features", ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(weight, f"{op}: weight", dtypes=FLOAT_DTYPES)
    check_tensor(bias, f"{op}: bias", ndim=1, dtypes=FLOAT_DTYPES)
    R, C, M, M2 = mask_features.shape
    if M != M2:
        raise InputError(f"{op}: mask_features must be [R, C, M, M], got {tuple(mask_features.shape)}")
    if not (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2:] == (1, 1))) or weight.shape[1] != C:
        raise InputError(f"{op}: weight must be [K, {C}] or [K, {C}, 1, 1], got {tuple(weight.shape)}")
    K = weight.shape[0]
    if bias.shape[0] != K:
        raise InputError(f"{op}: bias must have shape ({K},), got {tuple(bias.shape)}")
    _check_labels(labels, R, K, op)
    return weight.reshape(K, C), R, M


def mask_predictor_loss(mask_features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                        mask_targets: torch.Tensor, *, roi_weight: Optional[torch.Tensor] = None,
                        check_targets: bool = True) -> torch.Tensor:
    """``sigmoid_bce_mask_loss(conv2d(mask_features, weight, bias), labels, mask_targets)`` without the
    ``[R,K,M,M]`` logits: only each RoI's label row of the 1x1 conv is computed.

    ``weight`` ``[K,C]`` or a Conv2d's ``[K,C,1,1]``; gradients flow to features, weight and bias.
    Computed (and returned) in fp32, or in fp64 for fp64 ``mask_features``.
    """
    op = "mask_predictor_loss"
    weight2d, R, M = _predictor_inputs(op, mask_features, weight, bias, labels)
    targets = _check_targets(mask_targets, R, M, op)
    _check_roi_weight(roi_weight, R, op)
    check_same_device(mask_features=mask_features, weight=weight, bias=bias, labels=labels, mask_targets=targets[0],
                      **({} if roi_weight is None else {"roi_weight": roi_weight}))
    _check_values(labels, weight2d.shape[0], targets, op, check_targets)
    need = _need_grad(mask_features, weight, bias)
    return _predictor_op(mask_features, weight2d, bias, labels, *targets, roi_weight, need)[0]


def class_mask_logits(mask_features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Inference: the ``[R,M,M]`` logits of class ``labels[r]`` of the 1x1 predictor (features' dtype),
    i.e. ``conv2d(mask_features, weight, bias)[arange(R), labels]`` without the other K-1 planes."""
    op = "class_mask_logits"
    weight2d, _, _ = _predictor_inputs(op, mask_features, weight, bias, labels)
    check_same_device(mask_features=mask_features, weight=weight, bias=bias, labels=labels)
    _check_values(labels, weight2d.shape[0], None, op, False)
    return _class_logits_op(mask_features, weight2d, bias, labels)


# ----------------------------------------------------------------------------------------------
# Offline compile specs
# ----------------------------------------------------------------------------------------------
def _fwd_io_cases(first: bool):
    """(logits/features dtype, targets dtype, FROM_GT) the launchers pass: targets in the logits' dtype
    or fp32; gt masks uint8 (bool is viewed as uint8), fp32, or fp64 with fp64 logits. Every dtype
    appears at least once with the default config; the other configs compile one plain and one
    gt-target case."""
    if not first:
        return [("bfloat16", "bfloat16", False), ("float16", "uint8", True)]
    return [("float32", "float32", False), ("bfloat16", "bfloat16", False), ("float16", "float32", False),
            ("bfloat16", "uint8", True), ("float32", "float32", True),
            ("float64", "float64", False), ("float64", "float32", False), ("float64", "uint8", True),
            ("float64", "float32", True), ("float64", "float64", True)]


def _ptr(dtype: str) -> str:
    return "*" + {"uint8": "u8", **TORCH_TO_TRITON}[dtype]


def _cdt_ptr(dtype: str) -> str:
    """Pointer type of the buffers in the compute dtype (weights, partials, compact gradient, boxes)."""
    return "*fp64" if dtype == "float64" else "*fp32"


def compile_specs() -> list[CompileSpec]:
    """Default configs in every dtype and mode; every other config for one plain and one gt-target case."""
    specs = []
    common = {"labels_ptr": "*i64", "idx_ptr": "*i64", "inv_count": "fp32", "has_weight": "i32", "write_grad": "i32",
              **{k: "i32" for k in ("C", "K", "M", "G", "H", "W")},
              **{k: "i64" for k in ("st_r", "st_h", "st_w", "sx_r", "sx_k", "sx_h", "sx_w", "sf_r", "sf_c", "sf_h",
                                    "sf_w")}}
    for kind, configs in (("loss", _LOSS_CONFIGS), ("predictor", _PREDICTOR_CONFIGS)):
        fwd = _sigmoid_bce_fwd_kernel if kind == "loss" else _mask_predictor_fwd_kernel
        bwd = _sigmoid_bce_bwd_kernel if kind == "loss" else _mask_predictor_bwd_kernel
        for i, cfg in enumerate(configs):
            meta, opts = _config.launch_kwargs(cfg)
            tag = ",".join(f"{k}={v}" for k, v in meta.items()) + f",w{opts['num_warps']}"
            cases = [(x, t, gt, False) for x, t, gt in _fwd_io_cases(i == 0)]
            if kind == "predictor":
                cases += [(x, x, False, True) for x in (("bfloat16", "float64") if i == 0 else ())]
            for xd, td, gt, lo in cases:
                const = dict(FROM_GT=gt, **meta, **({"LOGITS_ONLY": lo} if kind == "predictor" else {}))
                c = _cdt_ptr(xd)
                sig = {**common, "x_ptr": _ptr(xd), "f_ptr": _ptr(xd), "t_ptr": _ptr(td), "w_ptr": c, "b_ptr": c,
                       "boxes_ptr": c, "rw_ptr": c, "norm_ptr": c, "partial_ptr": c, "grad_ptr": c,
                       "out_ptr": _ptr(xd) if lo else c, **{k: "constexpr" for k in const}}
                sig = {k: sig[k] for k in fwd.arg_names}
                name = f"mask_loss.{fwd.__name__[1:-7]}[{xd},t={td},gt{int(gt)},lo{int(lo)},{tag}]"
                specs.append(CompileSpec(name, fwd, sig, const, default=i == 0, **opts))
            for xd in (("float32", "bfloat16", "float64") if i == 0 else ("bfloat16",)):
                c = _cdt_ptr(xd)
                sig = {"grad_ptr": c, "g_ptr": c, "gout_ptr": c, "labels_ptr": "*i64",
                       "out_ptr": _ptr(xd), "f_ptr": _ptr(xd), "w_ptr": c, "df_ptr": _ptr(xd), "gw_ptr": c,
                       "P": "i32", **{k: v for k, v in common.items() if k[:2] == "sf" or k in ("C", "K", "M")},
                       **{k: "constexpr" for k in meta}}
                sig = {k: sig[k] for k in bwd.arg_names}
                name = f"mask_loss.{bwd.__name__[1:-7]}[{xd},{tag}]"
                specs.append(CompileSpec(name, bwd, sig, dict(meta), default=i == 0, **opts))
    return specs
