"""RoI heads (He et al., Mask R-CNN, sec. 3): box branch and mask branch, batched, no host syncs.

Training, per image and with fixed sizes throughout:
    candidates = proposals (P, padded) + ground truth (G, padded)
    -> match (IoU >= fg: its ground truth's class, < bg: background) -> fixed balanced sample of S RoIs
    -> box branch on all B*S RoIs -> classification + box regression losses (torchvision's normalisation)
    -> mask branch on the first ``S * positive_fraction`` slots of each image, which hold every
       sampled positive; non-positive slots weigh 0, so the loss is torchvision's mean over positives.
Inference: box branch on all proposals -> :mod:`maskrcnn_fast.postprocess` picks detections
-> mask branch on the (padded) detections.

The parameter names are torchvision's (``box_head.fc6``, ``box_predictor.cls_score``,
``mask_head.0.0``, ``mask_predictor.conv5_mask``, ...).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import kernels
from kernels._backend import backend_for
from maskrcnn_fast import box_ops
from maskrcnn_fast.config import MaskRCNNConfig
from maskrcnn_fast.rpn import sample_balanced

POOLED_STRIDES = (4, 8, 16, 32)  # RoIs are pooled from P2..P5; P6 only feeds the RPN


def roi_levels(rois: torch.Tensor, canonical_scale: int = 224, canonical_level: int = 4,
               k_min: int = 2, k_max: int = 5) -> torch.Tensor:
    """FPN level of each RoI (torchvision's LevelMapper, eq. 1 of the FPN paper), 0-based."""
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    lvl = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale) + 1e-6)
    return (lvl.nan_to_num(k_min).clamp(k_min, k_max) - k_min).to(torch.int64)


