"""Non-maximum suppression: Triton kernels (an IoU bitmask and a greedy reduction), and a CPU backend on
torchvision's compiled NMS (in ``_nms_torch.py``).

Maths (torchvision's exact rule)
    Boxes are visited in decreasing score order (a stable sort, so ties keep input order).
    Box i is kept unless an earlier kept box j of the same class (or image) has
        IoU(i, j) = inter / (area_i + area_j - inter) > iou_threshold,
        inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1)),  area = (x2 - x1) * (y2 - y1),
    in fp32 (fp16/bf16 boxes are up-cast in registers), or in fp64 for fp64 boxes. The threshold is rounded
    to fp32, as torchvision's CUDA kernel takes it (its CPU kernel compares with the double instead; the two
    differ only for an IoU lying between the double and its fp32 rounding). Autocast changes none of this.
    Defined behaviour: NaN scores are treated as -inf; -inf scores mark padding and are never kept;
    boxes with a non-finite coordinate never suppress and are never suppressed; x2 < x1 gives the
    formula's value (IoU <= 0), as torchvision.

Kernels (CUDA; CPU under TRITON_INTERPRET=1)
    1. ``_nms_mask_kernel``: one program per image and 64 x 64 tile on or above the diagonal (a
       triangular grid: no program exits for being below it), one bit per (i, j>i) pair:
       mask[b, j // 64, i] bit j % 64 = "i suppresses j". Column-word-major, so a tile's 64 row words
       are one contiguous 512-byte store. Each IoU step is rounded as in torchvision's formula (the
       launch turns FMA contraction off) and the division is correctly rounded (``div_rn``; fp32 '/'
       compiles to the approximate div.full.f32): the bits equal torchvision's CPU kernel's exactly.
    2. ``_nms_reduce_kernel``: one program per image walks the sorted boxes 64 at a time. It loads the
       block's 64 diagonal words unconditionally (no load waits on another), resolves the block in
       registers (row jj's word has only bits above jj, so a row survives iff its bit of the running
       "removed" word is clear when it is reached), writes the kept boxes with one prefix-sum store,
       ORs the kept rows' later words into the removed bitset (coalesced [BLOCK_W, 64] tiles), and stops
       as soon as ``max_output`` boxes are kept. Output: fixed-size ``keep[B, max_output]`` (-1 padded)
       and ``num_kept[B]``, so nothing ever syncs with the host.
    fp64 boxes compute the tile in 16-row slices (``_F64_CONFIG``) to stay spill-free.

Bytes moved, per image with N boxes (W = ceil(N / 64) words, e = 2, 4 or 8 bytes per coordinate)
    mask kernel  : reads N * (4 * e + 4) (boxes, class ids) once per tile row/column, writes
                   ~N * W * 8 / 2 bytes (upper triangle of the N x N / 8 bitmask, rows padded to 64)
    reduce kernel: reads at most the same upper triangle (less with the early stop), writes
                   max_output * 8 + W * 8 (keep list + removed bitset)
"""
from __future__ import annotations

import contextlib
import numbers
import struct

import numpy as np
import torch
import triton
import triton.language as tl

from kernels import _config
from kernels._backend import (FLOAT_DTYPES, InputError, InputTypeError, backend_for, check_same_device,
                              check_tensor, no_autocast)
from kernels._math import div_rn as _div_rn  # correctly rounded: fp32 '/' is div.full.f32
from kernels._nms_torch import _torch_nms, torch_batched_nms

WORD = 64
_F32 = struct.Struct("f")


