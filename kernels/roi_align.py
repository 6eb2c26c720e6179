"""RoIAlign and multi-level (FPN) RoIAlign, forward and backward, as Triton kernels.

Maths (He et al., Mask R-CNN, sec. 3; torchvision's exact sampling rule)
    For RoI k with box (x1, y1, x2, y2) on a level with scale s and offset o = 0.5 if aligned:
        start = (x1 * s - o, y1 * s - o),  size = ((x2 - x1) * s, (y2 - y1) * s)  (>= 1 if not aligned)
        bin = size / (PH, PW);  grid = sampling_ratio, or ceil(size / (PH, PW)) when <= 0
        out[k, c, ph, pw] = 1/count * sum_{iy<grid_h, ix<grid_w} bilinear(X[b, c], y, x)
        y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h   (x likewise)
    Samples with y < -1, y > H, x < -1 or x > W contribute 0 (torchvision's rule).
    Backward scatters g * w_corner / count to the four corners of every sample.

Multi-level: level(k) = clamp(floor(4 + log2(sqrt(area_k) / 224) + 1e-6), k_min, k_max) - k_min,
as torchvision's LevelMapper. One launch covers all levels: each program loads its RoI's level and
selects that level's pointer and geometry.

Bytes moved (the roofline budget; no kernel can move less)
    forward : K*C*PH*PW*e (output) + K*5*4 (rois) + min(unique sampled texels, N*C*H*W)*e reads;
              each sample reads 4 texels, so with 16-byte channel runs (channels_last) the texel
              reads are coalesced; worst case 4*K*C*PH*PW*grid^2*e bytes through L2.
    backward: K*C*PH*PW*e (grad_output) + N*C*H*W*4 (fp32 accumulator, zeroed + atomics)
              + N*C*H*W*e (cast to the input dtype); deterministic: int64 accumulator (8 B/elem).
    e = element size of the features (2 for fp16/bf16, 4 for fp32).

Backends: CUDA -> Triton; CPU + TRITON_INTERPRET=1 -> Triton interpreter; CPU otherwise -> the
vectorized PyTorch code at the bottom (its backward is autograd through the same code).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._backend import InputError, backend_for, compute_dtype, no_autocast
from kernels._compile import TORCH_TO_TRITON, CompileSpec
from kernels._roi_align_torch import _torch_roi_align, _torch_roi_align_bwd
from kernels._roi_common import (MAX_GRID, check_rois, fixed_point_scale, from_fixed_point, pair,
                                 rois_from_boxes, tl_compute_dtype)

MAX_LEVELS = 5
META_COLS = 10   # per level: H, W, in strides (n, c, h, w), grad strides (n, c, h, w)


@triton.jit
def _select_level(lvl, p0, p1, p2, p3, p4, NUM_LEVELS: tl.constexpr):
    ptr = p0
    if NUM_LEVELS > 1:
        if lvl == 1:
            ptr = p1
        if NUM_LEVELS > 2:
            if lvl == 2:
                ptr = p2
            if NUM_LEVELS > 3:
                if lvl == 3:
                    ptr = p3
                if NUM_LEVELS > 4:
                    if lvl == 4:
                        ptr = p4
    return ptr


@triton.jit
def _roi_geometry(rois_ptr, levels_ptr, meta_ptr, scales_ptr, k, N, PH, PW, sampling_ratio,
                  ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr, ACC: tl.constexpr):
    """Everything about RoI k that does not depend on the output bin (in ACC: fp32, or fp64 for fp64 input)."""
    b = tl.load(rois_ptr + k * 5).to(ACC)
    x1 = tl.load(rois_ptr + k * 5 + 1).to(ACC)
    y1 = tl.load(rois_ptr + k * 5 + 2).to(ACC)
    x2 = tl.load(rois_ptr + k * 5 + 3).to(ACC)
    y2 = tl.load(rois_ptr + k * 5 + 4).to(ACC)
    lvl = 0
    if NUM_LEVELS > 1:
        lvl = tl.minimum(tl.maximum(tl.load(levels_ptr + k), 0), NUM_LEVELS - 1)
    scale = tl.load(scales_ptr + lvl).to(ACC)
    # clamp the batch index so that a bad value (also reported by the launcher) stays in bounds
    b = tl.minimum(tl.maximum(tl.where(b == b, b, 0.0), 0.0), N - 1.0).to(tl.int64)
    off = 0.5 if ALIGNED else 0.0
    start_w = x1 * scale - off
    start_h = y1 * scale - off
    roi_w = x2 * scale - off - start_w
    roi_h = y2 * scale - off - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if sampling_ratio > 0:
        grid_h = sampling_ratio
        grid_w = sampling_ratio
    else:
        # NaN sizes give an empty grid (output 0); huge ones are capped at MAX_GRID
        gh = tl.where(roi_h == roi_h, tl.ceil(roi_h / PH), 0.0)
        gw = tl.where(roi_w == roi_w, tl.ceil(roi_w / PW), 0.0)
        grid_h = tl.minimum(tl.maximum(gh, 0.0), MAX_GRID).to(tl.int32)
        grid_w = tl.minimum(tl.maximum(gw, 0.0), MAX_GRID).to(tl.int32)
    count = tl.maximum(grid_h * grid_w, 1).to(ACC)
    H = tl.load(meta_ptr + lvl * 10 + 0)
    W = tl.load(meta_ptr + lvl * 10 + 1)
    return b, lvl, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count, H, W


@triton.jit
def _bilinear(y, x, H, W):
    """torchvision's bilinear_interpolate: corner indices, weights and validity for sample (y, x)."""
    Hf = H.to(y.dtype)
    Wf = W.to(x.dtype)
    valid = (y >= -1.0) & (y <= Hf) & (x >= -1.0) & (x <= Wf)
    y = tl.where(valid, tl.maximum(y, 0.0), 0.0)  # NaN/inf never reach the int conversion
    x = tl.where(valid, tl.maximum(x, 0.0), 0.0)
    y_low = y.to(tl.int32)
    x_low = x.to(tl.int32)
    y_top = y_low >= H - 1
    x_top = x_low >= W - 1
    y_low = tl.where(y_top, H - 1, y_low)
    x_low = tl.where(x_top, W - 1, x_low)
    y_high = tl.where(y_top, H - 1, y_low + 1)
    x_high = tl.where(x_top, W - 1, x_low + 1)
    y = tl.where(y_top, y_low.to(y.dtype), y)
    x = tl.where(x_top, x_low.to(x.dtype), x)
    ly = y - y_low.to(y.dtype)
    lx = x - x_low.to(x.dtype)
    hy = 1.0 - ly
    hx = 1.0 - lx
    return valid, y_low, x_low, y_high, x_high, hy * hx, hy * lx, ly * hx, ly * lx


