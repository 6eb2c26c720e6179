"""COCO metrics with pycocotools' COCOeval (never a hand-written AP).

``evaluate(model, dataset)`` runs inference, turns detections into COCO results (xywh boxes, RLE
masks thresholded at 0.5 as in the paper) and returns, for ``bbox`` and ``segm``: AP, AP50, AP75,
APs, APm, APl. Under DDP each rank predicts its shard; results are gathered on every rank and
evaluated once, so every rank returns the same numbers.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.distributed as dist

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_from_dict(data: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], **data}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_coco_results(outputs: list[dict], image_ids: list[int], label_to_cat: list[int],
                    mask_threshold: float = 0.5) -> list[dict]:
    """Model outputs (boxes xyxy, labels, scores, masks [N,1,H,W] probabilities) -> COCO results."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy()
        scores = out["scores"].detach().float().cpu().numpy()
        labels = out["labels"].detach().cpu().numpy()
        masks = out.get("masks")
        if masks is not None:
            masks = (masks.detach()[:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        for k in range(len(scores)):
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            r = {"image_id": int(image_id), "category_id": int(label_to_cat[int(labels[k])]),
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_metrics(coco_gt, results: list[dict], image_ids=None) -> dict:
    """COCOeval for ``bbox`` and ``segm`` -> ``{"bbox": {AP, AP50, ...}, "segm": {...}}`` in [0, 1]."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for iou_type in ("bbox", "segm"):
        usable = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not usable:  # loadRes rejects an empty list; no detections means AP 0
            metrics[iou_type] = {k: 0.0 for k in METRIC_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(usable)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval reports -1 where a size range has no ground truth; keep it, it means "undefined"
        metrics[iou_type] = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats[:6])}
    return metrics


@torch.no_grad()
def predict_dataset(model, dataset, device, batch_size: int = 8, rank: int = 0, world_size: int = 1,
                    autocast_dtype=None) -> tuple[list[dict], list[int]]:
    """COCO results and image ids for this rank's share of ``dataset`` (every ``world_size``-th image)."""
    was_training = model.training
    model.eval()
    results, ids = [], []
    indices = list(range(rank, len(dataset), world_size))
    try:
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start:start + batch_size]]
            items = [it for it in items if it is not None]
            if not items:
                continue
            images = [im.to(device, non_blocking=True) for im, _ in items]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = model(images)
            image_ids = [t["image_id"] for _, t in items]
            results += to_coco_results(outputs, image_ids, dataset.label_to_cat)
            ids += image_ids
    finally:
        model.train(was_training)
    return results, ids


def evaluate(model, dataset, device=None, batch_size: int = 8, autocast_dtype=None) -> dict:
    """COCO bbox and segm metrics of ``model`` on ``dataset`` (a shapes, COCO or coins dataset)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    results, ids = predict_dataset(model, dataset, device, batch_size, rank, world, autocast_dtype)
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, (results, ids))
        results = [r for part in gathered for r in part[0]]
        ids = [i for part in gathered for i in part[1]]
    all_ids = [dataset.image_info(i)["id"] for i in range(len(dataset))]
    return coco_metrics(dataset.coco, results, all_ids)


def format_metrics(metrics: dict) -> str:
    lines = []
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        lines.append(f"{iou_type:>4}: " + "  ".join(f"{k} {100 * m[k]:5.1f}" for k in METRIC_NAMES))
    return "\n".join(lines)
