"""Load a torchvision Mask R-CNN (ResNet-50-FPN, v1 layout) into :class:`maskrcnn_fast.MaskRCNN`.

The parameter names are the same on both sides, so the weights load as they are (BatchNorm's
``num_batches_tracked`` is dropped by the frozen BN). From a model, the configuration is read from
its modules too; from a ``state_dict``, pass the configuration as keyword arguments.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from maskrcnn_fast.config import MaskRCNNConfig
from maskrcnn_fast.model import MaskRCNN


def config_of(tv_model) -> dict[str, Any]:
    """torchvision ``MaskRCNN`` -> :class:`MaskRCNNConfig` keyword arguments."""
    t, rpn, heads = tv_model.transform, tv_model.rpn, tv_model.roi_heads
    sizes = rpn.anchor_generator.sizes
    ratios = rpn.anchor_generator.aspect_ratios
    if any(len(s) != 1 for s in sizes) or any(tuple(r) != tuple(ratios[0]) for r in ratios):
        raise ValueError("only one anchor size per level and the same aspect ratios on every level are supported, "
                         f"got sizes={sizes}, aspect_ratios={ratios}")
    mask_convs = [m for m in heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    body = tv_model.backbone.body
    if not hasattr(body, "layer4") or type(body.layer1[0]).__name__ != "Bottleneck" or len(body.layer3) != 6:
        raise ValueError("from_torchvision supports the ResNet-50-FPN Mask R-CNN (v1 layout) only")
    return dict(
        num_classes=heads.box_predictor.cls_score.out_features,
        min_size=t.min_size[0], max_size=t.max_size,
        image_mean=tuple(t.image_mean), image_std=tuple(t.image_std), size_divisible=t.size_divisible,
        backbone="resnet50", fpn_channels=tv_model.backbone.out_channels,
        anchor_sizes=tuple(s[0] for s in sizes), aspect_ratios=tuple(ratios[0]),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"], rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold, rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction, rpn_score_thresh=rpn.score_thresh,
        box_score_thresh=heads.score_thresh, box_nms_thresh=heads.nms_thresh,
        box_detections_per_img=heads.detections_per_img,
        box_fg_iou_thresh=heads.proposal_matcher.high_threshold, box_bg_iou_thresh=heads.proposal_matcher.low_threshold,
        box_batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=heads.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=tuple(heads.box_coder.weights),
        representation_size=heads.box_head.fc7.out_features,
        box_roi_size=heads.box_roi_pool.output_size[0], mask_roi_size=heads.mask_roi_pool.output_size[0],
        sampling_ratio=heads.box_roi_pool.sampling_ratio,
        mask_layers=tuple(c.out_channels for c in mask_convs),
        mask_dilation=mask_convs[0].dilation[0],
    )


def from_torchvision(model_or_state_dict, **cfg) -> MaskRCNN:
    """Our model with the torchvision model's weights and configuration (``cfg`` overrides).

    ``model_or_state_dict``: a ``torchvision.models.detection.MaskRCNN`` or its ``state_dict``.
    The result is in eval mode if the torchvision model was (always, for a state dict).
    """
    if isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
        cfg.setdefault("num_classes", state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        training = False
    else:
        tv = model_or_state_dict
        state = tv.state_dict()
        cfg = {**config_of(tv), **cfg}
        training = tv.training
    if cfg.get("backbone", "resnet50") != "resnet50":
        raise ValueError("from_torchvision loads the ResNet-50-FPN layout")
    model = MaskRCNN(MaskRCNNConfig.from_kwargs(**cfg))
    ours = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the Mask R-CNN ResNet-50-FPN v1 layout: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if ours[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the configuration ({tuple(ours[k].shape)})")
    model.load_state_dict(state)
    return model.train(training)
