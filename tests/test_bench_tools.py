"""bench/ tooling: the report, the tuned-config loader, the compile report and the tuning loop."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kernels import _config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import autotune, report  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bench_h100.json"


def test_report_table_speedup_and_roofline(tmp_path):
    rows = {r["op"]: r for r in report.load_rows([FIXTURE])}
    nms = rows["batched_nms"]
    assert nms["speedup"] == pytest.approx(14.0)
    assert nms["gbps"] == pytest.approx(3350.0)  # 335 MB in 100 us
    assert nms["pct_peak"] == pytest.approx(100.0)  # H100 SXM: 3.35 TB/s
    assert rows["roi_align"]["speedup"] is None  # no torchvision entry in that group
    out, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(FIXTURE), "--out", str(out), "--plot", str(png)]) == 0
    text = out.read_text()
    assert "| batched_nms | 10000 boxes x 80 classes | 100.0 µs | 1.40 ms | 14.00× | 3350.0 | 100.0% |" in text
    assert png.stat().st_size > 1000
    assert report.main([str(tmp_path / "missing.json")]) == 2


def test_report_lists_every_model_implementation_with_img_per_s(tmp_path):
    """CUDA graphs and inductor entries (and img/s) reach the quick-look table, not only the JSON."""
    def entry(impl, median, **info):
        return {"name": f"t[{impl}]", "group": "train_step 8x800x1216", "stats": {"median": median},
                "extra_info": {"impl": impl, "device": "NVIDIA H100 80GB HBM3", **info}}
    data = {"benchmarks": [entry("ours", 0.2, img_per_s=40.0, setup_s=3.0), entry("torchvision", 0.4, img_per_s=20.0),
                           entry("ours_cudagraph", 0.1, img_per_s=80.0, setup_s=9.5)]}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    text = report.markdown(report.load_rows([path]))
    assert "| train_step | 8x800x1216 | ours_cudagraph | 100.00 ms | 4.00× | 80.0 | 9.5 |" in text
    assert "| train_step | 8x800x1216 | torchvision | 400.00 ms | 1.00× | 20.0 | – |" in text


def _load(tmp_path, gpu):
    _config.load_tuned.cache_clear()
    try:
        return _config.load_tuned(gpu, str(tmp_path))
    finally:
        _config.load_tuned.cache_clear()


def test_tuned_config_loader_falls_back_with_a_warning(tmp_path):
    gpu = "NVIDIA H100 80GB HBM3"
    with pytest.warns(UserWarning, match="no tuned configs"):
        assert _load(tmp_path, gpu) == {}
    path = tmp_path / f"{_config.gpu_slug(gpu)}.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring tuned configs"):
        assert _load(tmp_path, gpu) == {}
    path.write_text(json.dumps({"gpu": "NVIDIA A100-SXM4-80GB", "ops": {"nms": {"all": {"BLOCK_ROWS": 64}}}}))
    with pytest.warns(UserWarning, match="not 'NVIDIA H100"):
        assert _load(tmp_path, gpu) == {}
    good = {"BLOCK_C": 64, "num_warps": 8, "num_stages": 1}
    path.write_text(json.dumps({"gpu": gpu, "ops": {"roi_align_fwd": {"p64": good}}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load(tmp_path, gpu) == {"roi_align_fwd": {"p64": good}}


def test_pick_ignores_a_tuned_config_outside_the_list(monkeypatch):
    configs = [{"BLOCK_C": 32, "num_warps": 4}, {"BLOCK_C": 64, "num_warps": 8}]
    monkeypatch.setattr(_config, "single_config", lambda: False)
    monkeypatch.setattr(_config, "load_tuned", lambda: {"op": {"b": {"BLOCK_C": 999}}, "op2": {"b": configs[1]}})
    with pytest.warns(UserWarning, match="not in get_configs"):
        assert _config.pick("op", "b", configs) == configs[0]
    assert _config.pick("op2", "b", configs) == configs[1]
    assert _config.pick("op3", "b", configs) == configs[0]


def test_tuning_loop_picks_the_fastest_config_through_the_pick_hook():
    configs = [{"BLOCK": 1}, {"BLOCK": 2}, {"BLOCK": 3}]
    seen = []

    def fn():
        seen.append(_config.pick("toy", "b0", configs))
    fake_ms = {1: 3.0, 2: 1.0, 3: 2.0}
    original_pick = _config.pick

    def timer(f):
        f()
        return fake_ms[seen[-1]["BLOCK"]]
    best = autotune.tune([("toy", "b0", configs, fn), ("other", "b0", configs, fn)], op_filter="toy",
                         timer=timer, log=lambda *a: None)
    assert best == {"toy": {"b0": {"BLOCK": 2}}}
    assert [c["BLOCK"] for c in seen] == [1, 2, 3]
    assert _config.pick is original_pick  # the forcing hook is undone


def test_autotune_forcing_takes_the_launchers_pick_signature():
    """Launchers call ``pick(op, bucket, configs, default)``: the forcing hook must accept it and leave
    other ops on their heuristic default."""
    from kernels import _config

    configs, heuristic = [{"BLOCK": 1}, {"BLOCK": 2}], {"BLOCK": 7}
    with autotune.forced("toy", configs[1]):
        assert _config.pick("toy", "b0", configs, heuristic) == {"BLOCK": 2}
        assert _config.pick("other", "b0", configs, heuristic) == heuristic
        assert _config.pick("other", "b0", configs) == configs[0]


def test_compile_report_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--cases", "roi_pool P2 7x7 fwd",
                           "--model", "none", "--filter", "roi_pool_fwd[float32", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert {r["cc"] for r in rows} == {80, 90}
    assert all(r["ok"] and r["regs"] > 0 for r in rows)
    assert "regs" in proc.stdout and "0 failures" in proc.stdout


def test_autotune_refuses_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "autotune.py")], capture_output=True, text=True,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_nms_work_counts():
    """Issue 22's before/target numbers, checked on hand-counted cases."""
    from bench import nms_work

    # 128 boxes: 2 blocks of 64, tiles (0,0) (0,1) (1,1), mask 2 words x 128 rows x 8 bytes
    assert nms_work.current(128) == {"chain": 2, "tiles": 3, "mask_bytes": 2048}
    assert nms_work.current(1) == {"chain": 1, "tiles": 1, "mask_bytes": 512}
    # classes of 64 and 65 boxes (and an empty one): 1 + 2 blocks; mask 64*1*4 + 65*2*4 bytes
    assert nms_work.segmented([64, 65, 0]) == {"chain": 2, "tiles": 1 + 3, "mask_bytes": 776}
    uniform, skewed = nms_work.class_sizes(3000, 100), nms_work.class_sizes(3000, 100, skew=True)
    assert sum(uniform) == sum(skewed) == 3000 and max(skewed) > 3 * max(uniform)
    table = nms_work.markdown(nms_work.rows())
    assert "| RPN training: 8 images x 5 levels x 2000 | 2000 | 157 / 32 | 12,403 / 2,640 |" in table
