"""Hand-written compile specs (legacy): superseded by the launch audit, kept for the op modules that import them.

``compile_specs()`` in the op modules list kernel x config x mode x dtype with *declared* signatures (every
stride ``i64``, no divisibility attributes, no ``==1`` constants): code that no launch produces.
``bench/compile_report.py`` no longer uses them: it captures real launches (:mod:`kernels._audit`), and
``--configs all`` covers every config autotuning may pick with the JIT's own specialization. Nothing here is
needed by it; ``CompileSpec``/``TORCH_TO_TRITON`` stay until the op modules drop their ``compile_specs()``.
``python -m kernels._compile`` still compiles the specs for sm_80/sm_90 (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``, no driver needed).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

TARGET_CCS = (80, 90)


@dataclass(frozen=True)
class CompileSpec:
    name: str                 # human-readable id, e.g. "roi_align_fwd[fp16,BLOCK_C=64,w4]"
    fn: object                # the @triton.jit function
    signature: dict           # arg name -> "*fp32" / "i32" / "i64" / "fp32" / "constexpr"
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    default: bool = False     # used by the defaults (a spill here fails the compile report)


def all_compile_specs() -> list[CompileSpec]:
    import kernels

    specs: list[CompileSpec] = []
    for mod in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"kernels.{mod.name}")
        if hasattr(module, "compile_specs"):
            specs.extend(module.compile_specs())
    return specs


def compile_for(spec: CompileSpec, cc: int):
    from kernels._compat import compile_kernel

    # ASTSource wants the signature in the kernel's argument order.
    signature = {name: spec.signature[name] for name in spec.fn.arg_names}
    return compile_kernel(spec.fn, signature, spec.constexprs, cc, spec.num_warps, spec.num_stages)


TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                   "int32": "i32"}


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack/local (spill) bytes, read off the cubin by cuobjdump (see :mod:`kernels._audit`)."""
    from kernels._audit import resource_usage as usage

    return usage(cubin)


def _compile_row(job) -> dict:
    index, cc, with_resources = job
    spec = all_compile_specs()[index]
    row = {"name": spec.name, "kernel": spec.fn.__name__, "cc": cc, "num_warps": spec.num_warps,
           "num_stages": spec.num_stages, "default": spec.default, "ok": False,
           "constexprs": {k: v for k, v in spec.constexprs.items() if isinstance(v, (bool, int, float, str))}}
    try:
        compiled = compile_for(spec, cc)
        row["ok"] = bool(compiled.asm.get("cubin"))
        row["shared"] = int(compiled.metadata.shared)
        if with_resources:
            row.update(resource_usage(compiled.asm["cubin"]))
    except Exception as e:  # reported per spec; the caller fails on any
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    return row


def compile_all(ccs=TARGET_CCS, with_resources: bool = True, name_filter: str | None = None,
                jobs: int | None = None) -> list[dict]:
    """Compile every spec for every cc (in ``jobs`` processes); one row per (spec, cc)."""
    import multiprocessing
    import os

    specs = all_compile_specs()
    work = [(i, cc, with_resources) for i, s in enumerate(specs) if not name_filter or name_filter in s.name
            for cc in ccs]
    jobs = jobs or min(len(work), os.cpu_count() or 1, 8)
    if jobs <= 1:
        return [_compile_row(w) for w in work]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_row, work, chunksize=1)


def main(argv=None) -> int:
    """``python -m kernels._compile [--json FILE] [--filter NAME]``: compile all, exit 1 on any failure."""
    import argparse
    import json
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces @triton.jit functions")
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--filter", help="only specs whose name contains this")
    p.add_argument("--no-resources", action="store_true")
    args = p.parse_args(argv)
    rows = compile_all(with_resources=not args.no_resources, name_filter=args.filter)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAILED {r['name']} sm_{r['cc']}: {r.get('error', 'no cubin')}")
    print(f"compiled {len(rows) - len(bad)}/{len(rows)} (kernel x config x mode x cc)")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
