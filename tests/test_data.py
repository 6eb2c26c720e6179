"""Data: shapes determinism and mask/box consistency, COCO loading (polygon/RLE, crowd, empty images),
the COCO round trip through COCOeval, the deterministic sharded batch order, and bad COCO input."""
import json
import os

import numpy as np
import pytest
import torch

from maskrcnn_fast.data import build_dataset, epoch_batches
from maskrcnn_fast.data.coco import CocoDataset
from maskrcnn_fast.data.shapes import ShapesDataset
from maskrcnn_fast.errors import UserError
from maskrcnn_fast.evaluate import coco_metrics


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def test_shapes_deterministic_per_seed():
    a, b = ShapesDataset("train", 6, 64, seed=3), ShapesDataset("train", 6, 64, seed=3)
    for i in range(6):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["labels"], tb["labels"])
    other_seed, val = ShapesDataset("train", 6, 64, seed=4), ShapesDataset("val", 6, 64, seed=3)
    assert not torch.equal(a[0][0], other_seed[0][0])
    assert not torch.equal(a[0][0], val[0][0])


def test_shapes_masks_boxes_labels_consistent():
    ds = ShapesDataset("train", 24, 64, seed=0)
    seen = set()
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        n = t["labels"].shape[0]
        assert n >= 1 and t["masks"].shape == (n, 64, 64) and t["boxes"].shape == (n, 4)
        assert ((t["labels"] >= 1) & (t["labels"] <= 4)).all()
        seen.update(t["labels"].tolist())
        # visible masks of one image never overlap: occlusion is resolved pixel-exactly
        assert t["masks"].sum(0).max() <= 1
        for m, box in zip(t["masks"], t["boxes"]):
            assert m.sum() >= 15
            assert box.tolist() == _tight_box(m)
    assert seen == {1, 2, 3, 4}


def test_flip_moves_masks_and_boxes_together():
    ds = ShapesDataset("train", 2, 64)
    (im, t), (imf, tf) = ds[1], ds[(1, True)]
    assert torch.equal(imf, im.flip(-1)) and torch.equal(tf["masks"], t["masks"].flip(-1))
    for m, box in zip(tf["masks"], tf["boxes"]):
        assert box.tolist() == _tight_box(m)


def test_coco_round_trip_and_cocoeval_of_ground_truth(tmp_path):
    shapes = ShapesDataset("val", 6, 64, seed=1)
    ann = shapes.write_coco(str(tmp_path))
    coco = CocoDataset(ann, str(tmp_path / "images"))
    assert len(coco) == 6 and coco.num_classes == 5 and coco.class_names == ("circle", "square", "triangle", "star")
    results = []
    for i in range(6):
        (im_s, t_s), (im_c, t_c) = shapes[i], coco[i]
        assert torch.equal(im_s, im_c)  # PNG is lossless and images are generated as uint8
        assert torch.equal(t_s["masks"], t_c["masks"]) and torch.equal(t_s["boxes"], t_c["boxes"])
        assert torch.equal(t_s["labels"], t_c["labels"])
        for a in coco.anns[coco.infos[i]["id"]]:
            results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                            "segmentation": a["segmentation"], "score": 1.0})
    metrics = coco_metrics(coco.coco, results)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0) and metrics[iou_type]["AP50"] == pytest.approx(1.0)


