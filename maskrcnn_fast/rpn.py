"""Region proposal network (Ren et al., Faster R-CNN, sec. 3.1), batched over images, no host syncs.

    anchors (cached per feature shape) -> objectness + deltas per level -> decode
    -> top-k per level -> clip, drop tiny / low-score -> ``kernels.nms_padded`` over (image, level)
    -> a fixed number of proposals per image, padded slots marked invalid.

Training: match anchors to padded ground truth, draw a fixed-size balanced sample per image
(unfilled slots weigh 0), and compute torchvision's two losses with the same normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

import kernels
from maskrcnn_fast import box_ops
from maskrcnn_fast.config import MaskRCNNConfig

RPN_MIN_BOX_SIZE = 1e-3
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# anchor sets kept, the least recently used dropped first: both aspect-ratio buckets of training plus a few
# evaluation sizes, so alternating wide and tall batches never rebuild anchors (graph mode does not rely
# on this: it captures a bucket right after warming it up, see maskrcnn_fast/graphs.py)
ANCHOR_CACHE_SIZE = 4


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness (A per location) and box deltas (4A)."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Sequential(Conv2dNormActivation(channels, channels, kernel_size=3, norm_layer=None))
        self.cls_logits = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness ``[B, N]`` and deltas ``[B, N, 4]`` over all levels, ordered level, y, x, anchor."""
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            o, d = self.cls_logits(t), self.bbox_pred(t)
            b, a, h, w = o.shape
            logits.append(o.permute(0, 2, 3, 1).reshape(b, h * w * a))
            deltas.append(d.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 4))
        return torch.cat(logits, 1), torch.cat(deltas, 1)


