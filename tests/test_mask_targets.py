"""Mask-target projection against torchvision's roi_heads.project_masks_on_boxes (on CPU), materialized and
inside the loss kernels (mask_targets_from_gt). The Triton cases run on ``kernel_device``: CUDA on a CUDA
host, Triton's interpreter on CPU otherwise."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import project_masks_on_boxes as tv_project

import kernels
from conftest import DEVICE, kernel_device, on
from kernels import mask_targets_from_gt, project_masks_on_boxes
from kernels._backend import InputError, InputTypeError


def make_case(R, G, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(G, H, W, generator=g) > 0.5).to(torch.uint8)
    xy = torch.rand(R, 2, generator=g) * torch.tensor([W, H]) * 1.2 - 0.1 * torch.tensor([W, H])
    wh = torch.rand(R, 2, generator=g) * torch.tensor([W, H]) * 0.7 + 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([3.0, 2.0, 3.2, 2.1])  # smaller than a pixel
    matched = torch.randint(0, G, (R,), generator=g)
    return masks, boxes, matched


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("R,G,H,W,M", [(7, 3, 33, 21, 7), (5, 2, 13, 45, 14), (3, 1, 61, 29, 28)])
def test_matches_torchvision(impl, R, G, H, W, M):
    masks, boxes, matched = make_case(R, G, H, W, seed=R + M)
    with kernels.use_backend(impl):
        ours = project_masks_on_boxes(*on(kernel_device(impl), masks, boxes, matched), M).cpu()
    ref = tv_project(masks, boxes, matched, M)
    assert ours.shape == (R, M, M) and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert ((ref > 0) & (ref < 1)).any()  # soft values: real bilinear sampling was compared


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.float64])
def test_float64_boxes_match_torchvision(impl, mask_dtype):
    """float64 boxes give float64 targets computed in float64 (kernels.roi_align's fp64 path), as
    torchvision's are."""
    masks, boxes, matched = make_case(5, 2, 21, 17, seed=10)
    masks, boxes = masks.to(mask_dtype), boxes.double()
    with kernels.use_backend(impl):
        ours = project_masks_on_boxes(*on(kernel_device(impl), masks, boxes, matched), 7).cpu()
    ref = tv_project(masks, boxes, matched, 7)
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float16, torch.int32])
def test_mask_dtypes_read_as_they_are(impl, mask_dtype):
    """bool / fp16 masks are read by the kernel without a float copy, other dtypes are converted first:
    the targets equal torchvision's (which converts every dtype to the boxes' dtype)."""
    masks, boxes, matched = make_case(4, 2, 23, 19, seed=13)
    masks = masks.to(mask_dtype)
    with kernels.use_backend(impl):
        ours = project_masks_on_boxes(*on(kernel_device(impl), masks, boxes, matched), 28).cpu()
    torch.testing.assert_close(ours, tv_project(masks, boxes, matched, 28), atol=1e-6, rtol=1e-6)


@pytest.mark.triton
def test_float_masks_and_empty():
    masks, boxes, matched = make_case(5, 2, 17, 19, seed=3)
    torch.testing.assert_close(project_masks_on_boxes(*on(DEVICE, masks.float(), boxes, matched), 7).cpu(),
                               tv_project(masks.float(), boxes, matched, 7), atol=1e-6, rtol=1e-6)
    empty = project_masks_on_boxes(*on(DEVICE, masks, boxes[:0], matched[:0]), 7)
    assert empty.shape == (0, 7, 7)


@pytest.mark.bad_values
def test_bad_inputs():
    """InputError / InputTypeError: ValueError / TypeError, and RuntimeError (what torchvision raises)."""
    masks, boxes, matched = make_case(4, 2, 9, 9, seed=4)
    with pytest.raises(InputError):
        project_masks_on_boxes(masks, boxes, matched[:3], 7)
    with pytest.raises(InputTypeError):
        project_masks_on_boxes(masks, boxes.long(), matched, 7)
    with pytest.raises(RuntimeError, match="M must"):
        project_masks_on_boxes(masks, boxes, matched, 0)
    with pytest.raises(ValueError, match="batch index|matched"):
        project_masks_on_boxes(masks, boxes, torch.tensor([0, 1, 2, 0]), 7)
    with pytest.raises(ValueError, match="matched_idxs"):
        project_masks_on_boxes(masks, boxes, matched[:3], 7)
    with pytest.raises(ValueError, match="boxes"):
        project_masks_on_boxes(masks, boxes[:, :3], matched, 7)
    with pytest.raises(ValueError, match="gt_masks"):
        project_masks_on_boxes(masks[0], boxes, matched, 7)
    with pytest.raises(TypeError, match="matched_idxs"):
        project_masks_on_boxes(masks, boxes, matched.float(), 7)
    with pytest.raises(ValueError, match="M"):
        project_masks_on_boxes(masks, boxes, matched, 0)
    with pytest.raises(ValueError, match="one device"):
        project_masks_on_boxes(masks, boxes.to("meta"), matched, 7)


