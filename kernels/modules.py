"""``nn.Module`` forms of the RoI ops, drop-ins for ``torchvision.ops.RoIAlign`` / ``RoIPool``.

The functions are registered with ``torch.fx.wrap`` here, where the modules call them, so that
``torch.fx.symbolic_trace`` records each call as one leaf node (as torchvision's modules do) instead of
tracing into our input checks with proxies.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.roi_align import roi_align
from kernels.roi_pool import roi_pool

torch.fx.wrap("roi_align")
torch.fx.wrap("roi_pool")


class RoIAlign(nn.Module):
    """``RoIAlign(output_size, spatial_scale, sampling_ratio, aligned=False)``, as torchvision's."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, rois) -> torch.Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class RoIPool(nn.Module):
    """``RoIPool(output_size, spatial_scale)``, as torchvision's."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: torch.Tensor, rois) -> torch.Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"
