"""The whole model, ours vs torchvision's maskrcnn_resnet50_fpn on the same random-weight inputs.

CUDA: training step (batch 8, 800x1216, AMP bf16) and inference img/s, peak memory.
CPU: host syncs and dispatched ops per training step (2 images), the numbers that decide
whether a step can be captured in a CUDA graph; timing there is only a smoke test.
"""
import pytest
import torch
import torchvision

import kernels
import maskrcnn_fast
from bench.shapes import CUDA, DEVICE
from maskrcnn_fast.syncs import count_syncs

BATCH, SIZE = (8, (800, 1216)) if CUDA else (2, (128, 160))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *SIZE, generator=g).to(DEVICE) for _ in range(BATCH)]
    targets = []
    for _ in range(BATCH):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([SIZE[1] * 0.6, SIZE[0] * 0.6])
        boxes = torch.cat([xy, xy + 16 + torch.rand(3, 2, generator=g) * 40], 1)
        masks = torch.zeros(3, *SIZE, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(DEVICE), "labels": torch.randint(1, 91, (3,), generator=g).to(DEVICE),
                        "masks": masks.to(DEVICE)})
    return images, targets


def _models():
    kw = dict(min_size=SIZE[0], max_size=SIZE[1])
    torch.manual_seed(0)
    ours = maskrcnn_fast.maskrcnn_resnet50_fpn(num_classes=91, **kw).to(DEVICE)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                num_classes=91, **kw).to(DEVICE)
    return {"ours": ours, "torchvision": theirs}


def _train_step(model, images, targets):
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
        losses = model(images, targets)
    sum(losses.values()).backward()


@pytest.mark.parametrize("impl", ["ours", "torchvision"])
def test_train_step(benchmark, impl):
    model = _models()[impl].train()
    images, targets = _data()
    backend = kernels.use_backend("torch") if not CUDA else kernels.use_backend("triton")
    with backend:
        if CUDA:
            _train_step(model, images, targets)  # warm-up (Triton compiles, cuDNN picks algorithms)
        # syncs are counted on the static-shape path the GPU runs; on the PyTorch CPU backend the mask
        # branch takes only the positive RoIs (a free host sync there; MaskRCNNConfig.mask_branch_positives_only)
        cfg = model.roi_heads.cfg if impl == "ours" else None
        if cfg is not None:
            cfg.mask_branch_positives_only = False
        try:
            with count_syncs(record_sites=False) as counts:
                _train_step(model, images, targets)
        finally:
            if cfg is not None:
                cfg.mask_branch_positives_only = None
        benchmark.group = f"model train_step B{BATCH} {SIZE[0]}x{SIZE[1]}" + (" bf16" if CUDA else "")
        benchmark.extra_info.update(impl=impl, host_syncs=counts.syncs, dispatched_ops=counts.ops,
                                    device=torch.cuda.get_device_name() if CUDA else "cpu")
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

        def step():
            _train_step(model, images, targets)
            if CUDA:
                torch.cuda.synchronize()
        result = benchmark.pedantic(step, rounds=10 if CUDA else 1, iterations=1)
    if CUDA:
        benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    benchmark.extra_info["img_per_s"] = BATCH / benchmark.stats.stats.median
    assert result is None
    if impl == "ours":
        assert counts.syncs == 0, counts.sync_ops


@pytest.mark.parametrize("impl", ["ours", "torchvision"])
def test_inference(benchmark, impl):
    model = _models()[impl].eval()
    images, _ = _data(1)
    backend = kernels.use_backend("torch") if not CUDA else kernels.use_backend("triton")
    with backend, torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
        if CUDA:
            model(images)  # warm-up
        with count_syncs(record_sites=False) as counts:
            out = model(images)
        benchmark.group = f"model inference B{BATCH} {SIZE[0]}x{SIZE[1]}" + (" bf16" if CUDA else "")
        benchmark.extra_info.update(impl=impl, host_syncs=counts.syncs, dispatched_ops=counts.ops,
                                    device=torch.cuda.get_device_name() if CUDA else "cpu")

        def infer():
            model(images)
            if CUDA:
                torch.cuda.synchronize()
        benchmark.pedantic(infer, rounds=10 if CUDA else 1, iterations=1)
    benchmark.extra_info["img_per_s"] = BATCH / benchmark.stats.stats.median
    assert len(out) == BATCH and {"boxes", "labels", "scores", "masks"} <= set(out[0])
