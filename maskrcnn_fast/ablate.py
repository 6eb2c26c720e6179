"""The paper's three ablations (He et al., 2017, Table 2) on shapes, several seeds per variant.

    RoIAlign vs RoIPool, FPN levels    (pooler)                 Table 2c
    RoIAlign vs RoIPool, stride 32     (pooler, pool_level=3)   Table 2c, the stride-32 rows
    sigmoid vs softmax masks           (mask_loss)              Table 2b
    FCN vs MLP mask head               (mask_head)              Table 2e

Every variant changes one switch of the baseline (RoIAlign, sigmoid, FCN, FPN levels) and trains
with the same data, iterations and schedule, once per seed (the seed sets the weights, the sample
order and the generated data, so a seed is a paired trial across variants). The stride-32 pair
pools every RoI from P5 (4x4 cells on a 128 px image), where RoIPool's rounding of boxes and bins
to whole cells costs most, as in the paper's stride-32 ResNet-50-C5 row.

Resumable: run ``seed`` of variant ``v`` lives in ``OUT/<v>/seed<seed>/``. A run whose
``metrics.json`` holds the requested budget is done and skipped; a run with only ``last.pt`` was
interrupted and resumes from it exactly (see :mod:`maskrcnn_fast.train`); the rest start fresh.
``OUT/progress.txt`` is rewritten after every run. The table (``ablation.md``), the numbers
(``ablation.json``) and the plot (``ablation.png``) are rewritten from all finished runs.

The softmax variant also gets a diagnostic, stored beside its score and never in place of it:
COCO AP with each mask pixel scored 1 - p(background) instead of p(detected class), and the largest
class probability of any pixel over all detections (see the README's ablation section).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

import kernels

from maskrcnn_fast.errors import UserError
from maskrcnn_fast.plots import plot_ablation
from maskrcnn_fast.train import TrainConfig, check_out_dir, shapes_model_kwargs, train

BASELINE = "baseline (RoIAlign, sigmoid, FCN)"
VARIANTS = (
    (BASELINE, {}),
    ("RoIPool", {"pooler": "roi_pool"}),
    ("RoIAlign, stride 32", {"pool_level": 3}),
    ("RoIPool, stride 32", {"pooler": "roi_pool", "pool_level": 3}),
    ("softmax masks", {"mask_loss": "softmax"}),
    ("MLP mask head", {"mask_head": "mlp"}),
)
COMPARISONS = (  # (comparison, reference variant, variant)
    ("RoIAlign vs RoIPool (FPN levels)", BASELINE, "RoIPool"),
    ("RoIAlign vs RoIPool (stride 32)", "RoIAlign, stride 32", "RoIPool, stride 32"),
    ("sigmoid vs softmax", BASELINE, "softmax masks"),
    ("FCN vs MLP mask head", BASELINE, "MLP mask head"),
)
METRICS = ("AP", "AP50", "AP75")
# the default budget per run: the demo's schedule, at whose end the baseline's curve flattens (cosine
# decay to 0); 1 h 53 min for 6 variants x 3 seeds with --jobs 2 on the 2-core CPU (README)
ABLATE_ITERS = 2000


def slug(name: str) -> str:
    return name.split(" (")[0].lower().replace(",", "").replace(" ", "_")


def selected(only: list[str] | None) -> list[tuple[str, dict]]:
    """The baseline plus the variants named in ``only`` (None: all). A name equal to a variant's slug
    picks that variant alone (``roipool`` is not also ``roipool_stride_32``); any other name is a
    case-insensitive substring (``stride`` picks both stride-32 variants)."""
    if not only:
        return list(VARIANTS)
    wanted = set()
    for o in only:
        o = o.lower()
        exact = [name for name, _ in VARIANTS[1:] if slug(name) == o]
        wanted.update(exact or [name for name, _ in VARIANTS[1:] if o in name.lower()])
    if not wanted:
        raise UserError(f"--only {' '.join(only)} names no variant; variants: "
                        + ", ".join(slug(n) for n, _ in VARIANTS[1:]))
    return [v for v in VARIANTS if v[0] == BASELINE or v[0] in wanted]


# ---------------------------------------------------------------------- one run
def _finished(out: str, cfg: TrainConfig) -> dict | None:
    """The stored metrics of a run that completed this budget, else None; a finished run of
    another budget or model in the same folder is an error, not something to mix in."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    stored = saved.get("config", {})
    want = dataclasses.asdict(cfg)
    diffs = [k for k in ("iters", "batch_size", "lr", "image_size", "train_images", "val_images", "seed")
             if stored.get(k) != want[k]]
    if json.loads(json.dumps(want["model_kwargs"])) != stored.get("model_kwargs"):
        diffs.append("model_kwargs")
    if diffs:
        raise UserError(f"{out} holds a finished run with other settings ({', '.join(diffs)}); "
                        "use another --out or delete it")
    return saved if saved.get("iter") == cfg.iters else None


