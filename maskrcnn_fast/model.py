"""Mask R-CNN (He et al., 2017), read top-down:

    images -> transform (normalise, resize, pad to one batch; ground truth padded to [B, Gmax])
           -> backbone (ResNet + FPN)
           -> rpn (proposals: fixed count per image)
           -> roi_heads (box branch, mask branch; losses in training)
           -> postprocess (detections, masks pasted at the original image size)

The calling convention is torchvision's: ``model(images, targets)`` returns the loss dict in
training mode, ``model(images)`` one dict per image in eval mode. A training step makes no host
sync; inference makes one, at the very end, to cut the padded outputs per image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn_fast.backbone import resnet_fpn
from maskrcnn_fast.config import MaskRCNNConfig
from maskrcnn_fast.postprocess import select_detections, split_per_image
from maskrcnn_fast.roi_heads import RoIHeads
from maskrcnn_fast.rpn import RegionProposalNetwork


class MaskRCNN(nn.Module):
    """Mask R-CNN from a :class:`MaskRCNNConfig` (or its keyword arguments).

    Each part can be swapped: ``backbone_module`` (images ``[B,3,H,W]`` -> dict of 5 FPN maps with
    ``cfg.fpn_channels`` channels at strides 4..64), ``rpn_module`` and ``roi_heads_module`` (the
    interfaces of :class:`RegionProposalNetwork` and :class:`RoIHeads`).
    """

    def __init__(self, cfg: MaskRCNNConfig | None = None, *, backbone_module: nn.Module | None = None,
                 rpn_module: nn.Module | None = None, roi_heads_module: nn.Module | None = None, **kwargs):
        super().__init__()
        cfg = MaskRCNNConfig.from_kwargs(**kwargs) if cfg is None else cfg.replace(**kwargs)
        self.cfg = cfg
        self.backbone = backbone_module or resnet_fpn(cfg.backbone, cfg.fpn_channels, cfg.trainable_backbone_layers)
        self.rpn = rpn_module or RegionProposalNetwork(cfg)
        self.roi_heads = roi_heads_module or RoIHeads(cfg)
        self.register_buffer("image_mean", torch.tensor(cfg.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(cfg.image_std).view(3, 1, 1), persistent=False)
        if self._channels_last(cuda=torch.cuda.is_available()):
            self.to(memory_format=torch.channels_last)

    def _channels_last(self, cuda: bool) -> bool:
        """``cfg.channels_last``; its default None means channels-last exactly on CUDA (see the config)."""
        return self.cfg.channels_last if self.cfg.channels_last is not None else cuda

    def forward(self, images, targets: list[dict] | None = None):
        images = _as_image_list(images)
        if self.training:
            _check_targets(images, targets)
        batch, image_hw, gt = self.transform(images, targets if self.training else None)
        hw = _to_device(image_hw, batch.device)
        if self.training:
            _check_target_values(gt, self.cfg.num_classes)
            return self.losses(batch, hw, gt)
        detections = self.detect(batch, hw)
        return split_per_image(*detections, image_hw, [tuple(im.shape[-2:]) for im in images])

    def losses(self, batch: torch.Tensor, image_hw: torch.Tensor, gt: dict) -> dict[str, torch.Tensor]:
        """The training losses from an already transformed batch: static shapes, no host sync, so
        this is the part to capture in a CUDA graph or ``torch.compile`` for a fixed batch shape.

        ``batch[B,3,Hp,Wp]``, ``image_hw[B,2]`` (float, resized sizes), ``gt`` as from :meth:`transform`.
        """
        features = list(self.backbone(batch).values())
        proposals, valid, rpn_losses = self.rpn(features, image_hw, tuple(batch.shape[-2:]), gt["boxes"], gt["valid"])
        head_losses = self.roi_heads(features[:4], proposals, valid, gt["boxes"], gt["labels"],
                                     gt["valid"], gt["masks"])
        return {**head_losses, **rpn_losses}

    def detect(self, batch: torch.Tensor, image_hw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inference core: everything before the per-image split, with static shapes and no host
        sync, so it compiles (``torch.compile``/``torch.export``) or is captured for a fixed batch shape.

        ``batch[B,3,Hp,Wp]``, ``image_hw[B,2]`` (float, resized sizes). Returns ``boxes[B,D,4]``,
        ``scores[B,D]``, ``labels[B,D]``, ``valid[B,D]`` (valid detections first in each row) and
        ``masks[B,D,M,M]`` (RoI mask probabilities of each detection's class), D = detections per image.
        """
        features = list(self.backbone(batch).values())
        proposals, proposal_valid, _ = self.rpn(features, image_hw, tuple(batch.shape[-2:]))
        features = features[:4]
        b, p, _ = proposals.shape
        batch_idx = torch.arange(b, device=proposals.device, dtype=proposals.dtype).view(b, 1, 1).expand(b, p, 1)
        rois = torch.cat([batch_idx, proposals], dim=2).view(-1, 5)
        class_logits, box_deltas = self.roi_heads.box_branch(features, rois)
        boxes, scores, labels, valid = select_detections(class_logits, box_deltas, proposals, proposal_valid,
                                                         image_hw, self.cfg)
        d = boxes.shape[1]
        det_idx = torch.arange(b, device=boxes.device, dtype=boxes.dtype).view(b, 1, 1).expand(b, d, 1)
        det_rois = torch.cat([det_idx, boxes], dim=2).view(-1, 5)
        masks = self.roi_heads.mask_probs(features, det_rois, labels.view(-1))
        return boxes, scores, labels, valid, masks.view(b, d, *masks.shape[-2:])

    # ------------------------------------------------------------------ transform
    def transform(self, images: list[torch.Tensor], targets: list[dict] | None,
                  padded_hw: tuple[int, int] | None = None, gt_capacity: int | None = None):
        """Normalise, resize (torchvision's rule and arithmetic), pad to a multiple of ``size_divisible``.

        Returns the batch ``[B, 3, Hp, Wp]``, the resized sizes, and (training) the padded ground truth:
        ``boxes[B, G, 4]``, ``labels[B, G]``, ``masks[B, G, Hp, Wp]`` (uint8), ``valid[B, G]``.
        ``padded_hw`` and ``gt_capacity`` fix ``(Hp, Wp)`` and ``G`` (a shape bucket, see
        :mod:`maskrcnn_fast.graphs`); a batch that does not fit raises :class:`DoesNotFitError`.
        """
        cfg = self.cfg
        resized, sizes = [], []
        for im in images:
            h, w = im.shape[-2:]
            scale = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w))
            x = (im.to(self.image_mean.dtype) - self.image_mean) / self.image_std
            x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
            resized.append(x)
            sizes.append(tuple(x.shape[-2:]))
        d = cfg.size_divisible
        hp = -(-max(s[0] for s in sizes) // d) * d
        wp = -(-max(s[1] for s in sizes) // d) * d
        if padded_hw is not None:
            if hp > padded_hw[0] or wp > padded_hw[1]:
                raise DoesNotFitError(f"resized images need {hp}x{wp}, more than the bucket's "
                                      f"{padded_hw[0]}x{padded_hw[1]}")
            hp, wp = padded_hw
        if gt_capacity is not None and targets is not None:
            most = max(t["boxes"].shape[0] for t in targets)
            if most > gt_capacity:
                raise DoesNotFitError(f"an image has {most} ground-truth objects, more than the capacity "
                                      f"{gt_capacity}")
        batch = resized[0].new_zeros((len(images), 3, hp, wp))
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[-2], : x.shape[-1]].copy_(x)
        if self._channels_last(cuda=batch.device.type == "cuda"):
            batch = batch.contiguous(memory_format=torch.channels_last)
        gt = None if targets is None else self._pad_targets(targets, images, sizes, (hp, wp), batch.device,
                                                            gt_capacity)
        return batch, sizes, gt

    @staticmethod
    def _pad_targets(targets, images, sizes, padded_hw, device, capacity=None) -> dict:
        b = len(targets)
        g = capacity or max(1, max(t["boxes"].shape[0] for t in targets))
        # padded boxes are a harmless unit box: they never match (invalid) and never divide by zero
        boxes = torch.zeros((b, g, 4), device=device)
        boxes[..., 2:] = 1.0
        labels = torch.zeros((b, g), dtype=torch.int64, device=device)
        valid = torch.zeros((b, g), dtype=torch.bool, device=device)
        masks = torch.zeros((b, g, *padded_hw), dtype=torch.uint8, device=device)
        for i, (t, im, (h, w)) in enumerate(zip(targets, images, sizes)):
            n = t["boxes"].shape[0]
            if n == 0:
                continue
            oh, ow = im.shape[-2:]
            # torchvision's resize_boxes: float32 ratios of the new to the old size
            rw, rh = np.float32(w) / np.float32(ow), np.float32(h) / np.float32(oh)
            boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32) * _to_device([rw, rh, rw, rh], device)
            labels[i, :n] = t["labels"].to(device)
            valid[i, :n] = True
            m = F.interpolate(t["masks"][:, None].to(device).float(), size=(h, w))[:, 0].byte()
            masks[i, :n, :h, :w] = m
            # RoIAlign samples up to the image's edge (x <= w) and there reads column w-1 of torchvision's
            # unpadded mask; one replicated row and column make the padded batch give the same targets
            if w < padded_hw[1]:
                masks[i, :n, :h, w] = m[:, :, w - 1]
            if h < padded_hw[0]:
                masks[i, :n, h, :w + 1] = masks[i, :n, h - 1, :w + 1]
        return {"boxes": boxes, "labels": labels, "valid": valid, "masks": masks}


