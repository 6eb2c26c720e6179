"""RoIPool (Fast R-CNN's quantized max pooling), forward and backward, as Triton kernels.

Mask R-CNN's first ablation compares it with RoIAlign: the box is rounded to the feature grid and
each bin takes the max over its (also quantized) cells, which misaligns masks by up to a cell.

Maths (torchvision's exact rule)
    start = round(x1 * s), end = round(x2 * s)   (round half away from zero; same for y)
    size = max(end - start + 1, 1);  bin = size / (PH, PW), correctly rounded (as torchvision's CUDA kernel;
    Triton's fp32 '/' is approximate and would move bin edges: kernels/_math.py)
    rows [floor(ph * bin_h), ceil((ph + 1) * bin_h)) + start_y, clamped to [0, H]; columns likewise
    out[k, c, ph, pw] = max over the cells (0 for an empty bin); argmax = first max in row-major order
    backward: grad_input[b, c, argmax] += g[k, c, ph, pw]

Bytes moved
    forward : K*C*PH*PW*(e + 4) (output + int32 argmax) + the cells of every bin (each read once:
              about K*C*area_in_cells*e, bounded by K*C*(bin_h+1)*(bin_w+1)*PH*PW*e)
    backward: K*C*PH*PW*(e + 4) + N*C*H*W*(4 + e) (fp32 accumulator, then cast); deterministic: int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._backend import backend_for, compute_dtype, no_autocast
from kernels._math import div_rn_int
from kernels._roi_common import (check_rois, fixed_point_scale, from_fixed_point, pair, rois_from_boxes,
                                 tl_compute_dtype)

_BIG = 1073741824.0  # 2**30: clamp for rounded coordinates before the int conversion


@triton.jit
def _round_half_away(v):
    return tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))


@triton.jit
def _roi_pool_bins(rois_ptr, k, N, H, W, PH, PW, spatial_scale, p, BIG: tl.constexpr, ACC: tl.constexpr):
    """Batch index, per-bin cell ranges [hs, he) x [ws, we) and the loop extent for RoI k (maths in ACC)."""
    b = tl.load(rois_ptr + k * 5).to(ACC)
    x1 = tl.load(rois_ptr + k * 5 + 1).to(ACC) * spatial_scale
    y1 = tl.load(rois_ptr + k * 5 + 2).to(ACC) * spatial_scale
    x2 = tl.load(rois_ptr + k * 5 + 3).to(ACC) * spatial_scale
    y2 = tl.load(rois_ptr + k * 5 + 4).to(ACC) * spatial_scale
    finite = (tl.abs(x1) < BIG) & (tl.abs(y1) < BIG) & (tl.abs(x2) < BIG) & (tl.abs(y2) < BIG)
    b = tl.minimum(tl.maximum(tl.where(b == b, b, 0.0), 0.0), N - 1.0).to(tl.int64)
    sw = _round_half_away(tl.where(finite, x1, 0.0)).to(tl.int32)
    sh = _round_half_away(tl.where(finite, y1, 0.0)).to(tl.int32)
    ew = _round_half_away(tl.where(finite, x2, 0.0)).to(tl.int32)
    eh = _round_half_away(tl.where(finite, y2, 0.0)).to(tl.int32)
    # correctly rounded (fp32 '/' is div.full.f32, <= 2 ulp): floor/ceil of ph * bin below turn one ulp into a
    # whole cell (an approximate bin edge moves for 171 of the integer sizes 1..399 at PH = 7)
    bin_h = div_rn_int(tl.maximum(eh - sh + 1, 1).to(ACC), PH)
    bin_w = div_rn_int(tl.maximum(ew - sw + 1, 1).to(ACC), PW)
    ph = (p // PW).to(ACC)
    pw = (p % PW).to(ACC)
    hs = tl.minimum(tl.maximum(tl.floor(ph * bin_h).to(tl.int32) + sh, 0), H)
    he = tl.minimum(tl.maximum(tl.ceil((ph + 1.0) * bin_h).to(tl.int32) + sh, 0), H)
    ws = tl.minimum(tl.maximum(tl.floor(pw * bin_w).to(tl.int32) + sw, 0), W)
    we = tl.minimum(tl.maximum(tl.ceil((pw + 1.0) * bin_w).to(tl.int32) + sw, 0), W)
    he = tl.where(finite, he, hs)  # non-finite boxes: every bin empty, output 0
    # a bin spans at most ceil(bin)+1 cells, and never more than the map
    nh = tl.minimum(tl.ceil(bin_h).to(tl.int32) + 1, H)
    nw = tl.minimum(tl.ceil(bin_w).to(tl.int32) + 1, W)
    return b, hs, he, ws, we, nh, nw


@triton.jit
def _roi_pool_fwd_kernel(
    x_ptr, rois_ptr, out_ptr, argmax_ptr, N, C, H, W, PH, PW, spatial_scale,
    s_n, s_c, s_h, s_w,
    BIG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    b, hs, he, ws, we, nh, nw = _roi_pool_bins(rois_ptr, k, N, H, W, PH, PW, spatial_scale, p, BIG, ACC)
    mask = (p < PH * PW)[:, None] & (c < C)[None, :]
    base = x_ptr + b * s_n + c[None, :].to(tl.int64) * s_c
    # torchvision starts from -FLT_MAX, so NaN and -inf cells are never taken
    best = tl.full((BLOCK_P, BLOCK_C), -3.4028234663852886e38, ACC)
    best_idx = tl.full((BLOCK_P, BLOCK_C), -1, tl.int32)
    for s in range(0, nh * nw):
        h = hs + s // nw
        w = ws + s % nw
        inside = (h < he) & (w < we)
        m = mask & inside[:, None]
        v = tl.load(base + (h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)[:, None], mask=m,
                    other=float("-inf")).to(ACC)
        take = m & (v > best)
        best = tl.where(take, v, best)
        best_idx = tl.where(take, (h * W + w)[:, None], best_idx)
    empty = (he <= hs)[:, None] | (we <= ws)[:, None]
    best = tl.where(empty, 0.0, best)
    offs = k * C * PH * PW + c[None, :].to(tl.int64) * (PH * PW) + p[:, None]
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(argmax_ptr + offs, best_idx, mask=mask)


@triton.jit
def _roi_pool_bwd_kernel(
    acc_ptr, rois_ptr, grad_ptr, argmax_ptr, fix_scale_ptr, N, C, HW, PH, PW,
    sg_k, sg_c, sg_h, sg_w,
    DETERMINISTIC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    mask = (p < PH * PW)[:, None] & (c < C)[None, :]
    b = tl.load(rois_ptr + k * 5)
    b = tl.minimum(tl.maximum(tl.where(b == b, b, 0.0), 0.0), N - 1.0).to(tl.int64)
    offs = k * C * PH * PW + c[None, :].to(tl.int64) * (PH * PW) + p[:, None]
    idx = tl.load(argmax_ptr + offs, mask=mask, other=-1)
    ph = (p // PW).to(tl.int64)
    pw = (p % PW).to(tl.int64)
    g = tl.load(grad_ptr + k * sg_k + c[None, :].to(tl.int64) * sg_c + (ph * sg_h + pw * sg_w)[:, None],
                mask=mask, other=0.0).to(ACC)
    m = mask & (idx >= 0) & (idx < HW)
    dst = acc_ptr + (b * C + c[None, :].to(tl.int64)) * HW + idx
    if DETERMINISTIC:
        gi = tl.floor(g.to(tl.float64) * tl.load(fix_scale_ptr) + 0.5).to(tl.int64)
        tl.atomic_add(dst, gi, mask=m, sem="relaxed")
    else:
        tl.atomic_add(dst, g, mask=m, sem="relaxed")


_CONFIGS = [
    {"BLOCK_C": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 16, "num_warps": 8, "num_stages": 1},
    {"BLOCK_C": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_C": 64, "num_warps": 8, "num_stages": 1},
    {"BLOCK_C": 8, "num_warps": 8, "num_stages": 1},
]


def get_configs() -> list[dict]:
    return _config.collapse(_CONFIGS)


def default_config(block_p: int, backward: bool = False) -> dict:
    """Spill-free heuristic (bench/compile_report.py checks it): at most 16 values of the tile per thread
    forward, 8 backward (the deterministic int64 tile at 16 spills 8 bytes on sm_90 with triton 3.6)."""
    if block_p <= 64:
        return _CONFIGS[0]
    return _CONFIGS[4] if backward else _CONFIGS[1]



def _launch_fwd(x, rois, ph, pw, spatial_scale):
    K, C = rois.shape[0], x.shape[1]
    out = torch.empty((K, C, ph, pw), dtype=x.dtype, device=x.device)
    argmax = torch.empty((K, C, ph, pw), dtype=torch.int32, device=x.device)
    if K == 0 or C == 0:
        return out, argmax
    block_p = triton.next_power_of_2(ph * pw)
    block, opts = _config.launch_kwargs(_config.pick("roi_pool_fwd", f"p{block_p}", get_configs(),
                                                     default_config(block_p)))
    grid = (K, triton.cdiv(C, block["BLOCK_C"]))
    _roi_pool_fwd_kernel[grid](x, rois, out, argmax, x.shape[0], C, x.shape[2], x.shape[3], ph, pw,
                               float(spatial_scale), *x.stride(), BIG=_BIG, BLOCK_P=block_p,
                               ACC=tl_compute_dtype(x.dtype), **block, **opts)
    return out, argmax


def _launch_bwd(grad, argmax, x, rois, ph, pw, deterministic):
    N, C, H, W = x.shape
    K = rois.shape[0]
    acc_dtype = torch.int64 if deterministic else compute_dtype(x.dtype)
    acc = torch.zeros((N, C, H, W), dtype=acc_dtype, device=x.device)
    fix = fixed_point_scale(grad, K * ph * pw) if deterministic else None
    if K > 0 and C > 0:
        block_p = triton.next_power_of_2(ph * pw)
        op = "roi_pool_bwd_det" if deterministic else "roi_pool_bwd"
        block, opts = _config.launch_kwargs(_config.pick(op, f"p{block_p}", get_configs(),
                                                         default_config(block_p, backward=True)))
        grid = (K, triton.cdiv(C, block["BLOCK_C"]))
        _roi_pool_bwd_kernel[grid](acc, rois, grad, argmax, fix if deterministic else grad, N, C, H * W, ph, pw,
                                   *grad.stride(), DETERMINISTIC=deterministic, BLOCK_P=block_p,
                                   ACC=tl_compute_dtype(x.dtype), **block, **opts)
    if deterministic:
        return from_fixed_point(acc, fix, x.dtype, grad)
    return acc.to(x.dtype)


# PyTorch fallback (CPU without the interpreter) ----------------------------------------------------
def _torch_roi_pool(x, rois, ph, pw, spatial_scale):
    """torchvision's compiled kernel where its behaviour is defined (finite boxes), else the vectorized code."""
    if x.shape[2] == 0 or x.shape[3] == 0:  # no cell to take: every bin is empty (0, argmax -1), as the kernels
        K, C = rois.shape[0], x.shape[1]
        return x.new_zeros((K, C, ph, pw)), torch.full((K, C, ph, pw), -1, dtype=torch.int32, device=x.device)
    if rois.shape[0] > 0 and x.shape[1] > 0 and _finite_boxes(rois, spatial_scale):
        cdt = compute_dtype(x.dtype)
        out, argmax = torch.ops.torchvision.roi_pool(x.to(cdt), rois.to(cdt), float(spatial_scale), ph, pw)
        return out.to(x.dtype), argmax.to(torch.int32)
    return _vectorized_roi_pool(x, rois, ph, pw, spatial_scale)


