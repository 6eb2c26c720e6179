"""``torch.export`` of the inference model for a fixed input shape.

    batch, sizes, _ = model.transform(images, None, padded_hw=(800, 1344))
    program = export_inference(model.eval(), batch, image_hw)
    boxes, scores, labels, valid, masks = program.module()(batch, image_hw)

The exported program is :meth:`MaskRCNN.detect`: backbone, RPN, box branch, detection NMS and the mask
branch, with our custom ops (RoIAlign, NMS, class mask logits) as single nodes whose fake
implementations give the output shapes. Every shape is static, which is why it exports at all:
torchvision's Mask R-CNN cannot be exported (pytorch/vision#9321), its shapes depend on the data.

The program stops before the per-image split, whose sizes are data (the detection counts):
:func:`maskrcnn_fast.postprocess.split_per_image` cuts its padded outputs per image. A saved program
(``torch.export.save``) needs ``import kernels`` before ``torch.export.load``, to register the ops.
"""
from __future__ import annotations

import torch
from torch import nn


class InferenceCore(nn.Module):
    """``(batch[B,3,Hp,Wp], image_hw[B,2]) -> (boxes, scores, labels, valid, masks)``: ``model.detect``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor, image_hw: torch.Tensor):
        return self.model.detect(batch, image_hw)


def export_inference(model: nn.Module, batch: torch.Tensor, image_hw: torch.Tensor) -> torch.export.ExportedProgram:
    """Export ``model.detect`` (a model in eval mode) for the shapes of ``batch`` and ``image_hw``."""
    if model.training:
        raise ValueError("export_inference exports inference: call model.eval() first")
    with torch.no_grad():
        return torch.export.export(InferenceCore(model), (batch, image_hw), strict=False)


__all__ = ["InferenceCore", "export_inference"]
