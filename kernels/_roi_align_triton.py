"""RoIAlign forward and backward Triton kernels (the launchers, op registration and API are in roi_align.py).

Layout and vector width
    Each program owns BLOCK_P bins x BLOCK_C channels of one RoI. Every level is dense in one of two
    layouts, chosen by the CHANNELS_LAST constexpr, and its strides are derived in the kernel from the
    channel count C, a kernel argument, and the level's H, W:
        channels_last (NHWC): channel stride 1, pixel stride C, row stride W*C, image stride H*W*C
        contiguous (NCHW):    channel stride H*W, pixel stride 1, row stride W, image stride C*H*W
    So in NHWC every texel address is (pixel * C + c): when C % 16 == 0 the JIT's divisibility-16
    specialization of C proves 16-byte runs along the channels, and each thread loads 8 bf16/fp16 or
    4 fp32 channels with one 128-bit load, and the backward adds 4 fp32 channels with one vector
    reduction (sm_90). C == 1 (the mask targets) specializes to a constant. In-image offsets are int64.
    In NHWC the tile is [P, C] (BINS_FIRST) with the lanes along the channels. In NCHW, where channels
    are H*W apart, the lanes go along the bins: they read neighbouring pixels of one plane, as
    torchvision's NCHW kernel, the output store and gradient read need no layout conversion, and each
    thread keeps the geometry of 1-2 bins instead of 8-16 (BINS_FIRST is chosen per triton version by
    the launcher, see roi_align._bins_first).

    The gradient of the output is read through its strides (sg_k, sg_c, sg_p): contiguous NCHW gives
    sg_p == 1 (a constant: lanes along the bins, coalesced) and channels_last gives sg_c == 1 (16-byte
    runs along C, matching the accumulators).

Sampling
    The samples are visited iy-major, the y half of the bilinear weights once per row of samples.
    SR2 (sampling_ratio == 2, the model's box and mask heads; MLPerf's kernel specializes it too) makes
    count = 4 and the sample offsets ((i + 0.5) / 2) * bin compile-time: no adaptive-grid arithmetic, no
    division by the grid. The loops stay rolled on purpose: unrolled (tl.static_range), ptxas hoists all
    16 corner loads of a bin and the bf16 forward needs 144 registers instead of 96 (sm_90), the
    deterministic backward 255; so even SR2's grid (2) stays a runtime loop bound -- a constant trip count
    of 2 lets LLVM unroll them (deterministic backward: 91 registers instead of 51, sm_90). 1/count is
    computed once per RoI; the backward scales the output gradient by it once per bin.

Division (issue 23)
    fp32 '/' compiles to div.full.f32 (up to 2 ulp); torchvision's CUDA kernel divides correctly rounded.
    Every quotient here is correctly rounded by kernels._math.div_rn_int (each divisor is a positive
    integer: PH, PW, the grid, the count; straight-line fp32, no call), computed once per RoI, none left
    in the sample loops (the audit's approx_div is 0, gated in tests/test_compile.py):
    * discrete -- the adaptive grid ceil(roi / PH): an approximate quotient adds a sample row for sizes
      such as 84, 168, 196 at PH = 28 (18 of the sizes 1..1199 under div.full emulated as a * RN(1/P);
      every multiple of P under +2 ulp);
    * continuous -- decided by measurement (float64 evaluation, numpy: box head = P2 200 x 304 randn
      features, 512 boxes up to 400 px, 7x7, SR2; mask targets = 0/1 mask, 28x28, adaptive grid). Max
      output change from a 2-ulp error in each quotient, against the fp32 computation's own error (fp32
      torchvision vs float64: 4.6e-5 box head, 3.0e-5 mask targets):
          bin = roi / P          3.6e-5 (0.80x)   1.2e-5 (0.41x)
          step = bin / grid      5.6e-6 (0.12x)   4.4e-7 (0.015x)
          1 / count              6.3e-7 (0.014x)  2.6e-7 (0.009x)
      and from hoisting the step out of the loop, (i + 0.5) * RN(bin / grid) instead of torchvision's
      RN((i + 0.5) * bin) / grid per sample: 0 (SR2: identical) / 1.8e-7 (0.006x).
      The bin's 2-ulp error is as large as all other rounding together, so it is correctly rounded; step
      and 1/count are too, as they cost nothing measurable: per RoI, div_rn_int is ~11 instructions
      against div.full's ~8, and the step, now a per-RoI value, takes the division out of the sample loop.
      Compiled for sm_80/sm_90 (bench/compile_report.py, every RoIAlign variant it launches, against the
      code with fp32 '/'): forward +0..+40 static SASS instructions, registers -16..0; backward -112..+16
      instructions, registers -5..+2; no spills; the same global accesses, except that the deterministic
      NCHW backward's sample loop no longer unrolls (8 static 64-bit atomics instead of 16). tl.math.div_rn
      (div.rn.f32) would add ~100 instructions per kernel: kernels/_math.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._math import div_rn_int


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
def _roi_geometry(rois_ptr, levels_ptr, hw_ptr, scales_ptr, k, N, PH, PW, sampling_ratio,
                  ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr,
                  SR2: tl.constexpr, ACC: tl.constexpr):
    """Everything about RoI k that does not depend on the bin (in ACC: fp32, or fp64 for fp64 input)."""
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
    # every quotient correctly rounded, once per RoI (see "Division" in the module docstring)
    bin_h = div_rn_int(roi_h, PH)
    bin_w = div_rn_int(roi_w, PW)
    if SR2:
        # sampling_ratio == 2 (the launcher's SR2), a runtime loop bound that keeps the loops rolled (Sampling)
        grid_h = sampling_ratio
        grid_w = sampling_ratio
        step_h = bin_h  # halved in _offset: (i + 0.5) / 2 is exact, and no extra value stays live
        step_w = bin_w
        inv_count = 0.25
    else:
        if sampling_ratio > 0:
            grid_h = sampling_ratio
            grid_w = sampling_ratio
        else:
            # ceil(roi_h / PH) of the correctly rounded quotient, as torchvision's; NaN sizes give an empty
            # grid (output 0); huge ones are capped at MAX_GRID
            gh = tl.where(roi_h == roi_h, tl.ceil(bin_h), 0.0)
            gw = tl.where(roi_w == roi_w, tl.ceil(bin_w), 0.0)
            grid_h = tl.minimum(tl.maximum(gh, 0.0), MAX_GRID).to(tl.int32)
            grid_w = tl.minimum(tl.maximum(gw, 0.0), MAX_GRID).to(tl.int32)
        # an empty grid samples nothing: its step is never used
        step_h = div_rn_int(bin_h, tl.maximum(grid_h, 1))
        step_w = div_rn_int(bin_w, tl.maximum(grid_w, 1))
        inv_count = div_rn_int(tl.full([], 1.0, ACC), tl.maximum(grid_h * grid_w, 1))
    H = tl.load(hw_ptr + lvl * 2)
    W = tl.load(hw_ptr + lvl * 2 + 1)
    return b, lvl, start_h, start_w, bin_h, bin_w, grid_h, grid_w, step_h, step_w, inv_count, H, W


@triton.jit
def _axis(v, size):
    """One axis of torchvision's bilinear_interpolate: validity, low/high index, weights of low/high.
    An empty axis (size 0) has no valid sample, so nothing outside the map is ever addressed."""
    valid = (v >= -1.0) & (v <= size.to(v.dtype)) & (size > 0)
    v = tl.where(valid, tl.maximum(v, 0.0), 0.0)  # NaN/inf never reach the int conversion
    lo = v.to(tl.int32)
    top = lo >= size - 1
    lo = tl.where(top, size - 1, lo)
    hi = tl.where(top, size - 1, lo + 1)
    v = tl.where(top, lo.to(v.dtype), v)
    frac = v - lo.to(v.dtype)
    return valid, lo, hi, 1.0 - frac, frac


@triton.jit
def _bilinear(y, x, H, W):
    """torchvision's bilinear_interpolate: corner indices, weights and validity for sample (y, x)."""
    vy, y_lo, y_hi, hy, ly = _axis(y, H)
    vx, x_lo, x_hi, hx, lx = _axis(x, W)
    return vy & vx, y_lo, x_lo, y_hi, x_hi, hy * hx, hy * lx, ly * hx, ly * lx