def _finite_boxes(rois: torch.Tensor, spatial_scale: float) -> bool:
    """Whether torchvision's kernel is safe here: it converts scaled coordinates to int (UB for NaN/inf).
    Reads one bool (a sync, free on the CPU this path runs on)."""
    return bool((rois[:, 1:].abs() * spatial_scale < _BIG).all())


def _vectorized_roi_pool(x, rois, ph, pw, spatial_scale):
    N, C, H, W = x.shape
    K = rois.shape[0]
    dev = x.device
    if K == 0:
        return x.new_empty((0, C, ph, pw)), torch.empty((0, C, ph, pw), dtype=torch.int32, device=dev)
    cdt = compute_dtype(x.dtype)
    r = rois.to(cdt)
    b = r[:, 0].nan_to_num(0).clamp(0, N - 1).long()
    coords = r[:, 1:] * spatial_scale
    finite = coords.abs().lt(_BIG).all(dim=1)
    coords = torch.where(finite[:, None], coords, torch.zeros_like(coords))
    q = (torch.sign(coords) * torch.floor(coords.abs() + 0.5)).long()  # round half away from zero
    sw, sh, ew, eh = q.unbind(1)
    bin_h = (eh - sh + 1).clamp_min(1).to(cdt) / ph
    bin_w = (ew - sw + 1).clamp_min(1).to(cdt) / pw
    ar_h = torch.arange(ph, device=dev, dtype=cdt)
    ar_w = torch.arange(pw, device=dev, dtype=cdt)
    hs = (torch.floor(ar_h[None] * bin_h[:, None]).long() + sh[:, None]).clamp(0, H)
    he = (torch.ceil((ar_h[None] + 1) * bin_h[:, None]).long() + sh[:, None]).clamp(0, H)
    ws = (torch.floor(ar_w[None] * bin_w[:, None]).long() + sw[:, None]).clamp(0, W)
    we = (torch.ceil((ar_w[None] + 1) * bin_w[:, None]).long() + sw[:, None]).clamp(0, W)
    he = torch.where(finite[:, None], he, hs)
    # bin extent is data-dependent: this CPU path reads it (a sync, harmless on CPU)
    Bh = int(min(torch.ceil(bin_h).max() + 1, H)) if K else 1
    Bw = int(min(torch.ceil(bin_w).max() + 1, W)) if K else 1
    hh = hs[:, :, None] + torch.arange(Bh, device=dev)  # [K, PH, Bh]
    ww = ws[:, :, None] + torch.arange(Bw, device=dev)  # [K, PW, Bw]
    inside = (hh < he[:, :, None])[:, :, :, None, None] & (ww < we[:, :, None])[:, None, None, :, :]
    cell = hh.clamp(max=H - 1)[:, :, :, None, None] * W + ww.clamp(max=W - 1)[:, None, None, :, :]
    plane = x.reshape(N, C, H * W)[b].to(cdt)  # [K, C, HW]
    vals = plane.gather(2, cell.reshape(K, 1, -1).expand(K, C, -1)).reshape(K, C, ph, Bh, pw, Bw)
    vals = vals.permute(0, 1, 2, 4, 3, 5).reshape(K, C, ph, pw, Bh * Bw)
    inside = inside.permute(0, 1, 3, 2, 4).reshape(K, 1, ph, pw, Bh * Bw)
    lowest = torch.finfo(torch.float32).min  # torchvision's start value (-FLT_MAX): NaN and -inf cells never win
    takeable = inside & (vals > lowest)
    vals = torch.where(takeable, vals, torch.full_like(vals, lowest))
    best, pos = vals.max(dim=-1)  # first maximum, as torchvision's row-major scan
    cell = cell.permute(0, 1, 3, 2, 4).reshape(K, 1, ph, pw, Bh * Bw).expand(K, C, ph, pw, Bh * Bw)
    argmax = cell.gather(-1, pos[..., None])[..., 0]
    argmax = torch.where(takeable.any(-1), argmax, torch.full_like(argmax, -1))
    empty = ~inside.any(-1).expand_as(best)
    best = torch.where(empty, torch.zeros_like(best), best)
    return best.to(x.dtype), argmax.to(torch.int32)


