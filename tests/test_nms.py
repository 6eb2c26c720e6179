"""NMS, batched NMS and the sync-free padded form against torchvision and across backends.

A test taking the ``backend`` fixture runs once per backend: "triton" (the kernels: on CUDA tensors on a
CUDA host, in Triton's interpreter on CPU otherwise; ``kernel_device`` in tests/conftest.py) and "torch" (the
CPU backend built on torchvision's compiled nms). References stay on CPU.
"""
import importlib

import numpy as np
import pytest
import torch
import torchvision

import kernels
from conftest import DEVICE, amp_device, kernel_device, on
from kernels import batched_nms, nms, nms_padded
from maskrcnn_fast.syncs import count_syncs

BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with kernels.use_backend(request.param):
        yield request.param


def clustered_boxes(n, seed=0, n_clusters=None, dtype=torch.float32):
    """Boxes jittered around a few centres, so that suppression really happens."""
    g = torch.Generator().manual_seed(seed)
    n_clusters = n_clusters or max(1, n // 6)
    centres = torch.rand(n_clusters, 2, generator=g) * 200
    pick = torch.randint(0, n_clusters, (n,), generator=g)
    c = centres[pick] + torch.randn(n, 2, generator=g) * 4
    wh = 20 + torch.rand(n, 2, generator=g) * 20
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    scores = torch.rand(n, generator=g)
    return boxes.to(dtype), scores


def greedy_reference(boxes, scores, thr, idxs=None):
    """Plain greedy NMS in fp32 with a stable descending sort (torchvision's formula)."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    b = boxes.float()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    removed, keep = set(), []
    for pos, i in enumerate(order):
        if i in removed:
            continue
        keep.append(i)
        for j in order[pos + 1:]:
            if idxs is not None and idxs[i] != idxs[j]:
                continue
            w = (torch.minimum(b[i, 2], b[j, 2]) - torch.maximum(b[i, 0], b[j, 0])).clamp_min(0)
            h = (torch.minimum(b[i, 3], b[j, 3]) - torch.maximum(b[i, 1], b[j, 1])).clamp_min(0)
            inter = w * h
            if inter / (area[i] + area[j] - inter) > thr:
                removed.add(j)
    return torch.tensor(keep, dtype=torch.int64)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 257])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(n, thr, backend):
    boxes, scores = clustered_boxes(n, seed=n)
    ours = nms(*on(kernel_device(backend), boxes, scores), thr).cpu()
    ref = torchvision.ops.nms(boxes, scores, thr)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref)
    if n > 64 and 0 < thr < 1:
        assert len(ref) < n  # the clustered boxes do suppress each other


@pytest.mark.triton
def test_nms_two_thousand_boxes():
    boxes, scores = clustered_boxes(2001, seed=7, n_clusters=150)
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert torch.equal(nms(*on(DEVICE, boxes, scores), 0.5).cpu(), ref)
    assert 150 <= len(ref) < 2001


@pytest.mark.parametrize("n_classes", [1, 3, 80])
@pytest.mark.parametrize("thr", [0.3, 0.7])
def test_batched_nms_matches_torchvision(n_classes, thr, backend):
    boxes, scores = clustered_boxes(301, seed=n_classes)
    idxs = torch.randint(0, n_classes, (301,), generator=torch.Generator().manual_seed(1))
    ref = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
    assert torch.equal(batched_nms(*on(kernel_device(backend), boxes, scores, idxs), thr).cpu(), ref)
    assert len(ref) < 301


def test_tied_scores_identical_and_zero_area_boxes(backend):
    boxes, _ = clustered_boxes(70, seed=3)
    scores = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.5] * 14)
    boxes[10] = boxes[11]  # identical boxes
    boxes[20, 2:] = boxes[20, :2]  # zero area
    boxes[21] = boxes[20]
    for thr in (0.0, 0.5, 1.0):
        ours = nms(*on(kernel_device(backend), boxes, scores), thr).cpu()
        assert torch.equal(ours, greedy_reference(boxes, scores, thr))
        # torchvision agrees wherever its own (unstable) tie order happens to be stable
        assert set(ours.tolist()) == set(torchvision.ops.nms(boxes, scores, thr).tolist())


def test_fp16_and_bf16_boxes(backend):
    boxes, scores = clustered_boxes(129, seed=11)
    for dtype in (torch.float16, torch.bfloat16):
        b = boxes.to(dtype)
        assert torch.equal(nms(*on(kernel_device(backend), b, scores), 0.5).cpu(),
                           torchvision.ops.nms(b.float(), scores, 0.5))


def test_degenerate_nan_and_inf(backend):
    dev = kernel_device(backend)
    boxes, scores = clustered_boxes(40, seed=5)
    boxes[3] = torch.tensor([50.0, 50.0, 40.0, 40.0])  # x2 < x1: IoU <= 0, as torchvision
    boxes[4] = boxes[3]
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert torch.equal(nms(*on(dev, boxes, scores), 0.5).cpu(), ref)
    bad = boxes.clone()
    bad[0, 2] = float("nan")
    bad[1, 0] = float("-inf")
    bad[2, 3] = float("inf")
    scores2 = scores.clone()
    scores2[[0, 1, 2]] = 2.0  # highest scores: if they could suppress, they would
    bad[[0, 1, 2]] = torch.where(torch.isfinite(bad[[0, 1, 2]]), boxes[5].expand(3, 4), bad[[0, 1, 2]])
    kept = nms(*on(dev, bad, scores2), 0.3).cpu()
    assert {0, 1, 2} <= set(kept.tolist())  # never suppressed
    finite = torch.arange(3, 40)
    ref = finite[torchvision.ops.nms(bad[3:], scores2[3:], 0.3)]
    assert torch.equal(kept[3:], ref)  # and never suppress anything
    nan_scores = scores.clone()
    nan_scores[[7, 8]] = float("nan")
    assert not {7, 8} & set(nms(*on(dev, boxes, nan_scores), 0.5).tolist())


@pytest.mark.parametrize("with_classes", [False, True])
def test_nms_padded_per_image_with_padding(with_classes, backend):
    g = torch.Generator().manual_seed(2)
    per_image = [clustered_boxes(n, seed=n) for n in (150, 97, 33)]
    B, N = 3, 150
    boxes = torch.zeros(B, N, 4)
    scores = torch.full((B, N), float("-inf"))  # -inf: padding
    idxs = torch.randint(0, 4, (B, N), generator=g)
    for b, (bx, sc) in enumerate(per_image):
        boxes[b, :len(bx)], scores[b, :len(bx)] = bx, sc
    dev = kernel_device(backend)
    keep, num = on("cpu", *nms_padded(*on(dev, boxes, scores), 0.5, 40, idxs=idxs.to(dev) if with_classes else None))
    assert keep.shape == (3, 40) and num.shape == (3,)
    for b, (bx, sc) in enumerate(per_image):
        n = len(bx)
        ref = (torchvision.ops.batched_nms(bx, sc, idxs[b, :n], 0.5) if with_classes
               else torchvision.ops.nms(bx, sc, 0.5))[:40]
        assert int(num[b]) == len(ref)
        assert torch.equal(keep[b, :len(ref)], ref)
        assert (keep[b, len(ref):] == -1).all()
    assert int(num[2]) < 40  # one image has fewer than max_output survivors: padding is exercised


@pytest.mark.parametrize("backend, n", [("triton", 65), ("triton", 1100), ("torch", 65)])
def test_nms_padded_makes_no_host_sync(backend, n):
    """The Triton path (GPU) never syncs. The CPU backend above PER_CLASS_ABOVE boxes with classes reads
    class boundaries on the host (free on a CPU; see the next test), like torchvision's own batched_nms."""
    boxes, scores = clustered_boxes(2 * n, seed=9)
    boxes, scores = boxes.reshape(2, n, 4), scores.reshape(2, n)
    idxs = torch.randint(0, 3, (2, n), generator=torch.Generator().manual_seed(0))
    boxes, scores, idxs = on(kernel_device(backend), boxes, scores, idxs)
    # the op's body, so that the counter also sees every op inside the custom op
    impl = importlib.import_module("kernels.nms")._nms_padded._init_fn
    with kernels.use_backend(backend), count_syncs() as counts:
        nms_padded(boxes, scores, 0.5, 20, idxs=idxs)
        impl(boxes, scores, idxs, 0.5, 20)
    assert counts.ops > 5
    assert counts.syncs == 0, counts.sync_sites


def test_infinite_scores_are_kept_like_any_other(backend):
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([float("inf"), 0.9, 0.5])  # +inf ranks first; only -inf marks padding
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    assert expected.tolist() == [0, 2]
    boxes, scores = on(kernel_device(backend), boxes, scores)
    assert torch.equal(nms(boxes, scores, 0.5).cpu(), expected)
    assert torch.equal(batched_nms(boxes, scores, torch.zeros(3, dtype=torch.int64, device=boxes.device), 0.5).cpu(),
                       expected)
    keep, num = nms_padded(boxes[None], scores[None], 0.5, 3)
    assert keep[0].tolist() == [0, 2, -1] and num.tolist() == [2]


@pytest.mark.triton
def test_torch_backend_per_class_path_equals_kernel_above_threshold():
    from kernels._nms_torch import PER_CLASS_ABOVE
    n = PER_CLASS_ABOVE + 37
    boxes, scores = clustered_boxes(n, seed=11)
    idxs = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(11))
    boxes[5, 2] = float("nan")
    scores[9] = float("-inf")
    with kernels.use_backend("torch"):
        got = batched_nms(boxes, scores, idxs, 0.5)
        padded, count = nms_padded(boxes[None], scores[None], 0.5, n, idxs=idxs[None])
    with kernels.use_backend("triton"):
        ref = batched_nms(*on(DEVICE, boxes, scores, idxs), 0.5).cpu()
    assert torch.equal(got, ref) and torch.equal(padded[0, :int(count[0])], ref)
    assert len(ref) < n - 1  # suppression happened


