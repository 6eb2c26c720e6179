"""PyTorch implementation of (multi-level) RoIAlign: the CPU backend when Triton's interpreter is off.

All levels gather from one flat ``[N * sum(H*W), C]`` table, so there is no loop over levels; the
backward scatters with ``index_add_`` through the same sampling plan.
"""
from __future__ import annotations

import torch

from kernels._roi_common import MAX_GRID


def _torch_sampling_plan(features, rois, levels, scales, ph, pw, sampling_ratio, aligned):
    """Flat gather indices and weights of every bilinear corner: 4 x ([K,PH,G,PW,G] idx, weight)."""
    x = features[0]
    N = x.shape[0]
    K = rois.shape[0]
    dev = x.device
    sizes = [f.shape[2] * f.shape[3] for f in features]
    total = sum(sizes)
    lvl = levels.long()
    level_off = torch.tensor([0] + sizes[:-1], device=dev).cumsum(0)[lvl]
    Hs = torch.tensor([f.shape[2] for f in features], device=dev)[lvl]
    Ws = torch.tensor([f.shape[3] for f in features], device=dev)[lvl]
    scale = torch.tensor(scales, dtype=torch.float32, device=dev)[lvl]
    r = rois.float()
    b = r[:, 0].nan_to_num(0).clamp(0, N - 1).long()
    off = 0.5 if aligned else 0.0
    start_w, start_h = r[:, 1] * scale - off, r[:, 2] * scale - off
    roi_w, roi_h = r[:, 3] * scale - off - start_w, r[:, 4] * scale - off - start_h
    if not aligned:
        roi_w, roi_h = roi_w.clamp_min(1.0), roi_h.clamp_min(1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        gh = gw = torch.full((K,), sampling_ratio, device=dev)
        G = sampling_ratio
    else:
        gh = torch.ceil(roi_h / ph).nan_to_num(0).clamp(0, MAX_GRID).long()
        gw = torch.ceil(roi_w / pw).nan_to_num(0).clamp(0, MAX_GRID).long()
        # the adaptive grid's size is data-dependent: this CPU path reads it (a sync, harmless on CPU)
        G = int(max(gh.max(), gw.max(), 1)) if K else 1
    count = (gh * gw).clamp_min(1).float()
    it = torch.arange(G, device=dev, dtype=torch.float32)
    y = (start_h[:, None, None] + torch.arange(ph, device=dev)[None, :, None] * bin_h[:, None, None]
         + (it[None, None, :] + 0.5) * bin_h[:, None, None] / gh[:, None, None])
    xx = (start_w[:, None, None] + torch.arange(pw, device=dev)[None, :, None] * bin_w[:, None, None]
          + (it[None, None, :] + 0.5) * bin_w[:, None, None] / gw[:, None, None])
    used = (it[None, None, :] < gh[:, None, None])[:, :, :, None, None] & \
        (it[None, None, :] < gw[:, None, None])[:, None, None, :, :]
    Y = y[:, :, :, None, None].expand(K, ph, G, pw, G)
    X = xx[:, None, None, :, :].expand(K, ph, G, pw, G)
    Hi, Wi = Hs[:, None, None, None, None], Ws[:, None, None, None, None]
    valid = (Y >= -1) & (Y <= Hi) & (X >= -1) & (X <= Wi) & used
    Y = torch.where(valid, Y.clamp_min(0), torch.zeros_like(Y))
    X = torch.where(valid, X.clamp_min(0), torch.zeros_like(X))
    y_lo, x_lo = Y.long(), X.long()
    y_top, x_top = y_lo >= Hi - 1, x_lo >= Wi - 1
    y_lo, x_lo = torch.where(y_top, Hi - 1, y_lo), torch.where(x_top, Wi - 1, x_lo)
    y_hi, x_hi = torch.where(y_top, Hi - 1, y_lo + 1), torch.where(x_top, Wi - 1, x_lo + 1)
    Y, X = torch.where(y_top, y_lo.float(), Y), torch.where(x_top, x_lo.float(), X)
    ly, lx = Y - y_lo, X - x_lo
    hy, hx = 1 - ly, 1 - lx
    row0 = (b * total + level_off)[:, None, None, None, None]
    w_scale = valid / count[:, None, None, None, None]
    corners = ((y_lo, x_lo, hy * hx), (y_lo, x_hi, hy * lx), (y_hi, x_lo, ly * hx), (y_hi, x_hi, ly * lx))
    return [(row0 + yy * Wi + xq, w * w_scale) for yy, xq, w in corners], total, G


def _torch_roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, aligned) -> torch.Tensor:
    x = features[0]
    N, C = x.shape[:2]
    K = rois.shape[0]
    plan, total, G = _torch_sampling_plan(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)
    # one flat [N*sum(HW), C] table of all levels, so every RoI gathers from its own level at once
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(N, -1, C) for f in features], 1).reshape(N * total, C)
    out = x.new_zeros((K, ph, G, pw, G, C), dtype=torch.float32)
    for idx, w in plan:
        out += flat.index_select(0, idx.reshape(-1)).float().reshape(K, ph, G, pw, G, C) * w[..., None]
    return out.sum(dim=(2, 4)).permute(0, 3, 1, 2).contiguous().to(x.dtype)


def _torch_roi_align_bwd(grad, features, rois, levels, scales, ph, pw, sampling_ratio, aligned):
    x = features[0]
    N, C = x.shape[:2]
    K = rois.shape[0]
    plan, total, G = _torch_sampling_plan(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)
    g = grad.float().permute(0, 2, 3, 1)[:, :, None, :, None, :]  # [K, PH, 1, PW, 1, C]
    acc = x.new_zeros((N * total, C), dtype=torch.float32)
    for idx, w in plan:
        acc.index_add_(0, idx.reshape(-1), (g * w[..., None]).reshape(-1, C))
    acc = acc.reshape(N, total, C)
    grads, start = [], 0
    for f in features:
        H, W = f.shape[2:]
        # a fresh tensor per level: custom-op outputs must not alias each other (or the accumulator)
        grads.append(torch.empty(f.shape, dtype=f.dtype, device=f.device).copy_(
            acc[:, start:start + H * W].reshape(N, H, W, C).permute(0, 3, 1, 2)))
        start += H * W
    return grads
