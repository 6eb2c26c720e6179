"""Compile audit of exactly what launches: capture every Triton launch, compile it for sm_80/sm_90, read the code.

Capture (no GPU, no interpreter)
    :func:`capture` replaces ``JITFunction.run`` -- the body of every ``kernel[grid](*args, **meta)`` -- with a
    stand-in for the CUDA driver. The stand-in runs the front half of the real ``run`` for a CUDA target: the
    binder Triton generates per kernel (``create_function_from_signature``, which calls ``specialize_impl`` on
    every argument) and ``JITFunction._pack_args``. Those yield the ``(signature, constexprs, attrs, options)``
    that ``run`` hands to ``ASTSource`` on a GPU, so the specialization is the JIT's own, derived from the actual
    argument values (triton 3.6 and 3.8 share this code path):

    * an int argument equal to 1 becomes a constexpr; other ints are ``i32``/``i64`` by range, bools ``u1``;
    * an int divisible by 16, and a tensor whose ``data_ptr()`` is a multiple of 16, get ``tt.divisibility=16``;
    * ``do_not_specialize`` / ``do_not_specialize_on_alignment`` and annotated parameters act as in ``run``.

    The stand-in records the launch and returns without running anything: outputs stay uninitialised, which is
    harmless because no launcher reads device values on the host (the hot-path rule). CPU tensors stand in
    for CUDA ones: PyTorch's CPU allocator aligns to 64 bytes and CUDA's caching allocator to 512, so 16-byte
    divisibility of a pointer depends only on the view's byte offset, the same on both.
    :func:`shadow_custom_ops` lets a whole model run on real values (PyTorch backend) while every
    ``maskrcnn_fast::`` custom op is also called once through the Triton path under :func:`capture`.

Compile
    :func:`compile_row` builds ``ASTSource(fn, signature, constexprs, attrs)`` with the target's parsed options
    and ``triton.compile``s it for ``GPUTarget("cuda", cc, 32)`` -- what ``JITFunction._do_compile`` does --
    then reads registers, stack/local bytes (cuobjdump), shared memory, and counts global load / store /
    atomic instructions by access width in bits from the SASS (PTX if cuobjdump fails): ``LDG.E.128`` -> 128,
    ``LDG.E.U16`` -> 16, ``REDG.E.ADD.F32x4`` -> 128, ``RED.E.ADD.64`` -> 64. Counts are static (instructions
    in the code), not dynamic. ``approx_div`` counts approximate fp32 divisions in the PTX (``div.full.f32``, what
    fp32 ``/`` compiles to; tests/test_compile.py gates it at 0 where quotients decide bin edges, sampling grids or
    suppressions, see kernels/_math.py), ``rn_div`` the correctly rounded ``div.rn.f32`` (``tl.math.div_rn``), and
    ``instructions`` the static SASS instruction count (a code-size measure to compare variants of a kernel).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

TARGETS = (80, 90)


@dataclass
class Launch:
    """One captured launch: the JIT's specialization of it and where it came from."""
    fn: object                      # the JITFunction
    signature: dict                 # arg name -> "*bf16" | "i32" | "constexpr" ...
    constexprs: dict                # path tuple -> value (declared constexprs and ints specialized to 1)
    attrs: dict                     # path tuple -> [["tt.divisibility", 16]] or []
    options: dict                   # launch options as passed (num_warps, num_stages, debug, ...)
    grid: tuple
    case: str = ""                  # the driver's label, e.g. "box head 7x7 bf16 cl fwd"
    dtype: str = ""
    layout: str = ""
    model: bool = False             # launched by the model step
    cases: list = field(default_factory=list)

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    @property
    def short(self) -> str:
        return re.sub(r"^_+|_kernel$", "", self.kernel)

    def _names(self, paths) -> dict:
        return {self.fn.arg_names[p[0]]: v for p, v in paths.items()}

    def declared(self) -> dict:
        """Values of the parameters declared ``tl.constexpr`` (not the ints the JIT made constant)."""
        return {n: v for n, v in self._names(self.constexprs).items()
                if self.fn.params[self.fn.arg_names.index(n)].is_constexpr}

    def key(self) -> tuple:
        """Everything the compiled code depends on (for one target): the specialization cache key."""
        return (self.fn.__module__, self.fn.__qualname__, tuple(self.signature.items()),
                repr(sorted(self._names(self.constexprs).items())), repr(sorted(self._names(self.attrs).items())),
                self.num_warps, self.num_stages)

    def variant(self) -> tuple:
        """The kernel variant independent of shapes: pointer dtypes, declared constexprs, warps, stages."""
        ptrs = tuple((n, t) for n, t in self.signature.items() if t.startswith("*"))
        return (self.fn.__module__, self.fn.__qualname__, ptrs, repr(sorted(self.declared().items())),
                self.num_warps, self.num_stages)

    @property
    def num_warps(self) -> int:
        return int(self.options.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.options.get("num_stages", 3))

    def tag(self) -> str:
        """dtype, layout, then the declared constexprs (blocks and mode flags) and warps/stages."""
        def show(v):
            return int(v) if isinstance(v, bool) else getattr(v, "name", v)
        parts = [p for p in (self.dtype, self.layout) if p]
        parts += [f"{k}={show(v)}" for k, v in self.declared().items() if k != "MAX_GRID"]
        return ",".join(parts + [f"w{self.num_warps}s{self.num_stages}"])

    def name(self) -> str:
        return f"{self.short}[{self.tag()}]"

    def specialization(self) -> str:
        """The runtime arguments as the JIT specialized them: ``C:i32/16`` (divisible by 16), ``PH=1``."""
        attrs = self._names(self.attrs)
        consts = self._names(self.constexprs)
        out = []
        for n, t in self.signature.items():
            if t == "constexpr":
                if not self.fn.params[self.fn.arg_names.index(n)].is_constexpr:
                    out.append(f"{n}={consts[n]}")
            else:
                out.append(f"{n}:{t}" + ("/16" if attrs.get(n) else ""))
        return " ".join(out)


