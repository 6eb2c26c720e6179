"""Offline compile report: every kernel x config x mode for sm_80 and sm_90, no GPU needed.

    python bench/compile_report.py [--filter NAME] [--json FILE]

Prints registers per thread, stack and local (spill) bytes, static shared memory and warps, read
off each cubin with cuobjdump. Exits 1 on any compile failure, or on spills in a config that the
defaults or a tuned file (kernels/configs/*.json) use.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tuned_configs(config_dir: Path) -> list[dict]:
    """Every config named by a tuned file, whatever its GPU (a spill there matters on that GPU)."""
    found = []
    for path in sorted(config_dir.glob("*.json")):
        try:
            ops = json.loads(path.read_text()).get("ops", {})
            found += [cfg for buckets in ops.values() for cfg in buckets.values() if isinstance(cfg, dict)]
        except (ValueError, AttributeError):
            print(f"warning: unreadable tuned file {path}", file=sys.stderr)
    return found


def uses_config(row: dict, config: dict) -> bool:
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return (config.get("num_warps", row["num_warps"]) == row["num_warps"]
            and all(row["constexprs"].get(k) == v for k, v in meta.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filter", help="only specs whose name contains this")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--config-dir", default=str(ROOT / "kernels" / "configs"))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces @triton.jit functions
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.path.insert(0, str(ROOT))
    from kernels._compile import compile_all

    rows = compile_all(with_resources=True, name_filter=args.filter)
    tuned = tuned_configs(Path(args.config_dir))
    print(f"{'kernel spec':<78} {'sm':>3} {'regs':>5} {'stack':>6} {'local':>6} {'smem':>7} {'warps':>5}")
    failures, spills = [], []
    for r in rows:
        if not r["ok"]:
            failures.append(r)
            print(f"{r['name']:<78} {r['cc']:>3}  COMPILE FAILED: {r.get('error', '')[:200]}")
            continue
        spilled = r.get("local", 0) > 0 or r.get("stack", 0) > 0
        used = r["default"] or any(uses_config(r, cfg) for cfg in tuned)
        flag = " SPILL" + (" (used!)" if used else "") if spilled else ""
        print(f"{r['name']:<78} {r['cc']:>3} {r.get('regs', -1):>5} {r.get('stack', 0):>6} {r.get('local', 0):>6} "
              f"{r.get('shared', 0):>7} {r['num_warps']:>5}{flag}")
        if spilled and used:
            spills.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{len(rows)} compiled kernels, {len(failures)} failures, {len(spills)} spilling configs in use")
    return 1 if failures or spills or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
