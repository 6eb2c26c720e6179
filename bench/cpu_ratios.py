"""CPU backend vs torchvision's CPU ops: time ratios measured in one process, interleaved.

    python bench/cpu_ratios.py [--quick] [--only SUBSTRING] [--out bench/results/cpu-ratios.md]

The CPU backend (no TRITON_INTERPRET) is what ``make demo`` and every CPU user run, so it must never be
slower than torchvision's own CPU ops. Each case times ours and torchvision's alternately (min of
``--repeat`` runs after a warm-up, so a background blip hits both sides alike) and prints
``ratio = ours / torchvision`` (lower is better; the goal is <= 1.0). Cases under 10 ms take at least
50 runs. NMS calls torchvision's own compiled NMS, so its ratio is 1 + our wrapper's share: the checks
that our rule for NaN/inf/-inf needs (~5-10 us) against NMS times from ~0.1 ms (300 boxes) up.

Cases: NMS and batched NMS (80 classes) at 300 / 2k / 10k boxes; RoIAlign forward+backward on one
level at the box-head shape; multi-level RoIAlign forward+backward (4 FPN levels, as
``MultiScaleRoIAlign``); a whole ResNet-50-FPN Mask R-CNN training step (2 images of 128x160,
random weights, trainable BatchNorm as both use without pretrained weights). Timing is no unit test:
this is a benchmark, and its numbers go in the README.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch CPU backend, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

import kernels  # noqa: E402


def _time_pair(ours, theirs, repeat: int) -> tuple[float, float]:
    ours(), theirs()  # warm-up
    t0 = time.perf_counter()
    theirs()
    if time.perf_counter() - t0 < 0.01:
        repeat = max(repeat, 50)  # sub-10 ms cases: the min of 5 runs is still noisy at this scale
    a, b = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs()
        b.append(time.perf_counter() - t0)
    return min(a), min(b)


def _nms_case(n: int, classes: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 700
    boxes = torch.cat([xy, xy + 16 + torch.rand(n, 2, generator=g) * 200], 1)
    scores = torch.rand(n, generator=g)
    if classes is None:
        return (lambda: kernels.nms(boxes, scores, 0.5)), (lambda: torchvision.ops.nms(boxes, scores, 0.5))
    idxs = torch.randint(0, classes, (n,), generator=g)
    return (lambda: kernels.batched_nms(boxes, scores, idxs, 0.5),
            lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def _fpn_case(k: int, channels: int, levels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 2
    sizes = [(200, 304), (100, 152), (50, 76), (25, 38)][:levels]
    feats = [torch.randn(n, channels, h, w, generator=g).requires_grad_() for h, w in sizes]
    xy = torch.rand(k, 2, generator=g) * 700
    boxes = torch.cat([xy, xy + 8 + torch.rand(k, 2, generator=g) * 300], 1)
    batch = torch.randint(0, n, (k,), generator=g)
    rois = torch.cat([batch[:, None].float(), boxes], 1)
    grad = torch.randn(k, channels, 7, 7, generator=g)
    if levels == 1:
        x = feats[0]
        ours = lambda: torch.autograd.grad(kernels.roi_align(x, rois, 7, 0.25, 2), x, grad)  # noqa: E731
        theirs = lambda: torch.autograd.grad(torchvision.ops.roi_align(x, rois, 7, 0.25, 2), x, grad)  # noqa: E731
        return ours, theirs
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32][:levels]
    pool = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(levels)], 7, 2)
    per_image = [boxes[batch == i] for i in range(n)]
    order = torch.cat([torch.nonzero(batch == i)[:, 0] for i in range(n)])  # torchvision's RoI order
    fmap = {str(i): f for i, f in enumerate(feats)}

    def ours():
        return torch.autograd.grad(kernels.multiscale_roi_align(feats, rois[order], 7, scales, 2), feats, grad)

    def theirs():
        return torch.autograd.grad(pool(fmap, per_image, [(800, 1216)] * n), feats, grad)
    return ours, theirs


def _train_step_case():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import maskrcnn_fast
    from test_bench_model import _data  # the bench suite's 2 x 128x160 batch (CPU sizes)

    kw = dict(min_size=128, max_size=160)
    torch.manual_seed(0)
    ours = maskrcnn_fast.maskrcnn_resnet50_fpn(num_classes=91, **kw).train()
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                num_classes=91, **kw).train()
    images, targets = _data()

    def step(model):
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
    return (lambda: step(ours)), (lambda: step(theirs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a smoke test, not a measurement)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", help="also write the table (markdown) here")
    p.add_argument("--only", help="run only the cases whose name contains this (e.g. nms)")
    args = p.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    cases = []
    for n in ((50,) if args.quick else (300, 2000, 10000)):
        cases.append((f"nms {n} boxes", 1.0, *_nms_case(n, None)))
        cases.append((f"batched_nms {n} boxes, 80 classes", 1.0, *_nms_case(n, 80)))
    k, c = (16, 8) if args.quick else (512, 256)
    cases.append((f"roi_align fwd+bwd, 1 level, {k} RoIs x {c} ch, 7x7", 1.0, *_fpn_case(k, c, 1)))
    cases.append((f"multiscale_roi_align fwd+bwd, 4 levels, {k} RoIs x {c} ch, 7x7", 1.0, *_fpn_case(k, c, 4)))
    step_name = "ResNet-50-FPN training step, 2 x 128x160"
    if not args.quick and (not args.only or args.only in step_name):
        cases.append((step_name, 1.0, *_train_step_case()))
    cases = [c for c in cases if not args.only or args.only in c[0]]
    lines = [f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
             f"min of {repeat} interleaved runs (50 under 10 ms)", "",
             "| case | ours (ms) | torchvision (ms) | ratio | goal |", "| --- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    worst = 0.0
    with kernels.use_backend("torch"):
        for name, goal, ours, theirs in cases:
            a, b = _time_pair(ours, theirs, 1 if "training step" in name and args.quick else repeat)
            line = f"| {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} | <= {goal} |"
            lines.append(line)
            print(line, flush=True)
            worst = max(worst, a / b / goal)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
