"""Turn pytest-benchmark JSON into a markdown table (and a plot) with speedups and % of HBM roofline.

    python bench/report.py RESULTS.json [MORE.json ...] [--out bench/results/NAME.md] [--plot NAME.png]

Each group holds one shape of one op; "ours" is compared with "torchvision" in the same group.
Achieved bandwidth = ``extra_info["bytes"]`` / median time; % of peak uses the GPU's HBM bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# datasheet HBM bandwidth, bytes/s (a measured copy bandwidth may replace these later)
PEAK_BW = {
    "H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
    "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12, "L40S": 0.864e12,
}


def peak_bandwidth(device: str) -> float | None:
    for name, bw in sorted(PEAK_BW.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device.lower():
            return bw
    return None


def load_rows(paths) -> list[dict]:
    groups: dict[str, dict] = defaultdict(dict)
    for path in paths:
        data = json.loads(Path(path).read_text())
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            impl = info.get("impl") or b.get("param") or b["name"]
            groups[b.get("group") or b["name"]][impl] = {"median_s": b["stats"]["median"], **info}
    rows = []
    for group, impls in sorted(groups.items()):
        op, _, shape = group.partition(" ")
        ours, tv = impls.get("ours"), impls.get("torchvision")
        row = {"op": op, "shape": shape, "ours_s": ours and ours["median_s"], "tv_s": tv and tv["median_s"],
               "fallback_s": impls.get("ours_torch", {}).get("median_s")}
        row["speedup"] = row["tv_s"] / row["ours_s"] if ours and tv else None
        device = (ours or tv or {}).get("device", "")
        nbytes = (ours or {}).get("bytes")
        row["gbps"] = nbytes / row["ours_s"] / 1e9 if ours and nbytes else None
        peak = peak_bandwidth(device)
        row["pct_peak"] = 100 * row["gbps"] * 1e9 / peak if row["gbps"] and peak else None
        row["device"] = device
        row["impls"] = impls
        rows.append(row)
    return rows


def _fmt_time(s):
    if s is None:
        return "–"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def markdown(rows) -> str:
    devices = sorted({r["device"] for r in rows if r["device"]})
    lines = [f"Device: {', '.join(devices) or 'unknown'}", "",
             "| op | shape | ours | torchvision | speedup | GB/s | % of peak HBM |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speedup = "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        gbps = "–" if r["gbps"] is None else f"{r['gbps']:.1f}"
        pct = "–" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}%"
        lines.append(f"| {r['op']} | {r['shape']} | {_fmt_time(r['ours_s'])} | {_fmt_time(r['tv_s'])} | "
                     f"{speedup} | {gbps} | {pct} |")
    return "\n".join(lines) + "\n" + _every_impl(rows)


def _every_impl(rows) -> str:
    """Every implementation of the groups that have more than ours and torchvision's (the model entries:
    CUDA graphs, inductor) or an img/s, with its speedup over torchvision, img/s and setup seconds."""
    main = {"ours", "torchvision", "ours_torch"}
    groups = [r for r in rows if set(r["impls"]) - main or any("img_per_s" in v for v in r["impls"].values())]
    if not groups:
        return ""
    lines = ["", "| op | shape | impl | median | vs torchvision | img/s | setup s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in groups:
        tv = r["impls"].get("torchvision", {}).get("median_s")
        for impl, v in sorted(r["impls"].items()):
            vs = f"{tv / v['median_s']:.2f}×" if tv and v["median_s"] else "–"
            ips = f"{v['img_per_s']:.1f}" if "img_per_s" in v else "–"
            setup = f"{v['setup_s']:.1f}" if "setup_s" in v else "–"
            lines.append(f"| {r['op']} | {r['shape']} | {impl} | {_fmt_time(v['median_s'])} | {vs} | {ips} | {setup} |")
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"]]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    labels = [f"{r['op']} {r['shape']}" for r in rows]
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="tab:green")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("speedup over torchvision (median time)")
    ax.set_title(", ".join(sorted({r["device"] for r in rows})) or "benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--out", help="write the markdown table here (default: stdout)")
    p.add_argument("--plot", help="write a speedup bar plot (PNG) here")
    args = p.parse_args(argv)
    missing = [f for f in args.json if not Path(f).exists()]
    if missing:
        print(f"report: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = load_rows(args.json)
    text = markdown(rows)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
