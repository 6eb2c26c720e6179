"""The ablation driver at a tiny budget: every variant and seed runs, mean ± std over seeds lands in
the table/JSON/plot, the softmax diagnostic is reported beside (not instead of) its score, and an
interrupted ablation resumes: finished runs are skipped, the killed run continues from its last.pt."""
import dataclasses
import json
import os
import statistics
import sys

import pytest

import kernels
from maskrcnn_fast import ablate as ablate_mod
from maskrcnn_fast.ablate import COMPARISONS, VARIANTS, ablate, slug
from maskrcnn_fast.errors import UserError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import records, tiny  # noqa: E402


@pytest.fixture(autouse=True)
def torch_backend():
    with kernels.use_backend("torch"):
        yield


def mask_ap(out, variant: str, seed: int) -> float:
    return json.loads((out / slug(variant) / f"seed{seed}" / "metrics.json").read_text())["segm"]["AP"]


def test_ablate_runs_every_variant_and_seed_and_writes_mean_and_std(tmp_path):
    rows = ablate(tiny(tmp_path, iters=1, val_images=1), seeds=2)
    assert [r["name"] for r in rows] == [name for name, _ in VARIANTS]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["seeds"] == 2 and len(saved["variants"]) == len(VARIANTS)
    for row in saved["variants"]:
        assert row["seeds"] == [0, 1]
        for kind in ("segm", "bbox"):
            for m in ("AP", "AP50", "AP75"):
                # the summary is recomputed here from the per-seed metrics.json each run wrote
                per_seed = [json.loads((tmp_path / slug(row["name"]) / f"seed{s}" / "metrics.json").read_text())
                            [kind][m] for s in (0, 1)]
                assert row["mean"][kind][m] == pytest.approx(statistics.fmean(per_seed))
                assert row["std"][kind][m] == pytest.approx(statistics.stdev(per_seed))
    # paired differences, recomputed from the per-seed metrics: reference minus variant, seed by seed
    assert [e["comparison"] for e in saved["paired_differences"]] == [c for c, _, _ in COMPARISONS]
    for e in saved["paired_differences"]:
        per_seed = [mask_ap(tmp_path, e["reference"], s) - mask_ap(tmp_path, e["variant"], s) for s in (0, 1)]
        assert e["seeds"] == [0, 1] and e["diff"]["mask AP"]["per_seed"] == pytest.approx(per_seed)
        assert e["diff"]["mask AP"]["mean"] == pytest.approx(statistics.fmean(per_seed))
        assert e["diff"]["mask AP"]["reference_ahead"] == sum(d > 0 for d in per_seed)
    softmax = next(r for r in saved["variants"] if r["switches"].get("mask_loss") == "softmax")
    assert set(softmax["diagnostic"]) >= {"foreground_segm_mean", "largest_class_prob", "detections"}
    assert all("diagnostic" not in r for r in saved["variants"] if r is not softmax)
    table = (tmp_path / "ablation.md").read_text()
    for comparison, _, _ in COMPARISONS:
        assert comparison in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 2 + 2 * len(COMPARISONS)
    assert "±" in table and "1 - p(background)" in table and table.count("Paired by seed") == len(COMPARISONS)
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert (tmp_path / "progress.txt").read_text().startswith(f"ablation {2 * len(VARIANTS)}/{2 * len(VARIANTS)}")