@triton.jit
def _sample_corners(s, grid_h, grid_w, start_h, start_w, ph, pw, bin_h, bin_w, H, W, s_h, s_w):
    """Sample s of every bin: validity, the int64 offsets of its four corners, and their weights."""
    iy = s // grid_w
    ix = s - iy * grid_w
    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
    x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
    valid, y_lo, x_lo, y_hi, x_hi, w1, w2, w3, w4 = _bilinear(y, x, H, W)
    r_lo = y_lo.to(tl.int64) * s_h
    r_hi = y_hi.to(tl.int64) * s_h
    c_lo = x_lo.to(tl.int64) * s_w
    c_hi = x_hi.to(tl.int64) * s_w
    return valid, r_lo + c_lo, r_lo + c_hi, r_hi + c_lo, r_hi + c_hi, w1, w2, w3, w4


@triton.jit
def _level_strides(meta_ptr, lvl, first_col, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) strides of level ``lvl`` from its meta row, starting at ``first_col``
    (2: the features, 6: the gradient accumulators)."""
    row = meta_ptr + lvl * 10 + first_col
    s_c = 1 if CHANNELS_LAST else tl.load(row + 1)  # constexpr 1: 16-byte channel runs
    return tl.load(row), s_c, tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _roi_align_fwd_kernel(
    x0, x1, x2, x3, x4, meta_ptr, scales_ptr, rois_ptr, levels_ptr, out_ptr,
    N, C, PH, PW, sampling_ratio,
    ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    b, lvl, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count, H, W = _roi_geometry(
        rois_ptr, levels_ptr, meta_ptr, scales_ptr, k, N, PH, PW, sampling_ratio,
        ALIGNED, NUM_LEVELS, MAX_GRID, ACC)
    x_ptr = _select_level(lvl, x0, x1, x2, x3, x4, NUM_LEVELS)
    s_n, s_c, s_h, s_w = _level_strides(meta_ptr, lvl, 2, CHANNELS_LAST)

    ph = (p // PW).to(ACC)
    pw = (p % PW).to(ACC)
    mask = (p < PH * PW)[:, None] & (c < C)[None, :]
    base = x_ptr + b * s_n + c[None, :].to(tl.int64) * s_c
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for s in range(0, grid_h * grid_w):
        valid, o1, o2, o3, o4, w1, w2, w3, w4 = _sample_corners(
            s, grid_h, grid_w, start_h, start_w, ph, pw, bin_h, bin_w, H, W, s_h, s_w)
        m = mask & valid[:, None]
        v1 = tl.load(base + o1[:, None], mask=m, other=0.0).to(ACC)
        v2 = tl.load(base + o2[:, None], mask=m, other=0.0).to(ACC)
        v3 = tl.load(base + o3[:, None], mask=m, other=0.0).to(ACC)
        v4 = tl.load(base + o4[:, None], mask=m, other=0.0).to(ACC)
        acc += w1[:, None] * v1 + w2[:, None] * v2 + w3[:, None] * v3 + w4[:, None] * v4
    out = acc / count
    out_offs = k * C * PH * PW + c[None, :].to(tl.int64) * (PH * PW) + p[:, None]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _roi_align_bwd_kernel(
    g0, g1, g2, g3, g4, meta_ptr, scales_ptr, rois_ptr, levels_ptr, grad_ptr, fix_scale_ptr,
    N, C, PH, PW, sampling_ratio, sg_k, sg_c, sg_h, sg_w,
    ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr,
    DETERMINISTIC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    b, lvl, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count, H, W = _roi_geometry(
        rois_ptr, levels_ptr, meta_ptr, scales_ptr, k, N, PH, PW, sampling_ratio,
        ALIGNED, NUM_LEVELS, MAX_GRID, ACC)
    acc_ptr = _select_level(lvl, g0, g1, g2, g3, g4, NUM_LEVELS)
    s_n, s_c, s_h, s_w = _level_strides(meta_ptr, lvl, 6, CHANNELS_LAST)

    ph_i = p // PW
    pw_i = p % PW
    ph = ph_i.to(ACC)
    pw = pw_i.to(ACC)
    mask = (p < PH * PW)[:, None] & (c < C)[None, :]
    g_offs = k * sg_k + c[None, :].to(tl.int64) * sg_c + (ph_i.to(tl.int64) * sg_h + pw_i * sg_w)[:, None]
    g = tl.load(grad_ptr + g_offs, mask=mask, other=0.0).to(ACC)
    if DETERMINISTIC:
        fix_scale = tl.load(fix_scale_ptr)
    base = acc_ptr + b * s_n + c[None, :].to(tl.int64) * s_c
    for s in range(0, grid_h * grid_w):
        valid, o1, o2, o3, o4, w1, w2, w3, w4 = _sample_corners(
            s, grid_h, grid_w, start_h, start_w, ph, pw, bin_h, bin_w, H, W, s_h, s_w)
        m = mask & valid[:, None]
        v1 = g * w1[:, None] / count
        v2 = g * w2[:, None] / count
        v3 = g * w3[:, None] / count
        v4 = g * w4[:, None] / count
        if DETERMINISTIC:
            v1 = tl.floor(v1.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
            v2 = tl.floor(v2.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
            v3 = tl.floor(v3.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
            v4 = tl.floor(v4.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
        tl.atomic_add(base + o1[:, None], v1, mask=m, sem="relaxed")
        tl.atomic_add(base + o2[:, None], v2, mask=m, sem="relaxed")
        tl.atomic_add(base + o3[:, None], v3, mask=m, sem="relaxed")
        tl.atomic_add(base + o4[:, None], v4, mask=m, sem="relaxed")


_CONFIGS = [
    {"BLOCK_C": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 16, "num_warps": 8, "num_stages": 1},
    {"BLOCK_C": 8, "num_warps": 8, "num_stages": 1},
    {"BLOCK_C": 32, "num_warps": 8, "num_stages": 1},
    {"BLOCK_C": 64, "num_warps": 8, "num_stages": 1},
]


def get_configs() -> list[dict]:
    return _config.collapse(_CONFIGS)


def default_config(block_p: int, backward: bool, fp64: bool = False) -> dict:
    """Spill-free heuristic (checked by bench/compile_report.py): the forward holds up to 16 fp32 values
    of the [P, C] tile per thread, the backward (four atomic address tiles live at once) 8; half as many
    fp64 values (two registers each)."""
    per_thread = (8 if backward else 16) // (2 if fp64 else 1)
    for cfg in _CONFIGS:
        if block_p * cfg["BLOCK_C"] <= per_thread * 32 * cfg["num_warps"]:
            return cfg
    return _CONFIGS[0]


def _block_p(ph: int, pw: int) -> int:
    return triton.next_power_of_2(ph * pw)


def _channels_last(tensors: Sequence[torch.Tensor]) -> bool:
    return all(t.stride(1) == 1 for t in tensors)


@functools.lru_cache(maxsize=256)
def _cached_meta(rows: tuple, scales: tuple, scale_dtype: torch.dtype, device: torch.device):
    """Launch metadata as device tensors, made once per (shapes, strides, scales, device): a steady-state
    call creates no tensor from host data, so a step can be captured in a CUDA graph."""
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    return meta, torch.tensor(scales, dtype=scale_dtype).to(device)


def _level_meta(features: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None, scales):
    rows = []
    for i, f in enumerate(features):
        gs = grads[i].stride() if grads is not None else f.stride()
        rows.append((f.shape[2], f.shape[3], *f.stride(), *gs))
    return _cached_meta(tuple(rows), tuple(float(v) for v in scales), compute_dtype(features[0].dtype),
                        features[0].device)


def _launch_fwd(features, rois, levels, scales, ph, pw, sampling_ratio, aligned) -> torch.Tensor:
    x = features[0]
    K, C = rois.shape[0], x.shape[1]
    out = torch.empty((K, C, ph, pw), dtype=x.dtype, device=x.device)
    if K == 0 or C == 0:
        return out
    meta, scales_t = _level_meta(features, None, scales)
    cfg = _config.pick("roi_align_fwd", f"p{_block_p(ph, pw)}", get_configs(),
                       default_config(_block_p(ph, pw), False, x.dtype == torch.float64))
    block, opts = _config.launch_kwargs(cfg)
    ptrs = list(features) + [x] * (MAX_LEVELS - len(features))
    grid = (K, triton.cdiv(C, block["BLOCK_C"]))
    _roi_align_fwd_kernel[grid](*ptrs, meta, scales_t, rois, levels, out, x.shape[0], C, ph, pw,
                                sampling_ratio, ALIGNED=aligned, NUM_LEVELS=len(features),
                                MAX_GRID=MAX_GRID, CHANNELS_LAST=_channels_last(features),
                                BLOCK_P=_block_p(ph, pw), ACC=tl_compute_dtype(x.dtype), **block, **opts)
    return out


def _launch_bwd(grad, features, rois, levels, scales, ph, pw, sampling_ratio, aligned,
                deterministic) -> list[torch.Tensor]:
    x = features[0]
    K, C = rois.shape[0], x.shape[1]
    acc_dtype = torch.int64 if deterministic else compute_dtype(x.dtype)
    # accumulators keep the features' layout (channels_last stays channels_last)
    accs = [torch.zeros_like(f, dtype=acc_dtype) for f in features]
    fix = fixed_point_scale(grad, K * ph * pw) if deterministic else None
    if K > 0 and C > 0:
        meta, scales_t = _level_meta(features, accs, scales)
        cfg = _config.pick("roi_align_bwd_det" if deterministic else "roi_align_bwd",
                           f"p{_block_p(ph, pw)}", get_configs(),
                           default_config(_block_p(ph, pw), True, x.dtype == torch.float64))
        block, opts = _config.launch_kwargs(cfg)
        ptrs = accs + [accs[0]] * (MAX_LEVELS - len(accs))
        grid = (K, triton.cdiv(C, block["BLOCK_C"]))
        _roi_align_bwd_kernel[grid](*ptrs, meta, scales_t, rois, levels, grad,
                                    fix if deterministic else scales_t, x.shape[0], C, ph, pw,
                                    sampling_ratio, *grad.stride(), ALIGNED=aligned,
                                    NUM_LEVELS=len(features), MAX_GRID=MAX_GRID,
                                    CHANNELS_LAST=_channels_last(features + accs),
                                    DETERMINISTIC=deterministic, BLOCK_P=_block_p(ph, pw),
                                    ACC=tl_compute_dtype(x.dtype), **block, **opts)
    if deterministic:
        return [from_fixed_point(a, fix, f.dtype, grad) for a, f in zip(accs, features)]
    return [a if a.dtype == f.dtype else a.to(f.dtype) for a, f in zip(accs, features)]


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
def _compute_rois(rois: torch.Tensor, features) -> torch.Tensor:
    """Boxes in the compute dtype (fp64 for fp64 features, else fp32), whatever dtype they came in."""
    return rois.to(compute_dtype(features[0].dtype)).contiguous()


@torch.library.custom_op("maskrcnn_fast::roi_align_forward", mutates_args=())
def _roi_align_forward(features: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,
                       spatial_scales: list[float], pooled_h: int, pooled_w: int, sampling_ratio: int,
                       aligned: bool, deterministic: bool) -> torch.Tensor:
    args = (list(features), _compute_rois(rois, features), levels.contiguous(), list(spatial_scales),
            pooled_h, pooled_w, sampling_ratio, aligned)
    with no_autocast(rois.device):
        if backend_for(rois) == "triton":
            return _launch_fwd(*args)
        return _torch_roi_align(*args)


@_roi_align_forward.register_fake
def _(features, rois, levels, spatial_scales, pooled_h, pooled_w, sampling_ratio, aligned, deterministic):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_h, pooled_w))


@torch.library.custom_op("maskrcnn_fast::roi_align_backward", mutates_args=())
def _roi_align_backward(grad: torch.Tensor, features: list[torch.Tensor], rois: torch.Tensor,
                        levels: torch.Tensor, spatial_scales: list[float], pooled_h: int, pooled_w: int,
                        sampling_ratio: int, aligned: bool, deterministic: bool) -> list[torch.Tensor]:
    args = (list(features), _compute_rois(rois, features), levels.contiguous(), list(spatial_scales),
            pooled_h, pooled_w, sampling_ratio, aligned)
    with no_autocast(rois.device):
        if backend_for(rois) == "triton":
            return _launch_bwd(grad, *args, deterministic)
        return _torch_roi_align_bwd(grad, *args)


@_roi_align_backward.register_fake
def _(grad, features, rois, levels, spatial_scales, pooled_h, pooled_w, sampling_ratio, aligned, deterministic):
    return [torch.empty_like(f) for f in features]


def _setup_context(ctx, inputs, output):
    features, rois, levels, scales, ph, pw, sr, aligned, det = inputs
    ctx.save_for_backward(*features, rois, levels)
    ctx.n_levels = len(features)
    ctx.args = (list(scales), ph, pw, sr, aligned, det)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    features, (rois, levels) = list(saved[:ctx.n_levels]), saved[ctx.n_levels:]
    grads = _roi_align_backward(grad, features, rois, levels, *ctx.args)
    return list(grads), None, None, None, None, None, None, None, None


torch.library.register_autograd("maskrcnn_fast::roi_align_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API (torchvision.ops signatures)
# ----------------------------------------------------------------------------------------------
def _deterministic(flag: bool | None) -> bool:
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def roi_align(input: torch.Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, *, deterministic: bool | None = None) -> torch.Tensor:
    """Drop-in for ``torchvision.ops.roi_align``; returns ``input.dtype``.

    ``boxes`` is ``Tensor[K,5]`` (batch index, x1, y1, x2, y2) or a list of ``Tensor[L,4]``, of any float
    dtype; the maths is fp32 (fp64 for fp64 input). ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``) selects the bitwise-reproducible backward. Defined behaviour: boxes outside the map are sampled
    as torchvision does (zeros beyond one pixel); boxes with NaN coordinates give zeros.
    """
    ph, pw = pair(output_size)
    rois = rois_from_boxes(boxes, input)
    check_rois([input], rois, "roi_align")
    levels = torch.zeros(rois.shape[0], dtype=torch.int32, device=rois.device)
    return _roi_align_forward([input], rois, levels, [float(spatial_scale)], ph, pw, int(sampling_ratio),
                              bool(aligned), _deterministic(deterministic))


def _levels_for(rois: torch.Tensor, spatial_scales: Sequence[float], canonical_scale: int,
                canonical_level: int) -> torch.Tensor:
    """torchvision's LevelMapper, elementwise on the device (no host sync)."""
    k_min = round(-math.log2(spatial_scales[0]))
    k_max = round(-math.log2(spatial_scales[-1]))
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    s = torch.sqrt(area)
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + 1e-6)
    lvl = torch.clamp(lvl.nan_to_num(k_min), min=k_min, max=k_max)
    return (lvl - k_min).to(torch.int32)


