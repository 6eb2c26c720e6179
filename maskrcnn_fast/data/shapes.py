"""Embedded synthetic "shapes" dataset: circles, squares, triangles and stars on noisy, textured
backgrounds, with exact instance masks. No download, no files: image ``i`` of a split is a pure
function of ``(seed, split, i)``.

Each object is rasterised at pixel centres, so its mask is exactly the set of pixels painted with
its colour. Later objects occlude earlier ones; an instance's mask is its *visible* part, and an
object that would hide more than half of an earlier one is re-drawn elsewhere, so every painted
object is a labelled, recognisable instance. Boxes are the tight extent of the visible mask
(``x2 = last column + 1``, COCO's convention for a pixel-exact box).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

CLASSES = ("circle", "square", "triangle", "star")
_SPLIT_IDS = {"train": 0, "val": 1}


def _polygon_mask(xx: np.ndarray, yy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every pixel centre (works for the non-convex star)."""
    inside = np.zeros(xx.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > yy) != (y0 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (yy - y1) * (x0 - x1) / (y0 - y1)
        inside ^= crosses & (xx < x_at)
        x0, y0 = x1, y1
    return inside


def _shape_mask(kind: str, cx: float, cy: float, r: float, angle: float, xx, yy) -> np.ndarray:
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == "square":
        a = np.pi / 4 + angle + np.arange(4) * np.pi / 2
        verts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    elif kind == "triangle":
        a = angle + np.arange(3) * 2 * np.pi / 3
        verts = np.stack([cx + 1.15 * r * np.cos(a), cy + 1.15 * r * np.sin(a)], 1)
    else:  # five-pointed star: outer radius r, inner 0.45 r
        a = angle + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.2 * r, 0.5 * r)
        verts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1)
    return _polygon_mask(xx, yy, verts)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Base colour + smooth low-frequency texture + per-pixel noise, float32 [H, W, 3] in [0, 1]."""
    base = rng.uniform(0.1, 0.9, size=3)
    cells = int(rng.integers(3, 9))
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=(1, 3, cells, cells)).astype(np.float32))
    texture = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = texture[0].permute(1, 2, 0).numpy() * rng.uniform(0.05, 0.2)
    noise = rng.normal(0, rng.uniform(0.01, 0.06), size=(size, size, 3))
    return (base + texture + noise).astype(np.float32), base


def render(seed: int, split: str, index: int, size: int = 128, max_objects: int = 4,
           min_radius: float = 0.08, max_radius: float = 0.22):
    """One image: ``(image uint8 [H, W, 3], masks bool [N, H, W], labels int64 [N] in 1..4)``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    image, base = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(10):
            r = rng.uniform(min_radius, max_radius) * size
            cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
            cls = int(rng.integers(len(CLASSES)))
            m = _shape_mask(CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * np.pi), xx, yy)
            # keep earlier instances at least half visible and every instance sizeable
            if m.sum() < 30 or any((prev & ~m).sum() < 0.5 * prev.sum() for prev in masks):
                continue
            break
        else:
            continue
        for prev in masks:
            prev &= ~m
        colour = rng.uniform(0, 1, size=3)
        while np.abs(colour - base).sum() < 0.6:  # visible against the background
            colour = rng.uniform(0, 1, size=3)
        shade = rng.normal(0, 0.03, size=(int(m.sum()), 3))
        image[m] = colour + shade
        masks.append(m)
        labels.append(cls + 1)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    mask_arr = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    return image, mask_arr, np.asarray(labels, dtype=np.int64)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight ``[x1, y1, x2, y2]`` of each mask, with ``x2 = last column + 1`` (pixel-exact)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


class ShapesDataset(torch.utils.data.Dataset):
    """``num_images`` synthetic images of one split. Items are keyed ``i`` or ``(i, flip)``.

    Returns ``(image float [3, H, W] in [0, 1], target)`` with target ``boxes[N, 4]`` (float32, xyxy),
    ``labels[N]`` (int64, 1..4), ``masks[N, H, W]`` (uint8), ``image_id`` (int).
    """

    class_names = CLASSES
    num_classes = len(CLASSES) + 1  # + background

    def __init__(self, split: str = "train", num_images: int = 512, size: int = 128, seed: int = 0,
                 max_objects: int = 4):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if num_images < 1 or size < 32:
            raise ValueError(f"need num_images >= 1 and size >= 32, got {num_images} and {size}")
        self.split, self.num_images, self.size, self.seed, self.max_objects = split, num_images, size, seed, max_objects
        self.label_to_cat = list(range(len(CLASSES) + 1))  # label k is COCO category id k
        self.decode_failures = 0
        self._coco = None

    def __len__(self) -> int:
        return self.num_images

    def raw(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range for {self.num_images} images")
        return render(self.seed, self.split, index, self.size, self.max_objects)

    def aspect_ratios(self) -> list[float]:
        return [1.0] * self.num_images

    def image_info(self, index: int) -> dict:
        return {"id": index, "file_name": f"{self.split}_{index:06d}.png", "height": self.size, "width": self.size}

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        image, masks, labels = self.raw(index)
        if flip:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
            "image_id": index,
        }
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255), target

    # ------------------------------------------------------------------ COCO
    def coco_dict(self, image_dir_prefix: str = "") -> dict:
        """The split as a COCO instances dict (RLE masks, exact), ground truth for COCOeval."""
        from pycocotools import mask as mask_utils

        images, annotations = [], []
        for i in range(self.num_images):
            _, masks, labels = self.raw(i)
            info = self.image_info(i)
            images.append({**info, "file_name": image_dir_prefix + info["file_name"]})
            for m, label, box in zip(masks, labels, masks_to_boxes(masks)):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(m.sum()), "iscrowd": 0,
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                })
        categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
        return {"images": images, "annotations": annotations, "categories": categories}

    @property
    def coco(self):
        """pycocotools ``COCO`` ground truth of this split (built once)."""
        if self._coco is None:
            from maskrcnn_fast.evaluate import coco_from_dict

            self._coco = coco_from_dict(self.coco_dict())
        return self._coco

    def write_coco(self, out_dir: str) -> str:
        """Write ``out_dir/instances.json`` and ``out_dir/images/*.png``; returns the JSON's path."""
        from PIL import Image

        image_dir = os.path.join(out_dir, "images")
        os.makedirs(image_dir, exist_ok=True)
        for i in range(self.num_images):
            Image.fromarray(self.raw(i)[0]).save(os.path.join(image_dir, self.image_info(i)["file_name"]))
        path = os.path.join(out_dir, "instances.json")
        with open(path, "w") as f:
            json.dump(self.coco_dict(), f)
        return path
