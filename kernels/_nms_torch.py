"""NMS's CPU backend (CPU tensors without the interpreter, or ``kernels.use_backend("torch")``), on
torchvision's compiled CPU NMS; the rule it follows and the Triton kernels are in ``nms.py``.

``torchvision.ops.nms`` once per image, on inputs rewritten so that its greedy loop follows the rule:
the boxes are already in our order, and strictly decreasing stand-in scores (-position) keep
torchvision's own sort from reordering ties; boxes that take no part (a non-finite coordinate, padding)
become all-NaN boxes, whose IoU with anything is NaN, never above the threshold. With class ids and up
to ``PER_CLASS_ABOVE`` (1000) boxes (not fp64), every class is moved along x into a strip of its own (dense class
rank r: shift r * (2 * span + 1), span = the image's extent of finite x), so boxes of different classes
are disjoint (IoU 0 or NaN) and one call does all classes. The shift is done in fp64 so that it does not
round fp32 coordinates of ordinary size; the IoU is then computed in fp64, which changes a decision only
for an fp32 IoU within rounding of the threshold. Above 1000 boxes (as torchvision's own batched_nms)
one call per class, in the compute dtype, so the work is sum(n_c^2) rather than N^2; the class
boundaries are read on the host, free on a CPU. A negative threshold with class ids (disjoint boxes, IoU
0, would suppress each other) runs the rule straight from its definition instead, slowly. Padding
positions are dropped after the call, so no data-dependent length is read on the host. The eager
drop-ins (``nms``/``batched_nms``, which sync for their length anyway) first try
``_torch_nms_flat_common_case``: all inputs finite, torchvision's nms on the real scores with no
stand-ins, ~10 tensor ops instead of ~30.
"""
from __future__ import annotations

import math

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)

from kernels._backend import compute_dtype


def _tv_nms(boxes, scores, iou_threshold):
    """torchvision's compiled CPU nms, called as an op: a user who sets ``torchvision.ops.nms = kernels.nms``
    (to port code) must not send our CPU backend back into itself."""
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def _separate_classes(bx, cls):
    """Shift each class's boxes along x into a strip of its own (see the module docstring), sync-free.

    ``bx [B,N,4]`` fp64 with all-NaN boxes for those that take no part; ``cls [B,N]`` class ids."""
    ids, perm = cls.sort(1)
    starts = torch.ones_like(ids, dtype=torch.int64)  # 1 where a new class id begins in sorted order
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rank = torch.empty_like(starts).scatter_(1, perm, starts.cumsum(1) - 1)  # dense rank 0, 1, 2, ...
    x = bx[..., 0::2].nan_to_num(0.0)
    stride = 2 * (x.amax((1, 2)) - x.amin((1, 2))) + 1  # the gap between strips (span + 1) outlasts rounding
    shift = rank.to(bx.dtype) * stride[:, None]
    return bx + torch.stack([shift, torch.zeros_like(shift)] * 2, -1)


def _greedy_by_definition(bx, cls, live, iou_threshold):
    """Kept mask ``[B,N]`` straight from the rule (an N x N suppression matrix, then N steps).

    Only for a negative threshold with class ids, where strips cannot separate the classes."""
    x1, y1, x2, y2 = bx.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None]) - torch.maximum(x1[:, :, None], x1[:, None])).clamp_min(0)
    h = (torch.minimum(y2[:, :, None], y2[:, None]) - torch.maximum(y1[:, :, None], y1[:, None])).clamp_min(0)
    inter = w * h
    sup = inter / (area[:, :, None] + area[:, None] - inter) > iou_threshold  # sup[b, i, j]: i suppresses j
    sup &= (cls[:, :, None] == cls[:, None]) & live[:, :, None] & live[:, None]
    kept = torch.zeros_like(live)
    for j in range(live.shape[1]):
        kept[:, j] = ~(kept[:, :j] & sup[:, :j, j]).any(1)
    return kept


PER_CLASS_ABOVE = 1000  # boxes per image above which classes run one torchvision call each (as torchvision)


def _torch_nms_image(boxes, cls, live, iou_threshold):
    """Kept positions (ascending = by score) of one image's sorted boxes ``[N,4]``, through torchvision's nms.

    Boxes that take no part (``~live``) become all-NaN: their IoU is NaN, so they neither suppress nor
    are suppressed. Up to ``PER_CLASS_ABOVE`` boxes of fp32/fp16/bf16, classes go into x strips and one call
    (fp64, so the shift rounds nothing); above it, or for fp64 boxes, one call per class on that class's
    boxes, whose boundaries are read
    on the host -- a sync, free on the CPU this runs on -- so that the work is sum(n_c^2), not N^2."""
    N = boxes.shape[0]
    # strips are shifted in fp64, exact for fp32/fp16/bf16 coordinates only (fp64 ones could round, and
    # near the top of fp64's range the strip width itself overflows)
    strips = cls is not None and N <= PER_CLASS_ABOVE and boxes.dtype != torch.float64
    dtype = torch.float64 if strips else compute_dtype(boxes.dtype)
    bx = torch.where(live[:, None], boxes.to(dtype), float("nan"))
    stand_in = -torch.arange(N, device=boxes.device, dtype=dtype)  # strictly decreasing: our order
    if cls is None:
        return _tv_nms(bx, stand_in, iou_threshold)
    if strips:
        return _tv_nms(_separate_classes(bx[None], cls[None])[0], stand_in, iou_threshold)
    by_class = torch.sort(cls, stable=True).indices  # positions grouped by class, score order inside
    counts = torch.unique_consecutive(cls[by_class], return_counts=True)[1].tolist()
    kept = [seg[_tv_nms(bx[seg], stand_in[seg], iou_threshold)]
            for seg in torch.split(by_class, counts)]
    return torch.cat(kept).sort().values


