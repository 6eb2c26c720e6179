"""The whole model, ours vs torchvision's maskrcnn_resnet50_fpn on the same random-weight inputs.

CUDA: a training step (batch 8, 800x1216, bf16 autocast: forward, backward, gradient clipping, SGD)
and inference (transform to per-image outputs), img/s and peak memory, for

* ``ours``            eager, end to end;
* ``ours_compiled``   ``MaskRCNN.losses`` / ``.detect`` under ``torch.compile`` (inductor, fullgraph) for
                      the fixed batch shape, transform and per-image split eager;
* ``ours_cudagraph``  training: the step captured once per shape bucket and replayed
                      (:mod:`maskrcnn_fast.graphs`); inference: ``.detect`` captured and replayed;
* ``torchvision``     eager.

Compilation and capture happen in the warm-up (their time is ``setup_s``), never in a timed round.
CPU: host syncs and dispatched ops of a training step's forward + backward (2 images) and of
inference, the numbers that decide whether a step can be captured; timing there is only a smoke
test, and the compiled and CUDA-graph entries are skipped (they exist for the GPU numbers).
"""
import time

import pytest
import torch
import torchvision

import kernels
import maskrcnn_fast
from bench.shapes import CUDA, DEVICE
from maskrcnn_fast.syncs import count_syncs

BATCH, SIZE = (8, (800, 1216)) if CUDA else (2, (128, 160))
OBJECTS = 3                      # ground-truth objects per image (_data)
IMPLS = ["ours", "ours_compiled", "ours_cudagraph", "torchvision"]
CLIP, LR = 10.0, 0.02


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *SIZE, generator=g).to(DEVICE) for _ in range(BATCH)]
    targets = []
    for _ in range(BATCH):
        xy = torch.rand(OBJECTS, 2, generator=g) * torch.tensor([SIZE[1] * 0.6, SIZE[0] * 0.6])
        boxes = torch.cat([xy, xy + 16 + torch.rand(OBJECTS, 2, generator=g) * 40], 1)
        masks = torch.zeros(OBJECTS, *SIZE, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(DEVICE), "masks": masks.to(DEVICE),
                        "labels": torch.randint(1, 91, (OBJECTS,), generator=g).to(DEVICE)})
    return images, targets


def _model(impl):
    kw = dict(min_size=SIZE[0], max_size=SIZE[1])
    torch.manual_seed(0)
    if impl == "torchvision":
        return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                  num_classes=91, **kw).to(DEVICE)
    return maskrcnn_fast.maskrcnn_resnet50_fpn(num_classes=91, **kw).to(DEVICE)


def _autocast(cache_enabled=True):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA, cache_enabled=cache_enabled)


def _fixed_shape_inputs(model, images, targets=None):
    """Transform to the batch's bucket: a fixed shape for the compiled / captured entries."""
    from maskrcnn_fast.graphs import bucket_shapes

    batch, sizes, gt = model.transform(images, targets, padded_hw=bucket_shapes(model.cfg)[0],
                                       gt_capacity=OBJECTS if targets is not None else None)
    return batch, torch.tensor(sizes, dtype=torch.float32).to(DEVICE, non_blocking=True), sizes, gt


