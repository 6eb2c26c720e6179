"""RoIAlign and multi-level (FPN) RoIAlign, forward and backward: launchers, op registration and API.
The Triton kernels are in ``_roi_align_triton.py``, the PyTorch (CPU) backend in ``_roi_align_torch.py``.

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

Layout: every level is used dense, channels_last (NHWC, the model's default on CUDA) when the features
are not plain contiguous and have unit channel stride, else contiguous NCHW; other strides are made
dense first (torchvision makes its input contiguous too). Gradients come back in that layout.

Bytes moved (the roofline budget; no kernel can move less)
    forward : K*C*PH*PW*e (output) + K*5*4 (rois) + min(unique sampled texels, N*C*H*W)*e reads;
              each sample reads 4 texels, so with 16-byte channel runs (channels_last) the texel
              reads are coalesced; worst case 4*K*C*PH*PW*grid^2*e bytes through L2.
    backward: K*C*PH*PW*e (grad_output) + N*C*H*W*4 (fp32 accumulator, zeroed + atomics)
              + N*C*H*W*e (cast to the input dtype); deterministic: int64 accumulator (8 B/elem).
    e = element size of the features (2 for fp16/bf16, 4 for fp32).

Backends: CUDA -> Triton; CPU + TRITON_INTERPRET=1 -> Triton interpreter; CPU otherwise -> PyTorch.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton

from kernels import _compat, _config
from kernels._backend import InputError, backend_for, compute_dtype, no_autocast
from kernels._roi_align_torch import _torch_roi_align, _torch_roi_align_bwd
from kernels._roi_align_triton import _roi_align_bwd_kernel, _roi_align_fwd_kernel
from kernels._roi_common import (MAX_GRID, check_rois, fixed_point_scale, from_fixed_point, pair,
                                 rois_from_boxes, tl_compute_dtype)

MAX_LEVELS = 5

# Tiles of BLOCK_P bins x BLOCK_C channels; any of them is valid for any shape (the grid covers the bins
# and channels in blocks). Spill-free on sm_80/sm_90 where the defaults use them (checked by the compile
# audit). Per thread at most: forward, two bins' worth of 16-byte channel runs in NHWC (16 bf16/fp16,
# 8 fp32, 4 fp64 values) and 8 values in NCHW (no vectors there: every value has its own 64-bit address;
# 16 bf16 values took 174 registers); backward, 8 fp32 or 4 fp64 accumulator values (each atomic has
# its own address); deterministic, 2 (int64 values and addresses: 4 took 128 registers and spilled).
# One channel (the mask targets: 28x28 bins of a 1-channel mask) gets its own narrow tile.
_CONFIGS = [
    {"BLOCK_P": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1},   # forward, 2-byte features
    {"BLOCK_P": 64, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},   # forward fp32 (or C <= 16), backward
    {"BLOCK_P": 32, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1},   # fp64 forward and backward
    {"BLOCK_P": 32, "BLOCK_C": 16, "num_warps": 8, "num_stages": 1},   # deterministic backward
    {"BLOCK_P": 128, "BLOCK_C": 1, "num_warps": 2, "num_stages": 1},   # one channel
    {"BLOCK_P": 32, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_P": 64, "BLOCK_C": 64, "num_warps": 8, "num_stages": 1},
    {"BLOCK_P": 128, "BLOCK_C": 32, "num_warps": 8, "num_stages": 1},
    {"BLOCK_P": 256, "BLOCK_C": 1, "num_warps": 4, "num_stages": 1},
]


def get_configs(mode: str = "fwd", itemsize: int = 2, channels_last: bool = True) -> list[dict]:
    """The tiles a launch in ``mode`` may use (a tuned file's choice among them): those within
    :func:`tile_budget`, so no tuned tile spills either (e.g. a 16-value deterministic tile spilled 464 B)."""
    return _config.collapse([c for c in _CONFIGS if c["BLOCK_P"] * c["BLOCK_C"]
                             <= tile_budget(mode, itemsize, c["num_warps"], channels_last)])


def tile_budget(mode: str, itemsize: int, num_warps: int, channels_last: bool = True) -> int:
    """Most tile elements a program of ``num_warps`` may hold without spilling (see ``_CONFIGS``):
    ``mode`` "fwd", "bwd" or "det", ``itemsize`` the features' element size in bytes."""
    fwd = 32 // max(itemsize, 2) if channels_last else 32 // max(itemsize, 4)
    per_thread = {"fwd": fwd, "bwd": 32 // max(itemsize, 4), "det": 2}[mode]
    return per_thread * 32 * num_warps


def default_config(P: int, C: int, mode: str, itemsize: int = 2, channels_last: bool = True) -> dict:
    """The heuristic tile for P = PH*PW bins and C channels in ``mode`` ("fwd", "bwd", "det") for features
    of ``itemsize`` bytes in that layout: always one of ``_CONFIGS`` within :func:`tile_budget` (never an
    oversized fallback: bins beyond a tile go to more programs)."""
    if C == 1:
        return _CONFIGS[4]
    if mode == "det":
        return _CONFIGS[3]
    if itemsize == 8:
        return _CONFIGS[2]
    wide = mode == "fwd" and channels_last and itemsize <= 2 and C > 16
    return _CONFIGS[0] if wide else _CONFIGS[1]


def _bucket(P: int, C: int) -> str:
    return f"p{triton.next_power_of_2(P)}" + ("c1" if C == 1 else "")


def channels_last_layout(features: Sequence[torch.Tensor]) -> bool:
    """The kernels' layout for these levels (see the module docstring): NHWC unless all are contiguous
    or a level's channels are not innermost."""
    return (not all(f.is_contiguous() for f in features)
            and all(f.stride(1) == 1 or f.shape[1] == 1 for f in features))


def _bins_first(channels_last: bool) -> bool:
    """Tile orientation (see _roi_align_triton.py): [P, C] for NHWC, and for NCHW the one whose lanes go
    along the bins. Those loads are gathers with no contiguity in either dimension, and the coalescing
    pass breaks that tie differently: triton 3.6 makes dim 0 the fastest, 3.8 dim 1 (the other choice
    puts the lanes along C there: 148/174 registers forward/backward instead of 90/90, sm_90, bf16)."""
    return channels_last or _compat.version() < (3, 7)


def _dense(features: Sequence[torch.Tensor], channels_last: bool) -> list[torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [f.contiguous(memory_format=fmt) for f in features]


# Unbounded on purpose: a captured CUDA graph keeps reading these device tensors, so an entry must never
# be evicted and freed while a graph may replay (entries are a few small tensors per level layout).
@functools.lru_cache(maxsize=None)
def _cached_meta(sizes: tuple, scales: tuple, scale_dtype: torch.dtype, device: torch.device):
    """Level sizes (H, W) and scales as device tensors, made once per (shapes, scales, device): a steady-state
    call creates no tensor from host data, so a step can be captured in a CUDA graph."""
    hw = torch.tensor(sizes, dtype=torch.int32).to(device)
    return hw, torch.tensor(scales, dtype=scale_dtype).to(device)


def _level_meta(features: Sequence[torch.Tensor], scales, acc_dtype: torch.dtype):
    sizes = tuple((f.shape[2], f.shape[3]) for f in features)
    if any(max(h, w) >= 2 ** 31 for h, w in sizes):  # the kernels hold H, W in int32 (offsets are int64)
        raise InputError(f"roi_align: feature map sizes {sizes} must be below 2**31")
    return _cached_meta(sizes, tuple(float(v) for v in scales), acc_dtype, features[0].device)


def _common_meta(features, scales, ph, pw, sampling_ratio, aligned, acc_dtype):
    hw, scales_t = _level_meta(features, scales, acc_dtype)
    return hw, scales_t, dict(ALIGNED=aligned, NUM_LEVELS=len(features), MAX_GRID=MAX_GRID,
                              SR2=sampling_ratio == 2, ACC=tl_compute_dtype(acc_dtype))


def _grid(K: int, C: int, P: int, block: dict) -> tuple[int, int]:
    # axis 0: the channel blocks of one RoI side by side (they read neighbouring bytes of the same texels)
    return K * triton.cdiv(C, block["BLOCK_C"]), triton.cdiv(P, block["BLOCK_P"])


def _launch_fwd(features, rois, levels, scales, ph, pw, sampling_ratio, aligned,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``out_dtype`` (default: the features') also sets the compute dtype: the mask targets pass uint8
    masks with fp32/fp64 output."""
    x = features[0]
    K, C = rois.shape[0], x.shape[1]
    out_dtype = out_dtype or x.dtype
    out = torch.empty((K, C, ph, pw), dtype=out_dtype, device=x.device)
    if K == 0 or C == 0:
        return out
    cl = channels_last_layout(features)
    features = _dense(features, cl)
    hw, scales_t, const = _common_meta(features, scales, ph, pw, sampling_ratio, aligned, compute_dtype(out_dtype))
    P = ph * pw
    e = features[0].element_size()
    cfg = _config.pick("roi_align_fwd", _bucket(P, C), get_configs("fwd", e, cl), default_config(P, C, "fwd", e, cl))
    block, opts = _config.launch_kwargs(cfg)
    ptrs = list(features) + [x] * (MAX_LEVELS - len(features))
    _roi_align_fwd_kernel[_grid(K, C, P, block)](*ptrs, hw, scales_t, rois, levels, out, x.shape[0], C, ph, pw,
                                                 sampling_ratio, CHANNELS_LAST=cl, BINS_FIRST=_bins_first(cl),
                                                 **const, **block, **opts)
    return out


def _grad_strides(grad: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """grad_output and its (RoI, channel, bin) strides: contiguous, channels_last, or made contiguous."""
    K, C, ph, pw = grad.shape
    if not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last):
        return grad, (C * ph * pw, 1, C)
    grad = grad.contiguous()
    return grad, (C * ph * pw, ph * pw, 1)


def _launch_bwd(grad, features, rois, levels, scales, ph, pw, sampling_ratio, aligned,
                deterministic) -> list[torch.Tensor]:
    x = features[0]
    K, C = rois.shape[0], x.shape[1]
    acc_dtype = torch.int64 if deterministic else compute_dtype(x.dtype)
    cl = channels_last_layout(features)
    # accumulators in the kernels' dense layout (channels_last stays channels_last)
    accs = [torch.zeros_like(f, dtype=acc_dtype) for f in _dense(features, cl)]
    fix = fixed_point_scale(grad, K * ph * pw) if deterministic else None
    if K > 0 and C > 0:
        hw, scales_t, const = _common_meta(features, scales, ph, pw, sampling_ratio, aligned,
                                           compute_dtype(x.dtype))
        P = ph * pw
        mode, e = "det" if deterministic else "bwd", x.element_size()
        cfg = _config.pick("roi_align_bwd_det" if deterministic else "roi_align_bwd", _bucket(P, C),
                           get_configs(mode, e, cl), default_config(P, C, mode, e, cl))
        block, opts = _config.launch_kwargs(cfg)
        grad, g_strides = _grad_strides(grad)
        ptrs = accs + [accs[0]] * (MAX_LEVELS - len(accs))
        _roi_align_bwd_kernel[_grid(K, C, P, block)](*ptrs, hw, scales_t, rois, levels, grad,
                                                     fix if deterministic else scales_t, x.shape[0], C, ph, pw,
                                                     sampling_ratio, *g_strides, CHANNELS_LAST=cl,
                                                     BINS_FIRST=_bins_first(cl),
                                                     DETERMINISTIC=deterministic, **const, **block, **opts)
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
    return [torch.empty_like(f) for f in _dense(features, channels_last_layout(features))]


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
    ``torch.are_deterministic_algorithms_enabled()``) selects the bitwise-reproducible backward. Defined
    behaviour: boxes outside the map are sampled as torchvision does (zeros beyond one pixel); boxes with
    NaN coordinates give zeros; a map with no rows or columns gives zeros.
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
