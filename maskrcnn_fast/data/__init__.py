"""Datasets and the training/eval loaders.

``--data`` specs:

* ``shapes`` (default) — the embedded synthetic dataset (:mod:`maskrcnn_fast.data.shapes`);
* ``coco:ANNOTATIONS.json:IMAGE_DIR`` — a COCO-format dataset (:mod:`maskrcnn_fast.data.coco`);
  it is both the training and the evaluation set unless ``--val-data`` names another;
* ``coins`` — scikit-image's coins photograph, a one-image real-photo sanity set.

The order of training samples is a pure function of ``(seed, epoch)``: ``epoch_batches`` orders the
dataset as ``DistributedSampler`` does, groups indices of similar aspect ratio into batches (as
torchvision's references do; batch k has the same group on every rank) and draws each sample's
horizontal flip. Resuming at iteration ``k``
therefore just skips the first batches of the current epoch, without loading them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from maskrcnn_fast.data.coco import CocoDataset, coins_dataset
from maskrcnn_fast.data.shapes import CLASSES, ShapesDataset
from maskrcnn_fast.errors import UserError

SCHEMES = ("shapes", "coco", "coins")


def build_dataset(spec: str, split: str, *, image_size: int = 128, num_images: int | None = None,
                  seed: int = 0):
    """Dataset for a ``--data`` spec; ``split`` is ``"train"`` or ``"val"``."""
    scheme, _, rest = spec.partition(":")
    if scheme == "shapes":
        if num_images is None:
            num_images = 512 if split == "train" else 64
        return ShapesDataset(split, num_images=num_images, size=image_size, seed=seed)
    if scheme == "coco":
        ann, sep, image_dir = rest.rpartition(":")
        if not sep or not ann or not image_dir:
            raise UserError(f"--data coco needs coco:ANNOTATIONS.json:IMAGE_DIR, got {spec!r}")
        return CocoDataset(ann, image_dir, train=split == "train")
    if scheme == "coins":
        return coins_dataset(train=split == "train")
    raise UserError(f"unknown --data scheme {scheme!r} in {spec!r}; use one of: shapes, coco:ANN.json:IMAGE_DIR, coins")


def aspect_groups(aspect_ratios: list[float]) -> np.ndarray:
    """Group id per image: wide (w >= h) or tall, so a batch pads little (torchvision's 2 bins at 1.0)."""
    return (np.asarray(aspect_ratios) < 1.0).astype(np.int64)


def epoch_batches(dataset, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  flip: bool = True, shuffle: bool = True) -> list[list[tuple[int, bool]]]:
    """This rank's batches of ``(index, flip)`` for one epoch, deterministic in ``(seed, epoch)``.

    Batches are formed for all ranks at once: ``batch_size * world_size`` samples of one aspect-ratio
    group make a global batch, and rank r takes every ``world_size``-th of them, so batch k has the same
    group on every rank (graph mode under torchrun then replays the same bucket everywhere instead of
    falling back). Incomplete groups are merged into the last batches, as in torchvision's
    GroupedBatchSampler. The order is ``DistributedSampler``'s, padded as it pads, so every rank gets
    the same number of batches and DDP ranks step together; with one process this is the plain
    single-rank grouping.
    """
    sampler = DistributedSampler(range(len(dataset)), num_replicas=1, rank=0, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    total = -(-len(indices) // world_size) * world_size
    indices = (indices * world_size)[:total]  # padded from the start, as DistributedSampler pads
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    flips = (torch.rand(len(indices), generator=gen) < 0.5).tolist() if flip else [False] * len(indices)
    groups = aspect_groups(dataset.aspect_ratios())
    span = batch_size * world_size
    buckets: dict[int, list] = {}
    batches = []
    for idx, f in zip(indices, flips):
        bucket = buckets.setdefault(int(groups[idx]), [])
        bucket.append((idx, f))
        if len(bucket) == span:
            batches.append(list(bucket))
            bucket.clear()
    leftover = [item for g in sorted(buckets) for item in buckets[g]]
    batches += [leftover[i:i + span] for i in range(0, len(leftover), span)]
    return [b[rank::world_size] for b in batches]  # every global batch holds a multiple of world_size


def collate(items):
    """Lists of images and targets; images that failed to decode (``None``) are dropped and counted."""
    kept = [it for it in items if it is not None]
    return [im for im, _ in kept], [t for _, t in kept], len(items) - len(kept)


def make_loader(dataset, batches, workers: int = 0, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    # a private generator: creating the iterator draws a worker seed, which must not shift the
    # global RNG stream that the model's sampling uses (exact resume depends on it)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))


__all__ = ["build_dataset", "epoch_batches", "collate", "make_loader", "aspect_groups", "ShapesDataset",
           "CocoDataset", "coins_dataset", "CLASSES", "SCHEMES"]