def _torch_roi_pool_bwd(grad, argmax, x, rois):
    N, C, H, W = x.shape
    if x.numel() == 0:  # nothing to scatter into (every argmax is -1)
        return torch.zeros_like(x)
    b = rois[:, 0].float().nan_to_num(0).clamp(0, N - 1).long()
    valid = argmax >= 0
    dst = (b[:, None, None, None] * C + torch.arange(C, device=x.device)[None, :, None, None]) * (H * W) \
        + argmax.long().clamp_min(0)
    cdt = compute_dtype(x.dtype)
    acc = torch.zeros(N * C * H * W, dtype=cdt, device=x.device)
    acc.index_add_(0, dst.reshape(-1), torch.where(valid, grad.to(cdt), torch.zeros_like(grad, dtype=cdt)).reshape(-1))
    return acc.reshape(N, C, H, W).to(x.dtype)


# torch.library registration --------------------------------------------------------------------------
@torch.library.custom_op("maskrcnn_fast::roi_pool_forward", mutates_args=())
def _roi_pool_forward(input: torch.Tensor, rois: torch.Tensor, pooled_h: int, pooled_w: int,
                      spatial_scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rois = rois.to(compute_dtype(input.dtype)).contiguous()
    with no_autocast(rois.device):
        if backend_for(rois) == "triton":
            return _launch_fwd(input, rois, pooled_h, pooled_w, spatial_scale)
        return _torch_roi_pool(input, rois, pooled_h, pooled_w, spatial_scale)


@_roi_pool_forward.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale, deterministic):
    shape = (rois.shape[0], input.shape[1], pooled_h, pooled_w)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("maskrcnn_fast::roi_pool_backward", mutates_args=())