@triton.jit
def _bins(v, BINS_FIRST: tl.constexpr):
    """A per-bin vector as a tile operand: the bins are dim 0 of the NHWC tile [P, C] (lanes along the
    channels: 16-byte runs) and dim 1 of the NCHW tile [C, P] (lanes along the bins, as torchvision's
    NCHW kernel: neighbouring bins sample neighbouring pixels of one channel plane)."""
    if BINS_FIRST:
        t = v[:, None]
    else:
        t = v[None, :]
    return t


@triton.jit
def _chans(v, BINS_FIRST: tl.constexpr):
    """A per-channel vector as a tile operand (see :func:`_bins`)."""
    if BINS_FIRST:
        t = v[None, :]
    else:
        t = v[:, None]
    return t


@triton.jit
def _offset(i, step, SR2: tl.constexpr):
    """Offset of sample i in its bin: torchvision's (i + 0.5) * bin / grid as (i + 0.5) * step, step = bin / grid
    (correctly rounded, per RoI); SR2: step = bin and ((i + 0.5) / 2) * bin, which is exactly torchvision's."""
    if SR2:
        o = ((i + 0.5) * 0.5) * step
    else:
        o = (i + 0.5) * step
    return o


@triton.jit
def _row(start_h, ph, bin_h, iy, step_h, H, s_h, SR2: tl.constexpr):
    """y half of a sample: validity, int64 offsets of the low/high rows, their weights."""
    y = start_h + ph * bin_h + _offset(iy, step_h, SR2)
    vy, lo, hi, hy, ly = _axis(y, H)
    return vy, lo.to(tl.int64) * s_h, hi.to(tl.int64) * s_h, hy, ly


