"""Batched NMS work at Mask R-CNN's shapes, counted on the CPU: today's all-pairs kernels against the
class-segment targets of issue 22 (the "before" column of its table).

    python bench/nms_work.py

Today (kernels/nms.py ``_launch``), per image of N boxes, W = ceil(N / 64):
    * IoU tiles computed: W (W + 1) / 2 tiles of 64 x 64 pairs (the upper triangle, all classes together);
    * mask bytes allocated: W x (64 W) int64 words = 512 W^2 bytes (``mask[B, W, NP]``, whole, not half);
    * longest serial chain: one reduce program per image walks up to W blocks of 64 boxes, in order.
Class segments (the targets, n_c boxes of class c, w_c = ceil(n_c / 64)):
    * tiles sum_c w_c (w_c + 1) / 2; mask bytes sum_c n_c w_c 8 / 2 (the issue's formula: half the square);
    * serial chain max_c w_c.
The class sizes are fixed by a seed: uniform classes for the detection shapes, RPN levels of 2000 each,
and a Zipf-skewed LVIS-like split (class c drawn with weight 1 / (c + 1)).
"""
from __future__ import annotations

import argparse
import math

import torch

WORD = 64


def current(n: int) -> dict:
    """Today's all-pairs kernels on one image of ``n`` boxes."""
    w = math.ceil(n / WORD)
    return {"chain": w, "tiles": w * (w + 1) // 2, "mask_bytes": w * (w * WORD) * 8}


def segmented(class_sizes) -> dict:
    """The class-segment targets for one image whose classes hold ``class_sizes`` boxes."""
    ws = [math.ceil(n / WORD) for n in class_sizes if n]
    return {"chain": max(ws, default=0), "tiles": sum(w * (w + 1) // 2 for w in ws),
            "mask_bytes": sum(n * w * 8 // 2 for n, w in zip((n for n in class_sizes if n), ws))}


def class_sizes(n: int, classes: int, skew: bool = False, seed: int = 0) -> list[int]:
    """How ``n`` boxes fall into ``classes`` classes: uniformly, or Zipf-skewed."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, classes + 1, dtype=torch.float64) if skew else torch.ones(classes, dtype=torch.float64)
    drawn = torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.bincount(drawn, minlength=classes).tolist()


CASES = [  # (label, images, boxes per image, class sizes of one image)
    ("RPN training: 8 images x 5 levels x 2000", 8, 10000, [2000] * 5),
    ("detection: 4096 candidates x 80 classes", 1, 4096, class_sizes(4096, 80)),
    ("10k boxes x 80 classes", 1, 10000, class_sizes(10000, 80)),
    ("LVIS-like: 30k boxes x 1203 classes, Zipf-skewed", 1, 30000, class_sizes(30000, 1203, skew=True)),
    ("100k boxes x 1203 classes, Zipf-skewed", 1, 100000, class_sizes(100000, 1203, skew=True)),
]


def rows() -> list[dict]:
    out = []
    for label, images, n, sizes in CASES:
        assert sum(sizes) == n
        before, target = current(n), segmented(sizes)
        out.append({"case": label, "images": images, "largest_class": max(sizes), "before": before, "target": target})
    return out


def _mb(b: int) -> str:
    return f"{b / 1e6:,.1f} MB" if b >= 1e6 else f"{b / 1e3:,.1f} kB"


def markdown(table: list[dict]) -> str:
    lines = ["| case (per image) | largest class | serial chain before / target | IoU tiles before / target "
             "| mask before / target |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in table:
        b, t = r["before"], r["target"]
        lines.append(f"| {r['case']} | {r['largest_class']} | {b['chain']} / {t['chain']} | "
                     f"{b['tiles']:,} / {t['tiles']:,} | {_mb(b['mask_bytes'])} / {_mb(t['mask_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(markdown(rows()), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
