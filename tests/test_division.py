"""Correctly rounded division in the RoI kernels (issue 23, defect 3).

fp32 ``/`` in Triton compiles to ``div.full.f32`` (up to 2 ulp); torchvision divides correctly rounded, and
so does Triton's interpreter, so the ordinary CPU tests cannot see the difference. Here:

* in numpy, what an approximate quotient does to the discrete results on integer boxes whose sizes are
  multiples of 7 and 28: RoIPool's bin edges and RoIAlign's adaptive sampling grid (mask targets) move;
* the arithmetic of ``kernels._math.div_rn_int`` against numpy's division, with a true FMA (the GPU) and
  with a separately rounded multiply-add (the interpreter);
* the kernels on those boxes, dividing as a GPU does: on a CUDA host the compiled kernels; on a CPU host the
  interpreter with fp32 ``/`` replaced by an emulation of div.full.f32 (a * RN(1/b)) and rsqrt perturbed to
  rsqrt.approx.f32's error bound. They must equal torchvision (correctly rounded), and in the interpreter no
  fp32 ``/`` may run in RoIAlign, RoIPool or the mask-target projection at all (the interpreter's twin of the
  compile audit's ``approx_div == 0`` gate in tests/test_compile.py).
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import triton
import triton.language as tl
from torchvision.models.detection.roi_heads import project_masks_on_boxes as tv_project

import kernels
from conftest import DEVICE
from kernels import mask_targets_from_gt, project_masks_on_boxes, roi_align, roi_pool
from kernels._math import div_rn_int

F32 = np.float32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def approx_div(a, b):
    """div.full.f32 as the issue emulates it: a * RN(1/b), in fp32."""
    return (F32(a) * (F32(1) / F32(b))).astype(F32)


def ulps(q, n):
    q = np.asarray(q, F32)
    for _ in range(abs(n)):
        q = np.nextafter(q, F32(np.inf if n > 0 else -np.inf))
    return q


def pool_edges(bin_size, P):
    """torchvision's RoIPool bin edges along one axis (relative to the RoI start), from the fp32 bin size."""
    ph = np.arange(P, dtype=F32)
    return np.floor(ph * F32(bin_size)).astype(int).tolist(), np.ceil((ph + 1) * F32(bin_size)).astype(int).tolist()


def sensitive_pool_sizes(P, sizes):
    return [s for s in sizes if pool_edges(approx_div(s, P), P) != pool_edges(F32(s) / F32(P), P)]


def sensitive_grid_sizes(P, sizes):
    return [s for s in sizes if np.ceil(approx_div(s, P)) != np.ceil(F32(s) / F32(P))]