@triton.jit
def _col(start_w, pw, bin_w, ix, step_w, W, s_w, SR2: tl.constexpr):
    """x half of a sample (as :func:`_row`)."""
    x = start_w + pw * bin_w + _offset(ix, step_w, SR2)
    vx, lo, hi, hx, lx = _axis(x, W)
    return vx, lo.to(tl.int64) * s_w, hi.to(tl.int64) * s_w, hx, lx


@triton.jit
def _gather4(base, r_lo, r_hi, vy, hy, ly, start_w, pw, bin_w, ix, step_w, W, s_w, mask,
             SR2: tl.constexpr, BINS_FIRST: tl.constexpr, ACC: tl.constexpr):
    """Bilinear value of one sample for the whole tile."""
    vx, c_lo, c_hi, hx, lx = _col(start_w, pw, bin_w, ix, step_w, W, s_w, SR2)
    m = mask & _bins(vy & vx, BINS_FIRST)
    v1 = tl.load(base + _bins(r_lo + c_lo, BINS_FIRST), mask=m, other=0.0).to(ACC)
    v2 = tl.load(base + _bins(r_lo + c_hi, BINS_FIRST), mask=m, other=0.0).to(ACC)
    v3 = tl.load(base + _bins(r_hi + c_lo, BINS_FIRST), mask=m, other=0.0).to(ACC)
    v4 = tl.load(base + _bins(r_hi + c_hi, BINS_FIRST), mask=m, other=0.0).to(ACC)
    return (_bins(hy * hx, BINS_FIRST) * v1 + _bins(hy * lx, BINS_FIRST) * v2
            + _bins(ly * hx, BINS_FIRST) * v3 + _bins(ly * lx, BINS_FIRST) * v4)