class MaskMLPHead(nn.Module):
    """The paper's MLP mask head ablation: fc 1024 -> fc 1024 -> fc K*M*M on the pooled features."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, mask_size: int):
        super().__init__()
        self.num_classes, self.mask_size = num_classes, mask_size
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_logits = nn.Linear(hidden, num_classes * mask_size * mask_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.fc_logits(x).view(-1, self.num_classes, self.mask_size, self.mask_size)


class RoIHeads(nn.Module):
    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        self.cfg = cfg
        c, k = cfg.fpn_channels, cfg.num_classes
        self.box_head = TwoMLPHead(c * cfg.box_roi_size ** 2, cfg.representation_size)
        self.box_predictor = FastRCNNPredictor(cfg.representation_size, k)
        if cfg.mask_head == "fcn":
            self.mask_head = MaskRCNNHeads(c, list(cfg.mask_layers), cfg.mask_dilation)
            self.mask_predictor = MaskRCNNPredictor(cfg.mask_layers[-1], cfg.mask_layers[-1], k)
        else:
            self.mask_head = MaskMLPHead(c * cfg.mask_roi_size ** 2, cfg.representation_size, k,
                                         2 * cfg.mask_roi_size)
            self.mask_predictor = None
        self.mask_size = 2 * cfg.mask_roi_size
        # softmax masks only, a diagnostic (not the ablation's score): score each pixel by
        # 1 - p(background) instead of p(detected class); it separates "learned where the object is"
        # from "learned which class it is" (see the README's ablation section)
        self.softmax_foreground = False

    # ------------------------------------------------------------------ pooling
    def pool(self, features: list[torch.Tensor], rois: torch.Tensor, size: int) -> torch.Tensor:
        """Pool ``rois[K, 5]`` (batch index, box) from its FPN level: ``[K, C, size, size]``."""
        scales = [1.0 / s for s in POOLED_STRIDES]
        if self.cfg.pool_level is not None:  # one level for every RoI (the paper's single-stride rows)
            f, s = features[self.cfg.pool_level], scales[self.cfg.pool_level]
            if self.cfg.pooler == "roi_align":
                return kernels.roi_align(f, rois, size, s, sampling_ratio=self.cfg.sampling_ratio)
            return kernels.roi_pool(f, rois, size, s)
        if self.cfg.pooler == "roi_align":
            return kernels.multiscale_roi_align(features, rois, size, scales, sampling_ratio=self.cfg.sampling_ratio)
        # RoIPool ablation: pool every RoI on every level and keep its own level's result; 4x the
        # work, but no data-dependent split of the RoIs (an ablation, not a hot path)
        levels = roi_levels(rois)
        out = 0
        for lvl, (f, s) in enumerate(zip(features, scales)):
            pooled = kernels.roi_pool(f, rois, size, s)
            out = out + pooled * (levels == lvl).to(pooled.dtype).view(-1, 1, 1, 1)
        return out

    # ------------------------------------------------------------------ branches
    def box_branch(self, features, rois):
        x = self.box_head(self.pool(features, rois, self.cfg.box_roi_size))
        return self.box_predictor(x)

    def mask_features(self, features, rois) -> torch.Tensor:
        """Features entering the last 1x1 predictor (FCN head) or the logits (MLP head)."""
        x = self.pool(features, rois, self.cfg.mask_roi_size)
        x = self.mask_head(x)
        if self.mask_predictor is not None:
            x = self.mask_predictor.relu(self.mask_predictor.conv5_mask(x))
        return x

    def mask_logits(self, features, rois) -> torch.Tensor:
        x = self.mask_features(features, rois)
        if self.mask_predictor is not None:
            x = self.mask_predictor.mask_fcn_logits(x)
        return x

    def mask_probs(self, features, rois, labels) -> torch.Tensor:
        """Mask probabilities ``[K, M, M]`` of class ``labels[K]`` for each RoI."""
        if self.mask_predictor is not None and self.cfg.mask_loss == "sigmoid":
            # only the predicted class's plane of the 1x1 predictor is computed
            logit_layer = self.mask_predictor.mask_fcn_logits
            x = self.mask_features(features, rois)
            return kernels.class_mask_logits(x, logit_layer.weight, logit_layer.bias, labels).float().sigmoid()
        logits = self.mask_logits(features, rois).float()
        if self.cfg.mask_loss == "softmax":
            probs = logits.softmax(dim=1)
            if self.softmax_foreground:
                return 1 - probs[:, 0]
        else:
            probs = logits.sigmoid()
        m = probs.shape[-1]
        return probs.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, m, m))[:, 0]

    # ------------------------------------------------------------------ training
    def forward(self, features, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, gt_masks):
        """Training losses: ``loss_classifier``, ``loss_box_reg``, ``loss_mask``."""
        cfg = self.cfg
        b = proposals.shape[0]
        candidates = torch.cat([proposals, gt_boxes], dim=1)
        candidate_valid = torch.cat([proposal_valid, gt_valid], dim=1)
        iou = box_ops.box_iou(gt_boxes, candidates)
        matched, labels = box_ops.match(iou, gt_valid, cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh,
                                        allow_low_quality=False)
        labels = torch.where(candidate_valid, labels, -1)
        idx, is_pos, is_valid = sample_balanced(labels, cfg.box_batch_size_per_image, cfg.box_positive_fraction)
        s = idx.shape[1]
        boxes = candidates.gather(1, idx[..., None].expand(-1, -1, 4))
        matched = matched.gather(1, idx)
        classes = torch.where(is_pos, gt_labels.gather(1, matched), 0)
        batch_idx = torch.arange(b, device=boxes.device, dtype=boxes.dtype).view(b, 1, 1).expand(b, s, 1)
        rois = torch.cat([batch_idx, boxes], dim=2)

        class_logits, box_deltas = self.box_branch(features, rois.view(-1, 5))
        num_sampled = is_valid.sum().clamp(min=1)
        ce = F.cross_entropy(class_logits.float(), classes.view(-1), reduction="none")
        loss_classifier = (ce * is_valid.view(-1)).sum() / num_sampled

        target_boxes = gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4))
        targets = box_ops.encode(target_boxes, boxes, cfg.bbox_reg_weights)
        targets = torch.where(is_pos[..., None], targets, 0.0)
        deltas = box_deltas.view(b * s, -1, 4).gather(1, classes.view(-1, 1, 1).expand(-1, 1, 4))[:, 0]
        box_loss = F.smooth_l1_loss(deltas.float(), targets.view(-1, 4), beta=1 / 9, reduction="none")
        loss_box_reg = (box_loss.sum(-1) * is_pos.view(-1)).sum() / num_sampled

        # positives occupy the leading slots of every image's sample (see sample_balanced)
        p = min(int(cfg.box_batch_size_per_image * cfg.box_positive_fraction), s)
        mask_rois = rois[:, :p].reshape(-1, 5)
        mask_weight = is_pos[:, :p].reshape(-1)
        mask_classes = classes[:, :p].reshape(-1)
        mask_matched = (matched[:, :p] + torch.arange(b, device=matched.device).view(b, 1) * gt_boxes.shape[1])
        mask_matched = mask_matched.reshape(-1)
        if self.positives_only(mask_rois):
            keep = torch.nonzero(mask_weight)[:, 0]  # a host sync: taken only where it is free (see config)
            mask_rois, mask_weight, mask_classes, mask_matched = (
                t[keep] for t in (mask_rois, mask_weight, mask_classes, mask_matched))
        mask_targets = project_masks(gt_masks, mask_rois, mask_matched, self.mask_size)
        loss_mask = self.mask_loss(features, mask_rois, mask_classes, mask_targets, mask_weight)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def positives_only(self, rois: torch.Tensor) -> bool:
        """Whether the mask branch runs on the positive RoIs only (``cfg.mask_branch_positives_only``)."""
        if self.cfg.mask_branch_positives_only is not None:
            return self.cfg.mask_branch_positives_only
        return backend_for(rois) == "torch" and rois.device.type == "cpu" and not torch.compiler.is_compiling()

    def mask_loss(self, features, rois, classes, targets, weight) -> torch.Tensor:
        """Mean over real positive RoIs (``weight`` 1) of the per-RoI mean pixel loss."""
        weight = weight.to(torch.float32)
        if self.cfg.fused_mask_loss:
            logit_layer = self.mask_predictor.mask_fcn_logits
            # targets are RoIAlign samples of {0,1} masks: in [0, 1] up to rounding, so unchecked
            return kernels.mask_predictor_loss(self.mask_features(features, rois), logit_layer.weight,
                                               logit_layer.bias, classes, targets, roi_weight=weight,
                                               check_targets=False)
        logits = self.mask_logits(features, rois)
        if self.cfg.mask_loss == "softmax":
            # multinomial ablation: a pixel's class is the RoI's class inside the mask, else background
            pixel_class = torch.where(targets >= 0.5, classes.view(-1, 1, 1), 0)
            per_pixel = F.cross_entropy(logits.float(), pixel_class, reduction="none")
            return (per_pixel.mean((1, 2)) * weight).sum() / weight.sum().clamp(min=1)
        return kernels.sigmoid_bce_mask_loss(logits, classes, targets, roi_weight=weight, check_targets=False)


def project_masks(gt_masks: torch.Tensor, rois: torch.Tensor, gt_index: torch.Tensor, size: int) -> torch.Tensor:
    """Ground-truth masks ``gt_masks[B, G, H, W]`` cut out by RoI boxes and resized to ``size``:
    ``[K, size, size]`` (torchvision's ``project_masks_on_boxes``, all images at once).

    ``gt_index[K]`` is the flat index ``b * G + g`` of each RoI's matched ground truth.
    """
    b, g, h, w = gt_masks.shape
    return kernels.project_masks_on_boxes(gt_masks.view(b * g, h, w), rois[:, 1:], gt_index, size)


__all__ = ["RoIHeads", "MaskMLPHead", "roi_levels", "project_masks"]
