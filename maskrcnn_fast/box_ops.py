"""Batched box maths: IoU, the (dx, dy, dw, dh) box coding, clipping. Boxes are (x1, y1, x2, y2).

Everything takes a leading batch dimension and is elementwise or a fixed-shape reduction, so none
of it syncs with the host.
"""
from __future__ import annotations

import math

import torch

# torchvision's cap on dw, dh, so exp() cannot overflow for a wild regression
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2:] - boxes[..., :2]).prod(-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[..., N, 4]`` against ``b[..., M, 4]`` -> ``[..., N, M]`` (torchvision's formula)."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / (box_area(a) + box_area(b) - inter)


def clip_boxes(boxes: torch.Tensor, image_hw: torch.Tensor) -> torch.Tensor:
    """Clip ``boxes[B, ..., 4]`` to per-image sizes ``image_hw[B, 2]`` (height, width)."""
    limit = image_hw.flip(-1).repeat(1, 2).to(boxes.dtype)           # [B, 4]: w, h, w, h
    limit = limit.view((boxes.shape[0],) + (1,) * (boxes.dim() - 2) + (4,))
    return torch.minimum(boxes.clamp(min=0), limit)


def is_big_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """torchvision's ``remove_small_boxes`` as a mask: both sides >= ``min_size``."""
    return ((boxes[..., 2:] - boxes[..., :2]) >= min_size).all(-1)


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = boxes[..., 2:] - boxes[..., :2]
    return boxes[..., :2] + 0.5 * size, size


def encode(gt: torch.Tensor, ref: torch.Tensor, weights) -> torch.Tensor:
    """Regression targets taking ``ref`` boxes to ``gt`` boxes (same shapes ``[..., 4]``).

    (dx, dy) = w_xy * (gt centre - ref centre) / ref size, (dw, dh) = w_wh * log(gt size / ref size).
    """
    gt_c, gt_s = _centre_size(gt)
    ref_c, ref_s = _centre_size(ref.to(gt.dtype))
    out = torch.cat([(gt_c - ref_c) / ref_s, torch.log(gt_s / ref_s)], dim=-1)
    return out * _weights_like(weights, out)


def decode(deltas: torch.Tensor, ref: torch.Tensor, weights) -> torch.Tensor:
    """Apply ``deltas[..., 4]`` to ``ref[..., 4]`` (broadcasting); inverse of :func:`encode`."""
    deltas = deltas / _weights_like(weights, deltas)
    ref_c, ref_s = _centre_size(ref.to(deltas.dtype))
    centre = deltas[..., :2] * ref_s + ref_c
    half = 0.5 * torch.exp(deltas[..., 2:].clamp(max=BBOX_XFORM_CLIP)) * ref_s
    return torch.cat([centre - half, centre + half], dim=-1)


_WEIGHT_CACHE: dict = {}


def _weights_like(weights, t: torch.Tensor) -> torch.Tensor:
    """The 4 coding weights as a (cached) tensor on ``t``'s device, created once per device."""
    key = (tuple(weights), t.dtype, t.device)
    if torch.compiler.is_compiling():
        # a constant of the traced graph; caching it would keep torch.export's fake tensor for later eager calls
        return torch.tensor(weights, dtype=t.dtype, device=t.device)
    if key not in _WEIGHT_CACHE:
        _WEIGHT_CACHE[key] = torch.tensor(weights, dtype=t.dtype).to(t.device)
    return _WEIGHT_CACHE[key]


def match(iou: torch.Tensor, valid_gt: torch.Tensor, fg_thresh: float, bg_thresh: float,
          allow_low_quality: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``Matcher``, batched over images.

    ``iou[B, G, A]`` (ground truth x candidates), ``valid_gt[B, G]``. Returns ``(matched[B, A], label)``
    where ``matched`` is the best ground-truth index (always a valid index, for gathering) and
    ``label`` is 1 (foreground), 0 (background) or -1 (between the thresholds: ignored).
    """
    iou = torch.where(valid_gt[:, :, None], iou, torch.full_like(iou, -1.0))
    best, matched = iou.max(dim=1)
    label = torch.where(best >= fg_thresh, 1, torch.where(best < bg_thresh, 0, -1))
    if allow_low_quality:
        # every ground truth keeps the candidates it overlaps most, even below fg_thresh
        best_per_gt = iou.max(dim=2, keepdim=True).values
        is_best = ((iou == best_per_gt) & valid_gt[:, :, None]).any(dim=1)
        label = torch.where(is_best, 1, label)
    return matched, label

