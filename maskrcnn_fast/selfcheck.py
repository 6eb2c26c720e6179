"""``python -m maskrcnn_fast selfcheck``: every kernel on small random inputs, against torchvision.

It says which implementation it checked, since agreement means different things for each:

* ``triton`` on CUDA: our compiled Triton kernels (the first thing to run on a new GPU);
* ``triton`` on CPU: the same kernels in Triton's interpreter. The interpreter must be switched on before
  triton is imported, so when this process was not started with ``TRITON_INTERPRET=1`` the check runs
  in a child process that is;
* ``torch``: the PyTorch backend that CPU users run. Its RoIAlign, RoIPool and NMS forwards call
  torchvision's own kernels, so there agreement checks our wrappers (level routing, input checks), not
  an independent implementation; its RoIAlign backward and the mask loss are our own.

``--backend auto`` (the default) checks ``triton`` on CUDA, and both on CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torchvision

import kernels

BACKENDS = ("auto", "triton", "torch", "all")


def _describe(backend: str, device: str) -> str:
    if backend == "torch":
        return "PyTorch backend (its RoIAlign/RoIPool/NMS forwards are torchvision's own kernels)"
    if device == "cuda":
        return f"Triton kernels, compiled for {torch.cuda.get_device_name()}"
    return "Triton kernels in Triton's interpreter (TRITON_INTERPRET=1)"


def _report(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float) -> bool:
    err = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    ok = err <= atol and ours.shape == ref.shape
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<34} max|err| = {err:.2e}")
    return ok


def _roi_align_grads(x, boxes, aligned, fn):
    x = x.detach().requires_grad_()
    out = fn(x, boxes, 7, 0.25, -1, aligned)
    weight = torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)  # not all-ones: a real gradient
    (out * weight).sum().backward()
    return x.grad


def _checks(device: str) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 16, 25, 31, device=device, generator=g)
    xy = torch.rand(20, 2, device=device, generator=g) * 90
    boxes = torch.cat([torch.randint(0, 2, (20, 1), device=device, generator=g).float(), xy,
                       xy + torch.rand(20, 2, device=device, generator=g) * 60], 1)
    ok = True
    for aligned in (False, True):
        ok &= _report(f"roi_align(aligned={aligned})", kernels.roi_align(x, boxes, 7, 0.25, -1, aligned),
                      torchvision.ops.roi_align(x, boxes, 7, 0.25, -1, aligned), 1e-4)
        ok &= _report(f"roi_align backward(aligned={aligned})",
                      _roi_align_grads(x, boxes, aligned, kernels.roi_align),
                      _roi_align_grads(x, boxes, aligned, torchvision.ops.roi_align), 1e-4)
    ok &= _report("roi_pool", kernels.roi_pool(x, boxes, 7, 0.25), torchvision.ops.roi_pool(x, boxes, 7, 0.25), 1e-5)
    scores = torch.rand(20, device=device, generator=g)
    idxs = torch.randint(0, 3, (20,), device=device, generator=g)
    b4 = boxes[:, 1:]
    ok &= _report("nms", kernels.nms(b4, scores, 0.5), torchvision.ops.nms(b4, scores, 0.5), 0)
    ok &= _report("batched_nms", kernels.batched_nms(b4, scores, idxs, 0.5),
                  torchvision.ops.batched_nms(b4, scores, idxs, 0.5), 0)
    logits = torch.randn(5, 3, 14, 14, device=device, generator=g)
    labels = torch.randint(0, 3, (5,), device=device, generator=g)
    targets = torch.rand(5, 14, 14, device=device, generator=g)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[torch.arange(5, device=device), labels], targets)
    ok &= _report("sigmoid_bce_mask_loss", kernels.sigmoid_bce_mask_loss(logits, labels, targets), ref, 1e-5)
    return ok


def _check(backend: str, device: str) -> bool:
    print(f"[{backend}] {_describe(backend, device)}")
    with kernels.use_backend(backend):
        ok = _checks(device)
    print(f"[{backend}] " + ("all kernels agree with torchvision" if ok else "MISMATCH: see FAIL lines above"))
    return ok


def _check_in_interpreter() -> bool:
    """The Triton check on CPU, in a child process that imports triton with the interpreter on."""
    cmd = [sys.executable, "-m", "maskrcnn_fast", "selfcheck", "--backend", "triton", "--device", "cpu"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    sys.stdout.flush()
    return subprocess.run(cmd, env=env).returncode == 0


def run(device: str | None = None, backend: str = "auto") -> int:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    backends = {"auto": ("triton",) if device == "cuda" else ("triton", "torch"),
                "all": ("triton", "torch")}.get(backend, (backend,))
    print(f"maskrcnn-fast selfcheck on {device} (torch {torch.__version__}, torchvision {torchvision.__version__}); "
          f"backends: {', '.join(backends)}")
    results = {}
    for b in backends:
        interpreted_here = device == "cpu" and b == "triton" and not kernels.interpreting()
        results[b] = _check_in_interpreter() if interpreted_here else _check(b, device)
    if len(results) > 1:
        print("; ".join(f"{b}: {'agrees' if ok else 'MISMATCH'}" for b, ok in results.items()))
    return 0 if all(results.values()) else 1
