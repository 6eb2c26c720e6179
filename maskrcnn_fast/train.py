"""The training loop: SGD + warm-up + cosine/multi-step decay, AMP, DDP, exact resume, COCO metrics.

``python -m maskrcnn_fast train --out DIR`` leaves in ``DIR``:

* ``log.jsonl``   one record per iteration: iter, loss, every loss term, lr, img_s (+ skipped images)
* ``last.pt``     model, optimizer, scheduler, AMP scaler, RNG states, iteration (atomic writes)
* ``best.pt``     the checkpoint with the best mask AP so far
* ``metrics.json`` final COCOeval bbox/segm AP, AP50, AP75, APs/m/l and the AP-vs-time history
* ``curves.png``  loss and AP curves

Exactness of ``--resume``: the sample order is a pure function of (seed, epoch) (see
:func:`maskrcnn_fast.data.epoch_batches`), the checkpoint stores every RNG state, and evaluation
runs between saved RNG states, so a run stopped at iteration k and resumed logs the same losses as
a run that never stopped (bitwise on a deterministic CPU).

Weights start from scratch (no download). As torchvision does for an untrained backbone, the
shapes demo swaps the frozen BatchNorm for trainable BatchNorm2d (``batch_norm=True``). With frozen
BN kept, frozen BN at its identity init would let activations grow with depth and diverge, so each
one is first set to the statistics of its input on the first batch (a data-dependent init, like
LSUV) and stays frozen after that.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from maskrcnn_fast import checkpoint, graphs
from maskrcnn_fast.checkpoint import rng_state, set_rng_state
from maskrcnn_fast.data import build_dataset, epoch_batches, make_loader
from maskrcnn_fast.distributed import Dist, pick_device
from maskrcnn_fast.errors import NonFiniteLossError, UserError
from maskrcnn_fast.evaluate import evaluate, format_metrics
from maskrcnn_fast.schedule import LOSS_TERMS, lr_factor

ARCH = "maskrcnn_fast.MaskRCNN"


def shapes_model_kwargs(image_size: int) -> dict:
    """Model settings for small synthetic images: anchors scaled to the image, fewer RoIs, narrow heads.

    The heads are sized for the 10-minute CPU budget: 64 FPN channels, a 256-wide box MLP and four
    64-channel mask convs cost about half the FLOPs of ResNet-18-FPN's defaults (128/512/128) early in
    training and 0.3x late, when the mask branch gets its full 8 positives per image (32 sampled RoIs
    x 0.25), so more iterations fit in the budget (README: the AP-vs-iteration curve of this recipe).
    """
    s = image_size / 128
    return dict(min_size=image_size, max_size=image_size, trainable_backbone_layers=5, batch_norm=True,
                fpn_channels=64, representation_size=256, mask_layers=(64, 64, 64, 64),
                anchor_sizes=tuple(int(round(a * s)) for a in (8, 16, 32, 64, 128)),
                rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                rpn_batch_size_per_image=64, box_batch_size_per_image=32, box_detections_per_img=50)


@dataclass
class TrainConfig:
    data: str = "shapes"
    val_data: str | None = None        # default: the val split of shapes, or --data itself for COCO
    backbone: str = "resnet18"
    iters: int | None = None           # default: 2000 (shapes demo) or epochs x batches per epoch
    epochs: int | None = None
    batch_size: int = 4
    lr: float | None = None            # default: 0.02 on shapes, else 0.02 x images per step / 16 (Detectron's rule)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    schedule: str = "cosine"           # "cosine" | "multistep" (x0.1 at 2/3 and 8/9 of the run)
    clip_grad: float | None = 10.0
    amp: bool | None = None            # default: on for CUDA (bf16 where supported, else fp16 + GradScaler)
    device: str | None = None
    out: str = "runs/shapes"
    seed: int = 0
    resume: bool = False
    eval_every: int = 0                # 0: evaluate at the end only
    ckpt_every: int = 100
    workers: int | None = None         # default: 0 on CPU (shapes render faster than a worker starts), else 4
    image_size: int = 128              # shapes only
    train_images: int = 8192           # shapes only; rendered on the fly, so a fresh image almost every step
    val_images: int = 64               # shapes only
    stop_after: int | None = None      # stop (as if killed) after this iteration; for resume tests
    cuda_graphs: bool = False          # one captured step per shape bucket, replayed (maskrcnn_fast.graphs)
    gt_capacity: int = 100             # ground-truth slots per image of a bucket (--cuda-graphs)
    model_kwargs: dict = field(default_factory=dict)

    # settings that may change between a run and its resumption
    RUNTIME = ("out", "resume", "stop_after", "workers", "device", "eval_every", "ckpt_every")


def build_model(backbone: str, num_classes: int, batch_norm: bool = False, **kwargs):
    """Our Mask R-CNN. ``batch_norm=True`` swaps the backbone's frozen BN for trainable BatchNorm2d,
    as torchvision's ``maskrcnn_resnet50_fpn`` does when it starts without pretrained weights."""
    from maskrcnn_fast import maskrcnn_resnet18_fpn, maskrcnn_resnet50_fpn

    factories = {"resnet18": maskrcnn_resnet18_fpn, "resnet50": maskrcnn_resnet50_fpn}
    if backbone not in factories:
        raise UserError(f"unknown --backbone {backbone!r}; use one of {sorted(factories)}")
    try:
        model = factories[backbone](num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model settings: {e}") from None
    if batch_norm:
        _use_batch_norm(model.backbone)
    return model


def _use_batch_norm(module: torch.nn.Module) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                parent._modules[name] = torch.nn.BatchNorm2d(child.weight.numel(), eps=child.eps)


def model_config(cfg: TrainConfig, num_classes: int) -> dict:
    return {"backbone": cfg.backbone, "num_classes": num_classes, **cfg.model_kwargs}


@torch.no_grad()
def calibrate_frozen_bn(model, images: list[torch.Tensor]) -> None:
    """Set every frozen BN's mean/var to its input's statistics on ``images`` (in forward order)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    def pre_hook(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-5)

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        batch = model.transform(images, None)[0]
        model.backbone(batch)
    finally:
        for h in handles:
            h.remove()


def check_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {path} is not writable: {e.strerror or e}") from None


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics. Only rank 0 writes files."""
    from maskrcnn_fast.plots import plot_curves
    from tqdm import tqdm

    stored = None
    if cfg.resume:
        stored = checkpoint.load(os.path.join(cfg.out, "last.pt"), expect_arch=ARCH)
        runtime = {k: getattr(cfg, k) for k in TrainConfig.RUNTIME}
        cfg = TrainConfig(**{**stored["train_config"], **runtime})
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ddp = Dist(device)
    try:
        return _train(cfg, device, ddp, stored, plot_curves, tqdm)
    finally:
        ddp.close()


def _train(cfg, device, ddp, stored, plot_curves, tqdm) -> dict:
    if cfg.schedule not in ("cosine", "multistep"):
        raise UserError(f"--schedule must be cosine or multistep, got {cfg.schedule!r}")
    if ddp.main:
        check_out_dir(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_ds = build_dataset(cfg.data, "train", image_size=cfg.image_size, num_images=cfg.train_images, seed=cfg.seed)
    val_ds = build_dataset(cfg.val_data or cfg.data, "val", image_size=cfg.image_size, num_images=cfg.val_images,
                           seed=cfg.seed)
    if val_ds.num_classes != train_ds.num_classes:
        raise UserError(f"validation data has {val_ds.num_classes - 1} classes, training data {train_ds.num_classes - 1}")
    if cfg.data.startswith("shapes") and not cfg.model_kwargs:
        cfg = dataclasses.replace(cfg, model_kwargs=shapes_model_kwargs(cfg.image_size))
    model = build_model(cfg.backbone, train_ds.num_classes, **cfg.model_kwargs).to(device)
    per_epoch = len(epoch_batches(train_ds, cfg.batch_size, 0, cfg.seed, ddp.rank, ddp.world))
    total = cfg.iters or (cfg.epochs * per_epoch if cfg.epochs else 2000)
    shapes = cfg.data.startswith("shapes")
    lr = cfg.lr or (0.02 if shapes else 0.02 * cfg.batch_size * ddp.world / 16)
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    amp_dtype = None
    if amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total, cfg.warmup_iters, cfg.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start, history, best_ap, train_seconds = 0, [], -1.0, 0.0
    mcfg = model_config(cfg, train_ds.num_classes)
    if stored is not None:
        checkpoint.load_model_state(model, stored["model"], os.path.join(cfg.out, "last.pt"))
        optimizer.load_state_dict(stored["optimizer"])
        scheduler.load_state_dict(stored["scheduler"])
        scaler.load_state_dict(stored["scaler"])
        set_rng_state(stored["rng"][min(ddp.rank, len(stored["rng"]) - 1)])
        start, history, best_ap = stored["iter"], stored["history"], stored["best_ap"]
        train_seconds = stored["train_seconds"]
    elif not cfg.model_kwargs.get("batch_norm"):
        first = [train_ds[k] for k in epoch_batches(train_ds, cfg.batch_size, 0, cfg.seed)[0]]
        calibrate_frozen_bn(model, [im.to(device) for im, _ in (x for x in first if x is not None)])
    graphed = graphs.for_training(cfg, model, optimizer, scheduler, lr, total, amp_dtype, start,
                                  tqdm.write) if cfg.cuda_graphs else None
    if graphed is not None:  # NCCL cannot destroy a communicator while a captured graph that uses it lives
        ddp.before_close.append(graphed.release)
    net = model
    if ddp.world > 1 and graphed is None:  # graph mode averages gradients inside its step (graphs.py)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    workers = cfg.workers if cfg.workers is not None else (0 if device.type == "cpu" else 4)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if ddp.main:
        _truncate_log(log_path, start)
    log = open(log_path, "a") if ddp.main else None

    def save(it: int, path: str) -> None:
        states = [rng_state()]
        if ddp.world > 1:
            states = [None] * ddp.world
            dist.all_gather_object(states, rng_state())
        if ddp.main:
            checkpoint.save({"format": checkpoint.FORMAT, "arch": ARCH, "model_config": mcfg,
                             "train_config": dataclasses.asdict(cfg), "class_names": list(train_ds.class_names),
                             "label_to_cat": list(train_ds.label_to_cat), "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "rng": states, "iter": it, "history": history,
                             "best_ap": best_ap, "train_seconds": train_seconds}, path)

    def run_eval(it: int) -> dict:
        nonlocal best_ap
        state = rng_state()  # evaluation must not shift the training random stream
        metrics = evaluate(model, val_ds, device, autocast_dtype=amp_dtype)
        set_rng_state(state)
        history.append({"iter": it, "minutes": train_seconds / 60, **metrics})
        improved = metrics["segm"]["AP"] > best_ap
        best_ap = max(best_ap, metrics["segm"]["AP"])
        save(it, os.path.join(cfg.out, "last.pt"))
        if improved:
            save(it, os.path.join(cfg.out, "best.pt"))
        if ddp.main:
            tqdm.write(f"[iter {it}, {train_seconds / 60:.1f} min] " + format_metrics(metrics).replace("\n", " | "))
        return metrics

    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    bar = tqdm(total=total, initial=start, disable=not ddp.main, desc="train", dynamic_ncols=True, mininterval=1.0)
    skipped, it, metrics, loader_iter, loader_epoch = 0, start, None, None, -1
    model.train()
    try:
        while it < stop:
            epoch, pos = divmod(it, per_epoch)
            if epoch != loader_epoch:
                batches = epoch_batches(train_ds, cfg.batch_size, epoch, cfg.seed, ddp.rank, ddp.world)
                loader_iter = iter(make_loader(train_ds, batches[pos:], workers, device.type == "cuda",
                                                seed=cfg.seed * 1000 + epoch))
                loader_epoch = epoch
            t0 = time.perf_counter()
            images, targets, n_skipped = next(loader_iter)
            skipped += n_skipped
            if not ddp.all_true(bool(images)):  # a rank left with no image: all skip the step (collectives)
                skipped += len(images)
                continue
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            if graphed is not None:  # losses are read every graphs.READ_EVERY steps and before eval/save
                n = it + 1
                rows = graphed.step(images, targets, read=n in (stop, total) or any(
                    every and n % every == 0 for every in (cfg.eval_every, cfg.ckpt_every)))
            else:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = net(images, targets)
                loss = sum(losses[k] for k in LOSS_TERMS)
                # one host sync per iteration: the log needs the values, and a NaN must stop us before the step
                values = ddp.mean(torch.stack([loss.detach().float()] + [losses[k].detach().float()
                                                                         for k in LOSS_TERMS])).tolist()
                if not all(math.isfinite(v) for v in values):
                    raise _non_finite(cfg, it + 1, values)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                rows = [(it + 1, values, lr, time.perf_counter() - t0)]
            it += 1
            for row_it, values, lr, dt in rows:
                if not all(math.isfinite(v) for v in values):
                    raise _non_finite(cfg, row_it, values)
                train_seconds += dt
                img_s = len(images) * ddp.world / dt
                if ddp.main:
                    record = {"iter": row_it, "loss": values[0], **dict(zip(LOSS_TERMS, values[1:])), "lr": lr,
                              "img_s": img_s, "time_s": train_seconds}
                    if skipped:
                        record["skipped_images"] = skipped
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{values[0]:.3f}", img_s=f"{img_s:.1f}")
            bar.update(1)
            if it == total or (cfg.eval_every and it % cfg.eval_every == 0):
                metrics = run_eval(it)
            elif cfg.ckpt_every and it % cfg.ckpt_every == 0 or it == stop:
                save(it, os.path.join(cfg.out, "last.pt"))
    finally:
        bar.close()
        if log is not None:
            log.close()
    if metrics is None:  # stopped early (stop_after) or nothing left to do on resume
        metrics = history[-1] if history else None
        if it == total and metrics is None:
            metrics = run_eval(it)
    if ddp.main and metrics is not None:
        final = {"bbox": metrics["bbox"], "segm": metrics["segm"], "iter": it, "train_minutes": train_seconds / 60,
                 "skipped_images": skipped, "history": history, "config": dataclasses.asdict(cfg)}
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
        plot_curves(log_path, history, os.path.join(cfg.out, "curves.png"))
    return metrics


def _non_finite(cfg, it: int, values) -> NonFiniteLossError:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(("loss",) + LOSS_TERMS, values))
    kept = f"{cfg.out}/last.pt (iteration {_ckpt_iter(cfg.out)}) is kept" if os.path.exists(
        os.path.join(cfg.out, "last.pt")) else "no checkpoint was written"
    return NonFiniteLossError(f"non-finite loss at iteration {it}: {terms}; training stopped, {kept}")


def _ckpt_iter(out: str):
    try:
        return checkpoint.read(os.path.join(out, "last.pt")).get("iter")
    except UserError:
        return "?"


def _truncate_log(path: str, start: int) -> None:
    """Keep only records up to the resumed iteration (a killed run may have logged past its checkpoint)."""
    if not os.path.exists(path):
        return
    if start == 0:
        os.unlink(path)
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["iter"] <= start]
    with open(path, "w") as f:
        f.writelines(keep)