class DoesNotFitError(ValueError):
    """A batch larger than a fixed shape bucket (image size or ground-truth count)."""


def _to_device(values, device) -> torch.Tensor:
    """A small float32 tensor of host values, copied without waiting for the device."""
    t = torch.tensor(np.asarray(values, dtype=np.float32))
    return t.to(device, non_blocking=device.type == "cuda")


# ---------------------------------------------------------------------- input checks
def _as_image_list(images) -> list[torch.Tensor]:
    """Images as a list of ``[3, H, W]`` float tensors; shape errors raise before any compute."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"a batch of images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of [3, H, W] tensors or a [B, 3, H, W] tensor")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3:
            raise ValueError(f"images[{i}] must be a [3, H, W] tensor, got "
                             f"{tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__}")
        if im.shape[0] != 3:
            raise ValueError(f"images[{i}] has {im.shape[0]} channels; every image needs 3 (RGB), "
                             f"got channel counts {[int(x.shape[0]) for x in images]}")
        if not im.is_floating_point():
            raise TypeError(f"images[{i}] must be a float tensor with values in [0, 1], got {im.dtype}")
        if im.device != images[0].device:
            raise ValueError(f"images[{i}] is on {im.device}, images[0] on {images[0].device}")
    return list(images)


def _check_targets(images, targets) -> None:
    if targets is None:
        raise ValueError("targets are required in training mode (call model.eval() for inference)")
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"targets must be a list of {len(images)} dicts, one per image")
    for i, (t, im) in enumerate(zip(targets, images)):
        for key in ("boxes", "labels", "masks"):
            if key not in t:
                raise ValueError(f"targets[{i}] has no {key!r}; Mask R-CNN training needs boxes, labels and masks")
        boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be a float [G, 4] tensor, got "
                             f"{boxes.dtype} {tuple(boxes.shape)}")
        g = boxes.shape[0]
        if labels.shape != (g,) or labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be an integer [{g}] tensor, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if masks.dim() != 3 or masks.shape[0] != g or tuple(masks.shape[-2:]) != tuple(im.shape[-2:]):
            raise ValueError(f"targets[{i}]['masks'] must be [{g}, {im.shape[-2]}, {im.shape[-1]}] "
                             f"(one mask per box, at the image's size), got {tuple(masks.shape)}")


def _check_target_values(gt: dict, num_classes: int) -> None:
    """Value checks on the padded ground truth, for all images at once and without a host sync:
    asynchronous on CUDA, an immediate RuntimeError on CPU. Runs before the backbone."""
    invalid = ~gt["valid"]
    labels_ok = ((gt["labels"] >= 1) & (gt["labels"] < num_classes)) | invalid
    torch._assert_async(labels_ok.all(), f"targets[i]['labels'] must be in [1, {num_classes - 1}] "
                                         f"(num_classes={num_classes}) for every image i")
    boxes_ok = (gt["boxes"][..., 2:] > gt["boxes"][..., :2]).all(-1) | invalid
    torch._assert_async(boxes_ok.all(), "targets[i]['boxes'] must have x2 > x1 and y2 > y1 for every image i")


# ---------------------------------------------------------------------- factories
def maskrcnn_resnet50_fpn(num_classes: int = 91, **kwargs) -> MaskRCNN:
    """Mask R-CNN with a ResNet-50-FPN backbone; keyword arguments as torchvision's (see MaskRCNNConfig)."""
    return MaskRCNN(num_classes=num_classes, backbone="resnet50", **kwargs)


def maskrcnn_resnet18_fpn(num_classes: int, **kwargs) -> MaskRCNN:
    """A small Mask R-CNN (ResNet-18-FPN) that trains on a CPU in minutes.

    Its weights start random (nothing is downloaded), so by default every backbone stage trains.
    """
    kwargs.setdefault("trainable_backbone_layers", 5)
    kwargs.setdefault("fpn_channels", 128)
    kwargs.setdefault("representation_size", 512)
    kwargs.setdefault("mask_layers", (128, 128, 128, 128))
    return MaskRCNN(num_classes=num_classes, backbone="resnet18", **kwargs)
