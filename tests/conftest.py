"""Test set-up: without CUDA, every Triton kernel runs in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any
``import kernels``. Importing torch does not import triton.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MASKRCNN_FAST_SINGLE_CONFIG", "1" if os.environ.get("CI") else "0")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
