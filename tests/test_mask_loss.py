"""Sigmoid-BCE mask loss and the fused mask predictor + loss against float64 torch formulas
(F.binary_cross_entropy_with_logits on the gathered channel; conv2d for the predictor), on CPU. The Triton
cases run on ``kernel_device``: CUDA on a CUDA host, Triton's interpreter on CPU otherwise."""
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import DEVICE, amp_device, kernel_device, on
from kernels import class_mask_logits, mask_predictor_loss, sigmoid_bce_mask_loss
from kernels._backend import InputError, InputTypeError

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# loss tolerance (absolute and relative) against the float64 formula on the same rounded inputs: the
# ops compute in fp32 for fp16/bf16/fp32 inputs, in fp64 for fp64 inputs
LOSS_TOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-6, torch.float64: 1e-12}
# gradient tolerance, relative to the largest reference gradient element (fp32/fp64: rounding only;
# fp16/bf16: the rounding of the gradient to the input's dtype)
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float64: 1e-12}


def loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def backend(name):
    return kernels.use_backend(name)


def make_inputs(R, K, M, dtype=torch.float32, seed=0, soft=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(R, K, M, M, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, K, (R,), generator=g)
    targets = torch.rand(R, M, M, generator=g, dtype=torch.float64)
    targets = (targets if soft else (targets > 0.5).double()).to(torch.float64 if dtype == torch.float64
                                                                  else torch.float32)
    return logits, labels, targets


def reference_loss(logits, labels, targets, roi_weight=None):
    """float64 loss and dense logits gradient from torch's own BCE-with-logits."""
    x = logits.detach().double().requires_grad_()
    R = x.shape[0]
    picked = x[torch.arange(R), labels]
    if roi_weight is None:
        loss = F.binary_cross_entropy_with_logits(picked, targets.double())
    else:
        per_roi = F.binary_cross_entropy_with_logits(picked, targets.double(), reduction="none").mean((1, 2))
        w = roi_weight.double()
        loss = (per_roi * w).sum() / w.sum().clamp(min=1)
    loss.backward()
    return loss.detach(), x.grad


def check_grad(ours, ref, dtype):
    assert ours.dtype == dtype and ours.shape == ref.shape
    scale = ref.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(ours.double(), ref, atol=float(scale) * GRAD_TOL[dtype], rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("R,K,M", [(5, 1, 7), (3, 3, 14), (3, 81, 28), (7, 81, 7), (1, 3, 28)])
def test_loss_and_grad_match_reference(impl, R, K, M):
    logits, labels, targets = make_inputs(R, K, M, seed=R * K + M)
    dev = kernel_device(impl)
    x = logits.to(dev, copy=True).requires_grad_()
    with backend(impl):
        loss = sigmoid_bce_mask_loss(x, *on(dev, labels, targets))
        loss.backward()
    ref_loss, ref_grad = reference_loss(logits, labels, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-6, rtol=1e-6)
    check_grad(x.grad.cpu(), ref_grad, torch.float32)
    # only the labelled channel carries gradient
    other = torch.ones(R, K, dtype=torch.bool)
    other[torch.arange(R), labels] = False
    assert (x.grad.cpu()[other] == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [True, False])
def test_every_dtype_against_float64_formula(impl, dtype, soft):
    """Targets in the logits' dtype; fp64 is computed in fp64 (to ~1e-12), the others in fp32."""
    logits, labels, targets = make_inputs(9, 3, 7, dtype=dtype, seed=3, soft=soft)
    targets = targets.to(dtype)
    dev = kernel_device(impl)
    x = logits.to(dev, copy=True).requires_grad_()
    with backend(impl):
        loss = sigmoid_bce_mask_loss(x, *on(dev, labels, targets))
        loss.backward(torch.tensor(2.5, dtype=loss.dtype, device=loss.device))
    # the reference sees the same rounded inputs: what is left is the maths' precision + grad rounding
    ref_loss, ref_grad = reference_loss(logits, labels, targets)
    assert loss.dtype == loss_dtype(dtype) and loss.shape == ()
    tol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=tol, rtol=tol)
    check_grad(x.grad.cpu(), 2.5 * ref_grad, dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_float64_is_computed_in_float64(impl):
    """Two sets of fp64 logits 1e-9 apart, which fp32 maths (or fp32 inputs) could not tell apart: the
    fp64 losses differ as the fp64 formula's do. |x| >= 12 puts exp(-|x|) where fp32 uses a series."""
    logits, labels, _ = make_inputs(3, 2, 5, dtype=torch.float64, seed=21)
    logits = logits + torch.sign(logits) * 12
    targets = torch.zeros(3, 5, 5, dtype=torch.float64)  # dloss/dx = sigmoid(x): the bump moves the loss
    bumped = logits + 1e-9
    dev = kernel_device(impl)
    with backend(impl):
        a, b = (sigmoid_bce_mask_loss(*on(dev, x, labels, targets)).cpu() for x in (logits, bumped))
    ref_a, ref_b = (reference_loss(x, labels, targets)[0] for x in (logits, bumped))
    torch.testing.assert_close(a, ref_a, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(b - a, ref_b - ref_a, atol=1e-14, rtol=0)
    assert 1e-11 < (b - a).abs() < 1e-9  # far below the ulp of a fp32 loss of this size


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_targets_in_another_dtype(impl, dtype):
    """fp32 targets with fp16/fp64 logits, fp64 targets with fp32 logits: each is read at its precision
    (fp32 targets are exact in fp64)."""
    logits, labels, targets = make_inputs(4, 3, 7, dtype=dtype, seed=22)
    dev = kernel_device(impl)
    for lg, tg in ((logits, targets.float()), (logits.float(), targets.double())):
        x = lg.to(dev, copy=True).requires_grad_()
        with backend(impl):
            loss = sigmoid_bce_mask_loss(x, *on(dev, labels, tg))
            loss.backward()
        ref_loss, ref_grad = reference_loss(lg, labels, tg.to(loss.dtype))
        tol = LOSS_TOL[lg.dtype]
        torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=tol, rtol=tol)
        check_grad(x.grad.cpu(), ref_grad, lg.dtype)


@pytest.mark.triton
def test_fp32_targets_with_half_logits_and_noncontiguous_logits():
    base, labels, targets = make_inputs(5, 4, 7, dtype=torch.bfloat16, seed=4)
    logits = base.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # K-major storage
    x = logits.to(DEVICE, copy=True).requires_grad_()  # a dense copy keeps the strides
    assert not x.is_contiguous()
    loss = sigmoid_bce_mask_loss(x, *on(DEVICE, labels, targets))
    loss.backward()
    ref_loss, ref_grad = reference_loss(logits, labels, targets)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-5, rtol=1e-5)
    check_grad(x.grad.cpu(), ref_grad, torch.bfloat16)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_extreme_logits_do_not_overflow(impl):
    R, K, M = 3, 2, 7
    logits = torch.full((R, K, M, M), 1e4)
    logits[:, :, ::2] = -1e4
    labels = torch.tensor([0, 1, 1])
    targets = torch.rand(R, M, M)
    targets[0] = 0.0
    targets[1] = 1.0
    dev = kernel_device(impl)
    x = logits.to(dev, copy=True).requires_grad_()
    with backend(impl):
        loss = sigmoid_bce_mask_loss(x, *on(dev, labels, targets))
        loss.backward()
    ref_loss, ref_grad = reference_loss(logits, labels, targets)
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-6, rtol=1e-6)
    check_grad(x.grad.cpu(), ref_grad, torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roi_weight_is_mean_over_weighted_rois(impl, dtype):
    logits, labels, targets = make_inputs(7, 3, 7, dtype=dtype, seed=5)
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=dtype) * 0.7
    dev = kernel_device(impl)
    x = logits.to(dev, copy=True).requires_grad_()
    with backend(impl):
        loss = sigmoid_bce_mask_loss(x, *on(dev, labels, targets), roi_weight=weight.to(dev))
        loss.backward()
    ref_loss, ref_grad = reference_loss(logits, labels, targets, weight)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=LOSS_TOL[dtype], rtol=LOSS_TOL[dtype])
    check_grad(x.grad.cpu(), ref_grad, dtype)
    x.grad = None
    with backend(impl):
        zero = sigmoid_bce_mask_loss(x, *on(dev, labels, targets), roi_weight=torch.zeros(7, device=dev))
        zero.backward()
    assert zero.item() == 0 and (x.grad == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rois(impl, dtype):
    """R = 0: the loss is torchvision's ``mask_logits.sum() * 0`` and the gradient is all zeros."""
    dev = kernel_device(impl)
    x = torch.randn(0, 81, 28, 28, dtype=dtype, device=dev, requires_grad=True)
    targets = torch.zeros(0, 28, 28, dtype=dtype, device=dev)
    with backend(impl):
        loss = sigmoid_bce_mask_loss(x, torch.zeros(0, dtype=torch.int64, device=dev), targets)
        loss.backward()
    assert loss.dtype == loss_dtype(dtype) and loss.shape == ()
    assert loss.item() == (x.sum() * 0).item() == 0
    assert x.grad.shape == x.shape and x.grad.dtype == dtype


@pytest.mark.triton
def test_no_grad_call_gives_the_same_loss():
    logits, labels, targets = make_inputs(5, 3, 7, seed=6)
    with torch.no_grad():
        loss = sigmoid_bce_mask_loss(*on(DEVICE, logits, labels, targets))
    torch.testing.assert_close(loss.double().cpu(), reference_loss(logits, labels, targets)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.bad_values
def test_bad_labels_raise_and_kernel_stays_in_bounds():
    logits, labels, targets = make_inputs(4, 3, 7, seed=7)
    for bad in (-1, 3, 2 ** 40):
        with pytest.raises(ValueError, match="labels"):
            sigmoid_bce_mask_loss(logits, torch.tensor([0, bad, 1, 2]), targets)
    # the raw op (no checks) clamps: a bad label reads its nearest valid channel, never out of bounds
    raw = torch.ops.maskrcnn_fast.sigmoid_bce_mask_loss(logits, torch.tensor([-5, 9, 1, 2 ** 40]), targets, None,
                                                        None, None, False)[0]
    ref = reference_loss(logits, torch.tensor([0, 2, 1, 2]), targets)[0]
    torch.testing.assert_close(raw.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_bad_label_on_cuda_is_a_sticky_device_side_assert():
    """On CUDA the label check is asynchronous (no host sync): a bad label fails at the next sync as a
    device-side assert, and the process's CUDA context stays broken -- so bad_values tests never run on CUDA
    in the shared pytest process (tests/conftest.py). Shown in a child process."""
    code = """if True:
        import torch, kernels
        try:
            logits, targets = torch.randn(2, 3, 7, 7, device="cuda"), torch.rand(2, 7, 7, device="cuda")
            kernels.sigmoid_bce_mask_loss(logits, torch.tensor([0, 3], device="cuda"), targets)
            torch.cuda.synchronize()
            print("no error")
        except RuntimeError as e:
            print("device-side assert:", "device-side assert" in str(e))
        try:
            torch.zeros(1, device="cuda").sum().item()
            print("recovered")
        except RuntimeError:
            print("sticky: True")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert "device-side assert: True" in proc.stdout and "sticky: True" in proc.stdout, \
        proc.stdout + proc.stderr[-3000:]


@pytest.mark.bad_values
def test_bad_inputs_raise_clear_errors():
    logits, labels, targets = make_inputs(4, 3, 7, seed=8)
    with pytest.raises(TypeError, match="mask_targets"):
        sigmoid_bce_mask_loss(logits, labels, targets.to(torch.uint8))
    with pytest.raises(TypeError, match="labels"):
        sigmoid_bce_mask_loss(logits, labels.float(), targets)
    with pytest.raises(TypeError, match="mask_logits"):
        sigmoid_bce_mask_loss(logits.to(torch.int32), labels, targets)
    with pytest.raises(ValueError, match="mask_targets"):
        sigmoid_bce_mask_loss(logits, labels, targets[:3])  # R mismatch
    with pytest.raises(ValueError, match="mask_targets"):
        sigmoid_bce_mask_loss(logits, labels, targets[:, :6, :6])  # M mismatch
    with pytest.raises(ValueError, match="labels"):
        sigmoid_bce_mask_loss(logits, labels[:3], targets)
    with pytest.raises(ValueError, match="M, M"):
        sigmoid_bce_mask_loss(logits[..., :6], labels, targets)
    with pytest.raises(ValueError, match="roi_weight"):
        sigmoid_bce_mask_loss(logits, labels, targets, roi_weight=torch.ones(3))
    with pytest.raises(ValueError, match="one device"):
        sigmoid_bce_mask_loss(logits, labels, targets.to("meta"))
    for bad in (1.5, -0.1, float("nan")):
        t = targets.clone()
        t[1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            sigmoid_bce_mask_loss(logits, labels, t)
    t = targets.clone()
    t[0, 0, 0] = 2.0
    assert torch.isfinite(sigmoid_bce_mask_loss(logits, labels, t, check_targets=False))


@pytest.mark.bad_values
def test_errors_are_ours_and_torchvisions():
    """Bad shapes raise InputError (a ValueError), bad dtypes InputTypeError (a TypeError): both are
    RuntimeErrors too, what torchvision raises."""
    logits, labels, targets = make_inputs(4, 3, 7, seed=8)
    features, weight, bias, plabels, ptargets = make_predictor(4, 5, 3, 7, seed=8)
    bad_shape = [
        lambda: sigmoid_bce_mask_loss(logits, labels, targets[:3]),
        lambda: sigmoid_bce_mask_loss(logits[..., :6], labels, targets),
        lambda: sigmoid_bce_mask_loss(logits, torch.tensor([0, 3, 1, 2]), targets),
        lambda: sigmoid_bce_mask_loss(logits, labels, targets + 1),
        lambda: mask_predictor_loss(features, weight, bias[:2], plabels, ptargets),
        lambda: class_mask_logits(features, weight[:, :4], bias, plabels),
    ]
    for call in bad_shape:
        with pytest.raises(InputError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    bad_type = [
        lambda: sigmoid_bce_mask_loss(logits.to(torch.int32), labels, targets),
        lambda: sigmoid_bce_mask_loss(logits, labels.int(), targets),
        lambda: mask_predictor_loss(features, weight, bias, plabels, ptargets.long()),
        lambda: class_mask_logits(features.long(), weight, bias, plabels),
    ]
    for call in bad_type:
        with pytest.raises(InputTypeError) as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("roi_weight", [False, True])
def test_gradcheck_loss_float64(impl, roi_weight):
    logits, labels, targets = make_inputs(3, 2, 5, dtype=torch.float64, seed=23)
    rw = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64) if roi_weight else None
    logits, labels, targets, rw = on(kernel_device(impl), logits, labels, targets, rw)
    with backend(impl):
        assert torch.autograd.gradcheck(lambda x: sigmoid_bce_mask_loss(x, labels, targets, roi_weight=rw),
                                        (logits.requires_grad_(),))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_loss_ignores_autocast(impl):
    """Autocast to bf16 (CPU's, or CUDA's for CUDA inputs) does not lower the precision inside the ops: bitwise
    the fp32 results."""
    dev = kernel_device(impl)
    logits, labels, targets = on(dev, *make_inputs(5, 3, 7, seed=24))
    features, weight, bias, plabels, ptargets = on(dev, *make_predictor(5, 6, 3, 7, seed=25))

    def run():
        leaves = [t.clone().requires_grad_() for t in (logits, features, weight, bias)]
        with backend(impl):
            a = sigmoid_bce_mask_loss(leaves[0], labels, targets)
            b = mask_predictor_loss(*leaves[1:], plabels, ptargets)
            c = class_mask_logits(features, weight, bias, plabels)
            (a + b).backward()
        return [a, b, c] + [t.grad for t in leaves]

    plain = run()
    with torch.autocast(amp_device(dev), dtype=torch.bfloat16):
        cast = run()
    for p, c in zip(plain, cast):
        assert c.dtype == p.dtype == torch.float32
        assert torch.equal(c, p)


@pytest.mark.triton
def test_loss_is_bitwise_reproducible():
    logits, labels, targets = on(DEVICE, *make_inputs(7, 3, 14, seed=9))
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss = sigmoid_bce_mask_loss(x, labels, targets)
        loss.backward()
        runs.append((loss, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------------------------
# fused predictor + loss
# ----------------------------------------------------------------------------------------------
def make_predictor(R, C, K, M, dtype=torch.float32, seed=0):
    """Features in ``dtype``; weight, bias and targets in fp32, or fp64 for fp64 features."""
    g = torch.Generator().manual_seed(seed)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    features = torch.randn(R, C, M, M, generator=g, dtype=torch.float64).relu().to(dtype)
    weight = (torch.randn(K, C, 1, 1, generator=g, dtype=torch.float64) * 0.5).to(param)
    bias = torch.randn(K, generator=g, dtype=torch.float64).to(param)
    labels = torch.randint(0, K, (R,), generator=g)
    targets = torch.rand(R, M, M, generator=g, dtype=torch.float64).to(param)
    return features, weight, bias, labels, targets


def reference_predictor(features, weight, bias, labels, targets, roi_weight=None):
    f, w, b = (t.detach().double().requires_grad_() for t in (features, weight, bias))
    logits = F.conv2d(f, w.view(w.shape[0], -1, 1, 1), b)
    loss, _ = reference_loss(logits, labels, targets, roi_weight)  # value only
    picked = logits[torch.arange(f.shape[0]), labels]
    if roi_weight is None:
        ref = F.binary_cross_entropy_with_logits(picked, targets.double())
    else:
        per_roi = F.binary_cross_entropy_with_logits(picked, targets.double(), reduction="none").mean((1, 2))
        ref = (per_roi * roi_weight.double()).sum() / roi_weight.double().sum().clamp(min=1)
    ref.backward()
    return ref.detach(), f.grad, w.grad, b.grad


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("R,C,K,M,weight_2d", [(5, 7, 3, 7, False), (3, 33, 81, 14, True), (1, 5, 1, 28, False)])
def test_fused_predictor_matches_conv_plus_loss(impl, R, C, K, M, weight_2d):
    features, weight, bias, labels, targets = make_predictor(R, C, K, M, seed=R + C)
    dev = kernel_device(impl)
    f = features.to(dev, copy=True).requires_grad_()
    w = (weight.view(K, C) if weight_2d else weight).to(dev, copy=True).requires_grad_()
    b = bias.to(dev, copy=True).requires_grad_()
    with backend(impl):
        loss = mask_predictor_loss(f, w, b, *on(dev, labels, targets))
        loss.backward()
    ref_loss, ref_df, ref_dw, ref_db = reference_predictor(features, weight, bias, labels, targets)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-5, rtol=1e-5)
    check_grad(f.grad.cpu(), ref_df, torch.float32)
    check_grad(w.grad.cpu(), ref_dw.view(w.shape), torch.float32)
    check_grad(b.grad.cpu(), ref_db, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.triton
def test_fused_predictor_half_features_weighted(dtype):
    features, weight, bias, labels, targets = make_predictor(7, 9, 3, 7, dtype=dtype, seed=11)
    roi_weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    f, w, b = (t.to(DEVICE, copy=True).requires_grad_() for t in (features, weight, bias))
    loss = mask_predictor_loss(f, w, b, *on(DEVICE, labels, targets), roi_weight=roi_weight.to(DEVICE))
    loss.backward()
    ref_loss, ref_df, ref_dw, ref_db = reference_predictor(features, weight, bias, labels, targets, roi_weight)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-5, rtol=1e-5)
    check_grad(f.grad.cpu(), ref_df, dtype)
    # weight/bias grads accumulate in fp32 from exact products of half features: fp32-level error
    torch.testing.assert_close(w.grad.double().cpu(), ref_dw, atol=1e-5 * float(ref_dw.abs().max()), rtol=0)
    torch.testing.assert_close(b.grad.double().cpu(), ref_db, atol=1e-5 * float(ref_db.abs().max()), rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_predictor_float64(impl):
    """fp64 features, weight and bias: loss and all three gradients to ~1e-12 of the fp64 formula."""
    features, weight, bias, labels, targets = make_predictor(5, 7, 3, 7, dtype=torch.float64, seed=26)
    dev = kernel_device(impl)
    f, w, b = (t.to(dev, copy=True).requires_grad_() for t in (features, weight, bias))
    with backend(impl):
        loss = mask_predictor_loss(f, w, b, *on(dev, labels, targets))
        loss.backward()
    ref_loss, ref_df, ref_dw, ref_db = reference_predictor(features, weight, bias, labels, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-12, rtol=1e-12)
    for ours, theirs in ((f.grad, ref_df), (w.grad, ref_dw), (b.grad, ref_db)):
        check_grad(ours.cpu(), theirs, torch.float64)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gradcheck_fused_predictor_float64(impl):
    features, weight, bias, labels, targets = make_predictor(2, 3, 2, 3, dtype=torch.float64, seed=27)
    labels = torch.tensor([1, 0])
    dev = kernel_device(impl)
    labels, targets = on(dev, labels, targets)
    inputs = tuple(t.to(dev, copy=True).requires_grad_() for t in (features, weight, bias))
    with backend(impl):
        assert torch.autograd.gradcheck(lambda f, w, b: mask_predictor_loss(f, w, b, labels, targets), inputs)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_predictor_empty(impl, dtype):
    param = loss_dtype(dtype)
    dev = kernel_device(impl)
    f = torch.randn(0, 5, 7, 7, dtype=dtype, device=dev, requires_grad=True)
    w = torch.randn(3, 5, dtype=param).to(dev).requires_grad_()
    b = torch.randn(3, dtype=param).to(dev).requires_grad_()
    with backend(impl):
        loss = mask_predictor_loss(f, w, b, torch.zeros(0, dtype=torch.int64, device=dev),
                                   torch.zeros(0, 7, 7, dtype=param, device=dev))
        loss.backward()
    assert loss.dtype == loss_dtype(dtype) and loss.item() == 0
    assert (w.grad == 0).all() and (b.grad == 0).all() and f.grad.shape == f.shape and f.grad.dtype == dtype


@pytest.mark.bad_values
def test_fused_predictor_bad_inputs():
    features, weight, bias, labels, targets = make_predictor(3, 5, 3, 7, seed=12)
    with pytest.raises(ValueError, match="weight"):
        mask_predictor_loss(features, weight[:, :4], bias, labels, targets)
    with pytest.raises(ValueError, match="weight"):
        mask_predictor_loss(features, torch.randn(3, 5, 3, 3), bias, labels, targets)
    with pytest.raises(ValueError, match="bias"):
        mask_predictor_loss(features, weight, bias[:2], labels, targets)
    with pytest.raises(ValueError, match="labels"):
        mask_predictor_loss(features, weight, bias, torch.tensor([0, 3, 1]), targets)
    with pytest.raises(ValueError, match="mask_targets"):
        mask_predictor_loss(features, weight, bias, labels, targets[:, 1:])
    with pytest.raises(TypeError, match="mask_targets"):
        mask_predictor_loss(features, weight, bias, labels, targets.long())


def relayout(t, layout):
    """``t`` [R, C, M, M] with the same values in another memory layout."""
    if layout == "channels_last":  # flat planes of stride C: the kernels read along channels
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "hw_transposed":  # planes not flat (stride(H) = 1): the launchers copy
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "channel_slice":  # flat planes, not dense: every other channel of a wider tensor
        return torch.stack([t, torch.full_like(t, float("nan"))], 2).flatten(1, 2)[:, ::2]
    return t


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "hw_transposed", "channel_slice"])
def test_memory_layouts(impl, layout):
    """Logits and features in NCHW's alternatives give the contiguous results; dF comes back in the
    features' layout when it is channels_last (and contiguous otherwise)."""
    logits, labels, targets = make_inputs(4, 3, 7, seed=28)
    dev = kernel_device(impl)
    assert torch.equal(relayout(logits, layout), logits)
    x = relayout(logits.to(dev), layout).requires_grad_()  # the layout made on the device
    features, weight, bias, plabels, ptargets = make_predictor(4, 6, 3, 7, seed=29)
    f = relayout(features.to(dev), layout).requires_grad_()
    with backend(impl):
        loss = sigmoid_bce_mask_loss(x, labels.to(dev), relayout(targets.to(dev)[:, None], layout)[:, 0])
        (dx,) = torch.autograd.grad(loss, x)
        ploss = mask_predictor_loss(f, *on(dev, weight, bias, plabels, ptargets))
        (df,) = torch.autograd.grad(ploss, f)
        logit = class_mask_logits(f, *on(dev, weight, bias, plabels))
    ref_loss, ref_dx = reference_loss(logits, labels, targets)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-6, rtol=1e-6)
    check_grad(dx.cpu(), ref_dx, torch.float32)
    ref_ploss, ref_df, _, _ = reference_predictor(features, weight, bias, plabels, ptargets)
    torch.testing.assert_close(ploss.double().cpu(), ref_ploss, atol=1e-5, rtol=1e-5)
    check_grad(df.cpu(), ref_df, torch.float32)
    assert df.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                            torch.contiguous_format)
    ref_logit = F.conv2d(features.double(), weight.double(), bias.double())[torch.arange(4), plabels]
    torch.testing.assert_close(logit.double().cpu(), ref_logit, atol=1e-5 * float(ref_logit.abs().max()), rtol=0)


def test_roi_span_beyond_int32_is_refused():
    """The kernels address inside one RoI with 32-bit offsets: a larger RoI raises instead of wrapping."""
    features = torch.empty((2, 3, 4, 4), device="meta").as_strided((2, 3, 4, 4), (2 ** 32, 2 ** 30, 4, 1))
    _, weight, bias, labels, _ = make_predictor(2, 3, 2, 4, seed=30)
    for call in (lambda: mask_predictor_loss(features, weight, bias, labels, torch.rand(2, 4, 4)),
                 lambda: class_mask_logits(features, weight, bias, labels)):
        with pytest.raises(InputError, match="2\\*\\*31"):
            call()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_mask_logits_match_conv(impl, dtype):
    features, weight, bias, labels, _ = make_predictor(5, 13, 4, 7, dtype=dtype, seed=13)
    with backend(impl):
        ours = class_mask_logits(*on(kernel_device(impl), features, weight, bias, labels)).cpu()
    ref = F.conv2d(features.double(), weight.double(), bias.double())[torch.arange(5), labels]
    assert ours.dtype == dtype and ours.shape == (5, 7, 7)
    # relative to the largest logit: the rounding of the result to its dtype
    tol = {torch.float64: 1e-14, torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(ours.double(), ref, atol=tol * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.triton
def test_opcheck(dtype):
    logits, labels, targets = on(DEVICE, *make_inputs(3, 2, 7, dtype=dtype, seed=14))
    features, weight, bias, plabels, ptargets = on(DEVICE, *make_predictor(3, 5, 2, 7, dtype=dtype, seed=15))
    w2 = weight.view(2, 5)
    roi_weight = torch.tensor([1.0, 0.0, 1.0], dtype=dtype, device=DEVICE)
    ops = torch.ops.maskrcnn_fast
    cases = [
        (ops.sigmoid_bce_mask_loss.default, (logits.requires_grad_(), labels, targets, None, None, None, True)),
        (ops.sigmoid_bce_mask_loss.default, (logits, labels, targets, None, None, roi_weight, True)),
        (ops.mask_predictor_loss.default, (features.requires_grad_(), w2.clone().requires_grad_(),
                                           bias.requires_grad_(), plabels, ptargets, None, None, None, True)),
        (ops.class_mask_logits.default, (features.detach(), w2, bias.detach(), plabels)),
        # channels_last features: dF in their layout, in the fake as in both backends
        (ops.mask_predictor_loss.default, (relayout(features.detach(), "channels_last").requires_grad_(), w2,
                                           bias, plabels, ptargets, None, None, None, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.triton
def test_torch_compile_fullgraph_matches_eager():
    logits, labels, targets = on(DEVICE, *make_inputs(5, 3, 7, seed=16))
    features, weight, bias, _, _ = on(DEVICE, *make_predictor(5, 6, 3, 7, seed=17))
    leaves = [t.clone().requires_grad_() for t in (logits, features, weight, bias)]

    def both(x, f, w, b):
        return sigmoid_bce_mask_loss(x, labels, targets) + mask_predictor_loss(f, w, b, labels, targets)

    results = []
    for fn in (both, torch.compile(both, fullgraph=True, backend="aot_eager")):
        for t in leaves:
            t.grad = None
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad.clone() for t in leaves])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.parametrize("config_index", range(4))
@pytest.mark.triton
def test_every_launch_config(monkeypatch, config_index):
    """Each tuned config (some split an RoI's 784 pixels over several programs) gives the same result."""
    from kernels import _config, mask_loss, mask_predictor

    def pick(op, bucket, configs, default=None):
        return configs[config_index % len(configs)]

    monkeypatch.setattr(_config, "pick", pick)
    monkeypatch.setattr(mask_loss, "get_configs", lambda kind="loss": list(
        mask_loss._LOSS_CONFIGS if kind == "loss" else mask_loss._PREDICTOR_CONFIGS))
    monkeypatch.setattr(mask_predictor, "get_configs", lambda: list(mask_predictor._PREDICTOR_CONFIGS))
    logits, labels, targets = make_inputs(3, 2, 28, seed=18)
    labels = torch.stack([labels, labels], 1).to(DEVICE).reshape(-1)[::2]  # non-contiguous labels
    x = logits.to(DEVICE, copy=True).requires_grad_()
    sigmoid_bce_mask_loss(x, labels, targets.to(DEVICE)).backward()
    labels = labels.cpu()
    ref_loss, ref_grad = reference_loss(logits, labels, targets)
    check_grad(x.grad.cpu(), ref_grad, torch.float32)
    features, weight, bias, plabels, ptargets = make_predictor(3, 37, 2, 28, seed=19)
    f, w, b = (t.to(DEVICE, copy=True).requires_grad_() for t in (features, weight, bias))
    loss = mask_predictor_loss(f, w, b, *on(DEVICE, plabels, ptargets))
    loss.backward()
    ref = reference_predictor(features, weight, bias, plabels, ptargets)
    torch.testing.assert_close(loss.double().cpu(), ref[0], atol=1e-5, rtol=1e-5)
    for ours, theirs in zip((f.grad, w.grad, b.grad), ref[1:]):
        check_grad(ours.cpu(), theirs.view(ours.shape), torch.float32)