# ----------------------------------------------------------------------------------------------
# numpy: what an approximate quotient changes
# ----------------------------------------------------------------------------------------------
def test_approximate_division_moves_roi_pool_bin_edges():
    moved = sensitive_pool_sizes(7, range(1, 400))
    assert len(moved) == 171  # the count: integer RoI heights 1..399 at 7 bins
    multiples = sensitive_pool_sizes(7, range(7, 400, 7))
    assert multiples and set(multiples) <= set(moved)
    # a 2-ulp error either way (div.full.f32's bound) moves the edges of every multiple of 7 or some of them
    up = [s for s in range(7, 400, 7) if pool_edges(ulps(F32(s) / F32(7), 2), 7) != pool_edges(s // 7, 7)]
    down = [s for s in range(7, 400, 7) if pool_edges(ulps(F32(s) / F32(7), -2), 7) != pool_edges(s // 7, 7)]
    assert len(up) == len(range(7, 400, 7)) and down


@pytest.mark.parametrize("P,expected", [(28, [84, 168, 196]), (7, [21, 42, 49])])
def test_approximate_division_changes_the_adaptive_grid(P, expected):
    """ceil(roi / P): RoIAlign's sampling_ratio <= 0 and the mask targets (P = M = 28)."""
    changed = sensitive_grid_sizes(P, range(1, 1200))
    assert changed[:3] == expected
    for s in expected:
        assert int(np.ceil(approx_div(s, P))) == s // P + 1  # one sample row (column) more per bin
    assert all(np.ceil(ulps(F32(s) / F32(P), 2)) == s // P + 1 for s in range(P, 1200, P))


# ----------------------------------------------------------------------------------------------
# the arithmetic of div_rn_int, emulated in numpy
# ----------------------------------------------------------------------------------------------
def _fma_fused(x, y, z):
    # the product is exact in longdouble (48 bits); the sum rounds at 2**-64, far below what matters here
    return (x.astype(np.longdouble) * y.astype(np.longdouble) + z.astype(np.longdouble)).astype(F32)


def _fma_separate(x, y, z):
    return (x * y).astype(F32) + z


def div_rn_int_emulated(a, n, fma, seed_error=0.0):
    """kernels._math.div_rn_int step by step in fp32 (seed_error: relative error added to rsqrt(n))."""
    a = np.asarray(a, F32)
    nf = np.broadcast_to(np.asarray(n, F32), a.shape)
    r = (F32(1) / np.sqrt(nf)).astype(F32) * F32(1 + seed_error)
    y = (r * r).astype(F32)
    q0 = (a * y).astype(F32)
    hi = (q0.view(np.int32) & np.int32(-4096)).view(F32)
    rem = fma(-nf, q0 - hi, fma(-nf, hi, a))
    return np.where(rem == rem, fma(rem, y, q0), q0)


@pytest.mark.parametrize("fma", [_fma_fused, _fma_separate], ids=["fused", "separate"])
def test_div_rn_int_arithmetic_is_correctly_rounded(fma):
    rng = np.random.default_rng(0)
    wrong = 0
    with np.errstate(invalid="ignore", over="ignore"):
        a_int = np.arange(0, 1 << 11, dtype=F32)
        for n in range(1, 4097):
            a_any = (rng.random(256) * 2.0 ** rng.integers(-12, 24)).astype(F32) * rng.choice([-1, 1], 256).astype(F32)
            for a in ((a_int, a_any) if n <= 256 else (a_any,)):
                for err in (0.0, 2.0 ** -21, -2.0 ** -21):  # rsqrt.approx.f32: within 2**-22.9
                    wrong += int((div_rn_int_emulated(a, n, fma, err) != a / F32(n)).sum())
        specials = np.array([np.inf, -np.inf, 0.0, 3e38, 1e-30], F32)
        np.testing.assert_array_equal(div_rn_int_emulated(specials, 7, fma), specials / F32(7))
        assert np.isnan(div_rn_int_emulated(np.array([np.nan], F32), 7, fma)).all()
    assert wrong == 0
    # sample counts beyond 4096 (grids over 64 x 64): within 1.5 ulp
    n = rng.integers(4097, 1 << 20, 512).astype(F32)
    got = div_rn_int_emulated(np.ones_like(n), n, fma, 2.0 ** -21).astype(np.float64)
    ref = 1.0 / n.astype(np.float64)
    assert (np.abs(got - ref) / np.spacing(ref.astype(F32)).astype(np.float64)).max() <= 1.5


# ----------------------------------------------------------------------------------------------
# the kernels, dividing as a GPU does
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_division(monkeypatch):
    """(device, fp32 '/' calls): on a CUDA host its device (the compiled kernels; calls None), on a CPU host
    the interpreter with fp32 '/' emulating div.full.f32 and rsqrt off by rsqrt.approx.f32's worst case
    (calls: a list that records every fp32 '/' the interpreter evaluates)."""
    if not INTERPRET:
        return DEVICE, None
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    calls = []
    exact_fdiv, exact_rsqrt = builder.create_fdiv, builder.create_rsqrt

    def create_fdiv(self, lhs, rhs):
        if lhs.data.dtype != np.float32:
            return exact_fdiv(self, lhs, rhs)
        calls.append(lhs.data.shape)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return self.binary_op(lhs, rhs, lambda a, b: (a * (F32(1) / b)).astype(F32))

    def create_rsqrt(self, arg):
        out = exact_rsqrt(self, arg)
        if out.data.dtype == np.float32:
            out.data = (out.data * F32(1 + 2.0 ** -22)).astype(F32)
        return out

    monkeypatch.setattr(builder, "create_fdiv", create_fdiv)
    monkeypatch.setattr(builder, "create_rsqrt", create_rsqrt)
    return "cpu", calls


@triton.jit
def _divide(x_ptr, n_ptr, q_ptr, rn_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    n = tl.load(n_ptr + offs)
    tl.store(q_ptr + offs, x / n.to(tl.float32))
    tl.store(rn_ptr + offs, div_rn_int(x, n))


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's emulation")
def test_the_emulation_is_in_effect(gpu_division):
    """fp32 '/' in a kernel now rounds as div.full.f32 would (else the tests below would pass vacuously);
    div_rn_int stays exact."""
    x = torch.tensor([84.0, 168.0, 196.0, 21.0, 42.0, 49.0, 1.0, 5.0])
    n = torch.tensor([28, 28, 28, 7, 7, 7, 28, 7], dtype=torch.int32)
    q, rn = torch.empty_like(x), torch.empty_like(x)
    _divide[(1,)](x, n, q, rn, BLOCK=8)
    np.testing.assert_array_equal(q.numpy(), approx_div(x.numpy(), n.numpy().astype(F32)))
    assert (q[:6] > x[:6] / n[:6]).all() and gpu_division[1]
    torch.testing.assert_close(rn, x / n.float(), atol=0, rtol=0)


def _ramp_features(H, W, device):
    """Two channels, increasing and decreasing along rows and columns: moving any bin edge of RoIPool
    changes a maximum."""
    ramp = torch.arange(H * W, dtype=torch.float32).reshape(H, W)
    return torch.stack([ramp, -ramp])[None].to(device)


def _boxes(sizes_h, sizes_w, extra):
    """[K, 5] integer boxes (batch 0) of the given heights/widths (box coordinates span size + extra)."""
    rows = []
    for i, (sh, sw) in enumerate(zip(sizes_h, sizes_w)):
        x1, y1 = float(1 + (3 * i) % 5), float(2 + (2 * i) % 3)
        rows.append([0.0, x1, y1, x1 + sw + extra, y1 + sh + extra])
    return torch.tensor(rows)


@pytest.mark.triton
def test_roi_pool_bin_edges_on_multiples_of_7(gpu_division):
    device, calls = gpu_division
    sizes = sensitive_pool_sizes(7, range(7, 99, 7))
    assert len(sizes) >= 4  # the boxes below are ones an approximate quotient gets wrong
    boxes = _boxes(sizes, sizes[::-1], extra=-1)  # RoIPool's size is end - start + 1
    x = _ramp_features(104, 104, "cpu")
    with kernels.use_backend("triton"):
        ours = roi_pool(x.to(device), boxes.to(device), 7, 1.0).cpu()
    ref = torchvision.ops.roi_pool(x, boxes, 7, 1.0)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    if calls is not None:
        assert not calls, "fp32 '/' ran in the RoIPool kernel"


@pytest.mark.parametrize("P,sizes", [(28, [84, 168, 196]), (7, [21, 42, 49])])
@pytest.mark.triton
def test_roi_align_adaptive_grid_on_multiples(gpu_division, P, sizes):
    device, calls = gpu_division
    boxes = _boxes(sizes + sizes[:1], sizes[::-1] + sizes[1:2], extra=0)  # aligned=False: size = end - start
    x = torch.randn(1, 2, 204, 204, generator=torch.Generator().manual_seed(0))
    with kernels.use_backend("triton"):
        ours = roi_align(x.to(device), boxes.to(device), P, 1.0, -1, False).cpu()
    ref = torchvision.ops.roi_align(x, boxes, P, 1.0, -1, False)
    # one sample row more moves outputs by ~0.1; the rounding of fp32 sums stays below 1e-5
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    if calls is not None:
        assert not calls, "fp32 '/' ran in the RoIAlign kernel"


@pytest.mark.triton
def test_mask_targets_on_multiples_of_28(gpu_division):
    """project_masks_on_boxes (RoIAlign's kernel) and the targets projected inside the loss kernel."""
    device, calls = gpu_division
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(2, 204, 204, generator=g) > 0.5).to(torch.uint8)
    sizes = [84, 168, 196, 112]
    boxes = _boxes(sizes, sizes[1:] + sizes[:1], extra=0)[:, 1:]
    matched = torch.tensor([0, 1, 1, 0])
    ref = tv_project(masks, boxes, matched, 28)
    assert sensitive_grid_sizes(28, sizes) == [84, 168, 196]
    with kernels.use_backend("triton"):
        ours = project_masks_on_boxes(masks.to(device), boxes.to(device), matched.to(device), 28).cpu()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    if calls is not None:
        assert not calls, "fp32 '/' ran in the mask-target projection"
    # in-kernel targets: loss and gradient as with torchvision's targets (a wrong grid moves whole boxes)
    logits = torch.randn(4, 2, 28, 28, generator=g) * 3
    labels = torch.tensor([0, 1, 0, 1])
    xl = logits.clone().to(device).requires_grad_()
    with kernels.use_backend("triton"):
        loss = kernels.sigmoid_bce_mask_loss(xl, labels.to(device), mask_targets_from_gt(
            masks.to(device), boxes.to(device), matched.to(device)))
        loss.backward()
    x64 = logits.double().requires_grad_()
    ref_loss = F.binary_cross_entropy_with_logits(x64[torch.arange(4), labels], ref.double())
    ref_loss.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xl.grad.cpu().double(), x64.grad, atol=1e-5 * float(x64.grad.abs().max()), rtol=0)