def _write_small_coco(tmp_path, anns, categories=None, images=None):
    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img_dir / name)
    data = {"images": images or [{"id": 7, "file_name": "a.png", "height": 40, "width": 50},
                                 {"id": 9, "file_name": "b.png", "height": 40, "width": 50}],
            "annotations": anns, "categories": categories or [{"id": 3, "name": "thing"}, {"id": 11, "name": "other"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path), str(img_dir)


def test_coco_polygon_rle_crowd_and_images_without_annotations(tmp_path):
    from pycocotools import mask as mask_utils

    rle_mask = np.zeros((40, 50), np.uint8, order="F")
    rle_mask[5:15, 30:45] = 1
    rle = mask_utils.encode(rle_mask)
    anns = [
        {"id": 1, "image_id": 7, "category_id": 11, "bbox": [10, 10, 10, 20], "iscrowd": 0,
         "segmentation": [[10, 10, 20, 10, 20, 30, 10, 30]]},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [30, 5, 15, 10], "iscrowd": 0,
         "segmentation": {"size": [40, 50], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": {"size": [40, 50], "counts": [0, 5, 35, 5, 35, 5, 35, 5, 35, 5, 1765]}},
    ]
    ann, img_dir = _write_small_coco(tmp_path, anns)
    train, val = CocoDataset(ann, img_dir, train=True), CocoDataset(ann, img_dir, train=False)
    assert len(train) == 1 and len(val) == 2  # image 9 has no annotation: skipped for training only
    _, t = train[0]
    assert t["labels"].tolist() == [2, 1]  # category ids 11 and 3 -> labels in categories' order; crowd left out
    assert t["boxes"].tolist() == [[10, 10, 20, 30], [30, 5, 45, 15]]
    assert t["masks"][1].bool().equal(torch.from_numpy(rle_mask.astype(bool)))
    poly = t["masks"][0].bool()
    assert poly[12:28, 12:18].all() and poly.sum() == pytest.approx(200, abs=40) and not poly[:, 25:].any()
    _, tf = train[(0, True)]
    assert tf["boxes"].tolist() == [[30, 10, 40, 30], [5, 5, 20, 15]]
    assert len(val.coco.getAnnIds(iscrowd=True)) == 1  # crowd stays in COCOeval's ground truth


@pytest.mark.parametrize("problem", ["missing_file", "malformed", "not_coco", "unknown_category", "missing_image"])
def test_bad_coco_input_is_one_clear_error(tmp_path, problem):
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}]
    images = None
    if problem == "unknown_category":
        anns[0]["category_id"] = 99
    if problem == "missing_image":
        images = [{"id": 7, "file_name": "nope.png", "height": 40, "width": 50}]
    ann, img_dir = _write_small_coco(tmp_path, anns, images=images)
    if problem == "missing_file":
        ann = str(tmp_path / "absent.json")
    if problem == "malformed":
        with open(ann, "w") as f:
            f.write('{"images": [')
    if problem == "not_coco":
        with open(ann, "w") as f:
            f.write("[1, 2, 3]")
    expected = {"missing_file": "not found", "malformed": "not valid JSON", "not_coco": "not COCO",
                "unknown_category": "not in 'categories'", "missing_image": "image not found"}[problem]
    with pytest.raises(UserError, match=expected):
        build_dataset(f"coco:{ann}:{img_dir}", "train")


def test_unknown_data_scheme():
    with pytest.raises(UserError, match="unknown --data scheme 'voc'"):
        build_dataset("voc:x", "train")


class _Ratios:
    def __init__(self, ratios):
        self.ratios = ratios

    def __len__(self):
        return len(self.ratios)

    def aspect_ratios(self):
        return self.ratios


def test_epoch_batches_deterministic_sharded_and_grouped():
    ds = _Ratios([1.5 if i % 3 else 0.6 for i in range(22)])
    b0 = epoch_batches(ds, 4, epoch=0, seed=5)
    assert b0 == epoch_batches(ds, 4, epoch=0, seed=5) and b0 != epoch_batches(ds, 4, epoch=1, seed=5)
    assert sorted(i for b in b0 for i, _ in b) == list(range(22))
    full = [b for b in b0 if len(b) == 4]
    assert all(len({ds.ratios[i] < 1 for i, _ in b}) == 1 for b in full)  # one aspect group per full batch
    flips = [f for b in b0 for _, f in b]
    assert 0 < sum(flips) < len(flips)
    r0, r1 = (epoch_batches(ds, 4, 0, 5, rank=r, world_size=2) for r in (0, 1))
    assert len(r0) == len(r1)
    i0, i1 = {i for b in r0 for i, _ in b}, {i for b in r1 for i, _ in b}
    assert not i0 & i1 and i0 | i1 == set(range(22))


@pytest.mark.parametrize("world", [2, 3])
def test_batch_k_has_one_aspect_group_on_every_rank(world):
    """Graph mode replays one bucket per aspect group: batch k of every rank is of the same group, except
    the last, merged leftovers (as the single-rank grouping); ranks get equal batch counts and sizes."""
    ds = _Ratios([1.5 if (i * 7) % 5 else 0.6 for i in range(61)])
    ranks = [epoch_batches(ds, 4, 1, 5, rank=r, world_size=world) for r in range(world)]
    assert len({len(b) for b in ranks}) == 1 and len({tuple(map(len, b)) for b in ranks}) == 1
    seen = [i for b in ranks for batch in b for i, _ in batch]
    assert set(seen) == set(range(61)) and len(seen) == -(-61 // world) * world  # DistributedSampler's padding
    same_group = 0
    for k, batches in enumerate(zip(*ranks)):
        groups = {ds.ratios[i] < 1 for batch in batches for i, _ in batch}
        full = all(len(batch) == 4 for batch in batches)
        if full and k < len(ranks[0]) - 2:  # the last two may hold the merged leftovers
            assert len(groups) == 1, (k, batches)
            same_group += 1
    assert same_group >= len(ranks[0]) - 3


def test_coins_sanity_set():
    pytest.importorskip("skimage")
    ds = build_dataset("coins", "val")
    image, t = ds[0]
    assert image.shape == (3, 303, 384) and len(t["labels"]) >= 15
    for m, box in zip(t["masks"], t["boxes"]):
        assert box.tolist() == _tight_box(m)
    assert os.path.basename(ds.image_info(0)["file_name"]) == "coins.png"


def test_undecodable_image_is_reported_skipped_and_counted(tmp_path, capsys):
    from maskrcnn_fast.data import collate

    anns = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}]
    ann, img_dir = _write_small_coco(tmp_path, anns)
    with open(os.path.join(img_dir, "a.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    ds = CocoDataset(ann, img_dir)
    assert ds[0] is None and "cannot decode" in capsys.readouterr().err
    images, targets, skipped = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 1 and skipped == 1