def test_torch_backend_matches_torchvision():
    boxes, scores = clustered_boxes(200, seed=4)
    idxs = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(4))
    with kernels.use_backend("torch"):
        assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
        assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
        keep, num = nms_padded(boxes[None], scores[None], 0.5, 10)
        assert torch.equal(keep[0], torchvision.ops.nms(boxes, scores, 0.5)[:10])


def awkward_batch(n, seed=0):
    """Two images of n clustered boxes holding every special case at once: negative coordinates, tied scores,
    a box with x2 < x1, non-finite coordinates on top-scored boxes, a NaN score, -inf padding at the end of
    image 1, and class ids far apart (negative and large)."""
    boxes, scores = clustered_boxes(2 * n, seed=seed)
    boxes, scores = boxes.reshape(2, n, 4) - 120.0, (scores * 8).round().reshape(2, n) / 8
    if n >= 8:
        boxes[0, 5] = boxes[0, 5, [2, 3, 0, 1]]
        boxes[0, 1, 2], boxes[0, 2, 0], boxes[1, 3, 3] = float("nan"), float("-inf"), float("inf")
        scores[0, [1, 2]] = scores[1, 3] = 2.0
        scores[1, 4] = float("nan")
        scores[1, -(n // 4):] = float("-inf")
    ids = torch.tensor([-7, 0, 3, 2**30])
    idxs = ids[torch.randint(0, 4, (2, n), generator=torch.Generator().manual_seed(seed))]
    return boxes, scores, idxs


@pytest.mark.parametrize("n", [0, 1, 65, 300])
@pytest.mark.parametrize("with_classes", [False, True])
@pytest.mark.parametrize("thr", [0.0, 0.5, -0.1])
@pytest.mark.triton
def test_torch_backend_equals_kernels(n, with_classes, thr):
    boxes, scores, idxs = awkward_batch(n, seed=n)
    idxs = idxs if with_classes else None
    for max_output in (40, n + 1):  # truncated, and all survivors
        out = {}
        for name in BACKENDS:
            with kernels.use_backend(name):
                out[name] = on("cpu", *nms_padded(*on(kernel_device(name), boxes, scores), thr, max_output,
                                                  idxs=None if idxs is None else idxs.to(kernel_device(name))))
        assert torch.equal(out["torch"][0], out["triton"][0]) and torch.equal(out["torch"][1], out["triton"][1])
    if n == 300:
        keep, num = out["torch"]
        assert num[0] < n - 50  # suppression did happen
        assert {1, 2} <= set(keep[0].tolist())  # the top-scored non-finite boxes were not suppressed


def iou_pair_boxes(n, thr, seed):
    """n random boxes (corners in [0, 100], sizes in [0, 100]); the last one repeats the first, its right edge
    pushed out so that the pair's IoU = width / (width + push) is a hair above thr."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100], 1)
    target = thr + 1e-5
    width = boxes[0, 2] - boxes[0, 0]
    boxes[-1] = boxes[0]
    boxes[-1, 2] += width * (1 - target) / target
    return boxes, torch.rand(n, generator=g)


@pytest.mark.parametrize("thr", [0.2, 0.5, 0.8])
def test_random_boxes_with_a_pair_just_above_threshold(backend, thr):
    n = 1000
    for seed in range(2):
        boxes, scores = iou_pair_boxes(n, thr, seed)
        keep = nms(*on(kernel_device(backend), boxes, scores), thr).cpu()
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr))
        assert not {0, n - 1} <= set(keep.tolist())  # the pair never survives together


def near_threshold_pairs(thr, per_offset=8, seed=0):
    """fp32 box pairs whose IoU, computed in torchvision's order with every step rounded to fp32, is the
    fp32 threshold t or one ulp either side of it. Returns ``boxes [P, 2, 4]`` and each pair's ulp offset.

    Box B shares A's y extent and overlaps it from the right; B's x2 is scanned over 600 consecutive fp32
    values around the exact solution of IoU = t. Of the values that hit a target, the one whose exact
    quotient lies farthest from its fp32 rounding is taken: an approximate division (up to 2 ulp off, as
    fp32 '/' compiles on a GPU) rounds those the other way first. (An IoU of exactly 0.5 is always an exact
    quotient of two fp32 values.)"""
    f32 = np.float32
    t = f32(thr)
    rng = np.random.default_rng(seed)
    found = {-1: [], 0: [], 1: []}
    while min(len(v) for v in found.values()) < per_offset:
        x1a, y1a = rng.uniform(0, 8, 2).astype(f32)
        wa, h = rng.uniform(16, 48, 2)
        x2a, y2a = f32(x1a + wa), f32(y1a + h)
        x1b = f32(x2a - rng.uniform(float(t) + 0.05, 0.99) * (x2a - x1a))  # overlap fraction above t
        inter_w = float(x2a) - float(x1b)
        x2b0 = f32(float(x1b) + inter_w * (1 / float(t) + 1) - (float(x2a) - float(x1a)))  # IoU = t exactly
        x2b = (np.array([x2b0]).view(np.int32) + np.arange(-300, 301, dtype=np.int32)).view(f32)
        x2b = x2b[x2b >= x2a]  # the formula above assumed B reaches past A
        w = np.maximum(np.minimum(x2a, x2b) - np.maximum(x1a, x1b), f32(0))
        hh = np.maximum(np.minimum(y2a, y2a) - np.maximum(y1a, y1a), f32(0))
        inter = w * hh
        den = ((x2a - x1a) * (y2a - y1a) + (x2b - x1b) * (y2a - y1a)) - inter
        iou = inter / den
        ulp = np.spacing(iou).astype(np.float64)
        hard = np.abs(inter.astype(np.float64) / den.astype(np.float64) - iou.astype(np.float64)) / ulp
        offset = iou.view(np.int32).astype(np.int64) - int(np.array(t).view(np.int32))
        for off, got in found.items():
            score = np.where(offset == off, hard, -1.0)
            best = int(np.argmax(score))
            if score[best] >= 0 and len(got) < per_offset:
                got.append([[x1a, y1a, x2a, y2a], [x1b, y1a, x2b[best], y2a]])
    boxes = [pair for off in found for pair in found[off]]
    offsets = [off for off in found for _ in found[off]]
    return torch.tensor(np.array(boxes, dtype=f32)), offsets


# fp32(0.7) < 0.7 and 0.375, 0.5 are exact: an IoU equal to fp32(thr) is kept by torchvision's CPU kernel
# (which compares with the double) as by its CUDA kernel and ours (fp32 threshold); fp32(0.3) > 0.3 is not
@pytest.mark.parametrize("thr", [0.375, 0.5, 0.7])
def test_iou_one_ulp_either_side_of_the_threshold(backend, thr):
    """IoUs equal to the fp32 threshold, and one ulp below and above: kept, kept, suppressed, as
    torchvision decides. The kernels need torchvision's rounding of every step and a correctly rounded
    division for this (the interpreter divides exactly anyway; compiled fp32 '/' does not)."""
    pairs, offsets = near_threshold_pairs(thr)
    P = len(pairs)
    scores = torch.tensor([0.9, 0.8]).repeat(P, 1)
    ref = [torchvision.ops.nms(pairs[p], scores[p], thr) for p in range(P)]
    # the construction is what it claims: torchvision suppresses exactly the pairs one ulp above
    assert [len(r) for r in ref] == [1 if off > 0 else 2 for off in offsets]
    dev = kernel_device(backend)
    keep, num = on("cpu", *nms_padded(*on(dev, pairs, scores), thr, 2))  # one pair per image
    for p in range(P):
        assert torch.equal(keep[p, :int(num[p])], ref[p]), (p, offsets[p])
    if backend == "triton":  # all pairs in one image, a class each (the torch backend's class strips are fp64)
        flat_scores = (scores - torch.arange(P)[:, None] * 1e-3).reshape(-1)
        kept = torch.cat([r + 2 * p for p, r in enumerate(ref)])
        expected = kept[torch.sort(flat_scores[kept], descending=True, stable=True).indices]
        ids = torch.arange(P).repeat_interleave(2)
        assert torch.equal(batched_nms(*on(dev, pairs.reshape(-1, 4), flat_scores, ids), thr).cpu(), expected)


def test_float64_boxes(backend):
    boxes, scores = clustered_boxes(257, seed=13, dtype=torch.float64)
    scores = scores.double()
    idxs = torch.randint(0, 4, (257,), generator=torch.Generator().manual_seed(13))
    dev = kernel_device(backend)
    assert torch.equal(nms(*on(dev, boxes, scores), 0.5).cpu(), torchvision.ops.nms(boxes, scores, 0.5))
    assert torch.equal(batched_nms(*on(dev, boxes, scores, idxs), 0.5).cpu(),
                       torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    # IoU = (1 - x) / (1 + x) with x a hair below 1/3: just above 0.5 in fp64; x's fp32 rounding lands below 0.5
    x = 1 / 3 - 1e-12
    pair = torch.tensor([[0, 0, 1, 1], [x, 0, x + 1, 1]], dtype=torch.float64)
    two = torch.tensor([0.9, 0.8], dtype=torch.float64)
    assert nms(*on(dev, pair, two), 0.5).tolist() == torchvision.ops.nms(pair, two, 0.5).tolist() == [0]
    assert nms(*on(dev, pair.float(), two.float()), 0.5).tolist() == [0, 1]
    # the threshold is rounded to fp32: an IoU between 0.3 and fp32(0.3) = 0.3000000119 does not suppress
    iou = 0.300000006
    x = (1 - iou) / (1 + iou)
    pair = torch.tensor([[0, 0, 1, 1], [x, 0, x + 1, 1]], dtype=torch.float64)
    assert nms(*on(dev, pair, two), 0.3).tolist() == [0, 1]
    assert batched_nms(*on(dev, pair, two, torch.zeros(2, dtype=torch.int64)), 0.3).tolist() == [0, 1]


def test_fp16_boxes_keep_what_fp32_keeps(backend):
    boxes = torch.tensor([[285.3538, 185.5758, 1193.5110, 851.4551], [285.1472, 188.7374, 1192.4984, 851.0669],
                          [279.2440, 197.9812, 1189.4746, 849.2019]])
    scores = torch.tensor([0.6370, 0.7569, 0.3966])
    dev = kernel_device(backend)
    keep = nms(*on(dev, boxes, scores), 0.2).cpu()
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.2))
    assert torch.equal(nms(*on(dev, boxes.half(), scores.half()), 0.2).cpu(), keep)


def test_autocast_changes_nothing(backend, monkeypatch):
    dev = kernel_device(backend)
    amp = amp_device(dev)
    seen = []  # whether autocast was on inside the op bodies
    for module, name in (("kernels.nms", "_sorted_inputs"), ("kernels._nms_torch", "_torch_nms_image"),
                         ("kernels._nms_torch", "_torch_nms_flat_common_case")):  # every path meets one
        mod = importlib.import_module(module)
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, fn=fn: seen.append(torch.is_autocast_enabled(amp)) or fn(*a))
    boxes, scores = clustered_boxes(130, seed=12)
    idxs = torch.randint(0, 3, (130,), generator=torch.Generator().manual_seed(12))
    boxes, scores, idxs = on(dev, boxes, scores, idxs)

    def run(b, s):
        return [nms(b, s, 0.5), batched_nms(b, s, idxs, 0.5), *nms_padded(b[None], s[None], 0.5, 30, idxs=idxs[None])]

    for dtype in (torch.float32, torch.float64):
        b, s = boxes.to(dtype), scores.to(dtype)
        plain = run(b, s)
        with torch.autocast(amp, dtype=torch.bfloat16):
            under_autocast = run(b, s)
        assert all(torch.equal(p, a) for p, a in zip(plain, under_autocast))
    assert len(seen) >= 12 and not any(seen)


def test_empty_inputs(backend):
    dev = kernel_device(backend)
    for out in (batched_nms(torch.empty((0,), dtype=torch.int64, device=dev), None, None, None),  # as torchvision:
                nms(torch.empty(0, 4, device=dev), torch.empty(0, device=dev), 0.5),               # no checks
                batched_nms(torch.empty(0, 4, dtype=torch.float64, device=dev), torch.empty(0, device=dev),
                            torch.empty(0, dtype=torch.int64, device=dev), 0.5)):
        assert out.dtype == torch.int64 and out.shape == (0,) and out.device.type == torch.device(dev).type
    keep, num = on("cpu", *nms_padded(torch.zeros(2, 0, 4, device=dev), torch.zeros(2, 0, device=dev), 0.5, 4))
    assert (keep == -1).all() and keep.shape == (2, 4) and (num == 0).all()


_R = torch.rand
_SHAPE_ERRORS = {  # the four calls torchvision's own tests expect a RuntimeError from, and ours
    "boxes 1-d": lambda: nms(_R(4), _R(3), 0.5),
    "boxes [N,5]": lambda: nms(_R(3, 5), _R(3), 0.5),
    "scores 2-d": lambda: nms(_R(3, 4), _R(3, 2), 0.5),
    "N mismatch": lambda: nms(_R(3, 4), _R(4), 0.5),
    "idxs N mismatch": lambda: batched_nms(_R(3, 4), _R(3), torch.zeros(2, dtype=torch.int64), 0.5),
    "scores [B,N] mismatch": lambda: nms_padded(_R(2, 3, 4), _R(2, 4), 0.5, 2),
    "max_output 0": lambda: nms_padded(_R(1, 3, 4), _R(1, 3), 0.5, 0),
}
_TYPE_ERRORS = {
    "int boxes": lambda: nms(torch.ones(3, 4, dtype=torch.int64), _R(3), 0.5),
    "float idxs": lambda: batched_nms(_R(3, 4), _R(3), _R(3), 0.5),
    "threshold None": lambda: nms(_R(3, 4), _R(3), None),
    "max_output 2.5": lambda: nms_padded(_R(1, 3, 4), _R(1, 3), 0.5, 2.5),
    "scores a list": lambda: nms(_R(3, 4), [0.1, 0.2, 0.3], 0.5),
}


@pytest.mark.parametrize("call", _SHAPE_ERRORS.values(), ids=_SHAPE_ERRORS.keys())
def test_shape_errors_are_value_and_runtime_errors(call):
    with pytest.raises(RuntimeError) as err:
        call()
    assert isinstance(err.value, ValueError) and isinstance(err.value, kernels.InputError)


@pytest.mark.parametrize("call", _TYPE_ERRORS.values(), ids=_TYPE_ERRORS.keys())
def test_type_errors_are_type_and_runtime_errors(call):
    with pytest.raises(RuntimeError) as err:
        call()
    assert isinstance(err.value, TypeError) and isinstance(err.value, kernels.InputTypeError)


def test_bad_inputs():
    boxes, scores = clustered_boxes(10)
    with pytest.raises(ValueError, match="last dimension 4"):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match="entries"):
        nms(boxes, scores[:9], 0.5)
    with pytest.raises(ValueError, match="one device"):
        nms(boxes, scores.to("meta"), 0.5)
    with pytest.raises(ValueError, match="max_output"):
        nms_padded(boxes[None], scores[None], 0.5, 0)
    with pytest.raises(ValueError, match=r"\[B,N\]"):
        nms_padded(boxes[None], scores[None, :5], 0.5, 3)
    with pytest.raises(TypeError, match="integer"):
        batched_nms(boxes, scores, scores, 0.5)
    empty_keep, empty_num = nms_padded(torch.zeros(2, 0, 4), torch.zeros(2, 0), 0.5, 4)
    assert (empty_keep == -1).all() and (empty_num == 0).all()


@pytest.mark.triton
def test_opcheck_and_compile():
    boxes, scores = clustered_boxes(70, seed=1)
    idxs = torch.randint(0, 3, (1, 70))
    ref = torchvision.ops.nms(boxes, scores, 0.5)[:10]
    boxes, scores, idxs = on(DEVICE, boxes, scores, idxs)
    torch.library.opcheck(torch.ops.maskrcnn_fast.nms_padded.default, (boxes[None], scores[None], idxs, 0.5, 10))
    fn = torch.compile(lambda b, s: nms_padded(b, s, 0.5, 10), fullgraph=True, backend="aot_eager")
    keep, num = fn(boxes[None], scores[None])
    assert torch.equal(keep[0, :int(num[0])].cpu(), ref)


@pytest.mark.gpu
def test_cuda_post_processing_shape():
    g = torch.Generator(device="cuda").manual_seed(0)
    c = torch.rand(8, 1000, 2, device="cuda", generator=g) * 800
    boxes = torch.cat([c, c + 50 * torch.rand(8, 1000, 2, device="cuda", generator=g) + 1], -1)
    scores = torch.rand(8, 1000, device="cuda", generator=g)
    idxs = torch.randint(0, 80, (8, 1000), device="cuda", generator=g)
    keep, num = nms_padded(boxes, scores, 0.5, 100, idxs=idxs)
    keep, num = keep.cpu(), num.cpu()
    for b in range(8):
        # torchvision's per-class loop on CPU: exact fp32 IoU on the boxes as given, as our kernel computes it.
        # Its public batched_nms shifts each class by up to ~68,000 px below 100k boxes (an fp32 ulp of
        # 0.004-0.008 px there) and its CUDA kernel contracts to FMAs: about 1 seed in 100 keeps another box.
        cpu = [t[b].cpu() for t in (boxes, scores, idxs)]
        ref = torchvision.ops.boxes._batched_nms_vanilla(*cpu, 0.5)[:100]
        assert torch.equal(keep[b, :int(num[b])], ref)


@pytest.mark.parametrize("ids", ["dense", "sparse", "huge_adjacent"])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.triton
def test_flat_drop_in_cpu_paths_equal_kernels(ids, special):
    """The eager CPU drop-in has a lean path (every box finite, every score > -inf, dense class ids) and the
    general one: both give the kernels' keep list, whichever inputs pick them."""
    boxes, scores, idxs = awkward_batch(300, seed=3)
    boxes, scores, idxs = boxes[0], scores[0], idxs[0]
    if not special:  # drop the non-finite boxes and the NaN/-inf scores: the lean path's inputs
        boxes, scores = boxes.nan_to_num(0.0, 0.0, 0.0), scores.nan_to_num(0.0, 3.0, 0.0)
    idxs = {"dense": idxs.remainder(5), "sparse": idxs,
            "huge_adjacent": 2**60 + idxs.remainder(2)}[ids]  # ids that fp64 cannot tell apart
    out = {}
    for name in BACKENDS:
        b, s, i = on(kernel_device(name), boxes, scores, idxs)
        with kernels.use_backend(name):
            out[name] = on("cpu", batched_nms(b, s, i, 0.5), nms(b, s, 0.5))
    assert torch.equal(out["torch"][0], out["triton"][0])
    assert torch.equal(out["torch"][1], out["triton"][1])
    assert len(out["torch"][0]) < 300 and len(out["torch"][1]) < len(out["torch"][0])


def test_cpu_backend_survives_torchvision_nms_patched_to_ours(monkeypatch):
    """Porting code by `torchvision.ops.nms = kernels.nms` must not make our CPU backend call itself."""
    boxes, scores = clustered_boxes(65, seed=2)
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    idxs = torch.arange(65) % 3
    ref_batched = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    monkeypatch.setattr(torchvision.ops, "nms", nms)
    with kernels.use_backend("torch"):
        assert torch.equal(nms(boxes, scores, 0.5), ref)
        assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), ref_batched)


