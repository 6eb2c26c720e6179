"""Mask targets: ground-truth masks cut out by each positive RoI's box and resized to M x M.

Maths (torchvision ``roi_heads.project_masks_on_boxes``)
    target[r] = RoIAlign(gt_masks[matched_idxs[r]], boxes[r], (M, M), spatial_scale=1,
                         sampling_ratio=-1 (adaptive: ceil(box size / M) samples per bin), aligned=False)
computed by the RoIAlign forward kernel on the masks as they are (uint8/bool/float: one channel, converted
to the boxes' dtype in registers, so no float copy of the masks is made), with its one-channel tile
(28x28 bins in programs of 128: no spills, no idle channel lanes), in the boxes' dtype (float64 boxes
compute in float64, as torchvision's do). Targets need no gradient.

Targets inside the loss kernel: ``mask_targets_from_gt(gt_masks, boxes, matched_idxs)`` returns a lazy
description that ``sigmoid_bce_mask_loss`` / ``mask_predictor_loss`` accept in place of ``mask_targets``;
their forward kernels then evaluate ``_projected_target`` (the same sampling rule and arithmetic as
RoIAlign) for each target pixel, so the [R,M,M] targets and the float copy of the masks never exist.
The projection computes in the boxes pointer's dtype, which the loss launchers set to the loss's
compute dtype: fp32, or fp64 for fp64 logits/features (as torchvision's float64 RoIAlign does).

Bytes moved (G gt masks of H x W, R RoIs; 128 RoIs, 20 masks of 800x1216 in brackets)
    no float32 copy of the masks (torchvision's G*H*W*(1 + 4) [97 MB] plus its re-read);
    RoIAlign reads at most 4 * R*M*M*grid^2 texels through L2 (boxes ~100 px: grid 4, 6.4 MB) and
    writes R*M*M*4 [0.4 MB].
    in-kernel targets: the same texel reads straight from the uint8/bool masks (1 byte per texel),
    no [R,M,M] write + re-read.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels._backend import (FLOAT_DTYPES, InputError, assert_in_range, backend_for, check_same_device,
                              check_tensor, no_autocast)
from kernels._math import div_rn_int
from kernels._roi_align_triton import _bilinear
from kernels._roi_common import MAX_GRID
from kernels.roi_align import _launch_fwd, roi_align

_MAX_GRID = tl.constexpr(MAX_GRID)


@triton.jit
def _projected_target(gt_ptr, boxes_ptr, idx_ptr, r, p, pm, M, G, H, W, s_n, s_h, s_w):
    """RoIAlign (scale 1, aligned=False, adaptive grid) of mask idx[r] over box r at pixels p, computed
    in the boxes' dtype (fp32 or fp64)."""
    cdt = boxes_ptr.dtype.element_ty
    x1 = tl.load(boxes_ptr + r * 4)
    y1 = tl.load(boxes_ptr + r * 4 + 1)
    x2 = tl.load(boxes_ptr + r * 4 + 2)
    y2 = tl.load(boxes_ptr + r * 4 + 3)
    n = tl.minimum(tl.maximum(tl.load(idx_ptr + r), 0), G - 1).to(tl.int64)  # in bounds for any index
    roi_w = tl.maximum(x2 - x1, 1.0)
    roi_h = tl.maximum(y2 - y1, 1.0)
    # correctly rounded quotients, once per RoI, as RoIAlign's kernel (_roi_align_triton._roi_geometry): the
    # grid is ceil(bin), which an approximate fp32 '/' (div.full.f32) turns into one sample row more for box
    # sizes such as 84, 168, 196 at M = 28
    bin_h = div_rn_int(roi_h, M)
    bin_w = div_rn_int(roi_w, M)
    gh = tl.where(roi_h == roi_h, tl.ceil(bin_h), 0.0)
    gw = tl.where(roi_w == roi_w, tl.ceil(bin_w), 0.0)
    grid_h = tl.minimum(tl.maximum(gh, 0.0), _MAX_GRID).to(tl.int32)
    grid_w = tl.minimum(tl.maximum(gw, 0.0), _MAX_GRID).to(tl.int32)
    step_h = div_rn_int(bin_h, tl.maximum(grid_h, 1))
    step_w = div_rn_int(bin_w, tl.maximum(grid_w, 1))
    inv_count = div_rn_int(tl.full([], 1.0, cdt), tl.maximum(grid_h * grid_w, 1))
    ph = (p // M).to(cdt)
    pw = (p % M).to(cdt)
    base = gt_ptr + n * s_n
    acc = tl.zeros(ph.shape, dtype=cdt)
    for s in range(0, grid_h * grid_w):
        iy = s // grid_w
        ix = s - iy * grid_w
        y = y1 + ph * bin_h + (iy + 0.5) * step_h
        x = x1 + pw * bin_w + (ix + 0.5) * step_w
        valid, y_lo, x_lo, y_hi, x_hi, w1, w2, w3, w4 = _bilinear(y, x, H, W)
        m = pm & valid
        r_lo = y_lo.to(tl.int64) * s_h
        r_hi = y_hi.to(tl.int64) * s_h
        c_lo = x_lo.to(tl.int64) * s_w
        c_hi = x_hi.to(tl.int64) * s_w
        v1 = tl.load(base + r_lo + c_lo, mask=m, other=0).to(cdt)
        v2 = tl.load(base + r_lo + c_hi, mask=m, other=0).to(cdt)
        v3 = tl.load(base + r_hi + c_lo, mask=m, other=0).to(cdt)
        v4 = tl.load(base + r_hi + c_hi, mask=m, other=0).to(cdt)
        acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
    return acc * inv_count


class GtMaskTargets(NamedTuple):
    """Mask targets described by the ground truth, evaluated inside the loss kernel."""
    gt_masks: torch.Tensor      # [G, H, W] uint8 (bool viewed as uint8), float32 or float64
    boxes: torch.Tensor         # [R, 4] float32, or float64
    matched_idxs: torch.Tensor  # [R] int64

    def materialize(self, M: int) -> torch.Tensor:
        return project_masks_on_boxes(self.gt_masks, self.boxes, self.matched_idxs, M)


def mask_targets_from_gt(gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor,
                         check_values: bool = True) -> GtMaskTargets:
    """Pass the result as ``mask_targets`` to the mask losses: they then compute
    ``project_masks_on_boxes(gt_masks, boxes, matched_idxs, M)`` per pixel inside their kernel.
    Checks shapes at once and the index range / mask values (in [0, 1]) without a host sync.
    float64 boxes and masks are kept in float64 (the fp64 losses then project in fp64)."""
    _check(gt_masks, boxes, matched_idxs, "mask_targets_from_gt")
    if boxes.shape[0] > 0 and 0 in gt_masks.shape:
        raise InputError(f"mask_targets_from_gt: {boxes.shape[0]} boxes but gt_masks has shape "
                         f"{tuple(gt_masks.shape)}")
    if gt_masks.dtype == torch.bool:
        gt_masks = gt_masks.view(torch.uint8)  # same bytes, no copy
    elif gt_masks.dtype not in (torch.uint8, torch.float32, torch.float64):
        gt_masks = gt_masks.float()  # rare: the copy torchvision makes for every dtype
    assert_in_range(matched_idxs, 0, gt_masks.shape[0],
                    f"mask_targets_from_gt: matched_idxs must be in [0, {gt_masks.shape[0]})")
    if check_values and gt_masks.numel():
        ok = (gt_masks <= 1).all() if gt_masks.dtype == torch.uint8 else ((gt_masks >= 0) & (gt_masks <= 1)).all()
        if gt_masks.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(ok, "mask_targets_from_gt: gt_masks must be in [0, 1]")
        elif not bool(ok):
            raise InputError("mask_targets_from_gt: gt_masks must be in [0, 1]")
    boxes = boxes if boxes.dtype == torch.float64 else boxes.float()
    return GtMaskTargets(gt_masks, boxes.contiguous(), matched_idxs.long().contiguous())


def _check(gt_masks, boxes, matched_idxs, op="project_masks_on_boxes"):
    check_tensor(gt_masks, f"{op}: gt_masks", ndim=3)
    check_tensor(boxes, f"{op}: boxes", ndim=2, last_dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(matched_idxs, f"{op}: matched_idxs", ndim=1, dtypes=(torch.int64, torch.int32, torch.int16,
                                                                       torch.uint8))
    if matched_idxs.shape[0] != boxes.shape[0]:
        raise InputError(f"{op}: {boxes.shape[0]} boxes but matched_idxs has shape {tuple(matched_idxs.shape)}")
    check_same_device(gt_masks=gt_masks, boxes=boxes, matched_idxs=matched_idxs)


# masks the kernel reads as they are (converted in registers exactly as Tensor.to would)
_DIRECT_MASK_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op("maskrcnn_fast::project_masks_on_boxes", mutates_args=())
def _project_masks(gt_masks: torch.Tensor, rois: torch.Tensor, M: int) -> torch.Tensor:
    """``rois`` [R, 5] (matched index, box) in the targets' dtype."""
    with no_autocast(rois.device):
        if backend_for(rois) == "triton" and gt_masks.dtype in _DIRECT_MASK_DTYPES:
            levels = torch.zeros(rois.shape[0], dtype=torch.int32, device=rois.device)
            return _launch_fwd([gt_masks[:, None]], rois, levels, [1.0], M, M, -1, False, out_dtype=rois.dtype)[:, 0]
        return roi_align(gt_masks[:, None].to(rois.dtype), rois, (M, M), 1.0)[:, 0]


@_project_masks.register_fake
def _(gt_masks, rois, M):
    return rois.new_empty((rois.shape[0], M, M))


def project_masks_on_boxes(gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor,
                           M: int) -> torch.Tensor:
    """``[R, M, M]`` targets in ``boxes.dtype``; same arguments and result as torchvision's
    ``roi_heads.project_masks_on_boxes`` (``gt_masks`` ``[G,H,W]`` any dtype, ``boxes`` ``[R,4]``
    float, ``matched_idxs`` ``[R]`` integer in ``[0, G)``; a bad index raises without a host sync)."""
    _check(gt_masks, boxes, matched_idxs)
    if not isinstance(M, int) or M <= 0:
        raise InputError(f"project_masks_on_boxes: M must be a positive int, got {M!r}")
    if boxes.shape[0] > 0 and 0 in gt_masks.shape:
        raise InputError(f"project_masks_on_boxes: {boxes.shape[0]} boxes but gt_masks has shape "
                         f"{tuple(gt_masks.shape)}")
    assert_in_range(matched_idxs, 0, gt_masks.shape[0],
                    f"project_masks_on_boxes: matched_idxs (the batch index) must be in [0, {gt_masks.shape[0]})")
    if gt_masks.dtype == torch.bool:
        gt_masks = gt_masks.view(torch.uint8)  # same bytes, no copy
    dtype = boxes.dtype
    with no_autocast(boxes.device):
        rois = torch.cat([matched_idxs.to(dtype)[:, None], boxes], dim=1)
        return _project_masks(gt_masks, rois, M)