def multiscale_roi_align(features: Sequence[torch.Tensor], rois, output_size, spatial_scales: Sequence[float],
                         sampling_ratio: int = 2, aligned: bool = False, canonical_scale: int = 224,
                         canonical_level: int = 4, *, deterministic: bool | None = None) -> torch.Tensor:
    """Pool every RoI from its FPN level in one launch; equals torchvision's ``MultiScaleRoIAlign``.

    ``features``: ``[N,C,Hl,Wl]`` per level, finest first; ``spatial_scales``: their scales
    (e.g. 1/4 ... 1/32); ``rois``: ``Tensor[K,5]`` or a list of ``Tensor[L,4]``.
    """
    features = list(features)
    if not 1 <= len(features) <= MAX_LEVELS:
        raise InputError(f"multiscale_roi_align: between 1 and {MAX_LEVELS} levels, got {len(features)}")
    if len(spatial_scales) != len(features):
        raise InputError(f"multiscale_roi_align: {len(features)} levels but {len(spatial_scales)} scales")
    ph, pw = pair(output_size)
    rois = rois_from_boxes(rois, features[0])
    check_rois(features, rois, "multiscale_roi_align")
    levels = _levels_for(rois, spatial_scales, canonical_scale, canonical_level)
    return _roi_align_forward(features, rois, levels, [float(s) for s in spatial_scales], ph, pw,
                              int(sampling_ratio), bool(aligned), _deterministic(deterministic))


