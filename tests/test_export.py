"""torch.export of the inference model (maskrcnn_fast.export): the exported program, run on new images of
the exported shape, gives the eager model's detections; saved and loaded, it still does. The "triton" case
runs on ``kernel_device``: CUDA on a CUDA host, Triton's interpreter on CPU otherwise."""
import pytest
import torch

import kernels
from conftest import kernel_device
from maskrcnn_fast.export import export_inference
from maskrcnn_fast.postprocess import split_per_image
from test_model import tiny_model

PADDED = (96, 96)


def _images(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g).to(device), torch.rand(3, 72, 64, generator=g).to(device)]


def _inputs(model, images):
    batch, sizes, _ = model.transform(images, None, padded_hw=PADDED)
    return batch, torch.tensor(sizes, dtype=torch.float32, device=batch.device), sizes


def _assert_same(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["boxes"].shape[0] == w["boxes"].shape[0] > 0
        assert torch.equal(g["labels"], w["labels"])
        for k in ("boxes", "scores", "masks"):
            torch.testing.assert_close(g[k], w[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_exported_program_gives_eager_detections(backend, tmp_path):
    torch.manual_seed(0)
    dev = kernel_device(backend)
    model = tiny_model().eval().to(dev)
    with kernels.use_backend(backend), torch.no_grad():
        batch, hw, _ = _inputs(model, _images(0, dev))
        program = export_inference(model, batch, hw)  # exported once, before any eager call fills a cache
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert {"maskrcnn_fast.roi_align_forward.default", "maskrcnn_fast.nms_padded.default"} <= ops
        path = tmp_path / "detect.pt2"
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path))
        for seed in (1, 2):  # images the export never saw, of the exported shape
            images = _images(seed, dev)
            batch, hw, sizes = _inputs(model, images)
            original = [tuple(im.shape[-2:]) for im in images]
            want = model(images)  # eager, end to end (pads to the batch's own size: 96x96 here too)
            for prog in (program, loaded):
                _assert_same(split_per_image(*prog.module()(batch, hw), sizes, original), want)


def test_export_refuses_a_training_model():
    model = tiny_model().train()
    batch = torch.zeros(1, 3, *PADDED)
    with pytest.raises(ValueError, match="eval"):
        export_inference(model, batch, torch.tensor([[64.0, 80.0]]))
