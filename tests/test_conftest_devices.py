"""The kernel tests follow the kernels onto CUDA on a GPU host, checked on a CPU host (tests/conftest.py).

On a CUDA host TRITON_INTERPRET is unset, so a CPU tensor that reaches a Triton kernel fails ("cannot be
accessed from Triton (cpu tensor?)") and a CPU tensor dispatched by default runs the PyTorch backend instead
of the kernels. These checks run the kernel test files on a *simulated* GPU host
(MASKRCNN_FAST_SIMULATE_GPU_HOST: the CUDA host's dispatch rule, the meta device standing in for CUDA, every
Triton launch recorded instead of run) and read what each test really handed to the ops:

* no Triton launch and no forced-"triton" dispatch ever sees a CPU tensor (the GPU host's spurious failure);
* no op is dispatched by default on a CPU tensor in-process (on a GPU host: the PyTorch backend, silently);
* every ``triton``-marked test (each backend/impl="triton" case, and the default-dispatch tests on DEVICE)
  hands at least one op its inputs on the device (dispatched to the Triton backend, or an empty input the
  op returns for before dispatching), and never mixes devices;
* ``bad_values`` tests never run in-process (a device-side assert is sticky), and no test outside them
  feeds a value that the ops' range checks reject.

The simulated run's own pass/fail means nothing (kernels run nothing, so the tests fail after their first
launch); only the record counts. ``test_checks_catch_a_test_that_builds_cpu_tensors`` shows that the checks
fail for a test written the old way.
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TEST_FILES = ["tests/test_nms.py", "tests/test_mask_loss.py", "tests/test_mask_targets.py",
                     "tests/test_roi_align.py", "tests/test_syncs.py", "tests/test_export.py"]
VALUE_CHECK = re.compile(r"must be in \[")  # the messages of the ops' range checks (asserts on CUDA)


def simulate(tmp_path, *args, cwd=ROOT):
    """Run pytest on a simulated GPU host; return its per-test report and the run's output."""
    report = tmp_path / "devices.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MASKRCNN_FAST_BAD_VALUES_SUBPROCESS")}
    env["MASKRCNN_FAST_SIMULATE_GPU_HOST"] = str(report)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-W", "ignore", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report.exists(), f"no report from the simulated GPU host run:\n{output}"
    return json.loads(report.read_text()), output


def problems(report) -> list[str]:
    """Every way a test would go wrong on a CUDA host, one line each."""
    found = []
    for nodeid, rec in sorted(report.items()):
        markers = set(rec["markers"])
        if "gpu" in markers:
            continue  # real CUDA tensors, skipped in the simulation

        def say(what):
            found.append(f"{nodeid}: {what} (outcome: {rec['outcome'].get('call', rec['outcome'])})")

        dispatches = [tuple(d) for d in rec["dispatches"]]  # (device, backend, "forced" | "default")
        for kernel, devices in rec["launches"]:
            if "cpu" in devices.split(","):
                say(f"Triton kernel {kernel} gets a CPU tensor (CUDA host: 'cannot be accessed from Triton')")
        if any(dev == "cpu" and backend == "triton" for dev, backend, _ in dispatches):
            say("an op is forced onto the Triton backend with CPU tensors")
        if any(dev == "cpu" and how == "default" for dev, _, how in dispatches):
            say("an op is dispatched by default on CPU tensors: on a CUDA host that runs the PyTorch backend, "
                "not the kernels (use DEVICE / kernel_device(backend), or force a backend)")
        if "bad_values" in markers:
            if not rec["subprocess"] or rec["launches"] or rec["dispatches"]:
                say("a bad_values test runs in the shared process on a CUDA host")
            continue
        on_device = any(dev != "cpu" and backend == "triton" for dev, backend, _ in dispatches) or any(
            "cpu" not in devs.split(",") and backend != "torch"  # an empty input returns before the dispatch
            for devs, backend in rec["inputs"])
        if "triton" in markers and not on_device:
            say("a triton test hands no op its inputs on the device")
        if "triton" in markers and any("one device" in e for e in rec["errors"]):
            say("a triton test mixes devices")
        if any(VALUE_CHECK.search(e) for e in rec["errors"]):
            say("feeds values the ops' range checks reject, in-process: mark it bad_values")
    return found


