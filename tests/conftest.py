"""Test set-up: where the Triton kernels run, and how the kernel tests follow them.

* CPU host: every Triton kernel runs in Triton's interpreter on CPU. TRITON_INTERPRET must be set before
  triton is first imported, so this runs before any ``import kernels`` (importing torch does not import
  triton).
* CUDA host: TRITON_INTERPRET stays unset, so a CPU tensor can never reach a Triton kernel (triton raises
  ``Pointer argument ... cannot be accessed from Triton (cpu tensor?)``; CPU tensors take the PyTorch
  backend by default). The kernel tests therefore put the inputs of every Triton-backend case on
  ``kernel_device(backend)`` ("cuda" for "triton" on a CUDA host, else "cpu") and keep their references
  (torchvision, float64 formulas) on CPU. Such tests carry the ``triton`` marker: added here to every case
  parametrized with ``backend``/``impl`` = "triton", written out on the tests that use the default
  dispatch on ``DEVICE``; ``-m triton`` (or ``-k triton``) selects them, e.g. for compute-sanitizer.

Bad values on CUDA. The ops check values (labels, batch indices, matched indices, targets in [0, 1]) with
``torch._assert_async``: no host sync, so on CUDA a failing check is a device-side assert, which is
*sticky*: the CUDA context is lost and every later CUDA call in the process fails with "device-side assert
triggered", so one such test would fail every test after it. Tests that feed bad values carry the
``bad_values`` marker and never run on CUDA in the shared pytest process: on a CUDA host each runs in a
subprocess that sees no GPU (CUDA_VISIBLE_DEVICES="", so TRITON_INTERPRET=1 there: the Triton kernels in
the interpreter, exactly as on a CPU host). MASKRCNN_FAST_BAD_VALUES_SUBPROCESS=1 takes that path on a CPU
host too (tests/test_conftest_devices.py does).

Simulated GPU host. MASKRCNN_FAST_SIMULATE_GPU_HOST=<report.json> makes a CPU host follow the CUDA host's
rules (no interpreter; CPU tensors dispatch to the PyTorch backend) with the ``meta`` device standing in for
CUDA (``DEVICE``/``kernel_device("triton")`` are "meta"): the maskrcnn_fast ops run their real launchers on
meta tensors, every Triton launch is recorded instead of run (outputs stay empty, so the tests fail after
their first launch: only the record counts), and the report lists per test which device each op dispatch
and each launch saw. tests/test_conftest_devices.py checks that report.
"""
import json
import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
SIMULATE_GPU_HOST = os.environ.get("MASKRCNN_FAST_SIMULATE_GPU_HOST", "")
GPU_HOST = HAS_CUDA or bool(SIMULATE_GPU_HOST)
if SIMULATE_GPU_HOST:
    os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels' dispatch rule, as on a CUDA host
elif not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MASKRCNN_FAST_SINGLE_CONFIG", "1" if os.environ.get("CI") else "0")

import pytest  # noqa: E402

# where the kernels' own (Triton) cases run: CUDA on a CUDA host ("meta" when simulating one), else CPU
DEVICE = ("meta" if SIMULATE_GPU_HOST else "cuda") if GPU_HOST else "cpu"
BAD_VALUES_SUBPROCESS = "MASKRCNN_FAST_BAD_VALUES_SUBPROCESS"  # "1": force the subprocess; "inner": we are it


def kernel_device(backend: str = "triton") -> str:
    """The device for the inputs of a kernel call on ``backend``: DEVICE for "triton", CPU for "torch"."""
    return DEVICE if backend == "triton" else "cpu"


def amp_device(dev) -> str:
    """The autocast device type for tensors on ``dev`` ("cuda" also for the simulation's "meta")."""
    return "cpu" if torch.device(dev).type == "cpu" else "cuda"


