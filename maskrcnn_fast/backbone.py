"""ResNet + FPN feature extractor: torchvision's ResNet and FPN with frozen BatchNorm.

Detection batches are too small for BatchNorm statistics, so BN is frozen to its ImageNet values
(an affine per channel), as in the paper and torchvision. The module layout and parameter names
are torchvision's (``body.layer1.0.conv1.weight``, ``fpn.inner_blocks.0.0.weight``, ...), so
torchvision checkpoints load unchanged.

``fold_frozen_bn`` merges each frozen BN into the conv before it: the same function with one op
per layer instead of three, used at inference and in the benchmark.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops import misc

_RESNETS = {"resnet50": resnet.resnet50, "resnet18": resnet.resnet18}

# FPN levels P2..P5 come from ResNet stages layer1..layer4 (strides 4..32); P6 is a max-pool of P5.
FPN_STRIDES = (4, 8, 16, 32, 64)


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """torchvision's frozen BN (same buffers, same state dict) computed as one ``addcmul``.

    The per-channel scale and shift are cached (per dtype, so bf16 activations stay bf16 instead
    of being promoted to fp32) and recomputed when a buffer changes in place or is replaced.
    One op forward and one backward instead of torchvision's eight and two, 53 times in a ResNet-50.
    """

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bufs = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((b.data_ptr(), b._version) for b in bufs)
        cache = self.__dict__.setdefault("_affine_cache", {})
        if cache.get("key") != key:
            cache.clear()
            cache["key"] = key
        if dtype not in cache:
            # never cache inference tensors: a later training step saves these for backward
            with torch.inference_mode(False), torch.no_grad():
                cache[dtype] = self._compute(dtype)
        return cache[dtype]

    def _compute(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale.view(1, -1, 1, 1).to(dtype), shift.view(1, -1, 1, 1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x).to(x.dtype)
        scale, shift = self._affine(x.dtype)
        return torch.addcmul(shift, x, scale)


def resnet_fpn(name: str = "resnet50", out_channels: int = 256, trainable_layers: int = 3) -> BackboneWithFPN:
    """ResNet-``name`` with frozen BN, freezing all but the last ``trainable_layers`` stages, plus FPN.

    Returns a module mapping ``[B,3,H,W]`` to an ordered dict of 5 maps (keys ``"0".."3"``, ``"pool"``)
    with ``out_channels`` channels at strides 4, 8, 16, 32, 64.
    """
    if name not in _RESNETS:
        raise ValueError(f"backbone must be one of {sorted(_RESNETS)}, got {name!r}")
    body = _RESNETS[name](weights=None, norm_layer=FrozenBatchNorm2d)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for pname, p in body.named_parameters():
        if not any(pname.startswith(layer) for layer in layers_to_train):
            p.requires_grad_(False)
    stage2 = body.inplanes // 8  # 256 for resnet50, 64 for resnet18
    in_channels = [stage2 * 2 ** i for i in range(4)]
    return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
    return BackboneWithFPN(body, return_layers, in_channels, out_channels, extra_blocks=LastLevelMaxPool())


@torch.no_grad()
def fold_frozen_bn(module: nn.Module) -> nn.Module:
    """Merge every ``conv -> FrozenBatchNorm2d`` pair into the conv (in place); returns ``module``.

    y = (conv(x) - mean) * w / sqrt(var + eps) + b  ==  conv'(x) with scaled weights and a bias.
    Only frozen BN is folded: its statistics and affine never change, so the fold is exact
    (up to rounding) for training as well as inference.
    """
    for parent in module.modules():
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, misc.FrozenBatchNorm2d):
                scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
                parent._modules[bn_name] = nn.Identity()
    return module