@triton.jit
def _tile_of(t):
    """(row block, column word) of upper-triangle tile ``t``, tiles numbered column by column:
    t = cb * (cb + 1) / 2 + rb with 0 <= rb <= cb (the fp32 square root is off by at most one)."""
    cb = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    cb = tl.where((cb + 1) * (cb + 2) // 2 <= t, cb + 1, cb)
    cb = tl.where(cb * (cb + 1) // 2 > t, cb - 1, cb)
    return t - cb * (cb + 1) // 2, cb


@triton.jit
def _nms_mask_kernel(
    boxes_ptr, cls_ptr, nvalid_ptr, mask_ptr, N, W, NP, iou_threshold,
    HAS_CLASSES: tl.constexpr, ROWS: tl.constexpr,
):
    # one program per 64 x 64 tile on or above the diagonal (no program exits for being below it)
    rb, cb = _tile_of(tl.program_id(0).to(tl.int64))
    b = tl.program_id(1).to(tl.int64)
    n_valid = tl.load(nvalid_ptr + b)
    if cb * 64 < n_valid:  # words past the last valid box are never read by the reduction
        j = cb * 64 + tl.arange(0, 64)
        bj = boxes_ptr + (b * N + j) * 4
        mj = j < N
        # fp32 maths (fp16/bf16 up-cast), fp64 for fp64 boxes (the fp32 threshold converts exactly)
        ct = tl.float64 if boxes_ptr.dtype.element_ty == tl.float64 else tl.float32
        x1j = tl.load(bj + 0, mask=mj, other=0.0).to(ct)
        y1j = tl.load(bj + 1, mask=mj, other=0.0).to(ct)
        x2j = tl.load(bj + 2, mask=mj, other=0.0).to(ct)
        y2j = tl.load(bj + 3, mask=mj, other=0.0).to(ct)
        area_j = (x2j - x1j) * (y2j - y1j)
        # a non-finite coordinate (x - x != 0 for NaN and inf) never suppresses nor is suppressed
        fin_j = ((x1j - x1j) == 0) & ((y1j - y1j) == 0) & ((x2j - x2j) == 0) & ((y2j - y2j) == 0)
        col_ok = fin_j & (j < n_valid)
        if HAS_CLASSES:
            cj = tl.load(cls_ptr + b * N + j, mask=mj, other=-2)
        for r0 in tl.static_range(0, 64, ROWS):  # ROWS < 64: the tile in row slices (fp64 registers)
            i = rb * 64 + r0 + tl.arange(0, ROWS)
            bi = boxes_ptr + (b * N + i) * 4
            mi = i < N
            x1i = tl.load(bi + 0, mask=mi, other=0.0).to(ct)
            y1i = tl.load(bi + 1, mask=mi, other=0.0).to(ct)
            x2i = tl.load(bi + 2, mask=mi, other=0.0).to(ct)
            y2i = tl.load(bi + 3, mask=mi, other=0.0).to(ct)
            area_i = (x2i - x1i) * (y2i - y1i)
            w = tl.maximum(tl.minimum(x2i[:, None], x2j[None, :]) - tl.maximum(x1i[:, None], x1j[None, :]), 0.0)
            h = tl.maximum(tl.minimum(y2i[:, None], y2j[None, :]) - tl.maximum(y1i[:, None], y1j[None, :]), 0.0)
            inter = w * h
            # torchvision's order of operations, each step rounded (the launch disables FMA contraction)
            iou = _div_rn(inter, (area_i[:, None] + area_j[None, :]) - inter)
            fin_i = ((x1i - x1i) == 0) & ((y1i - y1i) == 0) & ((x2i - x2i) == 0) & ((y2i - y2i) == 0)
            sup = (iou > iou_threshold) & (j[None, :] > i[:, None]) & fin_i[:, None] & col_ok[None, :]
            if HAS_CLASSES:
                ci = tl.load(cls_ptr + b * N + i, mask=mi, other=-1)
                sup = sup & (ci[:, None] == cj[None, :])
            bits = sup.to(tl.int64) << tl.arange(0, 64).to(tl.int64)[None, :]
            word = tl.sum(bits, axis=1)  # disjoint bits: the sum is the OR
            # column-word-major layout: the tile's rows are consecutive words (coalesced); rows < NP always
            tl.store(mask_ptr + (b * W + cb) * NP + i, word)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _nms_reduce_kernel(
    mask_ptr, nvalid_ptr, removed_ptr, keep_ptr, count_ptr, W, NP, max_output,
    BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n_valid = tl.load(nvalid_ptr + b)
    n_blocks = (n_valid + 63) // 64
    rows = tl.arange(0, 64)
    plane = mask_ptr + b * W * NP  # word w of row i at plane[w * NP + i]
    count = n_valid * 0
    blk = n_valid * 0
    while (blk < n_blocks) & (count < max_output):
        diag = plane + blk.to(tl.int64) * NP + blk * 64
        # rows past the last valid box start out removed
        tail = n_valid - blk * 64
        pad = tl.where(tail < 64, -1, 0).to(tl.int64) << tl.minimum(tail, 63).to(tl.int64)
        r = tl.load(removed_ptr + b * W + blk) | pad
        # greedy over the block in registers: the 64 loads depend on nothing, so they issue back to back,
        # and row jj's word only has bits above jj, so bit jj of r is final when row jj is visited
        for jj in tl.static_range(64):
            row_word = tl.load(diag + jj)
            r = r | (row_word & (((r >> jj) & 1) - 1))  # & -1 if row jj survives, & 0 if removed
        kept = ((~r >> rows.to(tl.int64)) & 1).to(tl.int32)
        pos = count + tl.cumsum(kept, axis=0) - kept
        tl.store(keep_ptr + b * max_output + pos, blk * 64 + rows, mask=(kept != 0) & (pos < max_output))
        count += tl.sum(kept, axis=0)
        # the kept rows suppress boxes in later words: OR them into the removed bitset
        if (r != -1) & (count < max_output):
            for w0 in range(blk + 1, n_blocks, BLOCK_W):
                words = w0 + tl.arange(0, BLOCK_W)
                wm = words < n_blocks
                tile = tl.load(plane + words[:, None].to(tl.int64) * NP + (blk * 64 + rows)[None, :],
                               mask=wm[:, None] & (kept != 0)[None, :], other=0)
                acc = tl.reduce(tile, 1, _or)
                old = tl.load(removed_ptr + b * W + words, mask=wm, other=0)
                tl.store(removed_ptr + b * W + words, old | acc, mask=wm)
            tl.debug_barrier()  # the next block's scalar load must see every thread's OR
        blk += 1
    tl.store(count_ptr + b, tl.minimum(count, max_output).to(tl.int64))


# The mask kernel's tile is always 64 x 64; ROWS rows of it are computed at a time, by num_warps warps.
# The reduction runs REDUCE_WARPS warps (one program per image). Registers at [0], sm_80 / sm_90: mask kernel
# 92-95 / 80-94 (fp32 or bf16 boxes), reduce 64 / 64 at 16 warps, which keeps ~14 of a block's 64 word loads
# in flight before the first is used. At 4 warps the reduce takes 128 registers and keeps ~28 ahead on triton
# 3.8, but spills 8 bytes on sm_90 with triton 3.6, so the default is 16. (ROWS=64 at 4 warps takes 255; the
# reduce at 8 warps with BLOCK_W=64 spills 8 bytes on sm_80.)
_CONFIGS = [
    {"ROWS": 32, "BLOCK_W": 64, "REDUCE_WARPS": 16, "num_warps": 8, "num_stages": 1},
    {"ROWS": 16, "BLOCK_W": 64, "REDUCE_WARPS": 16, "num_warps": 4, "num_stages": 1},
    {"ROWS": 64, "BLOCK_W": 32, "REDUCE_WARPS": 8, "num_warps": 8, "num_stages": 1},
    {"ROWS": 32, "BLOCK_W": 128, "REDUCE_WARPS": 16, "num_warps": 4, "num_stages": 1},
]


# fp64 boxes: 16-row slices (sm_90 89 registers, sm_80 110; 32-row slices take 141 on sm_90); reduce as [0]
_F64_CONFIG = {"ROWS": 16, "BLOCK_W": 64, "REDUCE_WARPS": 16, "num_warps": 8, "num_stages": 1}


def get_configs() -> list[dict]:
    return _config.collapse(_CONFIGS)


def _threshold(iou_threshold) -> float:
    try:
        if isinstance(iou_threshold, (numbers.Real, torch.Tensor)):
            return float(iou_threshold)
    except (TypeError, ValueError, RuntimeError):
        pass
    raise InputTypeError(f"iou_threshold must be a real number, got {iou_threshold!r}")


def _fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (how the kernels receive the threshold)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]  # 0.3 us where numpy takes 2 (it counts in the eager CPU drop-in)
    except OverflowError:
        with np.errstate(over="ignore"):
            return float(np.float32(x))


def _check_idxs_dtype(idxs):
    if idxs.dtype.is_floating_point or idxs.dtype.is_complex or idxs.dtype == torch.bool:
        raise InputTypeError(f"idxs must be an integer tensor, got {idxs.dtype}")


def _check(boxes, scores, idxs, max_output):
    check_tensor(boxes, "boxes", ndim=3, last_dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(scores, "scores", ndim=2, dtypes=FLOAT_DTYPES)
    if scores.shape != boxes.shape[:2]:
        raise InputError(f"scores must be [B,N] = {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}")
    check_same_device(boxes=boxes, scores=scores)
    if idxs is not None:
        check_tensor(idxs, "idxs", ndim=2)
        _check_idxs_dtype(idxs)
        if idxs.shape != scores.shape:
            raise InputError(f"idxs must be [B,N] = {tuple(scores.shape)}, got {tuple(idxs.shape)}")
        check_same_device(boxes=boxes, idxs=idxs)
    if not isinstance(max_output, numbers.Integral):
        raise InputTypeError(f"max_output must be an int >= 1, got {max_output!r}")
    if max_output < 1:
        raise InputError(f"max_output must be an int >= 1, got {max_output!r}")


def _sorted_inputs(boxes, scores, idxs):
    """Stable descending sort per image; NaN scores become -inf; count of valid (finite-score) boxes."""
    s = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    s_sorted = s.gather(1, order)
    n_valid = (s_sorted > float("-inf")).sum(1)
    boxes_sorted = boxes.gather(1, order[..., None].expand(-1, -1, 4)).contiguous()
    # int64 ids in the kernel too (8 bytes a box): an int32 copy would merge ids 2**32 apart
    cls_sorted = idxs.gather(1, order).to(torch.int64).contiguous() if idxs is not None else None
    return order, boxes_sorted, cls_sorted, n_valid


def _launch(boxes, cls, n_valid, iou_threshold, max_output):
    B, N = boxes.shape[:2]
    W = triton.cdiv(N, WORD)
    dev = boxes.device
    keep = torch.full((B, max_output), -1, dtype=torch.int64, device=dev)
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    if N == 0 or B == 0:
        return keep, count
    cfg = _F64_CONFIG if boxes.dtype == torch.float64 else _config.pick("nms", "all", get_configs())
    meta, opts = _config.launch_kwargs(cfg)
    NP = W * WORD  # rows padded to whole tiles: every tile stores all its rows, unmasked
    mask = torch.empty((B, W, NP), dtype=torch.int64, device=dev)  # mask[b, w, i]: word w of row i
    removed = torch.zeros((B, W), dtype=torch.int64, device=dev)
    n_valid32 = n_valid.to(torch.int32)
    # the W * (W + 1) / 2 tiles on or above the diagonal; no FMA contraction, for torchvision's exact IoU
    _nms_mask_kernel[(W * (W + 1) // 2, B)](
        boxes, cls if cls is not None else n_valid32, n_valid32, mask, N, W, NP, float(iou_threshold),
        HAS_CLASSES=cls is not None, ROWS=meta["ROWS"], enable_fp_fusion=False, **opts)
    _nms_reduce_kernel[(B,)](mask, n_valid32, removed, keep, count, W, NP, max_output,
                             BLOCK_W=meta["BLOCK_W"], num_warps=meta["REDUCE_WARPS"], num_stages=1)
    return keep, count


@torch.library.custom_op("maskrcnn_fast::nms_padded", mutates_args=())
def _nms_padded(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None, iou_threshold: float,
                max_output: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, N = scores.shape
    with no_autocast(boxes.device):
        if N == 0:
            return (torch.full((B, max_output), -1, dtype=torch.int64, device=boxes.device),
                    torch.zeros(B, dtype=torch.int64, device=boxes.device))
        order, boxes_s, cls_s, n_valid = _sorted_inputs(boxes, scores, idxs)
        run = _launch if backend_for(boxes) == "triton" else _torch_nms
        pos, count = run(boxes_s, cls_s, n_valid, _fp32(iou_threshold), max_output)
        keep = torch.where(pos >= 0, order.gather(1, pos.clamp_min(0)), pos)
        return keep, count


@_nms_padded.register_fake
def _(boxes, scores, idxs, iou_threshold, max_output):
    B = boxes.shape[0]
    return (boxes.new_empty((B, max_output), dtype=torch.int64), boxes.new_empty((B,), dtype=torch.int64))


def nms_padded(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_output: int,
               idxs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sync-free batched NMS with static output shapes.

    ``boxes [B,N,4]``, ``scores [B,N]``, optional class ids ``idxs [B,N]`` (NMS only within a class).
    Returns ``keep [B,max_output]`` int64 (indices into N, by decreasing score, -1 padded) and
    ``num_kept [B]``. Per image, ``keep[b, :num_kept[b]]`` equals torchvision's ``batched_nms``
    (or ``nms``) truncated to ``max_output``. See the module docstring for NaN/inf/-inf behaviour.
    Bad input raises :class:`~kernels.InputError` (a ValueError and a RuntimeError) or
    :class:`~kernels.InputTypeError` (a TypeError and a RuntimeError).
    """
    _check(boxes, scores, idxs, max_output)
    return _nms_padded(boxes, scores, idxs, _threshold(iou_threshold), int(max_output))


def _batched_nms_impl(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None,
                      iou_threshold: float) -> torch.Tensor:
    N = boxes.shape[0]
    with no_autocast(boxes.device):
        if N == 0:
            return torch.empty(0, dtype=torch.int64, device=boxes.device)
        if backend_for(boxes) == "torch" and iou_threshold >= 0:
            # the drop-in syncs for its length anyway: the lean CPU path, without the padded machinery
            return torch_batched_nms(boxes, scores, idxs, _fp32(iou_threshold))
        keep, count = _nms_padded(boxes[None], scores[None], None if idxs is None else idxs[None], iou_threshold, N)
        return keep[0, :int(count[0])].clone()  # the drop-in API's output length is data-dependent: one sync


@torch.library.custom_op("maskrcnn_fast::batched_nms", mutates_args=())
def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None,
                 iou_threshold: float) -> torch.Tensor:
    return _batched_nms_impl(boxes, scores, idxs, iou_threshold)


def _dispatch_batched_nms(boxes, scores, idxs, iou_threshold):
    """Eager CPU calls skip the custom-op wrapper (~0.3 ms of Python per call, as much as NMS of 300
    boxes itself): nothing there needs it, the result has no gradient. torch.compile sees the op.
    The common CPU call goes straight to the lean path, with autocast switched off only where it is on
    (torchvision's nms autocasts fp64 to fp32): each microsecond counts against torchvision's own
    wrapper at 300 boxes (bench/cpu_ratios.py)."""
    if backend_for(boxes) != "torch" or torch.compiler.is_compiling():
        return _batched_nms(boxes, scores, idxs, iou_threshold)
    if iou_threshold < 0 or boxes.shape[0] == 0:
        return _batched_nms_impl(boxes, scores, idxs, iou_threshold)
    autocast_on = torch.is_autocast_enabled("cpu" if boxes.is_cpu else boxes.device.type)
    with no_autocast(boxes.device) if autocast_on else contextlib.nullcontext():
        return torch_batched_nms(boxes, scores, idxs, _fp32(iou_threshold))


@_batched_nms.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def _check_flat(boxes, scores, idxs=None):
    check_tensor(boxes, "boxes", ndim=2, last_dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(scores, "scores", ndim=1, dtypes=FLOAT_DTYPES)
    if scores.shape[0] != boxes.shape[0]:
        raise InputError(f"scores must have {boxes.shape[0]} entries, got {scores.shape[0]}")
    check_same_device(boxes=boxes, scores=scores)
    if idxs is not None:
        check_tensor(idxs, "idxs", ndim=1)
        if idxs.shape[0] != boxes.shape[0]:
            raise InputError(f"idxs must have {boxes.shape[0]} entries, got {idxs.shape[0]}")
        _check_idxs_dtype(idxs)
        check_same_device(boxes=boxes, idxs=idxs)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Drop-in for ``torchvision.ops.nms``: kept indices by decreasing score (syncs once for the length)."""
    _check_flat(boxes, scores)
    return _dispatch_batched_nms(boxes, scores, None, _threshold(iou_threshold))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Drop-in for ``torchvision.ops.batched_nms``: NMS independently per category, one launch set.

    Empty ``boxes`` give an empty int64 tensor without looking at the other arguments, as torchvision."""
    if isinstance(boxes, torch.Tensor) and boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    _check_flat(boxes, scores, idxs)
    return _dispatch_batched_nms(boxes, scores, idxs, _threshold(iou_threshold))