def _torch_nms(boxes, cls, n_valid, iou_threshold, max_output):
    """CPU backend: ``torchvision.ops.nms`` once per image, fed so that it follows our rule (module docstring).

    ``boxes [B,N,4]`` / ``cls [B,N]`` are sorted (``_sorted_inputs``), ``n_valid [B]`` counts the finite
    scores, ``iou_threshold`` is already an fp32 value. Returns kept positions in order then -1
    ``[B,max_output]``, and their count ``[B]``. The loop runs over the B images; only tensor shapes reach
    Python, except the per-class counts above ``PER_CLASS_ABOVE`` boxes (a host read, free on a CPU). On
    CUDA torchvision's nms would itself sync for its output length; CUDA tensors always run the Triton
    kernels instead.
    """
    B, N = boxes.shape[:2]
    dev = boxes.device
    pos = torch.arange(N, device=dev)
    live = torch.isfinite(boxes).all(-1) & (pos < n_valid[:, None])  # the boxes that take part
    keep = torch.full((B, max_output), -1, dtype=torch.int64, device=dev)
    if cls is not None and iou_threshold < 0:
        kept = _greedy_by_definition(boxes.to(compute_dtype(boxes.dtype)), cls, live, iou_threshold)
        slot = torch.where(kept, kept.cumsum(1) - 1, max_output).clamp_max(max_output)
        spill = torch.full((B, max_output + 1), -1, dtype=torch.int64, device=dev)
        keep = spill.scatter_(1, slot, pos.expand(B, N))[:, :max_output]  # column max_output is a spill bin
    else:
        for b in range(B):
            kept = _torch_nms_image(boxes[b], None if cls is None else cls[b], live[b], iou_threshold)[:max_output]
            keep[b, :kept.shape[0]] = kept
    # padding boxes never suppress (NaN or not live) and come last: drop them from the end of each row
    keep = torch.where(keep < n_valid[:, None], keep, -1)
    return keep, (keep >= 0).sum(1)


def _torch_nms_flat_common_case(boxes, scores, idxs, iou_threshold):
    """Eager CPU drop-in when every box is finite and every score above -inf (not NaN), else None.

    Then our rule is torchvision's own: its CPU nms sorts the real scores stably, so no stand-in scores,
    gathers or NaN boxes are needed. Classes (at most ``PER_CLASS_ABOVE`` boxes, ids spanning at most
    as many values) are shifted diagonally by (id - min id) * (2 * span + 1) in fp64, which rounds no
    fp32/fp16/bf16 coordinate. The checks read values on the host: free on a CPU, and this drop-in
    syncs for its output length anyway. Every op counts here (bench/cpu_ratios.py: at 300 boxes the
    wrapper is a third of torchvision's NMS): the box extent that sizes the class strips is also the
    finiteness test (min/max propagate NaN and show an inf), the scores' minimum the -inf/NaN test."""
    lo, hi = boxes.aminmax()
    lo, hi, s_min = float(lo), float(hi), float(scores.min())
    if not (math.isfinite(lo) and math.isfinite(hi) and s_min > float("-inf")):  # NaN > -inf is False
        return None
    if idxs is None:
        dtype = compute_dtype(boxes.dtype)
        if scores.dtype == torch.float64 and dtype != torch.float64:
            return None  # fp64 scores rounded to fp32 could tie and reorder: the general path sorts them as they are
        return _tv_nms(_as(boxes, dtype), _as(scores, dtype), iou_threshold)
    if boxes.shape[0] > PER_CLASS_ABOVE or boxes.dtype == torch.float64:
        return None  # per-class calls (large N); fp64 coordinates could round when shifted
    id_lo, id_hi = idxs.aminmax()
    id_lo, id_hi = int(id_lo), int(id_hi)
    if id_hi - id_lo > PER_CLASS_ABOVE:
        return None  # sparse ids: the general path ranks them densely
    rank = (idxs - id_lo if id_lo else idxs).to(torch.float64)  # ids subtracted exactly, as ints
    shifted = boxes.to(torch.float64).add_(rank.unsqueeze_(1), alpha=2 * (hi - lo) + 1)
    return _tv_nms(shifted, scores.to(torch.float64), iou_threshold)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def torch_batched_nms(boxes, scores, idxs, iou_threshold):
    """The eager ``nms``/``batched_nms`` drop-ins on CPU: kept indices by decreasing score, like
    torchvision's. ``boxes [N,4]`` (N >= 1), ``iou_threshold`` >= 0, already an fp32 value."""
    kept = _torch_nms_flat_common_case(boxes, scores, idxs, iou_threshold)
    if kept is not None:
        return kept
    s_sorted, order = torch.sort(torch.where(torch.isnan(scores), float("-inf"), scores),
                                 descending=True, stable=True)
    boxes_sorted = boxes[order]
    scored = s_sorted > float("-inf")  # -inf scores (and NaN, made -inf) are padding: never kept
    live = scored & torch.isfinite(boxes_sorted).all(1)
    pos = _torch_nms_image(boxes_sorted, None if idxs is None else idxs[order], live, iou_threshold)
    return order[pos[scored[pos]]]
