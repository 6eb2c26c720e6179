"""``python -m maskrcnn_fast selfcheck``: it names what it checked, and runs the Triton kernels on CPU too."""
import subprocess

import pytest
import torch

import kernels
from maskrcnn_fast import selfcheck


def test_auto_on_cpu_checks_the_triton_kernels_and_the_pytorch_backend(capsys):
    assert selfcheck.run("cpu") == 0  # the test process interprets (conftest): the Triton check runs here
    out = capsys.readouterr().out
    assert "backends: triton, torch" in out
    assert "[triton] Triton kernels in Triton's interpreter" in out
    assert "[torch] PyTorch backend (its RoIAlign/RoIPool/NMS forwards are torchvision's own kernels)" in out
    assert out.count("all kernels agree with torchvision") == 2 and "FAIL" not in out
    assert out.count("ok   roi_align backward(aligned=True)") == 2


def test_a_wrong_kernel_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "roi_pool", lambda *a: torchvision_roi_pool(*a) + 1e-3)
    assert selfcheck.run("cpu", "torch") == 1
    out = capsys.readouterr().out
    assert "FAIL roi_pool" in out and "MISMATCH" in out and "[triton]" not in out


def torchvision_roi_pool(*args):
    import torchvision

    return torchvision.ops.roi_pool(*args)


def test_without_the_interpreter_the_triton_check_runs_in_a_child_that_has_it(monkeypatch, capsys):
    seen = {}

    def child(cmd, env):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(selfcheck.subprocess, "run", child)
    assert selfcheck.run("cpu", "triton") == 0
    assert seen["env"]["TRITON_INTERPRET"] == "1"
    assert seen["cmd"][-6:] == ["maskrcnn_fast", "selfcheck", "--backend", "triton", "--device", "cpu"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        selfcheck.run("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            selfcheck.run("cuda")
