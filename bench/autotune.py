"""Live autotuning on a GPU: sweep every op's configs over shape buckets, keep the fastest.

    python bench/autotune.py [--op NAME] [--shapes maskrcnn|sweep] [--out kernels/configs/<gpu>.json]

Each op's launcher asks ``kernels._config.pick(op, bucket, configs)`` for its config; this script
forces each candidate in turn through that hook, times the whole launcher (which allocates fresh,
zeroed accumulators, so atomic buffers are reset between trials) with ``triton.testing.do_bench``,
and writes ``{"gpu": name, "ops": {op: {bucket: best_config}}}`` -- the file the kernels load at
import for that GPU. Deterministic and atomic backward variants are separate ops, tuned separately.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _boxes(n, size, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    xy = torch.rand(n, 2, device=device, generator=g) * torch.tensor(size[::-1], device=device) * 0.8
    return torch.cat([xy, xy + 8 + torch.rand(n, 2, device=device, generator=g) * 200], 1)


def cases(shapes: str, device: str):
    """(op, bucket, configs, fn) for every tunable launch; ``fn`` runs the public op once."""
    import kernels
    from kernels import mask_loss, nms, roi_align, roi_pool

    scale = [1, 2] if shapes == "sweep" else [1]
    out = []
    for s in scale:
        img = (800, 1216)
        feats = [torch.randn(2, 256, img[0] // st, img[1] // st, device=device, dtype=torch.bfloat16)
                 .contiguous(memory_format=torch.channels_last).requires_grad_() for st in (4, 8, 16, 32)]
        boxes = [_boxes(512 * s, img, device, i) for i in range(2)]
        scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        for size, bucket in ((7, "p64"), (14, "p256")):
            fwd = lambda size=size: kernels.multiscale_roi_align(feats, boxes, size, scales, 2)  # noqa: E731
            out.append(("roi_align_fwd", bucket, roi_align._CONFIGS, fwd))
            for det, op in ((False, "roi_align_bwd"), (True, "roi_align_bwd_det")):
                y = kernels.multiscale_roi_align(feats, boxes, size, scales, 2, deterministic=det)
                grad = torch.ones_like(y)
                out.append((op, bucket, roi_align._CONFIGS,
                            lambda y=y, grad=grad: torch.autograd.grad(y, feats, grad, retain_graph=True)))
        x = feats[0]
        out.append(("roi_pool_fwd", "p64", roi_pool._CONFIGS, lambda: kernels.roi_pool(x, boxes, 7, 0.25)))
        for det, op in ((False, "roi_pool_bwd"), (True, "roi_pool_bwd_det")):
            y = kernels.roi_pool(x, boxes, 7, 0.25, deterministic=det)
            out.append((op, "p64", roi_pool._CONFIGS,
                        lambda y=y: torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)))
        b = _boxes(10_000 * s, img, device, 7)
        sc = torch.rand(10_000 * s, device=device)
        idx = torch.randint(0, 80, (10_000 * s,), device=device)
        out.append(("nms", "all", nms._CONFIGS, lambda: kernels.batched_nms(b, sc, idx, 0.5)))
        R, K, M = 128 * s, 80, 28
        logits = torch.randn(R, K, M, M, device=device, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, K, (R,), device=device)
        targets = (torch.rand(R, M, M, device=device) > 0.5).float()
        loss_fn = lambda: kernels.sigmoid_bce_mask_loss(logits, labels, targets).backward()  # noqa: E731
        for op in ("sigmoid_bce_mask_loss_fwd", "sigmoid_bce_mask_loss_bwd"):
            out.append((op, f"p{M * M}", mask_loss._LOSS_CONFIGS, loss_fn))
        feat = torch.randn(R, 256, M, M, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(K, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.zeros(K, device=device, dtype=torch.bfloat16, requires_grad=True)
        pred_fn = lambda: kernels.mask_predictor_loss(feat, w, bias, labels, targets).backward()  # noqa: E731
        for op in ("mask_predictor_fwd", "mask_predictor_bwd"):
            out.append((op, f"p{M * M}", mask_loss._PREDICTOR_CONFIGS, pred_fn))
    return out


@contextmanager
def forced(op: str, config: dict):
    """Make ``_config.pick`` return ``config`` for ``op`` (other ops keep their defaults)."""
    from kernels import _config

    original = _config.pick

    def pick(name, bucket, configs, default=None):  # the signature of _config.pick
        return config if name == op else (default if default is not None else configs[0])
    _config.pick = pick
    try:
        yield
    finally:
        _config.pick = original


def do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def tune(all_cases, op_filter=None, timer=do_bench, log=print) -> dict:
    best: dict = {}
    for op, bucket, configs, fn in all_cases:
        if op_filter and op_filter not in op:
            continue
        timings = []
        for config in configs:
            with forced(op, config):
                try:
                    timings.append((timer(fn), config))
                except Exception as e:  # a config that fails to launch is skipped, loudly
                    log(f"  {op}/{bucket} {config}: failed ({type(e).__name__}: {e})")
        if not timings:
            continue
        ms, config = min(timings, key=lambda t: t[0])
        log(f"{op:<28} {bucket:<6} best {ms * 1e3:9.1f} us  {config}  (default {timings[0][0] * 1e3:.1f} us)")
        prev = best.setdefault(op, {}).get(bucket)
        if prev is None or ms < prev[0]:
            best[op][bucket] = (ms, config)
    return {op: {b: cfg for b, (_, cfg) in buckets.items()} for op, buckets in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", help="tune only ops whose name contains this")
    p.add_argument("--shapes", choices=["maskrcnn", "sweep"], default="maskrcnn")
    p.add_argument("--out", help="output file (default kernels/configs/<gpu-slug>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune: needs a CUDA GPU (nothing to time on CPU); defaults stay in use", file=sys.stderr)
        return 2
    from kernels import _config

    gpu = torch.cuda.get_device_name()
    ops = tune(cases(args.shapes, "cuda"), args.op)
    out = Path(args.out or _config.CONFIG_DIR / f"{_config.gpu_slug(gpu)}.json")
    if out.exists():  # keep other ops' entries when tuning one op
        try:
            old = json.loads(out.read_text()).get("ops", {})
            old.update(ops)
            ops = old
        except ValueError:
            pass
    out.write_text(json.dumps({"gpu": gpu, "ops": ops}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
