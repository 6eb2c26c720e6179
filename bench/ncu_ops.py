"""Nsight Compute targets: RoIAlign forward/backward, NMS and the mask loss at Mask R-CNN's shapes, one profiled
call each, and the summary of ncu's CSV (achieved DRAM bandwidth as % of peak, local-memory traffic).

    ncu --profile-from-start off --metrics ... --csv python bench/ncu_ops.py > ncu.csv   # on a CUDA GPU
    python bench/ncu_ops.py --summarize ncu.csv [--out ncu.md]                          # anywhere

Every op runs once un-profiled first (Triton compiles, the allocator warms up); the profiled calls sit between
``cudaProfilerStart``/``Stop`` so ncu sees only them. bench/run_gpu.sh runs both halves.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram__bytes_read.sum",
           "dram__bytes_write.sum", "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
           "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum", "launch__registers_per_thread",
           "sm__warps_active.avg.pct_of_peak_sustained_active")
KERNELS = "regex:roi_align|nms|sigmoid_bce|mask_predictor"


def cases(dev: str = "cuda"):
    """(label, fn) at model shapes: 2 images 800x1216, FPN P2-P5 with 256 channels, bf16 channels_last."""
    import torch

    import kernels
    from bench.audit import BOX_ROIS, CLASSES, LEVELS, MASK_ROIS, SCALES, _rois

    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 256, h, w, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
             .requires_grad_(True) for h, w in LEVELS]
    rois = _rois(BOX_ROIS, gen).to(dev)
    out = kernels.multiscale_roi_align(feats, rois, 7, SCALES, sampling_ratio=2)
    grad = torch.randn_like(out)
    xy = torch.rand(10_000, 2, generator=gen) * 1000
    boxes = torch.cat([xy, xy + 10 + torch.rand(10_000, 2, generator=gen) * 200], 1).to(dev)
    scores, idxs = torch.rand(10_000, device=dev), torch.randint(0, 80, (10_000,), device=dev)
    logits = torch.randn(MASK_ROIS, CLASSES, 28, 28, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(1, CLASSES, (MASK_ROIS,), device=dev)
    targets = torch.rand(MASK_ROIS, 28, 28, device=dev)
    return [
        ("roi_align fwd box7 bf16 cl", lambda: kernels.multiscale_roi_align(feats, rois, 7, SCALES, sampling_ratio=2)),
        ("roi_align bwd box7 bf16 cl", lambda: torch.autograd.grad(out, feats, grad, retain_graph=True)),
        ("batched_nms 10k x 80", lambda: kernels.batched_nms(boxes, scores, idxs, 0.5)),
        ("sigmoid_bce_mask_loss fwd+bwd bf16", lambda: torch.autograd.grad(
            kernels.sigmoid_bce_mask_loss(logits, labels, targets, check_targets=False), logits)),
    ]


def profile() -> int:
    import torch

    if not torch.cuda.is_available():
        print("ncu_ops.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    todo = cases()
    for _, fn in todo:  # warm-up: compile, allocate
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, fn in todo:
        torch.cuda.nvtx.range_push(label)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


def parse(text: str) -> list[dict]:
    """ncu ``--csv`` output (long: one row per metric, or ``--page raw``: one row per kernel) -> one dict per
    profiled kernel: ``{"kernel": name, metric: float}``."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        return []
    # ncu (and the profiled program) may interleave "==PROF==" and other lines with the CSV rows
    rows = list(csv.DictReader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
    kernels: dict[str, dict] = {}

    def num(v):
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return None

    for r in rows:
        k = kernels.setdefault(r["ID"], {"kernel": r.get("Kernel Name", "?")})
        if "Metric Name" in r:
            k[r["Metric Name"]] = num(r.get("Metric Value"))
        else:
            k.update({m: num(r[m]) for m in METRICS if m in r})
    return list(kernels.values())


def summarize(path: str, out: str | None) -> int:
    kernels = parse(Path(path).read_text(errors="replace"))
    head = ("| kernel | time (µs) | DRAM % of peak | DRAM read MB | DRAM write MB | local ld / st bytes | regs | "
            "occupancy % |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for k in kernels:
        def g(m, scale=1.0, fmt="{:.1f}"):
            v = k.get(m)
            return "n/a" if v is None else fmt.format(v * scale)
        local = f"{g(METRICS[4], fmt='{:.0f}')} / {g(METRICS[5], fmt='{:.0f}')}"
        lines.append(f"| {k['kernel'][:60]} | {g(METRICS[0], 1e-3)} | {g(METRICS[1])} | {g(METRICS[2], 1e-6)} | "
                     f"{g(METRICS[3], 1e-6)} | {local} | {g(METRICS[6], fmt='{:.0f}')} | {g(METRICS[7])} |")
    text = "\n".join(lines) + ("\n" if kernels else "\n(no profiled kernels in the CSV)\n")
    if out:
        Path(out).write_text(text)
    print(text, end="")
    return 0 if kernels else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", metavar="CSV", help="summarize an ncu CSV instead of running the ops")
    p.add_argument("--out", help="with --summarize: also write the markdown table here")
    p.add_argument("--print-metrics", action="store_true", help="print the ncu --metrics list and the kernel regex")
    args = p.parse_args(argv)
    if args.print_metrics:
        print(",".join(METRICS), KERNELS)
        return 0
    if args.summarize:
        return summarize(args.summarize, args.out)
    sys.path.insert(0, str(ROOT))
    return profile()


if __name__ == "__main__":
    sys.exit(main())