def test_interrupted_ablation_skips_finished_runs_and_resumes_the_killed_one(tmp_path, monkeypatch):
    base = tiny(tmp_path, iters=3, val_images=1, ckpt_every=1)
    calls = []
    real_train = ablate_mod.train

    def killed_on_second_run(cfg):
        calls.append(cfg)
        if len(calls) == 2:  # the second run dies after writing its iteration-2 checkpoint
            real_train(dataclasses.replace(cfg, stop_after=2))
            raise KeyboardInterrupt
        return real_train(cfg)

    monkeypatch.setattr(ablate_mod, "train", killed_on_second_run)
    with pytest.raises(KeyboardInterrupt):
        ablate(base, only=["mlp", "softmax"], seeds=1)  # plan: baseline, softmax, MLP (seed 0)
    assert "running" in (tmp_path / "progress.txt").read_text()
    killed = tmp_path / "softmax_masks" / "seed0"
    assert (killed / "last.pt").exists() and not (killed / "metrics.json").exists()

    calls.clear()
    monkeypatch.setattr(ablate_mod, "train", lambda cfg: calls.append(cfg) or real_train(cfg))
    rows = ablate(base, only=["mlp", "softmax"], seeds=1)
    # the finished baseline run is skipped; the killed run resumes, the last one starts fresh
    assert [(c.out, c.resume) for c in calls] == [(str(killed), True), (str(tmp_path / "mlp_mask_head" / "seed0"), False)]
    assert [r["iter"] for r in records(killed)] == [1, 2, 3]
    assert [(r["name"], r["seeds"]) for r in rows] == [(VARIANTS[0][0], [0]), ("softmax masks", [0]),
                                                       ("MLP mask head", [0])]
    assert "diagnostic" in rows[1] and (tmp_path / "ablation.md").exists()


def test_finished_run_of_another_budget_is_an_error_not_a_result(tmp_path):
    ablate(tiny(tmp_path, iters=1, val_images=1), only=["mlp"], seeds=1)
    with pytest.raises(UserError, match="other settings"):
        ablate(tiny(tmp_path, iters=2, val_images=1), only=["mlp"], seeds=1)


def test_only_must_name_a_variant(tmp_path):
    with pytest.raises(UserError, match="names no variant"):
        ablate(tiny(tmp_path), only=["roi_warp"])


def test_only_picks_a_variant_by_its_exact_slug_else_by_substring():
    names = lambda only: [n for n, _ in ablate_mod.selected(only)]  # noqa: E731
    assert names(["roipool"]) == [VARIANTS[0][0], "RoIPool"]  # not also "RoIPool, stride 32"
    assert names(["stride"]) == [VARIANTS[0][0], "RoIAlign, stride 32", "RoIPool, stride 32"]
    assert names(["RoIPool_Stride_32", "mlp"]) == [VARIANTS[0][0], "RoIPool, stride 32", "MLP mask head"]
    assert names(None) == [n for n, _ in VARIANTS]


def test_parallel_jobs_train_the_same_runs_seed_by_seed_in_worker_processes(tmp_path):
    seq = ablate(tiny(tmp_path / "seq", iters=1, val_images=1), only=["mlp"], seeds=2)
    par = ablate(tiny(tmp_path / "par", iters=1, val_images=1), only=["mlp"], seeds=2, jobs=2)
    assert [(r["name"], r["seeds"]) for r in par] == [(r["name"], r["seeds"]) for r in seq] == \
        [(VARIANTS[0][0], [0, 1]), ("MLP mask head", [0, 1])]
    lines = (tmp_path / "par" / "progress.txt").read_text().splitlines()
    assert lines[0].startswith("ablation 4/4 runs done")
    # seed-major: every variant's seed 0 before any seed 1
    assert [(line.split(" seed ")[0].strip(), line.split(" seed ")[1][0]) for line in lines[1:]] == \
        [(VARIANTS[0][0], "0"), ("MLP mask head", "0"), (VARIANTS[0][0], "1"), ("MLP mask head", "1")]
    for name in (VARIANTS[0][0], "MLP mask head"):
        for s in (0, 1):
            run = f"{slug(name)}/seed{s}"
            assert (tmp_path / "par" / run / "train.log").stat().st_size > 0  # a worker's own output
            # same config and seed in a 1-thread worker: the same first step as in-process, up to
            # the order of floating-point reductions
            assert records(tmp_path / "par" / run)[0]["loss"] == pytest.approx(
                records(tmp_path / "seq" / run)[0]["loss"], rel=1e-4)
    with pytest.raises(UserError, match="--jobs"):
        ablate(tiny(tmp_path / "bad"), jobs=0)


def test_background_launch_refuses_a_folder_with_a_running_ablation(tmp_path):
    (tmp_path / "ablate.pid").write_text(str(os.getpid()))  # this process: certainly alive
    with pytest.raises(UserError, match="already running"):
        ablate_mod.launch_background(["ablate", "--background", "--out", str(tmp_path)], str(tmp_path))
    assert not (tmp_path / "ablate.log").exists()