def test_class_ids_2_to_the_32_apart_stay_apart(backend):
    """Class ids travel as int64 all the way: ids 0 and 2**32 (equal in an int32 copy) never suppress
    each other, on either backend, padded or drop-in."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [0, 0.5, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    idxs = torch.tensor([0, 2**32, 0])
    boxes, scores, idxs = on(kernel_device(backend), boxes, scores, idxs)
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]
    keep, num = nms_padded(boxes[None], scores[None], 0.5, 3, idxs=idxs[None])
    assert keep[0, :int(num[0])].tolist() == [0, 1]


def test_fp64_scores_are_ordered_as_they_are(backend):
    """fp32 boxes with fp64 scores that differ below fp32's resolution: the higher score wins (a copy of
    the scores in fp32 would tie them and keep the first)."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    scores = torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64)
    boxes, scores, idxs = on(kernel_device(backend), boxes, scores, torch.tensor([3, 3]))
    assert nms(boxes, scores, 0.5).tolist() == [1]
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [1]


def test_fp64_boxes_near_the_top_of_the_range_with_classes(backend):
    """Per-class NMS of fp64 boxes whose extent is too large to shift classes apart (the strip width
    would overflow to inf): each class still suppresses within itself, as torchvision's nms per class."""
    a, d = 1e308, 1e300  # boxes 1e300 wide (finite areas) at +-1e308: the extent, 2e308, is past fp64's max
    boxes = torch.tensor([[a, 0, a + d, 1], [a + d / 100, 0, a + d, 1], [-a, 0, -a + d, 1],
                          [-a + d / 100, 0, -a + d, 1]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    idxs = torch.tensor([0, 0, 1, 1])
    ref = torch.cat([torchvision.ops.nms(boxes[idxs == c], scores[idxs == c], 0.5).add(2 * c) for c in (0, 1)])
    assert ref.tolist() == [0, 2]
    assert batched_nms(*on(kernel_device(backend), boxes, scores, idxs), 0.5).tolist() == ref.tolist()
