"""Every knob of the model in one dataclass.

The torchvision keyword arguments of ``maskrcnn_resnet50_fpn`` keep their names and meanings, so a
torchvision call ports by changing the import. The rest are head sizes (small values make the
CPU demo and the tests fast) and the paper's ablation switches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

_CHOICES = {
    "backbone": ("resnet50", "resnet18"),
    "pooler": ("roi_align", "roi_pool"),
    "mask_loss": ("sigmoid", "softmax"),
    "mask_head": ("fcn", "mlp"),
}


@dataclass
class MaskRCNNConfig:
    num_classes: int = 91

    # --- transform (torchvision's GeneralizedRCNNTransform) ---
    min_size: int = 800
    max_size: int = 1333
    image_mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32

    # --- backbone ---
    backbone: str = "resnet50"
    fpn_channels: int = 256
    trainable_backbone_layers: int = 3
    # None: channels-last where CUDA is available (cuDNN's NHWC convolutions; RoIAlign's 128-bit loads along
    # channels), else NCHW, the layout the README's CPU timings use. Resolved when the model is built
    # (on CPU, then moved: .to(device) keeps the memory format); the batch follows its device.
    channels_last: Optional[bool] = None

    # --- RPN ---
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0

    # --- RoI heads ---
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: Optional[Tuple[float, float, float, float]] = None  # None -> (10, 10, 5, 5)
    # candidates (proposal x class) entering the final NMS per image; greedy NMS keeps the same
    # boxes as torchvision's uncapped NMS whenever box_detections_per_img survive inside the cap
    box_pre_nms_top_n: int = 4096
    representation_size: int = 1024
    box_roi_size: int = 7
    mask_roi_size: int = 14
    mask_layers: Tuple[int, ...] = (256, 256, 256, 256)
    mask_dilation: int = 1
    sampling_ratio: int = 2
    # The mask branch runs on a fixed p = box_batch_size_per_image * box_positive_fraction slots per
    # image (padding weighs 0), so a step has static shapes and no host sync. Where a host sync is free
    # (the PyTorch CPU backend), running it on the positive RoIs only is the same loss for a fraction of
    # the compute. None: positives only exactly there; True/False force it.
    mask_branch_positives_only: Optional[bool] = None

    # --- ablations (He et al., Table 2) ---
    pooler: str = "roi_align"        # "roi_align" | "roi_pool"
    # None: each RoI is pooled from its FPN level (FPN eq. 1). 0..3: every RoI from P2..P5 (stride 4..32);
    # 3 is the paper's stride-32 RoIAlign/RoIPool row (Table 2c), where RoIPool's quantization costs most
    pool_level: Optional[int] = None
    mask_loss: str = "sigmoid"       # "sigmoid" (per-class binary) | "softmax" (multinomial over classes)
    mask_head: str = "fcn"           # "fcn" | "mlp"
    fused_mask_loss: bool = False    # 1x1 predictor + loss in one kernel (sigmoid loss only)

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {self.num_classes}")
        if self.fused_mask_loss and (self.mask_loss != "sigmoid" or self.mask_head != "fcn"):
            raise ValueError("fused_mask_loss fuses the FCN head's 1x1 predictor with the sigmoid loss; "
                             "it needs mask_loss='sigmoid' and mask_head='fcn'")
        for name in ("rpn_positive_fraction", "box_positive_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.bbox_reg_weights is None:
            self.bbox_reg_weights = (10.0, 10.0, 5.0, 5.0)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.bbox_reg_weights = tuple(float(v) for v in self.bbox_reg_weights)
        if self.pool_level is not None and self.pool_level not in (0, 1, 2, 3):
            raise ValueError(f"pool_level must be None or one of 0..3 (P2..P5), got {self.pool_level!r}")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {self.trainable_backbone_layers}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "MaskRCNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown MaskRCNNConfig keyword(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def replace(self, **kwargs) -> "MaskRCNNConfig":
        return dataclasses.replace(self, **kwargs)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)


__all__ = ["MaskRCNNConfig"]
