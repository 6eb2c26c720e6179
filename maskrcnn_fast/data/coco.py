"""COCO-format instance segmentation data (``instances_*.json`` + an image folder).

Follows COCO tools and torchvision's detection references:

* polygon, uncompressed-RLE and compressed-RLE ``segmentation`` are all decoded with pycocotools;
* crowd annotations (``iscrowd=1``) are left out of the training targets (the model has no notion
  of "ignore" regions) but stay in the ground truth that COCOeval sees, where they are ignored;
* images without annotations are skipped for training and kept for evaluation (where every
  detection on them is a false positive);
* category ids (any integers) map to contiguous labels ``1..K`` in the order of ``categories``.

The annotation file and every image path are checked when the dataset is opened, so a typo fails
at once with one clear line (``UserError``). An image that exists but fails to decode is reported,
counted in ``decode_failures`` and skipped by the collate function.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from maskrcnn_fast.errors import UserError


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"annotation file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise UserError(f"annotation file {path} is not COCO instances format "
                        "(needs 'images' and 'categories' lists)")
    data.setdefault("annotations", [])
    return data


def validate_coco(data: dict, source: str) -> None:
    """Structural checks with one clear line per problem, before anything is trained."""
    cat_ids = {c.get("id") for c in data["categories"]}
    if not cat_ids:
        raise UserError(f"{source}: 'categories' is empty")
    image_ids = set()
    for im in data["images"]:
        if not all(k in im for k in ("id", "file_name", "height", "width")):
            raise UserError(f"{source}: image entry {im!r:.80} needs id, file_name, height and width")
        image_ids.add(im["id"])
    for ann in data["annotations"]:
        for k in ("image_id", "category_id", "bbox"):
            if k not in ann:
                raise UserError(f"{source}: annotation {ann.get('id')} has no {k!r}")
        if ann["category_id"] not in cat_ids:
            raise UserError(f"{source}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                            f"which is not in 'categories' (ids {sorted(cat_ids)[:10]})")
        if ann["image_id"] not in image_ids:
            raise UserError(f"{source}: annotation {ann.get('id')} refers to image_id {ann['image_id']}, "
                            "which is not in 'images'")


def segmentation_to_mask(segm, height: int, width: int) -> np.ndarray:
    """Polygon(s), uncompressed RLE or compressed RLE -> bool mask ``[H, W]``."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise UserError(f"unsupported segmentation of type {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)


class CocoDataset(torch.utils.data.Dataset):
    """One COCO-format split. Items keyed ``i`` or ``(i, flip)`` -> ``(image [3,H,W] float, target)``
    (``None`` if the image fails to decode). ``train=True`` drops images with no non-crowd annotation.
    """

    def __init__(self, annotations, image_dir: str | None, train: bool = False, source: str | None = None,
                 images: dict | None = None):
        if isinstance(annotations, str):
            source = source or annotations
            data = _load_json(annotations)
        else:
            data = annotations
        source = source or "annotations"
        validate_coco(data, source)
        self.data, self.image_dir, self._images = data, image_dir, images
        cats = data["categories"]
        self.class_names = tuple(str(c.get("name", c["id"])) for c in cats)
        self.label_to_cat = [0] + [c["id"] for c in cats]
        self.cat_to_label = {c["id"]: k + 1 for k, c in enumerate(cats)}
        self.num_classes = len(cats) + 1
        per_image: dict = {im["id"]: [] for im in data["images"]}
        for ann in data["annotations"]:
            per_image[ann["image_id"]].append(ann)
        self.anns = per_image
        infos = data["images"]
        if train:
            infos = [im for im in infos if any(not a.get("iscrowd", 0) for a in per_image[im["id"]])]
            if not infos:
                raise UserError(f"{source}: no image has a (non-crowd) annotation to train on")
        self.infos = infos
        if images is None:
            if image_dir is None or not os.path.isdir(image_dir):
                raise UserError(f"image folder not found: {image_dir}")
            missing = [im["file_name"] for im in infos if not os.path.isfile(self._path(im))]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"image not found: {os.path.join(image_dir, missing[0])}{more}")
        self.decode_failures = 0
        self._coco = None

    def _path(self, info: dict) -> str:
        return os.path.join(self.image_dir, info["file_name"])

    def __len__(self) -> int:
        return len(self.infos)

    def aspect_ratios(self) -> list[float]:
        return [im["width"] / im["height"] for im in self.infos]

    def image_info(self, index: int) -> dict:
        return self.infos[index]

    def _decode(self, info: dict):
        if self._images is not None:
            return self._images[info["id"]]
        from PIL import Image

        try:
            with Image.open(self._path(info)) as im:
                return np.array(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any decoder error means "skip this image"
            self.decode_failures += 1
            print(f"warning: skipping {self._path(info)}: cannot decode ({type(e).__name__}: {e})", file=sys.stderr)
            return None

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        info = self.infos[index]
        image = self._decode(info)
        if image is None:
            return None
        h, w = image.shape[:2]
        anns = [a for a in self.anns[info["id"]] if not a.get("iscrowd", 0)]
        masks = np.zeros((len(anns), h, w), dtype=bool)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for i, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            boxes[i] = (x, y, x + bw, y + bh)
            if "segmentation" in a:
                masks[i] = segmentation_to_mask(a["segmentation"], h, w)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # degenerate boxes cannot train
        boxes, masks = boxes[keep], masks[keep]
        labels = np.asarray([self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)[keep]
        if flip:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
            "image_id": info["id"],
        }
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255), target

    @property
    def coco(self):
        if self._coco is None:
            from maskrcnn_fast.evaluate import coco_from_dict

            self._coco = coco_from_dict(self.data)
        return self._coco


def coins_dataset(train: bool = False) -> CocoDataset:
    """A one-photo real-image sanity set: scikit-image's ``coins``, one instance per coin from Otsu
    thresholding and connected-component labelling. Same image for train and val."""
    from pycocotools import mask as mask_utils
    from scipy import ndimage
    from skimage import data, filters, measure, morphology

    gray = data.coins()
    fg = gray > filters.threshold_otsu(gray)
    fg = ndimage.binary_fill_holes(ndimage.binary_closing(fg, structure=morphology.disk(2)))
    labelled = measure.label(fg)
    anns = []
    for region in measure.regionprops(labelled):
        if region.area < 300:  # specks and edge fragments
            continue
        m = np.asfortranarray((labelled == region.label).astype(np.uint8))
        rle = mask_utils.encode(m)
        y0, x0, y1, x1 = region.bbox
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                     "area": float(region.area), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    h, w = gray.shape
    ann = {"images": [{"id": 1, "file_name": "coins.png", "height": h, "width": w}], "annotations": anns,
           "categories": [{"id": 1, "name": "coin"}]}
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    return CocoDataset(ann, None, train=train, source="coins", images={1: rgb})