def _roi_pool_backward(grad: torch.Tensor, argmax: torch.Tensor, input: torch.Tensor, rois: torch.Tensor,
                       pooled_h: int, pooled_w: int, deterministic: bool) -> torch.Tensor:
    rois = rois.to(compute_dtype(input.dtype)).contiguous()
    with no_autocast(rois.device):
        if backend_for(rois) == "triton":
            return _launch_bwd(grad, argmax.contiguous(), input, rois, pooled_h, pooled_w, deterministic)
        return _torch_roi_pool_bwd(grad, argmax, input, rois)


@_roi_pool_backward.register_fake
def _(grad, argmax, input, rois, pooled_h, pooled_w, deterministic):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    input, rois, ph, pw, _, det = inputs
    ctx.save_for_backward(input, rois, output[1])
    ctx.args = (ph, pw, det)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_argmax):
    input, rois, argmax = ctx.saved_tensors
    ph, pw, det = ctx.args
    return _roi_pool_backward(grad, argmax, input, rois, ph, pw, det), None, None, None, None, None


torch.library.register_autograd("maskrcnn_fast::roi_pool_forward", _backward, setup_context=_setup_context)


def roi_pool(input: torch.Tensor, boxes, output_size, spatial_scale: float = 1.0, *,
             deterministic: bool | None = None) -> torch.Tensor:
    """Drop-in for ``torchvision.ops.roi_pool`` (forward and backward); returns ``input.dtype``.

    Boxes with non-finite coordinates give zeros; an empty bin gives 0, as in torchvision.
    """
    ph, pw = pair(output_size)
    rois = rois_from_boxes(boxes, input)
    check_rois([input], rois, "roi_pool")
    det = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    return _roi_pool_forward(input, rois, ph, pw, float(spatial_scale), det)[0]
