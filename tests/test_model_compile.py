"""torch.compile with inductor (fullgraph) of the training losses and of the inference core, on CPU.

For a fixed batch shape (a shape bucket: padded image size and ground-truth capacity) the whole of
``MaskRCNN.losses`` and ``MaskRCNN.detect`` compile as one graph each, our custom ops (RoIAlign, NMS,
mask targets, mask loss) run inside it, and the results equal eager's. Sampling draws random numbers,
so inductor is told to use eager's (``torch._inductor.config.fallback_random = True``); without it
the compiled step samples other RoIs and its losses differ.

The ops run in Triton's interpreter (tests/conftest.py), i.e. the kernels a GPU runs. Compiling costs
about 2 minutes on a 2-core CPU (forward and backward graphs), paid once per module: the whole file is
marked ``slow`` (deselect with ``-m "not slow"``).
"""
import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.testing import CompileCounterWithBackend

from test_model import LOSS_KEYS, NUM_CLASSES, tiny_model

pytestmark = pytest.mark.slow
BUCKET = (96, 96)   # padded image size of every batch
CAPACITY = 4        # ground-truth slots per image


def _batch(seed: int):
    """Two images of different sizes inside BUCKET, 1..3 objects each; a new draw per seed."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in ((64, 80), (72, 64)):
        n = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1 + (x2 - x1) // 3:x2] = 1
        images.append(torch.rand(3, h, w, generator=g))
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g), "masks": masks})
    return images, targets


def _prepare(model, seed):
    images, targets = _batch(seed)
    batch, sizes, gt = model.transform(images, targets, padded_hw=BUCKET, gt_capacity=CAPACITY)
    return batch, torch.tensor(sizes, dtype=torch.float32), gt


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def compiled_training():
    """Eager and compiled losses and gradients of the same model on three batches of one bucket."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model().train()
    model.roi_heads.cfg.mask_branch_positives_only = False  # the static-shape mask branch, as compiled
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(model.losses, fullgraph=True, backend=counter)
    runs = []
    with torch._inductor.config.patch(fallback_random=True):
        for seed in (1, 2, 3):
            batch, hw, gt = _prepare(model, seed)
            torch.manual_seed(10 + seed)
            model.zero_grad(set_to_none=True)
            eager = model.losses(batch, hw, gt)
            sum(eager.values()).backward()
            eager_grads = _grads(model)
            torch.manual_seed(10 + seed)
            model.zero_grad(set_to_none=True)
            compiled = step(batch, hw, gt)
            sum(compiled.values()).backward()
            runs.append((eager, compiled, eager_grads, _grads(model), gt))
    return model, counter, runs


def test_compiled_losses_equal_eager(compiled_training):
    _, _, runs = compiled_training
    for eager, compiled, *_ in runs:
        assert set(compiled) == LOSS_KEYS
        for k in LOSS_KEYS:
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)
            assert compiled[k].requires_grad
    # the batches differ, so equal losses are not one cached value
    assert len({round(float(r[0]["loss_mask"].detach()), 6) for r in runs}) == 3


def test_compiled_gradients_flow_and_equal_eager(compiled_training):
    model, _, runs = compiled_training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for _, _, eager_grads, compiled_grads, _ in runs:
        assert set(compiled_grads) == set(eager_grads) == trainable
        for n, g in compiled_grads.items():
            e = eager_grads[n]
            assert torch.isfinite(g).all(), n
            # relative to the tensor's own gradient scale: sums over many terms reassociate under inductor
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4 * float(e.abs().max()) + 1e-8, msg=n)


def test_three_batches_of_one_bucket_compile_once(compiled_training):
    _, counter, runs = compiled_training
    assert len({int(r[4]["valid"].sum()) for r in runs}) > 1, "batches should differ in object count"
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one batch shape"
    ops = {str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("maskrcnn_fast.roi_align_forward", "maskrcnn_fast.nms_padded", "maskrcnn_fast.sigmoid_bce_mask_loss"):
        assert any(op in o for o in ops), f"{op} not in the compiled graph"


def test_inference_core_compiles_and_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model().eval()
    counter = CompileCounterWithBackend("inductor")
    detect = torch.compile(model.detect, fullgraph=True, backend=counter)
    with torch.no_grad():
        for seed in (1, 2):
            batch, hw, _ = _prepare(model, seed)
            eager = model.detect(batch, hw)
            compiled = detect(batch, hw)
            _assert_same_detections(compiled, eager)
    assert counter.frame_count == 1
    ops = {str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("maskrcnn_fast.nms_padded", "maskrcnn_fast.roi_align_forward", "maskrcnn_fast.class_mask_logits"):
        assert any(op in o for o in ops), f"{op} not in the compiled graph"


def _assert_same_detections(got, want):
    boxes, scores, labels, valid, masks = got
    assert torch.equal(valid, want[3]) and int(valid.sum()) > 0
    v = valid
    assert torch.equal(labels[v], want[2][v])
    torch.testing.assert_close(boxes[v], want[0][v], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scores[v], want[1][v], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(masks[v], want[4][v], rtol=1e-4, atol=1e-5)