# ----------------------------------------------------------------------------------------------
# targets projected inside the loss kernels (mask_targets_from_gt)
# ----------------------------------------------------------------------------------------------
def reference_bce(logits, labels, targets):
    x = logits.detach().double().requires_grad_()
    loss = F.binary_cross_entropy_with_logits(x[torch.arange(x.shape[0]), labels], targets.double())
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, torch.float32])
@pytest.mark.parametrize("R,G,H,W,M,K", [(7, 3, 33, 21, 7, 3), (3, 2, 61, 29, 14, 1)])
def test_loss_with_targets_from_gt_matches_projected_targets(impl, mask_dtype, R, G, H, W, M, K):
    masks, boxes, matched = make_case(R, G, H, W, seed=R + M + K)
    masks = masks.to(mask_dtype)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(R, K, M, M, generator=g) * 3
    labels = torch.randint(0, K, (R,), generator=g)
    dev = kernel_device(impl)
    x = logits.to(dev, copy=True).requires_grad_()
    with kernels.use_backend(impl):
        loss = kernels.sigmoid_bce_mask_loss(x, labels.to(dev), mask_targets_from_gt(*on(dev, masks, boxes, matched)))
        loss.backward()
    ref_loss, ref_grad = reference_bce(logits, labels, tv_project(masks, boxes, matched, M))
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, atol=1e-5 * float(ref_grad.abs().max()), rtol=0)


# precision of the loss with targets from gt, by logits dtype: the Triton kernels project in the loss's
# compute dtype (fp64 for fp64 logits); the PyTorch backend materializes the targets with
# kernels.roi_align, which computes fp64 input in fp64 too.
GT_LOSS_TOL = {("triton", torch.float64): 1e-12, ("torch", torch.float64): 1e-12,
               ("triton", torch.float32): 1e-6, ("torch", torch.float32): 1e-6}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("logits_dtype,boxes_dtype,mask_dtype", [
    (torch.float64, torch.float64, torch.uint8), (torch.float64, torch.float32, torch.bool),
    (torch.float64, torch.float64, torch.float64), (torch.float64, torch.float32, torch.float32),
    (torch.float32, torch.float64, torch.uint8), (torch.float32, torch.float32, torch.float64)])