_captured: list[Launch] | None = None
_context: dict = {}


def _record(self, *args, grid, warmup, **kwargs):
    """Stand-in for ``JITFunction.run``: the real binder and ``_pack_args`` for a CUDA target, no launch."""
    from kernels._compat import launch_specialization

    bound, signature, constexprs, attrs, options = launch_specialization(self, _backend(90), args, kwargs)
    if callable(grid):
        grid = grid(bound)
    launch = Launch(self, signature, constexprs, attrs,
                    {k: v for k, v in options.items() if isinstance(v, (bool, int, float, str, type(None)))},
                    tuple(int(g) for g in grid), **_context)
    _captured.append(launch)
    return None


@contextlib.contextmanager
def capture(**context) -> Iterator[list[Launch]]:
    """Record every Triton launch in the block (nothing runs); ``context`` (case, dtype, layout, model) labels
    them. Nests: an inner block relabels its launches and they also land in the outer list."""
    from triton.runtime.jit import JITFunction

    global _captured, _context
    outer, outer_ctx, original = _captured, _context, JITFunction.run
    mine: list[Launch] = []
    _captured, _context = mine, {**outer_ctx, **context}
    JITFunction.run = _record
    try:
        yield mine
    finally:
        JITFunction.run = original if outer is None else _record
        _captured, _context = outer, outer_ctx
        if outer is not None:
            outer.extend(mine)


@contextlib.contextmanager
def shadow_custom_ops(namespace: str = "maskrcnn_fast", **context) -> Iterator[list[Launch]]:
    """Run real computations on the PyTorch backend while capturing what the Triton backend would launch.

    Inside the block the model runs under ``use_backend("triton")`` (so it takes the CUDA code path); every
    ``<namespace>::`` op call is dispatched twice: through the Triton path under :func:`capture` (launches
    recorded, nothing run, result dropped), then under ``use_backend("torch")`` for the real result.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels._backend import use_backend

    launches: list[Launch] = []

    class Shadow(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == namespace:
                with capture(**context) as got, use_backend("triton"):
                    func(*args, **kwargs)
                launches.extend(got)
                with use_backend("torch"):
                    return func(*args, **kwargs)
            return func(*args, **kwargs)

    with use_backend("triton"), Shadow():
        yield launches


# ----------------------------------------------------------------------------------------------
# compile and read the code
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _backend(cc: int):
    """Triton's CUDA backend for ``sm_<cc>``. Launches are specialized with sm_90's: the CUDA rules
    (``get_int_specialization``/``get_tensor_specialization``) do not depend on the target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", cc, 32))


def compile_launch(launch: Launch, cc: int):
    """What ``JITFunction._do_compile`` does on a GPU of compute capability ``cc``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = _backend(cc).parse_options(dict(launch.options))
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack/local bytes per thread, read off the cubin by cuobjdump."""
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", _cuobjdump(
        cubin, "--dump-resource-usage"))}
    return {"regs": found.get("reg", -1), "stack": found.get("stack", 0), "local": found.get("local", 0)}


_SASS_KIND = {"LDG": "load", "STG": "store", "RED": "atomic", "REDG": "atomic", "ATOM": "atomic",
              "ATOMG": "atomic", "LDL": "local_load", "STL": "local_store"}


def _sass_width(modifiers: list[str]) -> int:
    width = 32
    for m in modifiers:
        if m in ("8", "16", "32", "64", "128"):
            width = int(m)
        elif t := re.fullmatch(r"(?:U|S|F|BF|B)(\d+)(?:x(\d+))?", m):
            width = int(t.group(1)) * int(t.group(2) or 1)
    return width


