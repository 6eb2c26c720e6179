"""The model end to end at a tiny size: losses, gradients, inference outputs, ablations, bad inputs,
empty targets, and torch.compile of the RoI heads. Kernels run in Triton's interpreter on CPU."""
import pytest
import torch

import kernels
from maskrcnn_fast import MaskRCNNConfig, maskrcnn_resnet18_fpn

TINY = dict(min_size=64, max_size=96, fpn_channels=32, representation_size=64, mask_layers=(16, 16, 16, 16),
            mask_roi_size=7, rpn_pre_nms_top_n_train=60, rpn_post_nms_top_n_train=40,
            rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=40, rpn_batch_size_per_image=64,
            box_batch_size_per_image=32, box_detections_per_img=20, box_score_thresh=0.0)
TINY_DESC = "resnet18-FPN32, 2 images 64x80 and 72x64, 40 proposals, 32 sampled RoIs"
NUM_CLASSES = 5
LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_model(**overrides):
    kw = {**TINY, **overrides}
    return maskrcnn_resnet18_fpn(num_classes=NUM_CLASSES, trainable_backbone_layers=5, **kw)


def _target(h, w, boxes, labels):
    boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1 + (x2 - x1) // 4:x2] = 1  # not the whole box, so targets differ from boxes
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


def make_batch(empty=(False, False)):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [_target(64, 80, [[5, 6, 40, 50], [20, 10, 70, 40]], [1, 3]),
               _target(72, 64, [[8, 12, 50, 60]], [4])]
    for i, e in enumerate(empty):
        if e:
            h, w = images[i].shape[-2:]
            targets[i] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                          "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
    return images, targets


@pytest.fixture(scope="module")
def trained_step():
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = make_batch()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return model, losses


def test_loss_keys_and_finite(trained_step):
    _, losses = trained_step
    assert set(losses) == LOSS_KEYS
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    # untrained classifiers start near chance: ln(2) for objectness, about ln(K) for classes
    assert 0.5 < losses["loss_objectness"].item() < 0.9
    assert 0.5 < losses["loss_classifier"].item() < 2 * torch.log(torch.tensor(float(NUM_CLASSES)))
    assert losses["loss_mask"].item() > 0.3


