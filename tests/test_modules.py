"""The nn.Module drop-ins: same outputs as torchvision's modules, and torch.fx traces them as leaf calls."""
import pytest
import torch
import torch.fx
import torchvision

import kernels


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 11, generator=g, dtype=dtype)
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 1.5, 5, 4, 9.5], [1, 0, 2, 10, 12.5]], dtype=dtype)
    return x, rois


@pytest.mark.parametrize("ours, theirs", [
    (kernels.RoIAlign((5, 3), 0.5, 2, aligned=True), torchvision.ops.RoIAlign((5, 3), 0.5, 2, aligned=True)),
    (kernels.RoIAlign(4, 1.0, -1), torchvision.ops.RoIAlign(4, 1.0, -1)),
    (kernels.RoIPool((3, 5), 0.5), torchvision.ops.RoIPool((3, 5), 0.5)),
])
def test_modules_equal_torchvision_and_trace_as_leaves(ours, theirs):
    x, rois = _inputs()
    torch.testing.assert_close(ours(x, rois), theirs(x, rois), rtol=1e-12, atol=1e-12)
    assert repr(ours) == repr(theirs)
    traced = torch.fx.symbolic_trace(ours)  # fails if tracing enters the op with proxies
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1 and calls[0].target.__name__ in ("roi_align", "roi_pool")
    torch.testing.assert_close(traced(x, rois), theirs(x, rois), rtol=1e-12, atol=1e-12)
