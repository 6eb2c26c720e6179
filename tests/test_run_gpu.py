"""bench/run_gpu.sh and bench/ncu_ops.py without a GPU: the script parses, its dry run plans the sanitizer and
Nsight Compute steps, and ncu's CSV is summarized into DRAM % of peak and local-memory traffic."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import ncu_ops  # noqa: E402


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "run_gpu.sh")]).returncode == 0


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils")
def test_dry_run_plans_sanitizer_and_ncu(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable, "RESULTS": str(tmp_path),
           "STEPS": "gpu bench-kernels bench-model memcheck racecheck ncu tests bench-compiled autotune compile"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = proc.stderr
    for tool in ("memcheck", "racecheck"):
        assert f"PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout" in plan and f"--tool {tool}" in plan
    assert "tests/test_roi_align.py" in plan and "tests/test_nms.py" in plan and "tests/test_mask_loss.py" in plan
    sanitized = [line for line in plan.splitlines() if "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in line]
    assert len(sanitized) == 2 and all("-m triton and not slow tests/" in line for line in sanitized), sanitized
    # (``triton``: the kernel tests' cases on CUDA tensors, tests/conftest.py; tests/test_conftest_devices.py)
    ncu_line = next(line for line in plan.splitlines() if "--profile-from-start off" in line)
    for metric in ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
                   "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum"):
        assert metric in ncu_line
    assert "bench/ncu_ops.py --summarize" in plan and "bench/compile_report.py --json" in plan
    assert "-m gpu" in plan and "bench/test_bench_kernels.py" in plan and "-k not ours_compiled" in plan
    assert "bench/report.py" in plan and "skipped" not in plan  # everything fits a DEADLINE when nothing runs


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils")
def test_steps_that_no_longer_fit_the_deadline_are_skipped(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable, "RESULTS": str(tmp_path), "DEADLINE": "30",
           "STEPS": "gpu bench-kernels"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bench-kernels: skipped" in proc.stderr or "gpu: skipped" in proc.stderr
    assert "=== gpu (15 s max" not in proc.stderr  # a step never starts with under 20 s
    assert not list((ROOT / "bench" / "results").glob("dry-run-*"))  # a dry run leaves no results behind


CSV = '''==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","python","h","_roi_align_fwd_kernel","1","7","(128, 1, 1)","(1024, 8, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","61.5"
"0","1234","python","h","_roi_align_fwd_kernel","1","7","(128, 1, 1)","(1024, 8, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","21,440"
"0","1234","python","h","_roi_align_fwd_kernel","1","7","(128, 1, 1)","(1024, 8, 1)","0","9.0","Command line profiler metrics","l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum","byte","0"
"1","1234","python","h","_nms_reduce_kernel","1","7","(256, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum","byte","4096"
==PROF== Disconnected from process 1234
'''


def test_ncu_csv_summary(tmp_path):
    kernels = ncu_ops.parse(CSV)
    assert [k["kernel"] for k in kernels] == ["_roi_align_fwd_kernel", "_nms_reduce_kernel"]
    assert kernels[0]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == 61.5
    assert kernels[0]["gpu__time_duration.sum"] == 21440.0
    assert kernels[1]["l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum"] == 4096.0
    src, out = tmp_path / "ncu.csv", tmp_path / "ncu.md"
    src.write_text(CSV)
    assert ncu_ops.summarize(str(src), str(out)) == 0
    table = out.read_text()
    assert "| _roi_align_fwd_kernel | 21.4 | 61.5 |" in table and "| n/a / 4096 |" in table
    src.write_text("==PROF== nothing profiled\n")
    assert ncu_ops.summarize(str(src), None) == 1


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils")
def test_dry_run_prints_the_time_plan_and_warms_the_triton_cache_first(tmp_path):
    """The plan names every step with a cap that includes compiling its kernels cold; the warm step comes first
    and compiles, in parallel, for this GPU's compute capability (90 in a dry run) what later steps launch."""
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable, "RESULTS": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = proc.stderr.split("=== ")[0]
    assert plan.startswith("time plan (DEADLINE 520 s")
    rows = [line.split() for line in plan.splitlines()[1:]]
    assert [r[0] for r in rows] == ["warm", "gpu", "bench-kernels", "bench-model", "memcheck", "ncu", "tests"]
    caps = {r[0]: int(r[2]) for r in rows}
    assert caps["gpu"] >= 100 + 30 * 1.1  # the gpu tests' ~100 s plus their ~30 kernel variants compiled cold
    assert caps["bench-kernels"] >= 80 * 1.1  # what the op benchmarks compile if the warm step misses
    warm = next(line for line in proc.stderr.splitlines() if "compile_report.py" in line)
    assert "--targets 90" in warm and "--jobs" in warm and "env -u TRITON_INTERPRET" in warm
    assert proc.stderr.index("=== warm") < proc.stderr.index("=== gpu")