def test_gradients_reach_every_parameter_group(trained_step):
    model, _ = trained_step
    groups = {"backbone.body": [], "backbone.fpn": [], "rpn.head": [], "roi_heads.box_head": [],
              "roi_heads.box_predictor": [], "roi_heads.mask_head": [], "roi_heads.mask_predictor": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = next(g for g in groups if name.startswith(g))
            groups[group].append(p.grad is not None and bool(p.grad.abs().sum() > 0))
    for g, has_grad in groups.items():
        assert has_grad and all(has_grad), f"{g}: {sum(has_grad)}/{len(has_grad)} parameters got a gradient"


def test_inference_outputs(trained_step):
    model, _ = trained_step
    model.eval()
    images, _ = make_batch()
    with torch.no_grad():
        out = model(images)
        out_batched = model(torch.stack([images[1], images[1]]))
    model.train()
    assert len(out) == 2 and len(out_batched) == 2
    for o, im in zip(out, images):
        n = o["boxes"].shape[0]
        assert 0 < n <= TINY["box_detections_per_img"]
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == (n,) and o["scores"].shape == (n,)
        assert o["masks"].shape == (n, 1, *im.shape[-2:])
        assert o["labels"].min() >= 1 and o["labels"].max() < NUM_CLASSES
        assert (o["scores"][:-1] >= o["scores"][1:]).all(), "detections sorted by score"
        assert (o["masks"] >= 0).all() and (o["masks"] <= 1).all()
        h, w = im.shape[-2:]
        assert (o["boxes"][:, 0::2] <= w + 1e-3).all() and (o["boxes"][:, 1::2] <= h + 1e-3).all()
    torch.testing.assert_close(out_batched[0]["boxes"], out_batched[1]["boxes"])


def test_zero_detections_give_empty_tensors():
    model = tiny_model(box_score_thresh=1.0).eval()
    images, _ = make_batch()
    with torch.no_grad():
        out = model(images)
    for o, im in zip(out, images):
        assert o["boxes"].shape == (0, 4) and o["boxes"].dtype == torch.float32
        assert o["scores"].shape == (0,) and o["labels"].shape == (0,) and o["labels"].dtype == torch.int64
        assert o["masks"].shape == (0, 1, *im.shape[-2:])


def test_images_without_ground_truth_train():
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = make_batch(empty=(True, True))
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    # only background and objectness losses apply
    assert losses["loss_box_reg"].item() == 0 and losses["loss_mask"].item() == 0
    assert losses["loss_rpn_box_reg"].item() == 0
    assert losses["loss_classifier"].item() > 0 and losses["loss_objectness"].item() > 0
    # one empty image next to a normal one
    images, targets = make_batch(empty=(False, True))
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"].item() > 0


@pytest.mark.parametrize("switch", [dict(pooler="roi_pool"), dict(mask_loss="softmax"), dict(mask_head="mlp"),
                                    dict(fused_mask_loss=True), dict(pool_level=3),
                                    dict(pooler="roi_pool", pool_level=3)])
def test_ablation_switches_train_and_infer(switch):
    torch.manual_seed(0)
    model = tiny_model(**switch).train()
    images, targets = make_batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    mask_params = [p for n, p in model.named_parameters() if n.startswith("roi_heads.mask")]
    assert mask_params and all(p.grad is not None for p in mask_params)
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert out[0]["masks"].shape[1:] == (1, *images[0].shape[-2:])


@pytest.mark.parametrize("pooler", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("level", [0, 3])
def test_pool_level_pools_every_roi_from_that_level_as_torchvision(pooler, level):
    import torchvision

    torch.manual_seed(0)
    heads = tiny_model(pooler=pooler, pool_level=level).roi_heads
    features = [torch.randn(2, 32, 64 // s, 64 // s, dtype=torch.float64) for s in (4, 8, 16, 32)]
    rois = torch.tensor([[0, 3.0, 5.0, 60.0, 50.0], [1, 10.0, 2.0, 22.0, 17.0], [0, 0.5, 0.5, 8.0, 63.0]],
                        dtype=torch.float64)  # large, small and thin boxes: FPN eq. 1 would use other levels
    scale = 1.0 / (4, 8, 16, 32)[level]
    if pooler == "roi_align":
        want = torchvision.ops.roi_align(features[level], rois, 7, scale, sampling_ratio=2, aligned=False)
    else:
        want = torchvision.ops.roi_pool(features[level], rois, 7, scale)
    torch.testing.assert_close(heads.pool(features, rois, 7), want, rtol=1e-12, atol=1e-12)


def test_softmax_foreground_diagnostic_is_one_minus_background_probability():
    torch.manual_seed(0)
    model = tiny_model(mask_loss="softmax").eval()
    heads = model.roi_heads
    features = [torch.randn(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    rois = torch.tensor([[0, 3.0, 5.0, 60.0, 50.0], [0, 10.0, 2.0, 22.0, 17.0]])
    labels = torch.tensor([2, 4])
    with torch.no_grad():
        logits = heads.mask_logits(features, rois).double()
        class_probs = heads.mask_probs(features, rois, labels)
        heads.softmax_foreground = True
        fg_probs = heads.mask_probs(features, rois, labels)
    p = logits.softmax(dim=1)
    torch.testing.assert_close(class_probs.double(), p[torch.arange(2), labels], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fg_probs.double(), 1 - p[:, 0], rtol=1e-5, atol=1e-6)


def test_fused_mask_loss_equals_unfused():
    torch.manual_seed(0)
    fused = tiny_model(fused_mask_loss=True).train()
    plain = tiny_model().train()
    plain.load_state_dict(fused.state_dict())
    images, targets = make_batch()
    torch.manual_seed(5)
    a = fused(images, targets)["loss_mask"]
    torch.manual_seed(5)
    b = plain(images, targets)["loss_mask"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class _KernelRan(Exception):
    pass


@pytest.fixture
def no_kernels(monkeypatch):
    """Bad inputs must be rejected before any kernel runs."""
    def boom(*args, **kwargs):
        raise _KernelRan("a kernel ran before the input was rejected")
    for name in ("multiscale_roi_align", "roi_align", "roi_pool", "nms_padded"):
        monkeypatch.setattr(kernels, name, boom, raising=False)


def _bad(case):
    images, targets = make_batch()
    if case == "channels":
        images[1] = torch.rand(1, 72, 64)
    elif case == "no masks":
        del targets[0]["masks"]
    elif case == "boxes shape":
        targets[0]["boxes"] = torch.zeros(2, 5)
    elif case == "label range":
        targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    elif case == "mask size":
        targets[0]["masks"] = torch.zeros(2, 32, 80, dtype=torch.uint8)
    elif case == "no targets":
        targets = None
    return images, targets


@pytest.mark.parametrize("case, match", [("channels", "channel"), ("no masks", "masks"), ("boxes shape", r"\[G, 4\]"),
                                         ("label range", "labels"), ("mask size", "masks"),
                                         ("no targets", "targets")])
def test_bad_inputs_raise_clear_errors(case, match, no_kernels):
    model = tiny_model().train()
    images, targets = _bad(case)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        model(images, targets)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pooler"):
        MaskRCNNConfig(pooler="roi_warp")
    with pytest.raises(ValueError, match="pool_level"):
        MaskRCNNConfig(pool_level=4)
    with pytest.raises(ValueError, match="fused_mask_loss"):
        MaskRCNNConfig(fused_mask_loss=True, mask_loss="softmax")
    with pytest.raises(TypeError, match="unknown"):
        maskrcnn_resnet18_fpn(num_classes=3, rpn_nms_threshold=0.5)


def test_roi_heads_compile_fullgraph():
    """The training RoI heads (sampling, both branches, losses) trace as one graph: no breaks."""
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = make_batch()
    batch, sizes, gt = model.transform(images, targets)
    features = [f.detach().requires_grad_() for f in list(model.backbone(batch).values())[:4]]
    proposals = gt["boxes"].repeat(1, 4, 1) + torch.rand(2, 4 * gt["boxes"].shape[1], 4) * 4
    valid = torch.ones(proposals.shape[:2], dtype=torch.bool)
    heads = torch.compile(model.roi_heads, fullgraph=True, backend="aot_eager")
    losses = heads(features, proposals, valid, gt["boxes"], gt["labels"],
                   gt["valid"], gt["masks"])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and features[0].grad is not None


# ---------------------------------------------------------------------- parts against torchvision
def test_paste_masks_matches_torchvision():
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from maskrcnn_fast.postprocess import paste_masks

    g = torch.Generator().manual_seed(0)
    h, w = 37, 53
    xy = torch.rand(13, 2, generator=g) * torch.tensor([w, h]) * 1.2 - 5
    boxes = torch.cat([xy, xy + 1 + torch.rand(13, 2, generator=g) * 30], 1)
    masks = torch.rand(13, 28, 28, generator=g)
    expected = paste_masks_in_image(masks[:, None], boxes, (h, w), padding=1)
    torch.testing.assert_close(paste_masks(masks, boxes, h, w), expected, atol=1e-5, rtol=1e-5)
    assert paste_masks(masks[:0], boxes[:0], h, w).shape == (0, 1, h, w)


@pytest.mark.parametrize("low_quality, fg, bg", [(True, 0.7, 0.3), (False, 0.5, 0.5)])
def test_matcher_matches_torchvision(low_quality, fg, bg):
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou
    from maskrcnn_fast.box_ops import box_iou as batched_iou, match

    g = torch.Generator().manual_seed(0)
    def boxes(n, scale):
        xy = torch.rand(n, 2, generator=g) * 50
        return torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * scale], 1)
    anchors = boxes(301, 30)
    gts = [boxes(5, 40), boxes(2, 20)]
    gt = torch.zeros(2, 5, 4)
    gt[..., 2:] = 1
    valid = torch.zeros(2, 5, dtype=torch.bool)
    for i, b in enumerate(gts):
        gt[i, :len(b)], valid[i, :len(b)] = b, True
    matched, labels = match(batched_iou(gt, anchors[None]), valid, fg, bg, low_quality)
    matcher = Matcher(fg, bg, allow_low_quality_matches=low_quality)
    for i, b in enumerate(gts):
        ref = matcher(box_iou(b, anchors))
        expected = torch.where(ref >= 0, 1, torch.where(ref == -1, 0, -1))
        assert torch.equal(labels[i], expected)
        assert torch.equal(matched[i][ref >= 0], ref[ref >= 0])


def test_balanced_sampler_counts():
    from maskrcnn_fast.rpn import sample_balanced

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (3, 97), generator=g)
    labels[1] = torch.where(labels[1] == 1, 0, labels[1])  # no positives at all
    labels[2, :90] = 1                                       # more positives than allowed
    idx, is_pos, is_valid = sample_balanced(labels, 40, 0.25)
    assert idx.shape == (3, 40)
    for i in range(3):
        n_pos, n_neg = int((labels[i] == 1).sum()), int((labels[i] == 0).sum())
        want_pos = min(10, n_pos)
        assert int(is_pos[i].sum()) == want_pos
        assert int((is_valid[i] & ~is_pos[i]).sum()) == min(40 - want_pos, n_neg)
        picked = idx[i][is_valid[i]]
        assert len(set(picked.tolist())) == len(picked)
        assert (labels[i][idx[i][is_pos[i]]] == 1).all() and (labels[i][idx[i][is_valid[i] & ~is_pos[i]]] == 0).all()
        assert is_pos[i, :want_pos].all(), "positives come first"


def test_folded_backbone_matches_frozen_bn():
    from maskrcnn_fast.backbone import fold_frozen_bn, resnet_fpn

    torch.manual_seed(0)
    net = resnet_fpn("resnet18", 16).eval()
    with torch.no_grad():
        for m in net.modules():  # non-trivial BN statistics
            if hasattr(m, "running_var"):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.normal_()
                m.weight.uniform_(0.5, 1.5)
        x = torch.rand(1, 3, 64, 64)
        expected = net(x)
        got = fold_frozen_bn(net)(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-4, rtol=1e-4)


def test_training_step_compiles_as_one_graph():
    """``MaskRCNN.losses`` (backbone to losses, after the host-side transform) has no graph break,
    so a fixed batch shape can be captured whole (CUDA graphs / mode="reduce-overhead" on a GPU)."""
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = make_batch()
    batch, sizes, gt = model.transform(images, targets)
    hw = torch.tensor(sizes, dtype=torch.float32)
    step = torch.compile(model.losses, fullgraph=True, backend="aot_eager")
    with kernels.use_backend("torch"):
        losses = step(batch, hw, gt)
        sum(losses.values()).backward()
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    assert model.rpn.head.cls_logits.weight.grad is not None


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _a_trained_conv_weight(model) -> torch.Tensor:  # 3x3 or larger, so NHWC and NCHW strides differ
    return next(p for p in model.backbone.parameters() if p.dim() == 4 and p.shape[-1] > 1 and p.requires_grad)


@pytest.mark.parametrize("setting, cuda_available, weights_cl", [
    (None, False, False), (None, True, True), (True, False, True), (False, True, False)])
def test_memory_format_default_is_channels_last_where_cuda_is(monkeypatch, setting, cuda_available, weights_cl):
    """channels_last=None (the default): NHWC weights when CUDA is available (the model is built on CPU and
    moved; .to(device) keeps the format) and an NHWC batch on CUDA only; True/False force it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    model = tiny_model(**({} if setting is None else {"channels_last": setting}))
    assert model.cfg.channels_last is setting
    assert _is_cl(_a_trained_conv_weight(model)) == weights_cl
    batch = model.transform(make_batch()[0], None)[0]  # a CPU batch: NHWC only when forced
    assert _is_cl(batch) == (setting is True)


@pytest.mark.gpu
def test_default_model_runs_channels_last_on_cuda():
    model = tiny_model().cuda().train()
    images, targets = make_batch()
    images = [im.cuda() for im in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    batch = model.transform(images, targets)[0]
    conv = _a_trained_conv_weight(model)
    assert _is_cl(batch) and _is_cl(conv)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and _is_cl(conv.grad)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_model(channels_last=True).train()
    images, targets = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images[:1])
    assert out[0]["masks"].dtype == torch.float32 and out[0]["boxes"].dtype == torch.float32