def test_kernel_tests_use_cuda_on_a_gpu_host(tmp_path):
    report, output = simulate(tmp_path, *KERNEL_TEST_FILES)
    collected = [n for n in report if "gpu" not in report[n]["markers"]]
    assert len(collected) > 400, output  # every file was collected
    found = problems(report)
    assert not found, "\n".join(found)
    on_cuda = Counter(n.split("::")[0] for n in collected if "triton" in report[n]["markers"])
    bad = Counter(n.split("::")[0] for n in collected if "bad_values" in report[n]["markers"])
    print("\ntests on CUDA on a GPU host, per file:", dict(on_cuda), "\nbad_values (CPU subprocess):", dict(bad))
    assert set(on_cuda) == set(KERNEL_TEST_FILES)
    for nodeid in collected:  # every case parametrized "triton" carries the marker (-m triton selects it)
        if "[triton" in nodeid or "-triton" in nodeid:
            assert "triton" in report[nodeid]["markers"], nodeid


def test_checks_catch_a_test_that_builds_cpu_tensors(tmp_path):
    """The checks fail for tests written the old way: CPU inputs for the triton backend; the default dispatch
    on CPU; a bad value fed in-process; a triton test that mixes devices."""
    conftest = ROOT / "tests" / "conftest.py"  # the same set-up, in a folder of its own
    (tmp_path / "conftest.py").write_text(f"exec(compile(open({str(conftest)!r}).read(), {str(conftest)!r}, 'exec'))\n")
    test = tmp_path / "test_old_ways.py"
    test.write_text('''
import pytest, torch, kernels
from conftest import DEVICE, kernel_device

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_old_style(backend):
    with kernels.use_backend(backend):
        kernels.nms(torch.rand(9, 4) * 9, torch.rand(9), 0.5)

@pytest.mark.triton
def test_default_dispatch_on_cpu():
    kernels.roi_align(torch.rand(1, 2, 5, 5), torch.tensor([[0, 1.0, 1, 3, 3]]), 2)

def test_bad_label_unmarked():
    with pytest.raises(ValueError):
        kernels.sigmoid_bce_mask_loss(torch.rand(1, 2, 3, 3), torch.tensor([5]), torch.rand(1, 3, 3))

@pytest.mark.parametrize("backend", ["triton"])
def test_mixed(backend):
    kernels.sigmoid_bce_mask_loss(torch.rand(1, 2, 3, 3).to(DEVICE), torch.tensor([1]), torch.rand(1, 3, 3))

@pytest.mark.parametrize("backend", ["triton"])
def test_right(backend):
    with kernels.use_backend(backend):
        kernels.nms(torch.rand(9, 4).to(kernel_device(backend)), torch.rand(9).to(kernel_device(backend)), 0.5)
''')
    report, output = simulate(tmp_path, test.name, cwd=tmp_path)
    found = "\n".join(problems(report))
    name = test.stem
    assert f"{name}.py::test_old_style[triton]: Triton kernel _nms_mask_kernel gets a CPU tensor" in found, found
    assert f"{name}.py::test_old_style[triton]: an op is forced onto the Triton backend" in found
    assert "test_old_style[torch]" not in found  # the torch backend on CPU is right
    assert f"{name}.py::test_default_dispatch_on_cpu: an op is dispatched by default on CPU" in found
    assert f"{name}.py::test_default_dispatch_on_cpu: a triton test hands no op its inputs on the device" in found
    assert f"{name}.py::test_bad_label_unmarked: feeds values the ops' range checks reject" in found
    assert f"{name}.py::test_mixed[triton]: a triton test mixes devices" in found
    assert "test_right" not in found, found


@pytest.mark.parametrize("nodeid", ["tests/test_roi_align.py::test_bad_inputs_raise_clearly"])
def test_bad_values_tests_run_in_a_cpu_only_subprocess(nodeid):
    """The path a CUDA host takes for a bad_values test (forced here): a child pytest that sees no GPU runs
    it in Triton's interpreter, and its verdict is the test's."""
    env = {**os.environ, "MASKRCNN_FAST_BAD_VALUES_SUBPROCESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rP", nodeid],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "CPU-only subprocess" in proc.stdout and proc.stdout.count("1 passed") == 2, proc.stdout[-4000:]
