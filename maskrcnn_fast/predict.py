"""Inference on image files: COCO-format result JSON (RLE masks) and PNG overlays.

Accepts our training checkpoints and torchvision Mask R-CNN weights (a ``state_dict``, or a dict
with a ``"model"`` entry as torchvision's reference scripts save), loaded through
:func:`maskrcnn_fast.from_torchvision`.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from maskrcnn_fast import checkpoint
from maskrcnn_fast.errors import UserError
from maskrcnn_fast.evaluate import to_coco_results


def _torchvision_state(obj):
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict) and "roi_heads.box_predictor.cls_score.weight" in state \
            and "roi_heads.mask_predictor.mask_fcn_logits.weight" in state:
        return state
    return None


def load_model(path: str, device, expect_num_classes: int | None = None):
    """``(model in eval mode, class_names, label_to_cat, checkpoint-or-None)`` from a checkpoint file."""
    from maskrcnn_fast import from_torchvision
    from maskrcnn_fast.train import ARCH, build_model

    raw = checkpoint.read(path)
    if not checkpoint.is_ours(raw):
        state = _torchvision_state(raw)
        if state is None:
            raise UserError(f"checkpoint {path} is neither a maskrcnn-fast checkpoint nor torchvision "
                            "Mask R-CNN weights")
        try:
            model = from_torchvision(state)
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path}: {e}") from None
        k = model.cfg.num_classes
        names = [f"class{i}" for i in range(1, k)]
        ckpt = None
    else:
        expect = {"num_classes": expect_num_classes} if expect_num_classes else None
        ckpt = checkpoint.load(path, expect_arch=ARCH, expect_config=expect)
        cfg = dict(ckpt["model_config"])
        model = build_model(cfg.pop("backbone"), cfg.pop("num_classes"), **cfg)
        checkpoint.load_model_state(model, ckpt["model"], path)
        names, k = ckpt["class_names"], model.cfg.num_classes
    if expect_num_classes is not None and model.cfg.num_classes != expect_num_classes:
        raise UserError(f"checkpoint {path} is for another model: {model.cfg.num_classes - 1} classes, "
                        f"the data has {expect_num_classes - 1}")
    label_to_cat = ckpt["label_to_cat"] if ckpt else list(range(k))
    return model.to(device).eval(), list(names), label_to_cat, ckpt


def read_image(path: str) -> np.ndarray | None:
    """RGB uint8 ``[H, W, 3]``; a missing file is a ``UserError``, an undecodable one ``None``."""
    from PIL import Image

    if not os.path.isfile(path):
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder error: report and skip
        print(f"warning: skipping {path}: cannot decode ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def overlay(image: np.ndarray, out: dict, class_names: list[str], score_thresh: float) -> np.ndarray:
    """Masks, boxes and "label score" captions drawn on the image (uint8 ``[H, W, 3]``)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    keep = out["scores"] >= score_thresh
    if keep.any():
        masks = out["masks"][keep][:, 0] > 0.5
        labels = out["labels"][keep].tolist()
        captions = [f"{class_names[k - 1] if 0 < k <= len(class_names) else k} {s:.2f}"
                    for k, s in zip(labels, out["scores"][keep].tolist())]
        img = draw_segmentation_masks(img, masks, alpha=0.45)
        img = draw_bounding_boxes(img, out["boxes"][keep], labels=captions, colors="yellow", width=1)
    return img.permute(1, 2, 0).numpy()


@torch.no_grad()
def predict(checkpoint_path: str, image_paths: list[str], out_dir: str, device="cpu",
            score_thresh: float = 0.5) -> str:
    """Write ``out_dir/predictions.json`` (COCO results, RLE masks; ``image_id`` = position in the
    list, plus ``file_name``) and one ``<name>_pred.png`` overlay per image. Returns the JSON's path."""
    from PIL import Image

    from maskrcnn_fast.train import check_out_dir

    if not image_paths:
        raise UserError("predict needs at least one image")
    check_out_dir(out_dir)
    images = [read_image(p) for p in image_paths]  # every path is checked before any compute
    device = torch.device(device)
    model, names, label_to_cat, _ = load_model(checkpoint_path, device)
    results = []
    for image_id, (path, image) in enumerate(zip(image_paths, images)):
        if image is None:
            continue
        x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(device)
        out = {k: v.cpu() for k, v in model([x])[0].items()}
        for r in to_coco_results([out], [image_id], label_to_cat):
            results.append({**r, "file_name": os.path.basename(path)})
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(overlay(image, out, names, score_thresh)).save(os.path.join(out_dir, f"{stem}_pred.png"))
        n = int((out["scores"] >= score_thresh).sum())
        print(f"{path}: {n} detection(s) with score >= {score_thresh}")
    json_path = os.path.join(out_dir, "predictions.json")
    with open(json_path, "w") as f:
        json.dump(results, f)
    return json_path