def _train_step(impl, model, images, targets):
    """A zero-argument training step of ``impl`` (forward, backward, clipping, SGD)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-4)
    if impl == "ours_cudagraph":
        from maskrcnn_fast.graphs import GraphedTrainStep

        stepper = GraphedTrainStep(model, opt, None, base_lr=LR, total=10 ** 6, warmup=0, schedule="multistep",
                                   clip_grad=CLIP, amp_dtype=torch.bfloat16 if CUDA else None, batch_size=BATCH,
                                   gt_capacity=OBJECTS, warn=lambda msg: pytest.fail(f"step not captured: {msg}"))
        return lambda: stepper.step(images, targets)
    forward = model
    if impl == "ours_compiled":
        losses = torch.compile(model.losses, fullgraph=True)

        def forward(images, targets):
            batch, hw, _, gt = _fixed_shape_inputs(model, images, targets)
            return losses(batch, hw, gt)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast():
            loss = sum(forward(images, targets).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
    return step


def _infer(impl, model, images):
    """A zero-argument inference call of ``impl`` (images to per-image dicts)."""
    if impl in ("ours", "torchvision"):
        return lambda: model(images)
    from maskrcnn_fast.postprocess import split_per_image

    original = [tuple(im.shape[-2:]) for im in images]
    if impl == "ours_compiled":
        detect = torch.compile(model.detect, fullgraph=True)

        def infer():
            batch, hw, sizes, _ = _fixed_shape_inputs(model, images)
            return split_per_image(*detect(batch, hw), sizes, original)
        return infer
    # CUDA graph: warm up on a side stream, capture detect on static inputs, replay per call
    static_batch, static_hw, _, _ = _fixed_shape_inputs(model, images)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _autocast(cache_enabled=False):
        model.detect(static_batch, static_hw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), _autocast(cache_enabled=False):
        outputs = model.detect(static_batch, static_hw)

    def infer():
        batch, hw, sizes, _ = _fixed_shape_inputs(model, images)
        static_batch.copy_(batch)
        static_hw.copy_(hw)
        graph.replay()
        return split_per_image(*outputs, sizes, original)
    return infer


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _setup(fn, calls):
    """Warm-up calls (compile, capture, cuDNN's choices), timed once as setup_s."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return time.perf_counter() - t0


def _record(benchmark, kind, impl, setup_s, counts=None):
    benchmark.group = f"model {kind} B{BATCH} {SIZE[0]}x{SIZE[1]}" + (" bf16" if CUDA else "")
    benchmark.extra_info.update(impl=impl, setup_s=setup_s, device=torch.cuda.get_device_name() if CUDA else "cpu")
    if counts is not None:
        benchmark.extra_info.update(host_syncs=counts.syncs, dispatched_ops=counts.ops)


def _finish(benchmark):
    if CUDA:
        benchmark.extra_info["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        benchmark.extra_info["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    benchmark.extra_info["img_per_s"] = BATCH / benchmark.stats.stats.median


def _timed(fn):
    def run():
        fn()
        _sync()
    return run


@pytest.fixture
def fresh_cuda():
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, impl, fresh_cuda):
    if impl in ("ours_compiled", "ours_cudagraph") and not CUDA:
        pytest.skip("GPU entry: a compiled or captured step is measured on CUDA only")
    model = _model(impl).train()
    images, targets = _data()
    with kernels.use_backend("triton" if CUDA else "torch"):
        step = _train_step(impl, model, images, targets)
        # CUDA: Triton compiles, cuDNN chooses; the compiled step compiles forward, then backward;
        # the graph step runs one step eagerly, then captures
        setup_s = _setup(step, 3) if CUDA else 0.0
        counts = None
        if impl in ("ours", "torchvision"):
            # syncs of forward + backward on the static-shape path the GPU runs; on the PyTorch CPU backend
            # the mask branch takes only the positive RoIs (MaskRCNNConfig.mask_branch_positives_only)
            cfg = model.roi_heads.cfg if impl == "ours" else None
            if cfg is not None:
                cfg.mask_branch_positives_only = False
            try:
                with count_syncs(record_sites=False) as counts:
                    with _autocast():
                        losses = model(images, targets)
                    sum(losses.values()).backward()
            finally:
                if cfg is not None:
                    cfg.mask_branch_positives_only = None
        _record(benchmark, "train_step", impl, setup_s, counts)
        result = benchmark.pedantic(_timed(step), rounds=10 if CUDA else 1, iterations=1)
    _finish(benchmark)
    assert result is None
    if impl == "ours":
        assert counts.syncs == 0, counts.sync_ops


@pytest.mark.parametrize("impl", IMPLS)
def test_inference(benchmark, impl, fresh_cuda):
    if impl in ("ours_compiled", "ours_cudagraph") and not CUDA:
        pytest.skip("GPU entry: compiled or captured inference is measured on CUDA only")
    model = _model(impl).eval()
    images, _ = _data(1)
    with kernels.use_backend("triton" if CUDA else "torch"), torch.no_grad():
        t0 = time.perf_counter()
        infer = _infer(impl, model, images)
        with _autocast(cache_enabled=impl != "ours_cudagraph"):
            setup_s = time.perf_counter() - t0 + (_setup(infer, 2) if CUDA else 0.0)
            counts = None
            if impl in ("ours", "torchvision"):
                with count_syncs(record_sites=False) as counts:
                    infer()
            out = infer()
            _record(benchmark, "inference", impl, setup_s, counts)
            benchmark.pedantic(_timed(infer), rounds=10 if CUDA else 1, iterations=1)
    _finish(benchmark)
    assert len(out) == BATCH and {"boxes", "labels", "scores", "masks"} <= set(out[0])
