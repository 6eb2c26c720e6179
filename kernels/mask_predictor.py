"""Mask R-CNN's mask predictor (the 1x1 conv to K class planes) fused with the per-class sigmoid BCE
mask loss of ``kernels/mask_loss.py``, and its inference form (the labelled class's logits only).

Maths
    x[r,p] = sum_c W[label_r, c] * F[r,c,p] + b[label_r]  (p over the P = M*M pixels); only the label
    row of the K logit planes is ever computed. Loss and its compact gradient dloss/dx as in mask_loss.
    With g = grad_output * dloss/dx:
        dF[r,c,p] = g[r,p] * W[label_r,c];  G[r,c] = sum_p g[r,p] F[r,c,p]
        dW[k,c] = sum_{r: label_r = k} G[r,c];  db[k] = sum_{r: label_r = k} sum_p g[r,p]
    (dW, db as a one-hot [R,K]^T matmul: deterministic and sync-free, R*K*C flops.)
    Precision: fp16/bf16/fp32 features are computed in fp32 (weights, bias, loss, gradients of the
    weights in fp32); fp64 in fp64 throughout (the kernels take the compute dtype from the features).

Kernels: ``_mask_predictor_fwd_kernel`` (grid R x ceil(P / BLOCK_P), a loop over C: label-row logits,
then their loss partials and compact gradient, or the logits alone with LOGITS_ONLY) and
``_mask_predictor_bwd_kernel`` (grid R x ceil(C / BLOCK_C), a loop over P: dF and G, the features read
once). Features are addressed as ``r * s_r + c * s_c + p * s_p`` (flat planes, see
``kernels/_mask_loss_common.py``): NCHW features (s_p = 1) load and store 128 bits along pixels,
channels_last ones (s_c = 1) along channels. dF takes the features' layout.

Bytes moved (e = features element size, et = targets'; 128 RoIs, C = 256, 80 classes, 28x28 in brackets)
    forward : R*C*P*e (features, once) + K*C*4 + R*P*(et + 4)  [fp32: 103 + 0.4 + 0.8 MB]
    backward: R*C*P*e read (features) + R*C*P*e written (dF) + R*P*4 + R*C*4 (G)
    The unfused conv1x1 + loss also writes and reads the R*K*P*e logits and their gradient: 4 x 32 MB.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._backend import (FLOAT_DTYPES, InputError, backend_for, check_same_device, check_tensor,
                              compute_dtype, no_autocast)
from kernels._mask_loss_common import (_check_labels, _check_roi_weight, _check_targets, _check_values,
                                       _flat_planes, _need_grad, _plane_strides, _scales, _store_loss_and_grad,
                                       _target_args, _torch_bce, _torch_targets)


@triton.jit
def _mask_predictor_fwd_kernel(
    f_ptr, w_ptr, b_ptr, labels_ptr, t_ptr, boxes_ptr, idx_ptr, rw_ptr, norm_ptr, partial_ptr, out_ptr,
    C, K, P, M, G, H, W, sf_r, sf_c, sf_p, s0, s1, s2, inv_count, has_weight, write_grad,
    LOGITS_ONLY: tl.constexpr, FROM_GT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Label-row logits (LOGITS_ONLY: stored to out) or their loss partials and gradient."""
    cdt = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32  # compute dtype (of w, b too)
    r = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    f_roi = f_ptr + r * sf_r
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_P,), dtype=cdt)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        w = tl.load(w_ptr + label * C + c, mask=cm, other=0.0)
        f = tl.load(f_roi + c[:, None] * sf_c + p[None, :] * sf_p, mask=cm[:, None] & pm[None, :],
                    other=0.0).to(cdt)
        acc += tl.sum(f * w[:, None], axis=0)
    x = acc + tl.load(b_ptr + label)
    if LOGITS_ONLY:
        tl.store(out_ptr + r * P + p, x.to(out_ptr.dtype.element_ty), mask=pm)
    else:
        _store_loss_and_grad(x, r, pb, p, pm, P, t_ptr, M, s0, s1, s2, boxes_ptr, idx_ptr, G, H, W,
                             rw_ptr, norm_ptr, inv_count, has_weight, partial_ptr, out_ptr, write_grad, FROM_GT)


