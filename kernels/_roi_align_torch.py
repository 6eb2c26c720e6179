"""PyTorch implementation of (multi-level) RoIAlign: the CPU backend when Triton's interpreter is off.

Forward: torchvision's compiled kernel, once per FPN level on the RoIs of that level (RoIs sorted by
level; the per-level counts are read on the host, which is free on the CPU this path runs on), in fp32
(fp64 for fp64 input). Where torchvision's behaviour is undefined or unbounded (a non-finite box
coordinate, or an adaptive sampling grid beyond ``MAX_GRID`` per axis), the forward instead takes the
sparse path below, which follows the Triton kernel's defined behaviour exactly.

Sparse path and backward: all levels live in one flat ``[N * sum(H*W), C]`` table and the bilinear
weights of every sample form one sparse matrix S, so the forward is ``S @ table`` and the backward
``S.T @ grad``: no loop over levels and no per-sample copy of C channels.

Why the forward is torchvision's (measured on a quiet 2-core CPU, 2026-12-02): at the box-head shape
(512 RoIs x 256 channels, 7x7, sampling_ratio 2, 4 FPN levels) the two forwards are close (torchvision
203-221 ms, sparse 172-200 ms; on one level 237-272 vs 137-148 ms), but with the adaptive grid of mask
targets (sampling_ratio -1, 28x28, 1 channel) the sparse plan grows with the square of the box size:
128 RoIs of 120 px take 15 ms with torchvision and 605 ms sparse, 256 of 300 px 146 ms vs 10.4 s. The
backward has no such case and the sparse one is faster (309-347 ms vs torchvision's 487-570 ms).
"""
from __future__ import annotations

import torch

from kernels._backend import compute_dtype
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
    cdt = compute_dtype(x.dtype)
    scale = torch.tensor(scales, dtype=cdt, device=dev)[lvl]
    r = rois.to(cdt)
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
    count = (gh * gw).clamp_min(1).to(cdt)
    it = torch.arange(G, device=dev, dtype=cdt)
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
    Y, X = torch.where(y_top, y_lo.to(cdt), Y), torch.where(x_top, x_lo.to(cdt), X)
    ly, lx = Y - y_lo, X - x_lo
    hy, hx = 1 - ly, 1 - lx
    row0 = (b * total + level_off)[:, None, None, None, None]
    w_scale = valid / count[:, None, None, None, None]
    corners = ((y_lo, x_lo, hy * hx), (y_lo, x_hi, hy * lx), (y_hi, x_lo, ly * hx), (y_hi, x_hi, ly * lx))
    return [(row0 + yy * Wi + xq, w * w_scale) for yy, xq, w in corners], total, G


def _interpolation_matrix(features, rois, levels, scales, ph, pw, sampling_ratio, aligned) -> torch.Tensor:
    """Sparse ``[K*PH*PW, N*sum(HW)]`` matrix of bilinear weights (already divided by the sample count):
    RoIAlign is ``S @ features`` and its backward ``S.T @ grad``, with no per-sample gather of C channels."""
    N = features[0].shape[0]
    K = rois.shape[0]
    plan, total, G = _torch_sampling_plan(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)
    dev = rois.device
    out_row = ((torch.arange(K, device=dev)[:, None, None, None, None] * ph
                + torch.arange(ph, device=dev)[None, :, None, None, None]) * pw
               + torch.arange(pw, device=dev)[None, None, None, :, None]).expand(K, ph, G, pw, G)
    rows = out_row.reshape(-1).repeat(len(plan))
    cols = torch.cat([idx.reshape(-1) for idx, _ in plan])
    vals = torch.cat([w.reshape(-1) for _, w in plan]).to(compute_dtype(features[0].dtype))
    # indices are in range by construction (clamped coordinates and batch index)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (K * ph * pw, N * total), check_invariants=False)