def on(dev, *tensors):
    """Copies of ``tensors`` on ``dev`` (None stays None), as a tuple."""
    return tuple(None if t is None else t.to(dev, copy=True) for t in tensors)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (on CUDA tensors on a CUDA host); "
                                       "added to every backend/impl='triton' case")
    config.addinivalue_line("markers", "bad_values: feeds values the ops reject with an asynchronous assert "
                                       "(sticky on CUDA): on a CUDA host runs in a CPU-only subprocess")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and "triton" in (params.params.get("backend"), params.params.get("impl")):
            item.add_marker("triton")
    if HAS_CUDA and not SIMULATE_GPU_HOST:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A ``bad_values`` test on a CUDA host: run it in a subprocess that sees no GPU (see the top)."""
    mode = os.environ.get(BAD_VALUES_SUBPROCESS, "")
    if "bad_values" not in pyfuncitem.keywords or mode == "inner" or not (GPU_HOST or mode == "1"):
        return None
    if SIMULATE_GPU_HOST:  # the subprocess is what the CPU host runs anyway: only note that it would run
        _sim_item(pyfuncitem)["subprocess"] = True
        return True
    env = {k: v for k, v in os.environ.items() if k != "MASKRCNN_FAST_SIMULATE_GPU_HOST"}
    env.update({"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", BAD_VALUES_SUBPROCESS: "inner"})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                          cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True, timeout=600)
    pyfuncitem.add_report_section("call", "CPU-only subprocess", proc.stdout[-4000:])
    if proc.returncode != 0:
        pytest.fail(f"in a CPU-only subprocess (exit status {proc.returncode}):\n{proc.stdout[-8000:]}\n"
                    f"{proc.stderr[-2000:]}", pytrace=False)
    return True


@pytest.fixture
def device():
    return DEVICE


# ---- simulated GPU host (MASKRCNN_FAST_SIMULATE_GPU_HOST) ---------------------------------------------
_sim_records: dict = {}
_sim_current = None


def _sim_item(item):
    return _sim_records.setdefault(item.nodeid, {"markers": [], "dispatches": set(), "inputs": set(),
                                                 "launches": set(), "errors": set(), "subprocess": False,
                                                 "outcome": {}})


def _sim_note(kind, value):
    if _sim_current is not None:
        _sim_records[_sim_current][kind].add(value)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _install_simulation():
    from torch._library.custom_ops import OPDEFS
    from torch._subclasses.fake_tensor import FakeTensor
    from triton.runtime.jit import JITFunction

    from kernels import _backend  # imports every op module, before backend_for is replaced in each

    def launch(self, *args, **kwargs):  # the body of every kernel[grid](...): record, run nothing
        devices = ",".join(sorted({t.device.type for t in _tensors([*args, *kwargs.values()])}))
        _sim_note("launches", (getattr(self, "__name__", repr(self)), devices))

    JITFunction.run = launch

    original = _backend.backend_for

    def backend_for(t):
        name = (_backend._forced or "triton") if t.device.type == "meta" else original(t)  # meta: CUDA
        _sim_note("dispatches", (t.device.type, name, "forced" if _backend._forced else "default"))
        return name

    same_device = _backend.check_same_device

    def check_same_device(**tensors):  # every op's inputs (an empty input returns before backend_for)
        devices = ",".join(sorted({t.device.type for t in tensors.values() if isinstance(t, torch.Tensor)}))
        _sim_note("inputs", (devices, _backend._forced or "default"))
        return same_device(**tensors)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "kernels":
            for attr, new, old in (("backend_for", backend_for, original),
                                   ("check_same_device", check_same_device, same_device)):
                if getattr(module, attr, None) is old:
                    setattr(module, attr, new)

    for qualname, opdef in OPDEFS.items():  # meta tensors (not FakeTensors) run the op's real launcher
        if qualname.startswith("maskrcnn_fast::"):
            def abstract(*args, _opdef=opdef, _fake=opdef._abstract_fn, **kwargs):
                ts = list(_tensors([*args, *kwargs.values()]))
                if ts and not any(isinstance(t, FakeTensor) for t in ts) and ts[0].device.type == "meta":
                    return _opdef._init_fn(*args, **kwargs)
                return _fake(*args, **kwargs)
            opdef._abstract_fn = abstract

    from torch._subclasses.fake_tensor import is_fake
    from torch.testing._internal.optests import generate_tests

    generate_tests.is_abstract = is_fake  # opcheck skips meta inputs: here they stand for CUDA ones

    init = _backend.InputError.__init__

    def input_error(self, *args):
        _sim_note("errors", str(args[0]) if args else "")
        init(self, *args)

    _backend.InputError.__init__ = input_error


if SIMULATE_GPU_HOST:
    _install_simulation()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        global _sim_current
        _sim_item(item)["markers"] = sorted({m.name for m in item.iter_markers()})
        _sim_current = item.nodeid
        yield
        _sim_current = None

    def pytest_runtest_logreport(report):
        if report.nodeid in _sim_records and (report.when == "call" or report.outcome != "passed"):
            crash = getattr(report.longrepr, "reprcrash", None)
            _sim_records[report.nodeid]["outcome"][report.when] = [report.outcome, crash.message[:300] if crash
                                                                   else str(report.longrepr or "")[:300]]

    def pytest_sessionfinish(session):
        out = {nodeid: {k: sorted(v) if isinstance(v, set) else v for k, v in rec.items()}
               for nodeid, rec in _sim_records.items()}
        with open(SIMULATE_GPU_HOST, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