def sass_access(sass: str) -> dict:
    """``{kind: {bits: count}}`` for global load/store/atomic and local load/store instructions."""
    counts: dict[str, Counter] = {k: Counter() for k in ("load", "store", "atomic", "local_load", "local_store")}
    for line in sass.splitlines():
        if "*/" not in line or not line.lstrip().startswith("/*"):
            continue
        words = line.split("*/", 1)[1].split()
        words = [w for w in words if not w.startswith("@")]
        if not words:
            continue
        op, *mods = words[0].rstrip(";").split(".")
        if op in _SASS_KIND:
            counts[_SASS_KIND[op]][_sass_width(mods)] += 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def sass_instructions(sass: str) -> int:
    """Static instruction count of the SASS (``/*addr*/ OPCODE ...`` lines, padding NOPs and the final
    self-branch included): a code-size measure to compare variants of one kernel."""
    return sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line))


def approx_divisions(ptx: str) -> int:
    """Approximate fp32 divisions in PTX: ``div.full.f32`` (what fp32 ``/`` compiles to, <= 2 ulp) and
    ``div.approx[.ftz].f32``. ``div.rn.f32`` (``tl.math.div_rn``) and fp64 ``div.rn.f64`` are exact."""
    return len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx))


_PTX = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st|red|atom)\.(global|local)\.([\w.:]+)")


def ptx_access(ptx: str) -> dict:
    """The same counts from PTX (``ld.global.v4.b32`` -> 128), for when cuobjdump is unavailable."""
    counts: dict[str, Counter] = {k: Counter() for k in ("load", "store", "atomic", "local_load", "local_store")}
    for line in ptx.splitlines():
        m = _PTX.match(line)
        if not m:
            continue
        op, space, mods = m.groups()
        mods = mods.split(".")
        vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d", x)), 1)
        bits = next((int(t.group(1)) for x in mods if (t := re.fullmatch(r"[bufs](\d+)", x))), 32)
        kind = {"ld": "load", "st": "store"}.get(op, "atomic")
        if space == "local":
            kind = "local_" + kind
        counts[kind][vec * bits] += 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def compile_row(launch: Launch, cc: int) -> dict:
    """One audit row: the launch compiled for ``sm_<cc>`` and what its code does."""
    row = {"name": launch.name(), "kernel": launch.kernel, "target": f"sm_{cc}", "cc": cc, "tag": launch.tag(),
           "dtype": launch.dtype, "layout": launch.layout, "constexprs": {
               k: (int(v) if isinstance(v, bool) else getattr(v, "name", v)) for k, v in launch.declared().items()},
           "case": launch.case, "cases": sorted(set(launch.cases or [launch.case])), "model_path": launch.model,
           "num_warps": launch.num_warps, "num_stages": launch.num_stages,
           "specialization": launch.specialization(), "grid": list(launch.grid), "ok": False}
    try:
        compiled = compile_launch(launch, cc)
        cubin = compiled.asm["cubin"]
        row["ok"] = bool(cubin)
        row["shared_bytes"] = int(compiled.metadata.shared)
        usage = resource_usage(cubin)
        row.update(regs=usage["regs"], spill_bytes=usage["stack"] + usage["local"], stack=usage["stack"],
                   local=usage["local"])
        try:
            sass = _cuobjdump(cubin, "-sass")
            access, row["access_from"] = sass_access(sass), "sass"
            row["instructions"] = sass_instructions(sass)
        except (OSError, subprocess.CalledProcessError):
            access, row["access_from"] = ptx_access(compiled.asm["ptx"]), "ptx"
            row["instructions"] = -1
        row["global_access"] = {k: access[k] for k in ("load", "store", "atomic")}
        # approximate fp32 division (div.full.f32, <= 2 ulp) where torch divides exactly (an IoU threshold, a
        # RoI's bin edges or sampling grid); correctly rounded division (tl.math.div_rn) is div.rn.f32
        row["approx_div"] = approx_divisions(compiled.asm["ptx"])
        row["rn_div"] = len(re.findall(r"\bdiv\.rn\.f32\b", compiled.asm["ptx"]))
        row["local_access"] = {"load": access["local_load"], "store": access["local_store"]}
    except Exception as e:  # reported per row; the report fails on any
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    return row


def merge(launches: list[Launch]) -> list[Launch]:
    """One launch per specialization key (compiles are cached by key), keeping every case that reached it;
    a key is on the model path if any launch of it was."""
    by_key: dict[tuple, Launch] = {}
    for launch in launches:
        kept = by_key.setdefault(launch.key(), launch)
        kept.cases = sorted(set(kept.cases) | {launch.case})
        kept.model = kept.model or launch.model
    return list(by_key.values())
