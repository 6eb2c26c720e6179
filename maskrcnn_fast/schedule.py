"""What the eager training loop and graph mode share: the learning-rate schedule and the logged loss terms.

Kept apart from both so that neither imports the other (``graphs`` is used by ``train``).
"""
from __future__ import annotations

import math

import torch

LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def lr_factor(it: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr before step ``it`` (0-based): linear warm-up, then the decay."""
    warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(it, total) / max(1, total)))
    return warm * 0.1 ** sum(it >= int(total * f) for f in (2 / 3, 8 / 9))


def lr_factor_tensor(it: torch.Tensor, total: int, warmup: int, schedule: str) -> torch.Tensor:
    """:func:`lr_factor` on the device (fp64) for a 0-d integer iteration ``it``: no host sync."""
    t = it.double()
    warm = ((t + 1) / warmup).clamp(max=1.0) if warmup > 0 else torch.ones_like(t)
    if schedule == "cosine":
        return warm * 0.5 * (1 + torch.cos(math.pi * t.clamp(max=total) / max(1, total)))
    drops = sum((t >= int(total * f)).double() for f in (2 / 3, 8 / 9))
    return warm * torch.pow(0.1, drops)
