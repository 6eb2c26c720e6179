"""Command line: ``python -m maskrcnn_fast [train|eval|predict|ablate|selfcheck] ...``.

With no arguments it runs ``train`` with its defaults: the embedded shapes demo, sized for a
2-core CPU. Bad input (paths, files, options) exits with status 2 and one ``error:`` line, no
traceback; a non-finite loss exits with status 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from maskrcnn_fast.errors import NonFiniteLossError, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UserError(f"{self.prog}: {message}")


def _add_common(p, out_default: str | None):
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--out", default=out_default, help="output folder")


def _add_train_args(p):
    from maskrcnn_fast.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", default=d.data, help="shapes | coco:ANNOTATIONS.json:IMAGE_DIR | coins")
    p.add_argument("--val-data", default=None, help="evaluation data (default: shapes val, or --data itself)")
    p.add_argument("--backbone", default=d.backbone, choices=["resnet18", "resnet50"])
    p.add_argument("--iters", type=int, default=None, help="training iterations (default 2000 on shapes)")
    p.add_argument("--epochs", type=int, default=None, help="instead of --iters")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per iteration per process")
    p.add_argument("--lr", type=float, default=None, help="base lr (default 0.02 on shapes, else 0.02 x batch / 16)")
    p.add_argument("--schedule", default=d.schedule, choices=["cosine", "multistep"])
    p.add_argument("--warmup", type=int, default=d.warmup_iters, help="linear warm-up iterations")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA: bf16, or fp16 + GradScaler (default: on with CUDA)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture one training step per shape bucket in a CUDA graph and replay it "
                        "(bf16 or fp32; with torchrun the step averages gradients itself; on CPU it runs uncaptured)")
    p.add_argument("--gt-capacity", type=int, default=d.gt_capacity,
                   help="ground-truth objects per image a bucket holds (--cuda-graphs)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.pt")
    p.add_argument("--eval-every", type=int, default=None, help="iterations between COCO evaluations")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, 4 on CUDA)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="shapes image size")
    p.add_argument("--train-images", type=int, default=d.train_images, help="shapes training images")
    p.add_argument("--val-images", type=int, default=d.val_images, help="shapes validation images")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    _add_common(p, d.out)


def _train_config(args):
    from maskrcnn_fast.train import TrainConfig

    for name in ("iters", "epochs", "batch_size", "image_size", "train_images", "val_images", "gt_capacity"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    eval_every = args.eval_every
    if eval_every is None:  # the demo reports its AP-vs-time curve
        eval_every = 400 if args.data == "shapes" else 0
    return TrainConfig(data=args.data, val_data=args.val_data, backbone=args.backbone, iters=args.iters,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                       warmup_iters=args.warmup, clip_grad=args.clip_grad or None, amp=args.amp,
                       device=args.device, out=args.out, seed=args.seed, resume=args.resume,
                       eval_every=eval_every, workers=args.workers, image_size=args.image_size,
                       train_images=args.train_images, val_images=args.val_images, stop_after=args.stop_after,
                       cuda_graphs=args.cuda_graphs, gt_capacity=args.gt_capacity)


def cmd_train(args) -> int:
    """Train Mask R-CNN (default: the shapes demo on CPU) and report COCO metrics."""
    from maskrcnn_fast.evaluate import format_metrics
    from maskrcnn_fast.train import train

    cfg = _train_config(args)
    print(f"maskrcnn-fast train: data={cfg.data} backbone={cfg.backbone} out={cfg.out}", flush=True)
    metrics = train(cfg)
    if metrics is not None and int(os.environ.get("RANK", "0")) == 0:
        print(format_metrics(metrics))
        print(f"wrote {cfg.out}/log.jsonl, last.pt, best.pt, metrics.json, curves.png")
    return 0


def cmd_eval(args) -> int:
    """Evaluate a checkpoint with COCOeval (bbox and segm); prints and writes metrics.json."""
    import torch

    from maskrcnn_fast.data import build_dataset
    from maskrcnn_fast.evaluate import evaluate, format_metrics
    from maskrcnn_fast.predict import load_model
    from maskrcnn_fast.distributed import pick_device
    from maskrcnn_fast.train import check_out_dir

    from maskrcnn_fast import checkpoint

    if args.out:
        check_out_dir(args.out)
    raw = checkpoint.read(args.checkpoint)
    tc = raw.get("train_config", {}) if checkpoint.is_ours(raw) else {}
    data = args.data or tc.get("val_data") or tc.get("data") or "shapes"
    ds = build_dataset(data, "val", image_size=tc.get("image_size", 128), num_images=tc.get("val_images"),
                       seed=tc.get("seed", 0))
    device = pick_device(args.device, 0)
    model, _, _, _ = load_model(args.checkpoint, device, expect_num_classes=ds.num_classes)
    with torch.no_grad():
        metrics = evaluate(model, ds, device, batch_size=args.batch_size)
    print(format_metrics(metrics))
    if args.out:
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump({**metrics, "checkpoint": args.checkpoint, "data": data}, f, indent=1)
        print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    return 0


def cmd_predict(args) -> int:
    """Detect and segment objects in images: COCO result JSON (RLE masks) + PNG overlays."""
    from maskrcnn_fast.predict import predict
    from maskrcnn_fast.distributed import pick_device

    path = predict(args.checkpoint, args.images, args.out, pick_device(args.device, 0), args.score_thresh)
    print(f"wrote {path} and overlays in {args.out}")
    return 0


def cmd_ablate(args) -> int:
    """The paper's ablations on shapes, several seeds each: RoIAlign/RoIPool (FPN levels and stride 32),
    sigmoid/softmax, FCN/MLP mask head. Resumes where it stopped; --background detaches it."""
    from maskrcnn_fast.ablate import ABLATE_ITERS, ablate, launch_background

    cfg = _train_config(args)
    if cfg.iters is None:
        cfg.iters = ABLATE_ITERS
    if args.eval_every is None:
        cfg.eval_every = 0
    if not cfg.data.startswith("shapes"):
        raise UserError("ablate runs on the shapes data only")
    if args.background:
        launch_background(sys.argv[1:] if args.argv is None else args.argv, cfg.out)
        return 0
    ablate(cfg, args.only, args.seeds, args.jobs)
    return 0


def cmd_selfcheck(args) -> int:
    """Run every kernel on small random inputs and compare with torchvision."""
    from maskrcnn_fast.selfcheck import run

    return run(args.device, args.backend)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskrcnn-fast", description="The fastest readable Mask R-CNN. "
                     "Without a command: train the shapes demo on CPU.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_train_args(sub.add_parser("train", help=cmd_train.__doc__))
    sub.choices["train"].set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="default: the checkpoint's validation data")
    p.add_argument("--batch-size", type=int, default=8)
    _add_common(p, None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help=cmd_predict.__doc__)
    p.add_argument("--checkpoint", required=True, help="maskrcnn-fast checkpoint or torchvision Mask R-CNN weights")
    p.add_argument("images", nargs="+")
    p.add_argument("--score-thresh", type=float, default=0.5, help="overlay threshold")
    _add_common(p, "predictions")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ablate", help=cmd_ablate.__doc__)
    _add_train_args(p)
    p.set_defaults(out="runs/ablate")
    p.add_argument("--only", nargs="*", default=None,
                   help="variants to run besides the baseline (substrings): roipool stride softmax mlp")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (seed, seed+1, ...)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with cores/jobs torch threads")
    p.add_argument("--background", action="store_true",
                   help="run detached, logging to OUT/ablate.log; progress in OUT/progress.txt")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("selfcheck", help=cmd_selfcheck.__doc__)
    p.add_argument("--backend", choices=("auto", "triton", "torch", "all"), default="auto",
                   help="auto: the Triton kernels on CUDA; on CPU both the PyTorch backend and the Triton "
                        "kernels in Triton's interpreter (a child process with TRITON_INTERPRET=1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv  # ablate --background re-runs the same command
        if args.command is None:
            args = parser.parse_args(["train"])
        return args.func(args)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are intact (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
