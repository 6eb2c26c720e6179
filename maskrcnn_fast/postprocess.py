"""From box-branch outputs to detections, and from RoI masks to image masks, on the device.

``select_detections``: torchvision's ``postprocess_detections`` with fixed shapes: decode every
(proposal, class) box, clip, mask out background / low scores / tiny boxes / padded proposals with
-inf, keep the best ``box_pre_nms_top_n``, then ``kernels.nms_padded`` over (image, class).

``paste_masks``: torchvision's ``paste_masks_in_image`` (pad by one pixel, expand the box, resize
bilinearly into the integer box, clip to the image) as two batched matmuls with interpolation
matrices, instead of one interpolate + slice assignment per mask.

``split_per_image`` is the single host sync of inference: it reads the detection counts.
"""
from __future__ import annotations

import torch

import kernels
from maskrcnn_fast import box_ops

DET_MIN_BOX_SIZE = 1e-2


def select_detections(class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: torch.Tensor,
                      proposal_valid: torch.Tensor, image_hw: torch.Tensor, cfg):
    """Returns ``boxes[B, D, 4]``, ``scores[B, D]``, ``labels[B, D]``, ``valid[B, D]`` (D = detections per image)."""
    b, p, _ = proposals.shape
    k = class_logits.shape[-1]
    scores = class_logits.float().softmax(-1).view(b, p, k)[:, :, 1:]
    boxes = box_ops.decode(box_deltas.float().view(b, p, k, 4)[:, :, 1:], proposals[:, :, None, :],
                           cfg.bbox_reg_weights)
    boxes = box_ops.clip_boxes(boxes, image_hw)
    labels = torch.arange(1, k, device=boxes.device).view(1, 1, k - 1).expand(b, p, k - 1)
    ok = (scores > cfg.box_score_thresh) & box_ops.is_big_enough(boxes, DET_MIN_BOX_SIZE) & proposal_valid[..., None]
    scores = torch.where(ok, scores, float("-inf")).reshape(b, -1)
    boxes, labels = boxes.reshape(b, -1, 4), labels.reshape(b, -1)

    # greedy NMS keeps, among the top-n candidates, exactly what it keeps of them without the cap
    n = min(cfg.box_pre_nms_top_n, scores.shape[1])
    scores, top = scores.topk(n, dim=1)
    boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
    labels = labels.gather(1, top)

    keep, _ = kernels.nms_padded(boxes, scores, cfg.box_nms_thresh, cfg.box_detections_per_img, idxs=labels)
    valid = keep >= 0
    keep = keep.clamp(min=0)
    det_boxes = boxes.gather(1, keep[..., None].expand(-1, -1, 4))
    det_scores = torch.where(valid, scores.gather(1, keep), 0.0)
    det_labels = torch.where(valid, labels.gather(1, keep), 0)
    return det_boxes, det_scores, det_labels, valid


def _interp_matrix(start: torch.Tensor, end: torch.Tensor, out_len: int, in_len: int) -> torch.Tensor:
    """``[N, out_len, in_len]`` weights of a bilinear resize (align_corners=False) of ``in_len``
    samples onto the integer pixels ``start..end`` (inclusive) of a line of ``out_len`` pixels;
    rows outside ``start..end`` are zero. The same arithmetic as ``F.interpolate(mode="bilinear")``."""
    size = (end - start + 1).clamp(min=1).float()                        # [N]
    pix = torch.arange(out_len, device=start.device)
    rel = pix.view(1, -1) - start.view(-1, 1)                            # [N, out]
    inside = (rel >= 0) & (rel < size.view(-1, 1))
    scale = in_len / size                                                # [N]
    src = ((rel.float() + 0.5) * scale.view(-1, 1) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_len - 1)
    i1 = (i0 + 1).clamp(max=in_len - 1)
    frac = src - i0.float()
    cols = torch.arange(in_len, device=start.device).view(1, 1, -1)
    w = (cols == i0[..., None]) * (1 - frac)[..., None] + (cols == i1[..., None]) * frac[..., None]
    return w * inside[..., None]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, padding: int = 1) -> torch.Tensor:
    """Paste ``masks[N, M, M]`` into ``boxes[N, 4]`` of an image of size (height, width): ``[N, 1, H, W]``."""
    n, m = masks.shape[0], masks.shape[-1]
    if n == 0:
        return masks.new_zeros((0, 1, height, width))
    padded = torch.nn.functional.pad(masks.float(), (padding,) * 4)
    scale = (m + 2 * padding) / m
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    # torchvision truncates the expanded box to integers before resizing into it
    x0, x1 = (cx - half_w).to(torch.int64), (cx + half_w).to(torch.int64)
    y0, y1 = (cy - half_h).to(torch.int64), (cy + half_h).to(torch.int64)
    wy = _interp_matrix(y0, y1, height, m + 2 * padding)                # [N, H, M+2]
    wx = _interp_matrix(x0, x1, width, m + 2 * padding)                 # [N, W, M+2]
    with torch.autocast(masks.device.type, enabled=False):              # probabilities stay fp32
        return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))[:, None]


def split_per_image(boxes, scores, labels, valid, mask_probs, image_hw, original_hw) -> list[dict]:
    """Cut padded detections to per-image dicts at the original image sizes (one host sync).

    Valid detections come first in every row (``kernels.nms_padded`` pads at the end)."""
    counts = valid.sum(1).tolist()
    results = []
    for i, (n, (h, w), (oh, ow)) in enumerate(zip(counts, image_hw, original_hw)):
        # float32 ratios, as torchvision's resize_boxes computes them
        ratio = torch.tensor([float(ow), float(oh)], device=boxes.device) / torch.tensor(
            [float(w), float(h)], device=boxes.device)
        b = boxes[i, :n] * ratio.repeat(2)
        results.append({"boxes": b, "labels": labels[i, :n], "scores": scores[i, :n],
                        "masks": paste_masks(mask_probs[i, :n], b, oh, ow)})
    return results
