"""Compile audit of exactly what launches: every kernel the ops and the model launch, compiled for sm_80 and
sm_90 with the specialization Triton's JIT gives those launches, no GPU needed.

    python bench/compile_report.py [--json FILE] [--filter TEXT] [--cases TEXT] [--model small|full|none]
                                   [--configs default|all] [--scope all|gates] [--targets 80,90] [--jobs N]

How (details in bench/audit.py and kernels/_audit.py): the public ops are called at Mask R-CNN's shapes with
``JITFunction.run`` replaced by a recorder that runs the JIT's own binder (ints == 1 -> constants, 16-byte
aligned pointers and ints divisible by 16 -> ``tt.divisibility=16``) for a CUDA target and launches nothing;
a model training step and inference run on real values (PyTorch backend) with every custom op shadowed the
same way, to mark the kernel variants the model launches (``model_path``). Each distinct specialization is
compiled once per target (``ASTSource`` + ``triton.compile``, as ``JITFunction._do_compile``; Triton's
on-disk cache makes re-runs cheap) and read: registers, local memory (stack + local bytes, LDL/STL), static
shared memory, and global load / store / atomic instructions counted by access width in bits from the SASS.

``--configs all`` also launches every entry of each op's ``get_configs()`` (what autotuning may pick on a GPU).
The hand-written ``compile_specs()`` in the op modules are no longer used: they compiled declared signatures
that no launch produces. ``--scope gates`` compiles only what tests/test_compile.py gates on, plus one
specialization of every kernel for each target (the CI subset).

Table: ``loads/stores/atomics`` read ``bits:count``; ``M`` marks a model-path kernel; tags are abbreviated
(``B``=BLOCK_, ``L``=NUM_LEVELS, ``al``=ALIGNED, ``det``=DETERMINISTIC, ``gt``=FROM_GT; the JSON has them whole). Exits 1 on any compile
failure or on local memory in a model-path kernel. ``--json`` writes one record per (specialization, target).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GATED_KERNELS = ("_roi_align_fwd_kernel", "_roi_align_bwd_kernel", "_sigmoid_bce_fwd_kernel",
                 "_sigmoid_bce_bwd_kernel", "_mask_predictor_fwd_kernel", "_mask_predictor_bwd_kernel")


def _gates_case(ctx: dict) -> bool:
    """The op cases the CI subset needs: no deterministic backward or RoIPool beyond one case each (they are
    neither gated nor on the model path, and their fixed-point epilogue is slow on CPU at these shapes)."""
    case = ctx["case"]
    one = ctx.get("dtype") == "bfloat16" and ctx.get("layout") == "cl"
    if case.endswith("bwd_det") or case.startswith("roi_pool"):
        return one and ("box7" in case or case.startswith("roi_pool"))
    return True


def _gated(launch) -> tuple[int, ...]:
    """The targets a gate of tests/test_compile.py reads this launch on (empty: none)."""
    if launch.kernel not in GATED_KERNELS:
        return ()
    if launch.kernel.startswith("_roi_align"):
        if launch.layout != "cl" or launch.declared().get("DETERMINISTIC", False):
            return ()
        return (90,) if launch.kernel == "_roi_align_bwd_kernel" else (80, 90)  # no vector float atomics on sm_80
    return (80, 90) if launch.layout == "nchw" else ()  # the mask-loss gates read contiguous planes


def collect(model: str, configs: str, scope: str, cases: str | None = None, log=print):
    """Capture, merge by specialization, mark the model path; returns the distinct launches."""
    from bench.audit import drive_model, drive_ops
    from kernels._audit import merge

    def select(ctx):
        return (scope != "gates" or _gates_case(ctx)) and (not cases or cases in ctx["case"])
    ops = drive_ops(configs, select=select, log=log)
    model_launches = drive_model(model, log=log) if model != "none" else []
    seen = {m.variant() for m in model_launches}
    for launch in ops:
        launch.model = launch.variant() in seen
    covered = {o.variant() for o in ops}
    # the full model's launches are exact; a small model's stand only for variants no op case covers
    extra = [m for m in model_launches if model == "full" or m.variant() not in covered]
    for m in extra:
        if model != "full":
            m.case += " (small-model shapes: no op case covers this variant)"
    return merge(ops + extra)


def plan(launches, targets, scope):
    """(launch, cc) pairs to compile: everything, or for ``gates`` the model path and the first specialization
    of every kernel (coverage) on every target, and the gated kernels on the targets their gate reads."""
    if scope != "gates":
        return [(l, cc) for l in launches for cc in targets]
    chosen, kernels_seen = [], set()
    for launch in launches:
        if launch.model or launch.kernel not in kernels_seen:
            chosen += [(launch, cc) for cc in targets]
            kernels_seen.add(launch.kernel)
        else:
            chosen += [(launch, cc) for cc in targets if cc in _gated(launch)]
    return chosen


_WORK: list = []


def _compile(i: int) -> dict:
    import time

    from kernels._audit import compile_row

    launch, cc = _WORK[i]
    start = time.perf_counter()
    row = compile_row(launch, cc)
    # wall seconds of this compile (Triton's on-disk cache hit: ~0; cold: what a GPU run's first launch pays,
    # which bench/run_gpu.sh's time plan is sized from)
    row["compile_s"] = round(time.perf_counter() - start, 3)
    return row


def compile_all(work, jobs: int) -> list[dict]:
    import gc
    import multiprocessing

    global _WORK
    _WORK = work
    gc.collect()
    if jobs <= 1 or len(work) <= 1:
        return [_compile(i) for i in range(len(work))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile, range(len(work)), chunksize=1)


def _fmt(counts: dict) -> str:
    return " ".join(f"{bits}:{n}" for bits, n in sorted(counts.items(), key=lambda kv: -int(kv[0]))) or "-"


_SHORT = [(r",CHANNELS_LAST=\d", ""), (r",ACC=fp32", ""), (r",BIG=[\d.e+]+", ""), (r"BLOCK_", "B"),
          (r"NUM_LEVELS=", "L"), (r"ALIGNED=", "al"), (r"DETERMINISTIC=", "det"), (r"HAS_CLASSES=", "cls"),
          (r"LOGITS_ONLY=", "logits"), (r"FROM_GT=", "gt"), (r"float32", "fp32"), (r"bfloat16", "bf16"),
          (r"float16", "fp16")]


def short_name(name: str) -> str:
    """The table's compact name[tag] (the JSON keeps the full one)."""
    import re

    for pattern, repl in _SHORT:
        name = re.sub(pattern, repl, name)
    return name