@torch.no_grad()
def softmax_diagnostic(run_dir: str, cfg: TrainConfig) -> dict:
    """COCO AP of the trained softmax model with masks scored 1 - p(background), and the largest
    p(detected class) of any mask pixel over all validation detections."""
    from maskrcnn_fast.data import build_dataset
    from maskrcnn_fast.evaluate import evaluate
    from maskrcnn_fast.predict import load_model

    path = os.path.join(run_dir, "diagnostic.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    val = build_dataset(cfg.data, "val", image_size=cfg.image_size, num_images=cfg.val_images, seed=cfg.seed)
    model, _, _, _ = load_model(os.path.join(run_dir, "last.pt"), "cpu", expect_num_classes=val.num_classes)
    largest, detections = 0.0, 0
    for i in range(len(val)):
        out = model([val[i][0]])[0]
        detections += len(out["scores"])
        if len(out["scores"]):
            largest = max(largest, float(out["masks"].max()))
    model.roi_heads.softmax_foreground = True
    metrics = evaluate(model, val, "cpu")
    diag = {"foreground_segm": metrics["segm"], "largest_class_prob": largest, "detections": detections}
    with open(path, "w") as f:
        json.dump(diag, f, indent=1)
    return diag


# ---------------------------------------------------------------------- summary
def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per variant: mean and sample standard deviation over its seeds of every reported metric."""
    rows = []
    for name, switches in VARIANTS:
        done = runs.get(name, [])
        if not done:
            continue
        row = {"name": name, "switches": switches, "seeds": [r["seed"] for r in done], "runs": done}
        for kind in ("segm", "bbox"):
            for m in METRICS:
                vals = [r[kind][m] for r in done]
                row.setdefault("mean", {}).setdefault(kind, {})[m] = statistics.fmean(vals)
                row.setdefault("std", {}).setdefault(kind, {})[m] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        diags = [r["diagnostic"] for r in done if "diagnostic" in r]
        if diags:
            fg = [d["foreground_segm"] for d in diags]
            row["diagnostic"] = {
                "foreground_segm_mean": {m: statistics.fmean(d[m] for d in fg) for m in METRICS},
                "foreground_segm_std": {m: statistics.stdev([d[m] for d in fg]) if len(fg) > 1 else 0.0
                                        for m in METRICS},
                "largest_class_prob": [d["largest_class_prob"] for d in diags],
                "detections": [d["detections"] for d in diags]}
        rows.append(row)
    return rows


PAIRED = (("segm", "AP", "mask AP"), ("segm", "AP75", "mask AP75"), ("bbox", "AP", "box AP"))


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per comparison, over the seeds both settings finished (a seed is a paired trial: same initial
    weights, data and sample order): reference minus variant of mask AP, mask AP75 and box AP, their
    mean and sample std, and on how many seeds the reference was ahead."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for comparison, ref, variant in COMPARISONS:
        if ref not in by_name or variant not in by_name:
            continue
        a = {r["seed"]: r for r in by_name[ref]["runs"]}
        b = {r["seed"]: r for r in by_name[variant]["runs"]}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        entry = {"comparison": comparison, "reference": ref, "variant": variant, "seeds": seeds, "diff": {}}
        for kind, m, label in PAIRED:
            d = [a[s][kind][m] - b[s][kind][m] for s in seeds]
            entry["diff"][label] = {"per_seed": d, "mean": statistics.fmean(d),
                                    "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                                    "reference_ahead": sum(x > 0 for x in d)}
        out.append(entry)
    return out


def _cell(row: dict, kind: str, m: str) -> str:
    return f"{100 * row['mean'][kind][m]:.1f} ± {100 * row['std'][kind][m]:.1f}"


def markdown_table(rows: list[dict], base: TrainConfig, seeds: int) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = ["| comparison | setting | seeds | mask AP | mask AP50 | mask AP75 | box AP | box AP50 | box AP75 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for comparison, ref, variant in COMPARISONS:
        if ref in by_name and variant in by_name:
            for label, r in ((comparison, by_name[ref]), ("", by_name[variant])):
                cells = [_cell(r, "segm", m) for m in METRICS] + [_cell(r, "bbox", m) for m in METRICS]
                lines.append(f"| {label} | {r['name']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines.append("")
    for e in paired_differences(rows):
        parts = [f"{label} {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} (ahead on {d['reference_ahead']}/"
                 f"{len(e['seeds'])})" for label, d in e["diff"].items()]
        lines.append(f"Paired by seed, {e['reference']} minus {e['variant']}: " + "; ".join(parts) + ".")
        lines.append("")
    for r in rows:
        if "diagnostic" in r:
            d = r["diagnostic"]
            fg = " / ".join(f"{100 * d['foreground_segm_mean'][m]:.1f} ± {100 * d['foreground_segm_std'][m]:.1f}"
                            for m in METRICS)
            lines.append(f"Diagnostic, not a score: {r['name']} with masks scored 1 - p(background): mask AP / "
                         f"AP50 / AP75 {fg}; largest p(class) of any mask pixel per seed: "
                         + ", ".join(f"{p:.3f}" for p in d["largest_class_prob"])
                         + " (over " + ", ".join(str(n) for n in d["detections"]) + " detections).")
            lines.append("")
    lines.append(f"Mean ± sample std over seeds {base.seed}..{base.seed + seeds - 1}. Shapes val ({base.val_images} "
                 f"images, {base.image_size} px), {base.backbone}-FPN from scratch, {base.iters} iterations x batch "
                 f"{base.batch_size} per run, lr {base.lr or 0.02}, {base.schedule} schedule; COCO AP (%) from "
                 "pycocotools' COCOeval at the end of each run.")
    return "\n".join(lines) + "\n"


def write_report(out: str, rows: list[dict], base: TrainConfig, seeds: int) -> str:
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(base), "seeds": seeds, "variants": rows,
                   "paired_differences": paired_differences(rows)}, f, indent=1)
    table = markdown_table(rows, base, seeds)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table)
    plot_ablation(rows, os.path.join(out, "ablation.png"))
    return table


# ---------------------------------------------------------------------- driver
def _run_one(cfg: TrainConfig, softmax: bool, threads: int | None = None,
             backend: str | None = None) -> tuple[dict | None, dict | None]:
    """Train one (variant, seed) run and, for a finished softmax run, its diagnostic. In a worker
    process (``threads`` set) torch gets that many threads, the parent's forced kernel backend holds,
    and the run's output goes to RUN/train.log."""
    if threads is None:
        metrics = train(cfg)
        return metrics, softmax_diagnostic(cfg.out, cfg) if metrics is not None and softmax else None
    torch.set_num_threads(threads)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "train.log"), "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            (kernels.use_backend(backend) if backend else contextlib.nullcontext()):
        return _run_one(cfg, softmax)


