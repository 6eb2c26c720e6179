"""Every kernel side by side with its torchvision / eager counterpart, grouped by op and shape.

On CUDA: Mask R-CNN shapes, compiled Triton. On CPU: tiny shapes, Triton's interpreter ("ours")
and the PyTorch fallback ("ours_torch"), as a smoke test that keeps the suite honest in CI.
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision

import kernels
from bench import shapes as S

DEV = S.DEVICE
IMPLS = ["ours", "torchvision"] + ([] if S.CUDA else ["ours_torch"])


def _backend(impl):
    return kernels.use_backend("torch") if impl == "ours_torch" else kernels.use_backend("triton")


def fpn(cfg, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    H, W = cfg["size"]
    feats = [torch.randn(cfg["images"], cfg["channels"], H // s, W // s, device=DEV, generator=g)
             .to(dtype).contiguous(memory_format=torch.channels_last) for s in cfg["strides"]]
    K = cfg["rois"]
    xy = torch.rand(K * cfg["images"], 2, device=DEV, generator=g) * torch.tensor([W, H], device=DEV) * 0.8
    wh = 8 + torch.rand(K * cfg["images"], 2, device=DEV, generator=g) * torch.tensor([W, H], device=DEV) * 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    return feats, [boxes[i * K:(i + 1) * K] for i in range(cfg["images"])]


def _no_grad_yet(*leaves) -> None:
    """Drop the leaves' .grad before a timed backward: otherwise every call after the first also adds the new
    gradient into the old one (a full-size read-modify-write that is no part of either op, timed on both
    sides, which pulls every speedup toward 1x and hides bandwidth)."""
    for t in leaves:
        t.grad = None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_multiscale_roi_align(run_bench, impl, direction):
    cfg, dtype = S.BOX_HEAD, torch.bfloat16 if S.CUDA else torch.float32
    feats, boxes = fpn(cfg, dtype)
    scales = [1.0 / s for s in cfg["strides"]]
    out = cfg["out"]
    K, C, P = cfg["rois"] * cfg["images"], cfg["channels"], out * out
    tv = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(len(feats))], out, 2)
    leaves = [f.detach().requires_grad_(direction != "fwd") for f in feats]

    def ours():
        with _backend(impl):
            _no_grad_yet(*leaves)
            y = kernels.multiscale_roi_align(leaves, boxes, out, scales, 2)
            if direction != "fwd":
                y.backward(torch.ones_like(y))

    def theirs():  # torchvision casts to fp32 under AMP; do the same to be fair to its kernel
        _no_grad_yet(*leaves)
        y = tv(OrderedDict((str(i), f.float()) for i, f in enumerate(leaves)), boxes, [cfg["size"]] * cfg["images"])
        if direction != "fwd":
            y.backward(torch.ones_like(y))

    e = S.esize(dtype)
    feature_elems = sum(f.numel() for f in feats)
    nbytes = S.roi_align_fwd_bytes(K, C, P, feature_elems * e, e)
    if direction != "fwd":
        nbytes += S.roi_align_bwd_bytes(K, C, P, feature_elems, e)
    run_bench(f"multiscale_roi_align {direction} {cfg['images']}x{cfg['rois']} C{C} {out}x{out} "
              f"L{len(feats)} {str(dtype)[6:]}", theirs if impl == "torchvision" else ours, nbytes, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["roi_align", "roi_align_det_bwd", "roi_pool"])
def test_mask_head_pooling(run_bench, impl, op):
    cfg, dtype = S.MASK_HEAD, torch.float32
    feats, boxes = fpn(cfg, dtype, seed=1)
    x = feats[0].detach().requires_grad_(op == "roi_align_det_bwd")
    out, scale = cfg["out"], 1.0 / cfg["strides"][0]
    K, C, P = cfg["rois"] * cfg["images"], cfg["channels"], cfg["out"] ** 2
    tv_op = torchvision.ops.roi_pool if op == "roi_pool" else torchvision.ops.roi_align
    our_op = kernels.roi_pool if op == "roi_pool" else kernels.roi_align

    def ours():
        with _backend(impl):
            if op == "roi_align_det_bwd":
                _no_grad_yet(x)
                kernels.roi_align(x, boxes, out, scale, 2, deterministic=True).sum().backward()
            else:
                our_op(x, boxes, out, scale)

    def theirs():
        if op == "roi_align_det_bwd":  # torchvision's (atomic) backward: the bar for our deterministic one
            _no_grad_yet(x)
            torchvision.ops.roi_align(x, boxes, out, scale, 2).sum().backward()
        else:
            tv_op(x, boxes, out, scale)

    e = S.esize(dtype)
    nbytes = S.roi_align_fwd_bytes(K, C, P, x.numel() * e, e)
    if op == "roi_align_det_bwd":
        nbytes += S.roi_align_bwd_bytes(K, C, P, x.numel(), e, acc=8)
    run_bench(f"{op} {K} RoIs C{C} {out}x{out}", theirs if impl == "torchvision" else ours, nbytes, impl=impl)


def _clustered(n, seed, batch=()):
    g = torch.Generator(device=DEV).manual_seed(seed)
    c = torch.rand(*batch, n, 2, device=DEV, generator=g) * 800
    wh = 10 + torch.rand(*batch, n, 2, device=DEV, generator=g) * 60
    return torch.cat([c, c + wh], -1), torch.rand(*batch, n, device=DEV, generator=g)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_nms(run_bench, impl):
    cfg = S.NMS
    boxes, scores = _clustered(cfg["boxes"], 0)
    idxs = torch.randint(0, cfg["classes"], (cfg["boxes"],), device=DEV)

    def ours():
        with _backend(impl):
            kernels.batched_nms(boxes, scores, idxs, 0.5)
    run_bench(f"batched_nms {cfg['boxes']} boxes x {cfg['classes']} classes",
              (lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)) if impl == "torchvision" else ours,
              S.nms_bytes(1, cfg["boxes"]), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["rpn", "postprocess"])
def test_nms_padded(run_bench, impl, case):
    if case == "rpn":
        cfg = S.RPN_NMS
        B, N, K, thr = cfg["images"], cfg["levels"] * cfg["per_level"], cfg["max_output"], 0.7
        idxs = torch.arange(cfg["levels"], device=DEV).repeat_interleave(cfg["per_level"]).expand(B, N)
    else:
        cfg = S.POST_NMS
        B, N, K, thr = cfg["images"], cfg["boxes"], cfg["max_output"], 0.5
        idxs = torch.randint(0, cfg["classes"], (B, N), device=DEV)
    boxes, scores = _clustered(N, 1, batch=(B,))

    def ours():
        with _backend(impl):
            kernels.nms_padded(boxes, scores, thr, K, idxs=idxs)

    def theirs():  # torchvision: a Python loop over images, each call syncing for its output length
        for b in range(B):
            torchvision.ops.batched_nms(boxes[b], scores[b], idxs[b], thr)[:K]
    run_bench(f"nms_padded {case} B{B} x {N} max{K}", theirs if impl == "torchvision" else ours,
              S.nms_bytes(B, N), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["sigmoid_bce_mask_loss", "mask_predictor_loss", "project_masks_on_boxes"])
def test_mask_loss(run_bench, impl, op):
    cfg = S.MASK_LOSS
    R, K, M, C = cfg["rois"], cfg["classes"], cfg["m"], cfg["channels"]
    dtype = torch.bfloat16 if S.CUDA else torch.float32
    g = torch.Generator(device=DEV).manual_seed(0)
    labels = torch.randint(0, K, (R,), device=DEV, generator=g)
    targets = (torch.rand(R, M, M, device=DEV, generator=g) > 0.5).float()
    if op == "project_masks_on_boxes":
        gt = (torch.rand(16, 400, 600, device=DEV, generator=g) > 0.5).to(torch.uint8)
        xy = torch.rand(R, 2, device=DEV, generator=g) * 300
        boxes = torch.cat([xy, xy + 20 + torch.rand(R, 2, device=DEV, generator=g) * 200], 1)
        matched = torch.randint(0, 16, (R,), device=DEV, generator=g)
        from torchvision.models.detection.roi_heads import project_masks_on_boxes as tv_project

        def ours():
            with _backend(impl):
                kernels.project_masks_on_boxes(gt, boxes, matched, M)
        run_bench(f"project_masks_on_boxes {R} RoIs {M}x{M}",
                  (lambda: tv_project(gt, boxes, matched, M)) if impl == "torchvision" else ours,
                  R * M * M * 4 + R * 24, impl=impl)
        return
    if op == "sigmoid_bce_mask_loss":
        logits = torch.randn(R, K, M, M, device=DEV, generator=g).to(dtype).requires_grad_()

        def ours():
            _no_grad_yet(logits)
            with _backend(impl):
                kernels.sigmoid_bce_mask_loss(logits, labels, targets).backward()

        def theirs():  # torchvision's maskrcnn_loss body
            _no_grad_yet(logits)
            F.binary_cross_entropy_with_logits(logits[torch.arange(R, device=DEV), labels], targets.to(dtype)).backward()
        nbytes = S.mask_loss_bytes(R, K, M * M, S.esize(dtype))
    else:
        feats = torch.randn(R, C, M, M, device=DEV, generator=g).to(dtype).requires_grad_()
        conv = torch.nn.Conv2d(C, K, 1).to(DEV, dtype)

        def ours():
            _no_grad_yet(feats, conv.weight, conv.bias)
            with _backend(impl):
                kernels.mask_predictor_loss(feats, conv.weight, conv.bias, labels, targets).backward()

        def theirs():
            _no_grad_yet(feats, conv.weight, conv.bias)
            logits = conv(feats)
            F.binary_cross_entropy_with_logits(logits[torch.arange(R, device=DEV), labels], targets.to(dtype)).backward()
        e = S.esize(dtype)
        nbytes = 2 * R * C * M * M * e + R * M * M * 12 + K * C * 8
    run_bench(f"{op} fwd+bwd {R}x{K}x{M}x{M} {str(dtype)[6:]}", theirs if impl == "torchvision" else ours,
              nbytes, impl=impl)