@triton.jit
def _mask_predictor_bwd_kernel(
    g_ptr, gout_ptr, f_ptr, w_ptr, labels_ptr, df_ptr, gw_ptr, C, K, P, sf_r, sf_c, sf_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dF[r, c, :] = g[r, :] * W[label, c] and G[r, c] = <g[r, :], F[r, c, :]>, features read once
    (dF has the features' strides)."""
    cdt = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32  # compute dtype (of g, w, gw)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    label = tl.minimum(tl.maximum(tl.load(labels_ptr + r), 0), K - 1).to(tl.int64)
    w = tl.load(w_ptr + label * C + c, mask=cm, other=0.0)
    gout = tl.load(gout_ptr).to(cdt)
    f_roi = f_ptr + r * sf_r
    df_roi = df_ptr + r * sf_r
    c_off = c[:, None] * sf_c
    acc = tl.zeros((BLOCK_C,), dtype=cdt)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        m = cm[:, None] & pm[None, :]
        off = c_off + p[None, :] * sf_p
        g = tl.load(g_ptr + r * P + p, mask=pm, other=0.0) * gout
        f = tl.load(f_roi + off, mask=m, other=0.0).to(cdt)
        acc += tl.sum(f * g[None, :], axis=1)
        tl.store(df_roi + off, (w[:, None] * g[None, :]).to(df_ptr.dtype.element_ty), mask=m)
    tl.store(gw_ptr + r * C + c, acc, mask=cm)


# [0] is the forward's default, [1] the backward's. 28x28 NCHW features (channels_last alike), registers
# sm_80 / sm_90: forward at [0] 64 / 56 (bf16), 64 / 70 (fp32), 128-bit feature loads and output stores (a
# thread's share of the BLOCK_P outputs must be 128 bits: BLOCK_P >= 8 * threads for bf16 logits); backward at
# [1] 64 / 64 (bf16, fp32), 128-bit loads and stores, no local memory (BLOCK_P=256 at 2 warps spills 8 bytes
# of fp32 on sm_80; the 16 x 256 tile at 4 warps takes 94 / 96 for fp32).
_PREDICTOR_CONFIGS = [
    {"BLOCK_C": 8, "BLOCK_P": 512, "num_warps": 2, "num_stages": 1},
    {"BLOCK_C": 8, "BLOCK_P": 128, "num_warps": 1, "num_stages": 1},
    {"BLOCK_C": 16, "BLOCK_P": 256, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 4, "BLOCK_P": 1024, "num_warps": 4, "num_stages": 1},
]


def get_configs() -> list[dict]:
    return _config.collapse(_PREDICTOR_CONFIGS)


def _check_roi_span(features: torch.Tensor, op: str):
    """The kernels address within one RoI in int32 (64-bit offsets cost 10-40% more registers)."""
    span = sum((n - 1) * abs(s) for n, s in zip(features.shape[1:], features.stride()[1:]))
    if span >= 2 ** 31:
        raise InputError(f"{op}: one RoI's features span {span} elements; at most 2**31 - 1 are supported")


def _dense_planes(features: torch.Tensor) -> torch.Tensor:
    """NCHW- or channels_last-contiguous features as they are, others copied: dF is allocated like the
    result (``empty_like`` keeps a dense tensor's strides), so features and dF share one set of strides."""
    if features.is_contiguous() or features.is_contiguous(memory_format=torch.channels_last):
        return features
    return features.contiguous()


# ----------------------------------------------------------------------------------------------
# Launchers (inputs already validated by the public functions)
# ----------------------------------------------------------------------------------------------
def _launch_predictor_fwd(features, weight, bias, labels, targets, gt_boxes, gt_idx, roi_weight, need_grad,
                          logits_only):
    R, C, M, _ = features.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
    features = _flat_planes(features)  # a copy only for layouts other than NCHW / channels_last (rare)
    P = M * M
    cfg = _config.pick("mask_predictor_fwd", f"p{P}", get_configs(), _PREDICTOR_CONFIGS[0])
    meta, opts = _config.launch_kwargs(cfg)
    n_pb = triton.cdiv(P, meta["BLOCK_P"])
    dev = features.device
    cdt = compute_dtype(features.dtype)  # the kernel's: weight, bias, partial sums, compact gradient
    if logits_only:
        # no targets: channel 0 of the features stands in for them (never read)
        out, partials, targets = torch.empty((R, M, M), dtype=features.dtype, device=dev), None, features[:, 0]
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
            dummy, out if out.numel() else dummy, C, weight.shape[0], P, M, G, H, W, *_plane_strides(features),
            *st, inv, int(w is not None), int(need_grad), LOGITS_ONLY=logits_only, FROM_GT=from_gt, **meta, **opts)
    return out if logits_only else (partials.sum(), out)


def _launch_predictor_bwd(grad_loss, grad, features, weight, labels):
    R, C, M, _ = features.shape
    labels = labels.contiguous()  # the kernels index labels[r] densely
    features = _dense_planes(features)
    cdt = compute_dtype(features.dtype)
    df = torch.empty_like(features)
    gw = torch.empty((R, C), dtype=cdt, device=features.device)
    if R > 0 and C > 0:
        cfg = _config.pick("mask_predictor_bwd", f"p{M * M}", get_configs(), _PREDICTOR_CONFIGS[1])
        meta, opts = _config.launch_kwargs(cfg)
        _mask_predictor_bwd_kernel[(R, triton.cdiv(C, meta["BLOCK_C"]))](
            grad, grad_loss, features, weight.to(cdt).contiguous(), labels, df, gw, C, weight.shape[0], M * M,
            *_plane_strides(features), **meta, **opts)
    return df, gw


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (same maths, vectorized, in compute_dtype: fp32, or fp64 for fp64 inputs)
# ----------------------------------------------------------------------------------------------
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
    df = torch.empty_like(_dense_planes(features))  # the kernels' layout (and the fake's)
    df.copy_((g.view(R, 1, M * M) * w.view(R, C, 1)).view(R, C, M, M))
    return df, torch.einsum("rcp,rp->rc", features.reshape(R, C, M * M).to(g.dtype), g)


# ----------------------------------------------------------------------------------------------
# torch.library registration (op bodies under no_autocast: see mask_loss)
# ----------------------------------------------------------------------------------------------
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
    return torch.empty_like(_dense_planes(features)), \
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
    _check_roi_span(mask_features, op)
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