def _spec(dtype: str, cfg: dict, levels: int, aligned: bool, block_p: int, det: bool | None, default: bool,
          channels_last: bool):
    t = TORCH_TO_TRITON[dtype]
    block, opts = _config.launch_kwargs(cfg)
    acc_t = "fp64" if dtype == "float64" else "fp32"
    const = dict(ALIGNED=aligned, NUM_LEVELS=levels, MAX_GRID=MAX_GRID, CHANNELS_LAST=channels_last,
                 BLOCK_P=block_p, **block, ACC=tl_compute_dtype(getattr(torch, dtype)))
    common = {"meta_ptr": "*i64", "scales_ptr": f"*{acc_t}", "rois_ptr": f"*{acc_t}", "levels_ptr": "*i32"}
    dims = {"N": "i32", "C": "i32", "PH": "i32", "PW": "i32", "sampling_ratio": "i32"}
    tag = (f"{dtype},L{levels},al{int(aligned)},cl{int(channels_last)},P{block_p},C{block['BLOCK_C']},"
           f"w{opts['num_warps']}")
    if det is None:
        sig = {**{f"x{i}": f"*{t}" for i in range(MAX_LEVELS)}, **common, "out_ptr": f"*{t}", **dims,
               **{k: "constexpr" for k in const}}
        return CompileSpec(f"roi_align_fwd[{tag}]", _roi_align_fwd_kernel, sig, const, default=default, **opts)
    const["DETERMINISTIC"] = det
    acc = "i64" if det else acc_t
    sig = {**{f"g{i}": f"*{acc}" for i in range(MAX_LEVELS)}, **common, "grad_ptr": f"*{t}",
           "fix_scale_ptr": "*fp64" if det else "*fp32", **dims,
           **{k: "i64" for k in ("sg_k", "sg_c", "sg_h", "sg_w")}, **{k: "constexpr" for k in const}}
    return CompileSpec(f"roi_align_bwd[det{int(det)},{tag}]", _roi_align_bwd_kernel, sig, const,
                       default=default, **opts)


def compile_specs() -> list[CompileSpec]:
    """Every config for 7x7 and 14x14 bins (bf16, 5 levels, channels_last) in every mode; the dtype and
    level/alignment variants with the default configs. ``default`` marks the configs the heuristic uses."""
    specs = []
    for cfg in _CONFIGS:
        for block_p in (64, 256):
            for det in (None, False, True):
                used = cfg == default_config(block_p, det is not None)
                specs.append(_spec("bfloat16", cfg, 5, False, block_p, det, default=used, channels_last=True))
    for dtype, levels, aligned, channels_last in (("float32", 1, False, False), ("float16", 5, True, False),
                                                  ("float64", 1, False, False)):
        for det in (None, False, True):
            cfg = default_config(64, det is not None, dtype == "float64")
            specs.append(_spec(dtype, cfg, levels, aligned, 64, det, default=True,
                               channels_last=channels_last))
    return specs