def table(rows: list[dict], width: int = 78) -> str:
    lines = [f"{'kernel[tag]':<{width}} {'sm':>3} {'regs':>4} {'local':>6} {'smem':>6}  "
             f"{'loads':<22} {'stores':<14} {'atomics':<12} M"]
    for r in rows:
        name = short_name(r["name"])
        name = name if len(name) <= width else name[:width - 1] + "~"
        if not r["ok"]:
            lines.append(f"{name:<{width}} {r['cc']:>3}  COMPILE FAILED: {r.get('error', '')[:300]}")
            continue
        g = r["global_access"]
        lines.append(f"{name:<{width}} {r['cc']:>3} {r['regs']:>4} {r['spill_bytes']:>6} {r['shared_bytes']:>6}  "
                     f"{_fmt(g['load']):<22} {_fmt(g['store']):<14} {_fmt(g['atomic']):<12} "
                     f"{'M' if r['model_path'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write one record per compiled kernel here")
    p.add_argument("--filter", help="only kernels whose name[tag] contains this")
    p.add_argument("--cases", help="only op cases whose label contains this (e.g. 'roi_pool', 'nms')")
    p.add_argument("--model", default="small", choices=("small", "full", "none"))
    p.add_argument("--configs", default="default", choices=("default", "all"))
    p.add_argument("--scope", default="all", choices=("all", "gates"))
    p.add_argument("--targets", default="80,90")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces @triton.jit functions
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.path.insert(0, str(ROOT))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    launches = collect(args.model, args.configs, args.scope, args.cases, log=log)
    if args.filter:
        launches = [l for l in launches if args.filter in l.name()]
    targets = [int(t) for t in args.targets.split(",")]
    work = plan(launches, targets, args.scope)
    log(f"{len(launches)} distinct specializations; compiling {len(work)} for sm_{'/sm_'.join(map(str, targets))}")
    rows = sorted(compile_all(work, args.jobs), key=lambda r: (r["kernel"], r["name"], r["cc"]))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failures = [r for r in rows if not r["ok"]]
    local = [r for r in rows if r["ok"] and r["model_path"] and r["spill_bytes"] > 0]
    print(f"\n{len(rows)} compiled kernels ({len({r['name'] for r in rows})} specializations), {len(failures)} "
          f"failures, {len(local)} model-path kernels with local memory")
    for r in local:
        print(f"  local memory: {r['name']} sm_{r['cc']}: {r['spill_bytes']} bytes/thread")
    return 1 if failures or local or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
