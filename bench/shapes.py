"""Benchmark shapes (Mask R-CNN's on CUDA, tiny on CPU) and the bytes each op must move.

The bytes are the compulsory traffic of one call -- every input read once and every output written
once -- so ``bytes / time`` over the GPU's HBM bandwidth is the % of roofline reported by report.py.
"""
from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# box head: 2 images x 512 RoIs, 256 channels, 7x7 bins, FPN levels P2-P5 of an 800x1216 input
BOX_HEAD = dict(images=2, rois=512, channels=256, out=7, size=(800, 1216), strides=(4, 8, 16, 32)) if CUDA else \
    dict(images=2, rois=13, channels=8, out=7, size=(64, 96), strides=(4, 8, 16, 32))
# mask head: 128 RoIs at 14x14 from P2
MASK_HEAD = dict(images=2, rois=128, channels=256, out=14, size=(800, 1216), strides=(4,)) if CUDA else \
    dict(images=2, rois=7, channels=8, out=14, size=(64, 96), strides=(4,))
NMS = dict(boxes=10_000, classes=80) if CUDA else dict(boxes=300, classes=5)
RPN_NMS = dict(images=8, levels=5, per_level=1000, max_output=1000) if CUDA else \
    dict(images=2, levels=2, per_level=65, max_output=40)
POST_NMS = dict(images=8, boxes=1000, classes=80, max_output=100) if CUDA else \
    dict(images=2, boxes=129, classes=5, max_output=20)
MASK_LOSS = dict(rois=128, classes=80, m=28, channels=256) if CUDA else dict(rois=7, classes=5, m=14, channels=8)


def roi_align_fwd_bytes(K, C, P, feature_bytes, e, grid=2):
    """Output + rois + sampled texels (4 per sample), capped by the feature maps' size."""
    return K * C * P * e + K * 5 * 4 + min(4 * K * C * P * grid * grid * e, feature_bytes)


def roi_align_bwd_bytes(K, C, P, feature_elems, e, acc=4):
    """grad_output + accumulator zeroing, atomic read-modify-write, and the cast to the input dtype."""
    return K * C * P * e + feature_elems * (3 * acc + e)


def nms_bytes(B, N, e=4):
    """Boxes + scores + the upper-triangle bitmask written then read (N*N/8 bytes per image) + keep."""
    words = (N + 63) // 64
    return B * (N * (4 * e + 4 + 8) + 2 * N * words * 8 // 2 + N * 8)


def mask_loss_bytes(R, K, P, e, fwd_and_bwd=True):
    """Selected logits + targets + labels + compact grad; backward writes the dense [R,K,P] gradient."""
    fwd = R * P * e + R * P * 4 + R * 8 + R * P * 4
    return fwd + (R * P * 4 + R * K * P * e if fwd_and_bwd else 0)