def cell_anchors(size: int, aspect_ratios, dtype, device) -> torch.Tensor:
    """torchvision's rounded, zero-centred anchors of one size: ``[len(aspect_ratios), 4]``."""
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    ws = (1 / h_ratios) * size
    hs = h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def sample_balanced(labels: torch.Tensor, batch_size: int, positive_fraction: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` with a fixed sample count per image.

    ``labels[B, N]``: 1 positive, 0 negative, -1 ignored. Returns ``(index, is_positive, is_valid)``,
    each ``[B, S]`` with ``S = min(batch_size, N)``: up to ``batch_size * positive_fraction`` random
    positives come first, random negatives fill the rest; slots left unfilled have ``is_valid`` False.
    """
    n = labels.shape[1]
    noise = torch.rand(labels.shape, device=labels.device)
    max_pos = min(int(batch_size * positive_fraction), n)
    pos_score = torch.where(labels == 1, noise, -1.0)
    top_pos = pos_score.topk(max_pos, dim=1).indices
    chosen_pos = torch.zeros_like(labels, dtype=torch.bool).scatter(1, top_pos, pos_score.gather(1, top_pos) >= 0)
    # positives rank above every negative (score 2 > noise), ignored candidates below everything
    score = torch.where(chosen_pos, 2.0, torch.where(labels == 0, noise, -1.0))
    top = score.topk(min(batch_size, n), dim=1)
    return top.indices, top.values >= 2.0, top.values >= 0.0


class RegionProposalNetwork(nn.Module):
    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(cfg.fpn_channels, cfg.num_anchors_per_location)
        self._anchor_cache: dict = {}

    def anchors(self, features: list[torch.Tensor], padded_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchors ``[N, 4]`` for one (padded) image and the FPN level of each, ``[N]``; cached by shape (LRU)."""
        key = (tuple(tuple(f.shape[-2:]) for f in features), padded_hw, features[0].device)
        if key in self._anchor_cache:
            if not torch.compiler.is_compiling():  # no side effect for a compiler to trace on a hit
                self._anchor_cache[key] = self._anchor_cache.pop(key)  # most recently used last
        else:
            device = features[0].device
            all_anchors, all_levels = [], []
            for lvl, (f, size) in enumerate(zip(features, self.cfg.anchor_sizes)):
                h, w = f.shape[-2:]
                stride_y, stride_x = padded_hw[0] // h, padded_hw[1] // w
                base = cell_anchors(size, self.cfg.aspect_ratios, torch.float32, device)
                ys = torch.arange(h, dtype=torch.int32, device=device) * stride_y
                xs = torch.arange(w, dtype=torch.int32, device=device) * stride_x
                yy, xx = torch.meshgrid(ys, xs, indexing="ij")
                shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4).float()
                a = (shifts + base.view(1, -1, 4)).reshape(-1, 4)
                all_anchors.append(a)
                all_levels.append(torch.full((a.shape[0],), lvl, dtype=torch.int64, device=device))
            self._anchor_cache[key] = (torch.cat(all_anchors), torch.cat(all_levels))
            while len(self._anchor_cache) > ANCHOR_CACHE_SIZE:
                del self._anchor_cache[next(iter(self._anchor_cache))]
        return self._anchor_cache[key]

    def forward(self, features: list[torch.Tensor], image_hw: torch.Tensor, padded_hw: tuple[int, int],
                gt_boxes: torch.Tensor | None = None, gt_valid: torch.Tensor | None = None):
        """Returns ``(proposals[B, P, 4], proposal_valid[B, P], losses)``; ``losses`` is empty in eval."""
        cfg = self.cfg
        logits, deltas = self.head(features)
        anchors, levels = self.anchors(features, padded_hw)
        counts = [f.shape[-2] * f.shape[-1] * cfg.num_anchors_per_location for f in features]
        pre_nms = cfg.rpn_pre_nms_top_n_train if self.training else cfg.rpn_pre_nms_top_n_test
        post_nms = cfg.rpn_post_nms_top_n_train if self.training else cfg.rpn_post_nms_top_n_test

        # top-k candidates per level, on detached scores: proposals are not differentiated through
        obj = logits.detach()
        top_idx, start = [], 0
        for level_obj, n in zip(obj.split(counts, dim=1), counts):
            top_idx.append(level_obj.topk(min(pre_nms, n), dim=1).indices + start)
            start += n
        idx = torch.cat(top_idx, dim=1)
        b = logits.shape[0]
        cand_deltas = deltas.detach().gather(1, idx[..., None].expand(-1, -1, 4)).float()
        boxes = box_ops.decode(cand_deltas, anchors[idx], RPN_BOX_WEIGHTS)
        boxes = box_ops.clip_boxes(boxes, image_hw)
        scores = torch.sigmoid(obj.gather(1, idx).float())
        keep_ok = box_ops.is_big_enough(boxes, RPN_MIN_BOX_SIZE) & (scores >= cfg.rpn_score_thresh)
        scores = torch.where(keep_ok, scores, float("-inf"))
        keep, _ = kernels.nms_padded(boxes, scores, cfg.rpn_nms_thresh, post_nms, idxs=levels[idx])
        proposals = boxes.gather(1, keep.clamp(min=0)[..., None].expand(-1, -1, 4))
        valid = keep >= 0

        losses: dict[str, torch.Tensor] = {}
        if self.training:
            losses = self.losses(logits, deltas, anchors, gt_boxes, gt_valid)
        return proposals.view(b, -1, 4), valid, losses

    def losses(self, logits, deltas, anchors, gt_boxes, gt_valid) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        iou = box_ops.box_iou(gt_boxes, anchors[None])
        matched, labels = box_ops.match(iou, gt_valid, cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh,
                                        allow_low_quality=True)
        idx, is_pos, is_valid = sample_balanced(labels, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction)
        num_sampled = is_valid.sum().clamp(min=1)

        sampled_logits = logits.gather(1, idx).float()
        objectness = F.binary_cross_entropy_with_logits(sampled_logits, is_pos.float(), reduction="none")
        loss_objectness = (objectness * is_valid).sum() / num_sampled

        idx4 = idx[..., None].expand(-1, -1, 4)
        target_boxes = gt_boxes.gather(1, matched.gather(1, idx)[..., None].expand(-1, -1, 4))
        targets = box_ops.encode(target_boxes, anchors[idx], RPN_BOX_WEIGHTS)
        # non-positive slots may hold a padded ground truth; zero them so no NaN reaches the gradient
        targets = torch.where(is_pos[..., None], targets, 0.0)
        box_loss = F.smooth_l1_loss(deltas.gather(1, idx4).float(), targets, beta=1 / 9, reduction="none")
        loss_box = (box_loss.sum(-1) * is_pos).sum() / num_sampled
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