def test_loss_with_targets_from_gt_float64(impl, logits_dtype, boxes_dtype, mask_dtype):
    """float64 logits, boxes or masks, in any mix: float64 logits give a float64 loss computed in fp64."""
    R, G, H, W, M, K = 5, 2, 29, 23, 7, 3
    masks, boxes, matched = make_case(R, G, H, W, seed=11)
    masks, boxes = masks.to(mask_dtype), boxes.to(boxes_dtype)
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(R, K, M, M, generator=g, dtype=torch.float64) * 3).to(logits_dtype)
    labels = torch.randint(0, K, (R,), generator=g)
    dev = kernel_device(impl)
    x = logits.to(dev, copy=True).requires_grad_()
    t = mask_targets_from_gt(*on(dev, masks, boxes, matched))
    assert t.boxes.dtype == (torch.float64 if boxes_dtype == torch.float64 else torch.float32)
    with kernels.use_backend(impl):
        loss = kernels.sigmoid_bce_mask_loss(x, labels.to(dev), t).cpu()
        loss.backward()
    assert loss.dtype == logits_dtype and x.grad.dtype == logits_dtype
    # the reference projects the boxes the kernel sees (fp32 logits: boxes rounded to fp32) in fp64
    seen = boxes.double() if logits_dtype == torch.float64 else boxes.float().double()
    ref_loss, ref_grad = reference_bce(logits, labels, tv_project(masks.double(), seen, matched, M))
    tol = GT_LOSS_TOL[impl, logits_dtype]
    torch.testing.assert_close(loss.double(), ref_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, atol=10 * tol * float(ref_grad.abs().max()), rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_predictor_with_targets_from_gt_float64(impl):
    masks, boxes, matched = make_case(4, 2, 19, 27, seed=12)
    g = torch.Generator().manual_seed(4)
    dev = kernel_device(impl)
    f = torch.randn(4, 5, 7, 7, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    w = torch.randn(3, 5, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    labels = torch.randint(0, 3, (4,), generator=g)
    with kernels.use_backend(impl):
        loss = kernels.mask_predictor_loss(f, w, b, labels.to(dev),
                                           mask_targets_from_gt(*on(dev, masks, boxes.double(), matched)))
        loss.backward()
    fr, wr, br = (t.detach().cpu().requires_grad_() for t in (f, w, b))
    logits = F.conv2d(fr, wr[:, :, None, None], br)[torch.arange(4), labels]
    ref = F.binary_cross_entropy_with_logits(logits, tv_project(masks, boxes.double(), matched, 7))
    ref.backward()
    tol = GT_LOSS_TOL[impl, torch.float64]
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), ref.detach(), atol=tol, rtol=tol)
    for ours, theirs in ((f.grad, fr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(ours.cpu(), theirs, atol=10 * tol * float(theirs.abs().max()), rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_predictor_with_targets_from_gt(impl):
    masks, boxes, matched = make_case(5, 2, 23, 31, seed=7)
    g = torch.Generator().manual_seed(2)
    dev = kernel_device(impl)
    f = torch.randn(5, 6, 7, 7, generator=g).to(dev).requires_grad_()
    w = torch.randn(3, 6, generator=g).to(dev).requires_grad_()
    b = torch.randn(3, generator=g).to(dev).requires_grad_()
    labels = torch.randint(0, 3, (5,), generator=g)
    with kernels.use_backend(impl):
        loss = kernels.mask_predictor_loss(f, w, b, labels.to(dev),
                                           mask_targets_from_gt(*on(dev, masks, boxes, matched)))
        loss.backward()
    fr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (f, w, b))
    logits = F.conv2d(fr, wr[:, :, None, None], br)[torch.arange(5), labels]
    ref = F.binary_cross_entropy_with_logits(logits, tv_project(masks, boxes, matched, 7).double())
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    for ours, theirs in ((f.grad, fr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(ours.double().cpu(), theirs, atol=1e-5 * float(theirs.abs().max()), rtol=0)


@pytest.mark.bad_values
def test_targets_from_gt_bad_inputs_and_bounds():
    masks, boxes, matched = make_case(4, 2, 9, 9, seed=8)
    logits = torch.randn(4, 2, 7, 7)
    labels = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="matched_idxs"):
        mask_targets_from_gt(masks, boxes, torch.tensor([0, 1, 2, 0]))
    bad = masks.clone()
    bad[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_targets_from_gt(bad, boxes, matched)
    with pytest.raises(ValueError, match="gt_masks"):
        mask_targets_from_gt(masks[:0], boxes, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="boxes"):
        kernels.sigmoid_bce_mask_loss(logits[:3], labels[:3], mask_targets_from_gt(masks, boxes, matched))
    # the raw op clamps a bad index to the nearest mask: never reads outside gt_masks
    idx = torch.tensor([-3, 1, 7, 0])
    raw = torch.ops.maskrcnn_fast.sigmoid_bce_mask_loss(logits, labels, masks, boxes, idx, None, False)[0]
    ref, _ = reference_bce(logits, labels, tv_project(masks, boxes, idx.clamp(0, 1), 7))
    torch.testing.assert_close(raw.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.triton
def test_opcheck_targets_from_gt():
    masks, boxes, matched = on(DEVICE, *make_case(3, 2, 11, 13, seed=9))
    logits = torch.randn(3, 2, 7, 7).to(DEVICE).requires_grad_()
    t = mask_targets_from_gt(masks, boxes, matched)
    torch.library.opcheck(torch.ops.maskrcnn_fast.sigmoid_bce_mask_loss.default,
                          (logits, torch.tensor([0, 1, 1], device=DEVICE), *t, None, True))


@pytest.mark.triton
def test_opcheck_project_masks():
    masks, boxes, matched = on(DEVICE, *make_case(3, 2, 11, 13, seed=14))
    rois = torch.cat([matched.float()[:, None], boxes], 1)
    torch.library.opcheck(torch.ops.maskrcnn_fast.project_masks_on_boxes.default, (masks, rois, 7))