def ablate(base: TrainConfig, only: list[str] | None = None, seeds: int = 3, jobs: int = 1) -> list[dict]:
    """Train every (variant, seed) under ``base.out``, skipping finished runs and resuming
    interrupted ones; write progress, table, numbers and plot; return the summary rows.

    Runs go seed by seed (every variant's seed 0 first), so a partial ablation already pairs every
    variant with the baseline. ``jobs`` > 1 trains that many runs at once in worker processes with
    cores / jobs torch threads each: on 2 cores, two 1-thread runs finish more runs per hour than one
    2-thread run, whose small convolutions do not use two threads fully (README)."""
    check_out_dir(base.out)
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    model_kwargs = base.model_kwargs or shapes_model_kwargs(base.image_size)
    plan = [(name, switches, base.seed + k) for k in range(seeds) for name, switches in selected(only)]
    results: dict[int, dict] = {}
    status = ["pending"] * len(plan)
    table = ""
    started = time.time()

    def progress() -> None:
        done = sum(s.startswith("done") for s in status)
        lines = [f"ablation {done}/{len(plan)} runs done, {(time.time() - started) / 60:.1f} min in this session"]
        for (name, _, seed), s in zip(plan, status):
            lines.append(f"{'>' if s.startswith(('running', 'resuming')) else ' '} {name:<34} seed {seed}: {s}")
        with open(os.path.join(base.out, "progress.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def by_variant() -> dict[str, list[dict]]:  # finished runs per variant, in seed order
        runs: dict[str, list[dict]] = {}
        for k in sorted(results, key=lambda k: (plan[k][2], k)):
            runs.setdefault(plan[k][0], []).append(results[k])
        return runs

    def finish(i: int, metrics: dict | None, diag: dict | None) -> None:
        nonlocal table
        if metrics is None:  # stopped before the end (stop_after): not a result
            status[i] = "stopped"
            progress()
            return
        result = {"seed": plan[i][2], "bbox": metrics["bbox"], "segm": metrics["segm"]}
        if diag is not None:
            result["diagnostic"] = diag
        results[i] = result
        status[i] = f"done: mask AP {100 * metrics['segm']['AP']:.1f}, box AP {100 * metrics['bbox']['AP']:.1f}"
        progress()
        table = write_report(base.out, summarize(by_variant()), base, seeds)  # partial results stay readable

    def is_softmax(i: int) -> bool:  # a softmax run also gets its diagnostic
        return plan[i][1].get("mask_loss") == "softmax"

    todo = []
    for i, (name, switches, seed) in enumerate(plan):
        cfg = dataclasses.replace(base, out=os.path.join(base.out, slug(name), f"seed{seed}"), seed=seed,
                                  resume=False, model_kwargs={**model_kwargs, **switches})
        metrics = _finished(cfg.out, cfg)
        if metrics is None:
            todo.append((i, cfg))
        else:  # finished earlier; a softmax run's diagnostic is computed once and stored
            finish(i, metrics, softmax_diagnostic(cfg.out, cfg) if is_softmax(i) else None)

    def start(i: int, cfg: TrainConfig) -> TrainConfig:
        resume = os.path.exists(os.path.join(cfg.out, "last.pt"))
        status[i] = "resuming from last.pt" if resume else "running"
        progress()
        name, switches, seed = plan[i]
        print(f"== [{i + 1}/{len(plan)}] {name}, seed {seed}: {switches or 'paper defaults'}"
              + (" (resuming)" if resume else "") + (f" -> {cfg.out}/train.log" if jobs > 1 else ""), flush=True)
        return dataclasses.replace(cfg, resume=resume)

    if jobs == 1:
        for i, cfg in todo:
            finish(i, *_run_one(start(i, cfg), is_softmax(i)))
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        forced = kernels._backend._forced
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            running = {}
            while todo or running:
                while todo and len(running) < jobs:  # submit only what runs now, so status is true
                    i, cfg = todo.pop(0)
                    running[pool.submit(_run_one, start(i, cfg), is_softmax(i), threads, forced)] = i
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    finish(running.pop(fut), *fut.result())
    print(table)
    return summarize(by_variant())


def launch_background(argv: list[str], out: str) -> int:
    """Re-run this ablate command detached (survives the shell), logging to ``OUT/ablate.log``."""
    check_out_dir(out)
    log_path, pid_path = os.path.join(out, "ablate.log"), os.path.join(out, "ablate.pid")
    if os.path.exists(pid_path):  # two drivers in one folder would train the same runs twice
        with open(pid_path) as f:
            old = int(f.read().strip() or 0)
        try:
            os.kill(old, 0)
        except (OSError, ValueError):
            pass
        else:
            raise UserError(f"an ablation (pid {old}) is already running in {out}; see {out}/progress.txt")
    args = [a for a in argv if a != "--background"]
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "maskrcnn_fast", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    with open(pid_path, "w") as f:
        f.write(str(proc.pid))
    print(f"ablation running in the background (pid {proc.pid}); progress: {out}/progress.txt, log: {log_path}; "
          "rerun the same command to resume after an interruption")
    return proc.pid