def _flat(features) -> torch.Tensor:
    """All levels as one ``[N*sum(HW), C]`` table (channels last) in the compute dtype, so RoIs of every
    level share one matmul."""
    N, C = features[0].shape[:2]
    cdt = compute_dtype(features[0].dtype)
    return torch.cat([f.permute(0, 2, 3, 1).reshape(N, -1, C) for f in features], 1).reshape(-1, C).to(cdt)


def _torchvision_defined(features, rois, scales, ph, pw, sampling_ratio) -> bool:
    """Finite boxes whose adaptive grid stays within MAX_GRID: where torchvision's kernel equals ours.
    Reads one bool on the host (free on the CPU this path runs on)."""
    ok = torch.isfinite(rois[:, 1:]).all()
    if sampling_ratio <= 0:
        extent = (rois[:, 3:5] - rois[:, 1:3]).abs().amax() * max(scales)
        ok = ok & (extent / min(ph, pw) < MAX_GRID - 1)
    return bool(ok)


def _torchvision_roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, aligned) -> torch.Tensor:
    x = features[0]
    K, C = rois.shape[0], x.shape[1]
    cdt = compute_dtype(x.dtype)
    roi_align = torch.ops.torchvision.roi_align
    if len(features) == 1:
        return roi_align(x.to(cdt), rois, scales[0], ph, pw, sampling_ratio, aligned).to(x.dtype)
    order = torch.argsort(levels, stable=True)
    counts = torch.bincount(levels, minlength=len(features)).tolist()
    by_level, start = [], 0
    sorted_rois = rois[order]
    for f, scale, n in zip(features, scales, counts):
        if n:
            by_level.append(roi_align(f.to(cdt), sorted_rois[start:start + n], scale, ph, pw, sampling_ratio, aligned))
        start += n
    out = torch.empty((K, C, ph, pw), dtype=cdt, device=x.device)
    out[order] = torch.cat(by_level)
    return out.to(x.dtype)


def _no_empty_maps(features) -> list[torch.Tensor]:
    """Each level with no pixel (H or W 0) replaced by one zero pixel. The kernels sample nothing from such a
    level (output and gradient 0); on one zero pixel every sample reads 0 as well, and nothing (neither
    torchvision's CPU kernel, which would read past the empty map, nor the sparse matrix) sees a 0 extent."""
    return [f if f.shape[2] and f.shape[3] else f.new_zeros((*f.shape[:2], max(f.shape[2], 1), max(f.shape[3], 1)))
            for f in features]


def _torch_roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, aligned) -> torch.Tensor:
    x = features[0]
    K, C = rois.shape[0], x.shape[1]
    if K == 0 or C == 0:
        return x.new_zeros((K, C, ph, pw))
    features = _no_empty_maps(features)
    if _torchvision_defined(features, rois, scales, ph, pw, sampling_ratio):
        return _torchvision_roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)
    S = _interpolation_matrix(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)
    out = torch.sparse.mm(S, _flat(features)).reshape(K, ph, pw, C)
    return out.permute(0, 3, 1, 2).contiguous().to(x.dtype)


def _torch_roi_align_bwd(grad, features, rois, levels, scales, ph, pw, sampling_ratio, aligned):
    shapes = [f.shape for f in features]
    features = _no_empty_maps(features)
    x = features[0]
    N, C = x.shape[:2]
    K = rois.shape[0]
    S = _interpolation_matrix(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)
    acc = torch.sparse.mm(S.t(), grad.to(compute_dtype(x.dtype)).permute(0, 2, 3, 1).reshape(K * ph * pw, C))
    acc = acc.reshape(N, -1, C)
    grads, start = [], 0
    for f, shape in zip(features, shapes):
        H, W = f.shape[2:]
        # a fresh tensor per level: custom-op outputs must not alias each other (or the accumulator)
        grads.append(torch.empty(shape, dtype=f.dtype, device=f.device).copy_(
            acc[:, start:start + H * W].reshape(N, H, W, C).permute(0, 3, 1, 2)[:, :, :shape[2], :shape[3]]))
        start += H * W
    return grads
