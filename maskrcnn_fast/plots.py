"""Training curves and the ablation bar plot (matplotlib, headless)."""
from __future__ import annotations

import json


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(log_path: str, history: list[dict], out_path: str) -> None:
    """Left: total and per-term loss against iteration. Right: AP against training minutes."""
    plt = _pyplot()
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if records:
        iters = [r["iter"] for r in records]
        window = max(1, len(records) // 50)
        for key in ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"):
            ax_loss.plot(iters, _smooth([r[key] for r in records], window), label=key, lw=2 if key == "loss" else 1)
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training loss (moving mean)")
    ax_loss.legend(fontsize=7)
    if history:
        minutes = [h["minutes"] for h in history]
        for iou_type, key, style in (("segm", "AP50", "-o"), ("segm", "AP", "-s"), ("bbox", "AP50", "--o"),
                                     ("bbox", "AP", "--s")):
            ax_ap.plot(minutes, [h[iou_type][key] for h in history], style, label=f"{iou_type} {key}", ms=3)
    ax_ap.set_xlabel("training minutes")
    ax_ap.set_ylim(0, 1)
    ax_ap.set_title("COCO AP on the validation set")
    ax_ap.grid(alpha=0.3)
    ax_ap.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_ablation(rows: list[dict], out_path: str) -> None:
    """Grouped bars with error bars: mean ± std over seeds of mask AP, mask AP75 and box AP per setting
    (rows as :func:`maskrcnn_fast.ablate.summarize` returns them)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(rows)), 4.5))
    bars = (("segm", "AP", "mask AP"), ("segm", "AP75", "mask AP75"), ("bbox", "AP", "box AP"))
    width = 0.8 / len(bars)
    for j, (kind, metric, label) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [100 * r["mean"][kind][metric] for r in rows], width=width, label=label,
               yerr=[100 * r["std"][kind][metric] for r in rows], capsize=3)
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels([f"{r['name']}\n({len(r['seeds'])} seeds)" for r in rows], rotation=20, fontsize=7)
    ax.set_ylabel("COCO AP (%), shapes val")
    ax.set_title("ablations: mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
