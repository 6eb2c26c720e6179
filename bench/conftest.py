"""Benchmark set-up: on CUDA the compiled kernels at Mask R-CNN shapes; without CUDA a CPU smoke run
(tiny shapes, kernels in Triton's interpreter, plus the PyTorch fallback)."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def cuda_timed(fn):
    """Wrap ``fn`` so every timed call ends with a device sync (pytest-benchmark times wall clock)."""
    if not HAS_CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture
def run_bench(benchmark):
    """``run_bench(group, fn, bytes_moved=None, rounds=None, **info)``: time ``fn`` and record metadata."""
    def _run(group, fn, bytes_moved=None, **info):
        benchmark.group = group
        benchmark.extra_info.update(info)
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
        if bytes_moved is not None:
            benchmark.extra_info["bytes"] = int(bytes_moved)
        fn()  # warm-up: compiles the kernel, fills caches of the allocator
        rounds, iters = (50, 5) if HAS_CUDA else (2, 1)
        return benchmark.pedantic(cuda_timed(fn), rounds=rounds, iterations=iters, warmup_rounds=1 if HAS_CUDA else 0)
    return _run
