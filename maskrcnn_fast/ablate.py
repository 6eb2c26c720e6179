"""The paper's three ablations (He et al., 2017, Table 2) on shapes, each at the same budget.

    RoIAlign vs RoIPool          (pooler)      Table 2c
    sigmoid vs softmax masks     (mask_loss)   Table 2b
    FCN vs MLP mask head         (mask_head)   Table 2e

The baseline (RoIAlign, sigmoid, FCN) is trained once and shared by the three comparisons; each
variant changes one switch. Every run uses the same seed, data, iterations and schedule. Writes
``ablation.md`` (a markdown table of mask and box AP) and ``ablation.png`` (a bar plot) to ``--out``.
"""
from __future__ import annotations

import dataclasses
import json
import os

from maskrcnn_fast.plots import plot_ablation
from maskrcnn_fast.train import TrainConfig, check_out_dir, shapes_model_kwargs, train

VARIANTS = (
    ("baseline (RoIAlign, sigmoid, FCN)", {}),
    ("RoIPool", {"pooler": "roi_pool"}),
    ("softmax masks", {"mask_loss": "softmax"}),
    ("MLP mask head", {"mask_head": "mlp"}),
)
COMPARISONS = (
    ("RoIAlign vs RoIPool", "RoIPool"),
    ("sigmoid vs softmax", "softmax masks"),
    ("FCN vs MLP mask head", "MLP mask head"),
)


def markdown_table(rows: list[dict], base: TrainConfig) -> str:
    by_name = {r["name"]: r for r in rows}
    baseline = rows[0]
    lines = ["| comparison | setting | mask AP | mask AP50 | mask AP75 | box AP | box AP50 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def row(comparison: str, r: dict) -> str:
        s, b = r["segm"], r["bbox"]
        return (f"| {comparison} | {r['name']} | {100 * s['AP']:.1f} | {100 * s['AP50']:.1f} | "
                f"{100 * s['AP75']:.1f} | {100 * b['AP']:.1f} | {100 * b['AP50']:.1f} |")

    for comparison, variant in COMPARISONS:
        if variant in by_name:
            lines.append(row(comparison, baseline))
            lines.append(row("", by_name[variant]))
    lines.append("")
    lines.append(f"Shapes val ({base.val_images} images, {base.image_size} px), {base.backbone}-FPN from scratch, "
                 f"{base.iters} iterations x batch {base.batch_size} per run, lr {base.lr or 0.02}, seed {base.seed}; "
                 "COCO AP (%) from pycocotools' COCOeval.")
    return "\n".join(lines) + "\n"


def ablate(base: TrainConfig, only: list[str] | None = None) -> list[dict]:
    """Train every variant under ``base.out/<variant>``; write the table and plot; return the rows."""
    check_out_dir(base.out)
    model_kwargs = base.model_kwargs or shapes_model_kwargs(base.image_size)
    rows = []
    for name, switches in VARIANTS:
        if only and name != VARIANTS[0][0] and not any(s in name.lower() for s in only):
            continue
        slug = name.split(" (")[0].lower().replace(" ", "_")
        cfg = dataclasses.replace(base, out=os.path.join(base.out, slug), resume=False,
                                  model_kwargs={**model_kwargs, **switches})
        print(f"== {name}: {switches or 'paper defaults'}")
        metrics = train(cfg)
        rows.append({"name": name, "switches": switches, "bbox": metrics["bbox"], "segm": metrics["segm"]})
    with open(os.path.join(base.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    table = markdown_table(rows, base)
    with open(os.path.join(base.out, "ablation.md"), "w") as f:
        f.write(table)
    plot_ablation(rows, os.path.join(base.out, "ablation.png"))
    print(table)
    return rows
