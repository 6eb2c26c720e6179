"""What the compile audit drives: the public ops at Mask R-CNN's shapes, and the model itself.

Why two sources (see kernels/_audit.py for how a launch is captured)
    * **Ops at model shapes, not run.** Every public op is called on CPU tensors of the shapes a
      ResNet-50-FPN step at 800x1216 (2 images) gives it, under ``kernels._audit.capture``: the launchers run
      for real (validation, allocation, metadata, config choice) and every launch is recorded with the JIT's
      specialization of its actual arguments, but no kernel executes -- the interpreter would need hours for
      these shapes. This covers what the model never launches but users may: fp16, deterministic backward,
      RoIPool, the drop-in ``nms``/``batched_nms``, the fused predictor.
    * **The model, run.** A Mask R-CNN training step (forward + backward) and inference, in fp32 and under
      bf16 autocast, in NCHW and channels_last, runs on real values with the PyTorch backend while every
      ``maskrcnn_fast::`` op is also shadow-called through the Triton path under capture
      (``kernels._audit.shadow_custom_ops``), taking the code path a GPU takes. ``model="full"`` is the real
      ResNet-50-FPN at 800x1216 (exact model launches; ~50 CPU-seconds per fp32 training pass, 8 passes); ``model="small"`` keeps the heads'
      geometry (256 channels, 7x7 / 14x14 / 28x28, 91 classes) on a ResNet-18 at 128x192 with fewer RoIs and
      marks the op launches of the same kernel variant (kernel, pointer dtypes, declared constexprs, warps,
      stages) as ``model_path``; a variant the model launches that no op case covers is audited from the
      model's own launch.

``configs="all"`` repeats the op cases once per entry of each op's ``get_configs()`` (what ``bench/autotune.py``
may pick on a GPU), by forcing ``kernels._config.pick``. This replaces the hand-written ``compile_specs()``
lists: those compiled declared signatures (every stride ``i64``, no divisibility, no ``==1`` constants) that
no launch produces.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

import kernels
from kernels._audit import Launch, capture, shadow_custom_ops

IMAGES, HW = 2, (800, 1216)
LEVELS = [(HW[0] // s, HW[1] // s) for s in (4, 8, 16, 32)]   # P2-P5: 200x304 ... 25x38
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
C = 256
BOX_ROIS, MASK_ROIS, CLASSES, DETECTIONS = 2 * 512, 2 * 128, 91, 100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rois(k: int, gen: torch.Generator, size=HW, lo=16.0, hi=400.0) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([size[1] * 0.7, size[0] * 0.7])
    wh = lo + torch.rand(k, 2, generator=gen) * (hi - lo)
    b = torch.randint(0, IMAGES, (k, 1), generator=gen).float()
    return torch.cat([b, xy, xy + wh], 1)


def _features(dtype, channels_last, levels=LEVELS, requires_grad=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.empty(IMAGES, C, h, w, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(requires_grad)
            for h, w in levels]


def _fwd_bwd(out: torch.Tensor, backward: bool) -> None:
    if backward:
        out.backward(torch.ones_like(out))


def roi_cases(gen) -> Iterator[tuple[dict, Callable]]:
    """RoIAlign (box head 7x7 on P2-P5, mask head 14x14, single level), RoIPool, mask targets 28x28."""
    for dtype in DTYPES:
        for cl in (False, True):
            layout = "cl" if cl else "nchw"
            for head, k, size in (("box7", BOX_ROIS, 7), ("mask14", MASK_ROIS, 14)):
                for mode in ("fwd", "bwd", "bwd_det"):
                    def run(dtype=dtype, cl=cl, k=k, size=size, mode=mode):
                        feats = _features(DTYPES[dtype], cl, requires_grad=mode != "fwd")
                        out = kernels.multiscale_roi_align(feats, _rois(k, gen), size, SCALES, sampling_ratio=2,
                                                           deterministic=mode == "bwd_det")
                        _fwd_bwd(out, mode != "fwd")
                    yield dict(case=f"multiscale_roi_align {head} {mode}", dtype=dtype, layout=layout), run
            for mode in ("fwd", "bwd", "bwd_det"):
                def single(dtype=dtype, cl=cl, mode=mode):
                    x = _features(DTYPES[dtype], cl, LEVELS[:1], requires_grad=mode != "fwd")[0]
                    out = kernels.roi_align(x, _rois(BOX_ROIS, gen), 7, 0.25, 2, aligned=True,
                                            deterministic=mode == "bwd_det")
                    _fwd_bwd(out, mode != "fwd")
                yield dict(case=f"roi_align P2 7x7 aligned {mode}", dtype=dtype, layout=layout), single
                if dtype == "float16":
                    continue
                def pool(dtype=dtype, cl=cl, mode=mode):
                    x = _features(DTYPES[dtype], cl, LEVELS[:1], requires_grad=mode != "fwd")[0]
                    out = kernels.roi_pool(x, _rois(BOX_ROIS, gen), 7, 0.25, deterministic=mode == "bwd_det")
                    _fwd_bwd(out, mode != "fwd")
                yield dict(case=f"roi_pool P2 7x7 {mode}", dtype=dtype, layout=layout), pool

    def targets():
        gt = torch.zeros(IMAGES * 3, *HW, dtype=torch.uint8)
        rois = _rois(MASK_ROIS, gen)
        kernels.project_masks_on_boxes(gt, rois[:, 1:], torch.randint(0, IMAGES * 3, (MASK_ROIS,), generator=gen), 28)
    yield dict(case="project_masks_on_boxes 28x28 1ch", dtype="uint8->float32", layout="nchw"), targets


def nms_cases(gen) -> Iterator[tuple[dict, Callable]]:
    """RPN (4 levels x 2000 + P6, per image, by level) and detection (4096 candidates, by class) NMS,
    the drop-in nms / batched_nms at 10k boxes."""
    def boxes(shape, dtype):
        xy = torch.rand(*shape, 2, generator=gen) * 1000
        return torch.cat([xy, xy + 10 + torch.rand(*shape, 2, generator=gen) * 200], -1).to(dtype)

    for dtype in ("float32", "bfloat16"):
        dt = DTYPES[dtype]
        n_rpn = 4 * 2000 + (HW[0] // 64 + 1) * (HW[1] // 64) * 3
        yield dict(case=f"nms_padded rpn N={n_rpn}", dtype=dtype), lambda dt=dt, n=n_rpn: kernels.nms_padded(
            boxes((IMAGES, n), dt), torch.rand(IMAGES, n, generator=gen).to(dt), 0.7, 2000,
            idxs=torch.randint(0, 5, (IMAGES, n), generator=gen))
        yield dict(case="nms_padded detection N=4096", dtype=dtype), lambda dt=dt: kernels.nms_padded(
            boxes((IMAGES, 4096), dt), torch.rand(IMAGES, 4096, generator=gen).to(dt), 0.5, DETECTIONS,
            idxs=torch.randint(1, CLASSES, (IMAGES, 4096), generator=gen))
    yield dict(case="nms N=10000", dtype="float32"), lambda: kernels.nms(
        boxes((10_000,), torch.float32), torch.rand(10_000, generator=gen), 0.5)
    yield dict(case="batched_nms N=10000 80 classes", dtype="float32"), lambda: kernels.batched_nms(
        boxes((10_000,), torch.float32), torch.rand(10_000, generator=gen), torch.randint(0, 80, (10_000,),
                                                                                             generator=gen), 0.5)


def mask_loss_cases(gen) -> Iterator[tuple[dict, Callable]]:
    """Sigmoid BCE mask loss on [256, 91, 28, 28] logits (materialized and in-kernel targets), the fused
    1x1 predictor + loss on [256, 256, 28, 28] features, inference class logits; forward and backward."""
    R, M = MASK_ROIS, 28
    labels = torch.randint(1, CLASSES, (R,), generator=gen)
    gt = torch.zeros(IMAGES * 3, *HW, dtype=torch.uint8)

    def targets(kind):
        if kind == "gt":
            return kernels.mask_targets_from_gt(gt, _rois(R, gen)[:, 1:], torch.randint(0, 6, (R,), generator=gen))
        return torch.rand(R, M, M, generator=gen)

    for dtype in DTYPES:
        dt = DTYPES[dtype]
        for kind in ("dense", "gt"):
            def loss(dt=dt, kind=kind):
                logits = torch.empty(R, CLASSES, M, M, dtype=dt, requires_grad=True)
                kernels.sigmoid_bce_mask_loss(logits, labels, targets(kind), roi_weight=torch.ones(R),
                                              check_targets=False).backward()
            yield dict(case=f"sigmoid_bce_mask_loss {kind} targets fwd+bwd", dtype=dtype, layout="nchw"), loss
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            layout = "cl" if cl else "nchw"

            def predictor(dt=dt, fmt=fmt):
                x = torch.empty(R, C, M, M, dtype=dt).contiguous(memory_format=fmt).requires_grad_(True)
                w = torch.empty(CLASSES, C, 1, 1, requires_grad=True)
                b = torch.zeros(CLASSES, requires_grad=True)
                kernels.mask_predictor_loss(x, w, b, labels, targets("dense"), roi_weight=torch.ones(R),
                                            check_targets=False).backward()
            yield dict(case="mask_predictor_loss fwd+bwd", dtype=dtype, layout=layout), predictor

            def logits(dt=dt, fmt=fmt):
                x = torch.empty(IMAGES * DETECTIONS, C, M, M, dtype=dt).contiguous(memory_format=fmt)
                kernels.class_mask_logits(x, torch.empty(CLASSES, C, 1, 1), torch.zeros(CLASSES),
                                          torch.randint(1, CLASSES, (IMAGES * DETECTIONS,), generator=gen))
            yield dict(case="class_mask_logits inference", dtype=dtype, layout=layout), logits


def op_cases(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    yield from roi_cases(gen)
    yield from nms_cases(gen)
    yield from mask_loss_cases(gen)


@contextlib.contextmanager
def forced_config(index: int | None, seen: list[int]):
    """``kernels._config.pick`` returns entry ``index`` of every op's config list (its default past the end;
    ``None``: the heuristic defaults); the list lengths it is offered are appended to ``seen``."""
    from kernels import _config

    original = _config.pick

    def pick(op, bucket, configs, default=None):
        seen.append(len(configs))
        if index is not None and index < len(configs):
            return configs[index]
        return original(op, bucket, configs, default)
    _config.pick = pick
    try:
        yield
    finally:
        _config.pick = original


def drive_ops(configs: str = "default", select: Callable[[dict], bool] | None = None, log=print) -> list[Launch]:
    """Capture the launches of every op case (``configs``: "default", or "all": then again with each index
    of the config lists the launchers choose from; ``select``: which cases)."""
    launches: list[Launch] = []
    seen: list[int] = []
    index: int | None = None
    while True:
        with forced_config(index, seen):
            for ctx, run in op_cases():
                if select is not None and not select(ctx):
                    continue
                if index is not None:
                    ctx = {**ctx, "case": f"{ctx['case']} config[{index}]"}
                with capture(**ctx) as got, kernels.use_backend("triton"):
                    run()
                launches += got
        index = 0 if index is None else index + 1
        if configs != "all" or index >= max(seen, default=0):
            break
    log(f"ops: {len(launches)} launches captured")
    return launches


MODEL_SIZES = {
    "full": dict(backbone="resnet50", size=HW, kw={}),
    "small": dict(backbone="resnet18", size=(128, 192),
                  kw=dict(representation_size=64, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=200,
                          rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=200, box_batch_size_per_image=32,
                          rpn_batch_size_per_image=64, box_pre_nms_top_n=512, box_score_thresh=0.0,
                          box_detections_per_img=8)),
}


def _model_batch(size, gen):
    images, targets = [], []
    for _ in range(IMAGES):
        images.append(torch.rand(3, *size, generator=gen))
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([size[1] * 0.6, size[0] * 0.6])
        boxes = torch.cat([xy, xy + 16 + torch.rand(3, 2, generator=gen) * size[0] * 0.3], 1)
        masks = torch.zeros(3, *size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, CLASSES, (3,), generator=gen), "masks": masks})
    return images, targets


def drive_model(kind: str = "small", log=print) -> list[Launch]:
    """Training step and inference of the model, fp32 and bf16 autocast, NCHW and channels_last."""
    import maskrcnn_fast

    spec = MODEL_SIZES[kind]
    launches: list[Launch] = []
    gen = torch.Generator().manual_seed(0)
    images, targets = _model_batch(spec["size"], gen)
    for cl in (False, True):
        torch.manual_seed(0)
        build = getattr(maskrcnn_fast, f"maskrcnn_{spec['backbone']}_fpn")
        model = build(num_classes=CLASSES, min_size=spec["size"][0], max_size=spec["size"][1], channels_last=cl,
                      **spec["kw"])
        for dtype in ("float32", "bfloat16"):
            amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
            ctx = dict(dtype=dtype, layout="cl" if cl else "nchw", model=True)
            with shadow_custom_ops(case=f"model {kind} train step", **ctx) as got:
                model.train()
                with amp:
                    losses = model(images, targets)
                sum(losses.values()).backward()
            launches += got
            with shadow_custom_ops(case=f"model {kind} inference", **ctx) as got, torch.no_grad():
                model.eval()
                with amp:
                    model(images)
            launches += got
            model.zero_grad(set_to_none=True)
    log(f"model ({kind}): {len(launches)} launches captured")
    return launches
