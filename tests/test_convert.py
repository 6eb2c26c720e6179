"""``from_torchvision``: same weights, same configuration, same detections as torchvision's Mask R-CNN.

A seeded random-weight torchvision model, with its RPN and class scores spread so that rankings are
not decided by rounding, runs on real photographs (scikit-image's). At this size the Triton
interpreter is too slow, so our side runs the kernels' PyTorch backend.
"""
import pytest
import torch
import torchvision
from torchvision.ops import box_iou

import kernels
from maskrcnn_fast import MaskRCNN, from_torchvision

skimage_data = pytest.importorskip("skimage.data")

TV_KW = dict(min_size=256, max_size=384, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
             box_detections_per_img=50)


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **TV_KW)
    with torch.no_grad():
        # random init gives near-uniform scores: every class ~1/91, every anchor ~0.5
        tv.rpn.head.cls_logits.weight.mul_(10)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(6)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(3)
    return tv.eval()


def photographs():
    return [torch.from_numpy(f()).permute(2, 0, 1).float() / 255
            for f in (skimage_data.astronaut, skimage_data.coffee, skimage_data.chelsea)]


def test_config_and_weights_carry_over(tv_model):
    ours = from_torchvision(tv_model)
    assert isinstance(ours, MaskRCNN) and not ours.training
    cfg = ours.cfg
    assert (cfg.num_classes, cfg.min_size, cfg.max_size) == (91, 256, 384)
    assert (cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test, cfg.box_detections_per_img) == (300, 150, 50)
    assert cfg.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0) and cfg.mask_layers == (256, 256, 256, 256)
    theirs = tv_model.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)


def test_state_dict_needs_matching_layout(tv_model):
    state = tv_model.state_dict()
    ours = from_torchvision(state, **TV_KW)
    assert ours.cfg.num_classes == 91
    with pytest.raises(ValueError, match="does not match"):
        from_torchvision(state, **TV_KW, representation_size=512)
    state = {k: v for k, v in state.items() if "mask_predictor" not in k}
    with pytest.raises(ValueError, match="missing"):
        from_torchvision(state, **TV_KW)


def _mask_iou(a, b):
    a, b = a[:, 0] > 0.5, b[:, 0] > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return inter, union


def _pair_up(e, g):
    """Index of our detection for each of torchvision's: same label, score within 2e-3, best box IoU.
    (Detections whose scores tie to float noise may come out in either order.)"""
    iou = box_iou(e["boxes"], g["boxes"])
    ok = (e["labels"][:, None] == g["labels"][None]) & ((e["scores"][:, None] - g["scores"][None]).abs() <= 2e-3)
    iou = torch.where(ok, iou, -1.0)
    order = []
    for i in range(len(iou)):
        j = int(iou[i].argmax())
        order.append(j)
        iou[:, j] = -1.0
    return torch.tensor(order, dtype=torch.int64)


def test_detections_equal_torchvision_on_photographs(tv_model):
    images = photographs()
    with torch.no_grad():
        expected = tv_model(images)
        with kernels.use_backend("torch"):
            got = from_torchvision(tv_model)(images)
    total = 0
    for e, g, im in zip(expected, got, images):
        n = len(e["boxes"])
        total += n
        assert len(g["boxes"]) == n
        order = _pair_up(e, g)
        assert sorted(order.tolist()) == list(range(n))
        g = {k: v[order] for k, v in g.items()}
        assert torch.equal(g["labels"], e["labels"])
        assert box_iou(g["boxes"], e["boxes"]).diag().min() > 0.95
        torch.testing.assert_close(g["scores"], e["scores"], atol=2e-3, rtol=0)
        assert g["masks"].shape == e["masks"].shape == (n, 1, *im.shape[-2:])
        inter, union = _mask_iou(g["masks"], e["masks"])
        # masks of a few pixels flip on threshold noise; judge those by the aggregate IoU
        big = union >= 50
        assert (inter[big] / union[big]).min() > 0.9
        assert inter.sum() / union.sum().clamp(min=1) > 0.97
    assert total >= 60, "too few detections to compare: spread the scores more"


@pytest.mark.parametrize("edge_objects", [False, True])
def test_training_losses_equal_torchvision_when_sampling_takes_everything(edge_objects):
    """With batch sizes above the candidate counts and positive fraction 1, both samplers take every
    positive and negative, so the training losses are deterministic and must agree. With
    ``edge_objects``, objects touch the bottom/right edge of images that are padded in the batch: their
    mask targets must be sampled from the image's own mask, as torchvision does, not from the padding."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    from test_model import make_batch

    torch.manual_seed(0)
    kw = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
              rpn_batch_size_per_image=100_000, rpn_positive_fraction=1.0,
              box_batch_size_per_image=100_000, box_positive_fraction=1.0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    tv = torchvision.models.detection.MaskRCNN(backbone, num_classes=5, **kw).train()
    with torch.no_grad():
        tv.rpn.head.cls_logits.weight.mul_(10)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(6)
    ours = from_torchvision(tv)
    assert ours.training
    images, targets = make_batch()
    if edge_objects:
        from test_model import _target
        # image 0 is 64x80 (padded in height), image 1 is 72x64 (padded in width)
        targets = [_target(64, 80, [[30, 20, 80, 64], [5, 6, 40, 50]], [1, 3]),
                   _target(72, 64, [[20, 30, 64, 72]], [4])]
    with torch.no_grad():
        expected = tv(images, targets)
        with kernels.use_backend("torch"):
            got = ours(images, targets)
    assert set(got) == set(expected)
    assert all(v > 0 for v in expected.values()), expected
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)