@triton.jit
def _level_strides(C, H, W, CHANNELS_LAST: tl.constexpr):
    """(image, channel, row, pixel) strides of a dense level (int64 where they multiply)."""
    hw = H.to(tl.int64) * W
    if CHANNELS_LAST:
        s_c = 1
        s_h = W.to(tl.int64) * C
        s_w = C
    else:
        s_c = hw
        s_h = W.to(tl.int64)
        s_w = 1
    return hw * C, s_c, s_h, s_w


@triton.jit
def _tile(pid_kc, pid_p, C, PH, PW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BINS_FIRST: tl.constexpr):
    """RoI, channels, bins and tile mask of this program (channel blocks of one RoI are neighbours in
    the grid)."""
    n_cblk = tl.cdiv(C, BLOCK_C)
    k = (pid_kc // n_cblk).to(tl.int64)
    c = (pid_kc % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = _bins(p < PH * PW, BINS_FIRST) & _chans(c < C, BINS_FIRST)
    return k, c, p, mask


@triton.jit
def _program(p0, p1, p2, p3, p4, hw_ptr, scales_ptr, rois_ptr, levels_ptr, N, C, PH, PW, sampling_ratio,
             ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr, SR2: tl.constexpr,
             CHANNELS_LAST: tl.constexpr, BINS_FIRST: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """What forward and backward share: this program's tile (RoI k, channels c, bins p, mask), the
    RoI's sampling geometry, and the address of its image's channels c on its level (p0..p4: the
    features forward, their gradient backward)."""
    k, c, p, mask = _tile(tl.program_id(0), tl.program_id(1), C, PH, PW, BLOCK_P, BLOCK_C, BINS_FIRST)
    b, lvl, start_h, start_w, bin_h, bin_w, grid_h, grid_w, step_h, step_w, inv_count, H, W = _roi_geometry(
        rois_ptr, levels_ptr, hw_ptr, scales_ptr, k, N, PH, PW, sampling_ratio,
        ALIGNED, NUM_LEVELS, MAX_GRID, SR2, ACC)
    s_n, s_c, s_h, s_w = _level_strides(C, H, W, CHANNELS_LAST)
    base = _select_level(lvl, p0, p1, p2, p3, p4, NUM_LEVELS) + b * s_n + _chans(c.to(tl.int64) * s_c, BINS_FIRST)
    ph = (p // PW).to(ACC)
    pw = (p % PW).to(ACC)
    return (k, c, p, mask, base, ph, pw, start_h, start_w, bin_h, bin_w, grid_h, grid_w, step_h, step_w, inv_count,
            H, W, s_h, s_w)


@triton.jit
def _roi_align_fwd_kernel(
    x0, x1, x2, x3, x4, hw_ptr, scales_ptr, rois_ptr, levels_ptr, out_ptr,
    N, C, PH, PW, sampling_ratio,
    ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr, SR2: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BINS_FIRST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    (k, c, p, mask, base, ph, pw, start_h, start_w, bin_h, bin_w, grid_h, grid_w, step_h, step_w, inv_count,
     H, W, s_h, s_w) = _program(
        x0, x1, x2, x3, x4, hw_ptr, scales_ptr, rois_ptr, levels_ptr, N, C, PH, PW, sampling_ratio,
        ALIGNED, NUM_LEVELS, MAX_GRID, SR2, CHANNELS_LAST, BINS_FIRST, BLOCK_P, BLOCK_C, ACC)
    acc = tl.zeros(mask.shape, dtype=ACC)
    for iy in range(0, grid_h):
        vy, r_lo, r_hi, hy, ly = _row(start_h, ph, bin_h, iy, step_h, H, s_h, SR2)
        for ix in range(0, grid_w):
            acc += _gather4(base, r_lo, r_hi, vy, hy, ly, start_w, pw, bin_w, ix, step_w, W, s_w, mask,
                            SR2, BINS_FIRST, ACC)
    out_offs = _chans(c.to(tl.int64) * (PH * PW), BINS_FIRST) + _bins(p, BINS_FIRST)
    out_ptr += k * C * (PH * PW)
    tl.store(out_ptr + out_offs, (acc * inv_count).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter4(base, r_lo, r_hi, vy, hy, ly, start_w, pw, bin_w, ix, step_w, W, s_w, g, mask, fix_scale,
              SR2: tl.constexpr, DETERMINISTIC: tl.constexpr, BINS_FIRST: tl.constexpr):
    """Add g * (bilinear weight) of one sample to its four corners, for the whole tile."""
    vx, c_lo, c_hi, hx, lx = _col(start_w, pw, bin_w, ix, step_w, W, s_w, SR2)
    m = mask & _bins(vy & vx, BINS_FIRST)
    v1 = g * _bins(hy * hx, BINS_FIRST)
    v2 = g * _bins(hy * lx, BINS_FIRST)
    v3 = g * _bins(ly * hx, BINS_FIRST)
    v4 = g * _bins(ly * lx, BINS_FIRST)
    if DETERMINISTIC:
        v1 = tl.floor(v1.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
        v2 = tl.floor(v2.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
        v3 = tl.floor(v3.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
        v4 = tl.floor(v4.to(tl.float64) * fix_scale + 0.5).to(tl.int64)
    tl.atomic_add(base + _bins(r_lo + c_lo, BINS_FIRST), v1, mask=m, sem="relaxed")
    tl.atomic_add(base + _bins(r_lo + c_hi, BINS_FIRST), v2, mask=m, sem="relaxed")
    tl.atomic_add(base + _bins(r_hi + c_lo, BINS_FIRST), v3, mask=m, sem="relaxed")
    tl.atomic_add(base + _bins(r_hi + c_hi, BINS_FIRST), v4, mask=m, sem="relaxed")


@triton.jit
def _roi_align_bwd_kernel(
    g0, g1, g2, g3, g4, hw_ptr, scales_ptr, rois_ptr, levels_ptr, grad_ptr, fix_scale_ptr,
    N, C, PH, PW, sampling_ratio, sg_k, sg_c, sg_p,
    ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, MAX_GRID: tl.constexpr, SR2: tl.constexpr,
    DETERMINISTIC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BINS_FIRST: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    (k, c, p, mask, base, ph, pw, start_h, start_w, bin_h, bin_w, grid_h, grid_w, step_h, step_w, inv_count,
     H, W, s_h, s_w) = _program(
        g0, g1, g2, g3, g4, hw_ptr, scales_ptr, rois_ptr, levels_ptr, N, C, PH, PW, sampling_ratio,
        ALIGNED, NUM_LEVELS, MAX_GRID, SR2, CHANNELS_LAST, BINS_FIRST, BLOCK_P, BLOCK_C, ACC)
    g_offs = _chans(c.to(tl.int64) * sg_c, BINS_FIRST) + _bins(p.to(tl.int64) * sg_p, BINS_FIRST)
    g = tl.load(grad_ptr + k * sg_k + g_offs, mask=mask, other=0.0).to(ACC) * inv_count
    fix_scale = 0.0
    if DETERMINISTIC:
        fix_scale = tl.load(fix_scale_ptr)
    for iy in range(0, grid_h):
        vy, r_lo, r_hi, hy, ly = _row(start_h, ph, bin_h, iy, step_h, H, s_h, SR2)
        for ix in range(0, grid_w):
            _scatter4(base, r_lo, r_hi, vy, hy, ly, start_w, pw, bin_w, ix, step_w, W, s_w, g, mask, fix_scale,
                      SR2, DETERMINISTIC, BINS_FIRST)
