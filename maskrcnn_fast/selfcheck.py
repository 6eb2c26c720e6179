"""``python -m maskrcnn_fast selfcheck``: every kernel on small random inputs, against torchvision.

On CUDA it runs the compiled Triton kernels; on CPU the PyTorch fallback, or the Triton
interpreter when TRITON_INTERPRET=1 is set before launch.
"""
from __future__ import annotations

import torch
import torchvision

import kernels


def _report(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float) -> bool:
    err = (ours.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    ok = err <= atol and ours.shape == ref.shape
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<32} max|err| = {err:.2e}")
    return ok


def run(device: str | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    print(f"maskrcnn-fast selfcheck on {device} (torch {torch.__version__}, torchvision {torchvision.__version__})")
    x = torch.randn(2, 16, 25, 31, device=device, generator=g)
    xy = torch.rand(20, 2, device=device, generator=g) * 90
    boxes = torch.cat([torch.randint(0, 2, (20, 1), device=device, generator=g).float(), xy,
                       xy + torch.rand(20, 2, device=device, generator=g) * 60], 1)
    ok = True
    for aligned in (False, True):
        ok &= _report(f"roi_align(aligned={aligned})", kernels.roi_align(x, boxes, 7, 0.25, -1, aligned),
                      torchvision.ops.roi_align(x, boxes, 7, 0.25, -1, aligned), 1e-4)
    ok &= _report("roi_pool", kernels.roi_pool(x, boxes, 7, 0.25), torchvision.ops.roi_pool(x, boxes, 7, 0.25), 1e-5)
    for name in ("nms", "batched_nms"):
        if hasattr(kernels, name):
            scores = torch.rand(20, device=device, generator=g)
            idxs = torch.randint(0, 3, (20,), device=device, generator=g)
            b4 = boxes[:, 1:]
            ours = kernels.nms(b4, scores, 0.5) if name == "nms" else kernels.batched_nms(b4, scores, idxs, 0.5)
            ref = (torchvision.ops.nms(b4, scores, 0.5) if name == "nms"
                   else torchvision.ops.batched_nms(b4, scores, idxs, 0.5))
            ok &= _report(name, ours, ref, 0)
    if hasattr(kernels, "sigmoid_bce_mask_loss"):
        logits = torch.randn(5, 3, 14, 14, device=device, generator=g)
        labels = torch.randint(0, 3, (5,), device=device, generator=g)
        targets = torch.rand(5, 14, 14, device=device, generator=g)
        ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[torch.arange(5, device=device), labels],
                                                                   targets)
        ok &= _report("sigmoid_bce_mask_loss", kernels.sigmoid_bce_mask_loss(logits, labels, targets), ref, 1e-5)
    print("all kernels agree with torchvision" if ok else "MISMATCH: see FAIL lines above")
    return 0 if ok else 1
