"""Compile audit gates: the kernels that launch, compiled for sm_80 and sm_90 with the JIT's launch-time
specialization, must compile and be fast by construction.

The audit (bench/compile_report.py --scope gates) runs in a subprocess without TRITON_INTERPRET, because the
interpreter replaces @triton.jit functions. Gates, each failing with the kernel and what its code does:

* every kernel compiles for sm_80 and sm_90, and every ``*_kernel`` in kernels/ is among them;
* no local memory (stack, spills, LDL/STL) in any kernel the model launches;
* RoIAlign forward on channels_last fp16/bf16/fp32 features loads channels 128 bits at a time;
* RoIAlign backward (channels_last, atomic) reduces with vector atomics (``REDG.E.ADD.F32x4``) on sm_90 --
  sm_80 has no vector float atomics;
* the mask loss and fused-predictor kernels load (and, where the plane writes are a bulk of the bytes, store)
  their contiguous M x M planes 128 bits at a time;
* no approximate fp32 division (``div.full.f32``) in RoIAlign, RoIPool's forward, NMS's IoU tile and the
  mask targets projected inside the loss kernel (issue 23: quotients there decide bin edges, sampling grids
  and suppressions; kernels/_math.py).
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels._audit import approx_divisions, ptx_access, sass_access

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)
ELEM_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("MASKRCNN_FAST_SINGLE_CONFIG", None)  # the configs the launchers pick, as on a GPU
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--scope", "gates",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads(out.read_text())


def _jit_kernels() -> set[str]:
    """Every ``@triton.jit`` function named ``*_kernel`` in the op modules of kernels/."""
    import kernels

    names = set()
    for mod in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{mod.name}")
        names |= {n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    return names


def _show(r) -> str:
    g = r.get("global_access", {})
    return (f"{r['name']} sm_{r['cc']} ({r['case']}): regs {r.get('regs')}, local {r.get('spill_bytes')} B, "
            f"loads {g.get('load')}, stores {g.get('store')}, atomics {g.get('atomic')} (bits: count), "
            f"approximate divisions {r.get('approx_div')}")


def _check(rows, want, what):
    assert rows, f"no audit rows for {what}: the audit did not reach these kernels"
    bad = [_show(r) for r in rows if not want(r)]
    assert not bad, f"{what}; {len(bad)}/{len(rows)} kernels fail:\n" + "\n".join(bad)


def test_every_kernel_compiles_for_sm80_and_sm90(audit):
    proc, rows = audit
    failed = [f"{r['name']} sm_{r['cc']}: {r.get('error', 'no cubin')[-600:]}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert all(r["regs"] > 0 for r in rows)  # resource usage was read off every cubin
    for cc in TARGETS:
        compiled = {r["kernel"] for r in rows if r["cc"] == cc}
        missing = _jit_kernels() - compiled
        assert not missing, f"sm_{cc}: kernels no op case or model step launched: {sorted(missing)}"


def test_model_path_kernels_use_no_local_memory(audit):
    _, rows = audit
    model = [r for r in rows if r["ok"] and r["model_path"]]
    assert {r["kernel"] for r in model} >= {"_roi_align_fwd_kernel", "_roi_align_bwd_kernel", "_nms_mask_kernel",
                                            "_nms_reduce_kernel"}, "the model step marked too little"
    _check(model, lambda r: r["spill_bytes"] == 0 and not r["local_access"]["load"] and not r["local_access"]["store"],
           "model-path kernels must not use local memory (stack/spills)")


def _rows(rows, kernel, **fields):
    return [r for r in rows if r["ok"] and r["kernel"] == kernel and all(r.get(k) == v for k, v in fields.items())]


def _n(counts: dict, bits: int) -> int:
    return counts.get(str(bits), counts.get(bits, 0))


def _share128(counts: dict) -> float:
    """The fraction of the bytes one thread's instructions of this kind move that go through 128-bit ones."""
    return 16 * _n(counts, 128) / max(sum(int(b) // 8 * n for b, n in counts.items()), 1)


def test_roi_align_forward_channels_last_loads_128_bits(audit):
    _, rows = audit
    fwd = [r for r in _rows(rows, "_roi_align_fwd_kernel", layout="cl") if r["dtype"] in ELEM_BITS]
    assert {r["dtype"] for r in fwd} == set(ELEM_BITS)

    def vectorized(r):
        loads = r["global_access"]["load"]
        # >= one 128-bit load per bilinear corner, and they fetch most of the bytes: the scalar loads left are
        # the RoI's geometry; a scalar channel gather has no 128-bit load at all
        return _n(loads, 128) >= 4 and _share128(loads) >= 0.5
    _check(fwd, vectorized, "RoIAlign forward on channels_last features must load 128 bits along channels "
                            "(>= 4 LDG.E.128 fetching at least half of the loaded bytes)")


def test_roi_align_backward_uses_vector_reductions(audit):
    _, rows = audit
    bwd = [r for r in _rows(rows, "_roi_align_bwd_kernel", layout="cl", cc=90)
           if not r["constexprs"].get("DETERMINISTIC") and r["dtype"] in ELEM_BITS]
    assert {r["dtype"] for r in bwd} == set(ELEM_BITS)

    def vector(r):
        atomics = r["global_access"]["atomic"]
        return _n(atomics, 128) >= 4 and _n(atomics, 32) == 0
    _check(bwd, vector, "RoIAlign backward (channels_last, fp32 accumulators) on sm_90 must reduce with "
                        "REDG.E.ADD.F32x4 (>= 4 128-bit atomics, no scalar 32-bit ones)")


# the accesses that move a kernel's planes: (loads, stores). The fused predictor's forward stores one M x M
# plane per RoI (its label's logits, or their gradient) for the C feature planes it reads: 1/256 of its bytes.
PLANE_ACCESSES = {"_sigmoid_bce_fwd_kernel": ("load", "store"), "_sigmoid_bce_bwd_kernel": ("load", "store"),
                  "_mask_predictor_fwd_kernel": ("load",), "_mask_predictor_bwd_kernel": ("load", "store")}


@pytest.mark.parametrize("kernel", sorted(PLANE_ACCESSES))
def test_mask_loss_kernels_access_planes_128_bits(audit, kernel):
    _, rows = audit
    planes = [r for r in _rows(rows, kernel, layout="nchw") if r["dtype"] in ELEM_BITS]
    assert {r["dtype"] for r in planes} == set(ELEM_BITS)
    kinds = PLANE_ACCESSES[kernel]

    def vectorized(r):
        g = r["global_access"]
        # With in-kernel targets (FROM_GT) the loads are mostly bilinear gathers of 1-byte gt-mask texels,
        # not a plane: there only the logits plane's load must be 128-bit, and the stores are gated as usual.
        gathers = bool(r["constexprs"].get("FROM_GT"))
        checked = [k for k in kinds if not (gathers and k == "load")]
        # 128-bit instructions move most of the bytes (the rest: labels, weights, partial sums); a 16-bit
        # access to an fp16/bf16 plane is a scalar one
        narrow = ELEM_BITS[r["dtype"]] == 16 and any(_n(g[k], 16) for k in checked)
        planes_ok = all(_share128(g[k]) >= 0.5 for k in checked) and not narrow
        return planes_ok and (not gathers or _n(g["load"], 128) >= 1)
    _check(planes, vectorized, f"{kernel} must {' and '.join(kinds)} its contiguous M x M planes 128 bits at a time"
                               " (128-bit instructions move >= half of the bytes; no 16-bit ones for fp16/bf16)")


# Quotients that decide something discrete must be correctly rounded, as torchvision's: RoIPool's bin edges
# (floor/ceil of ph * size / P), RoIAlign's adaptive grid ceil(roi / P) (the mask targets), NMS's IoU against
# its threshold. fp32 '/' compiles to div.full.f32 (up to 2 ulp). RoIAlign's other quotients (bin size, sample
# step, 1/count) are correctly rounded too (decision and numbers: kernels/_roi_align_triton.py, "Division").
EXACT_DIVISION = ("_roi_align_fwd_kernel", "_roi_align_bwd_kernel", "_roi_pool_fwd_kernel", "_nms_mask_kernel")


def test_roi_and_nms_kernels_divide_correctly_rounded(audit):
    _, rows = audit
    for kernel in EXACT_DIVISION:
        assert {r["cc"] for r in _rows(rows, kernel)} == set(TARGETS), f"{kernel}: not audited on every target"
    assert _rows(rows, "_roi_align_fwd_kernel", cc=80) and any(
        not r["constexprs"].get("SR2") for r in _rows(rows, "_roi_align_fwd_kernel")), \
        "the adaptive-grid RoIAlign (mask targets, sampling_ratio <= 0) was not audited"
    exact = [r for r in rows if r["ok"] and r["kernel"] in EXACT_DIVISION]
    _check(exact, lambda r: r["approx_div"] == 0,
           "RoIAlign, RoIPool (forward) and NMS must divide correctly rounded (kernels._math: div_rn_int / div_rn), "
           "no div.full.f32")


def test_mask_targets_in_the_loss_kernels_divide_correctly_rounded(audit):
    """The targets projected inside the loss kernels (FROM_GT) add no approximate division to the loss's own
    (the sigmoid/BCE maths of FROM_GT=0, continuous values, not gated)."""
    _, rows = audit
    plain = {(r["name"], r["cc"]): r["approx_div"] for r in rows if r["ok"] and not r["constexprs"].get("FROM_GT")}
    from_gt = [r for r in rows if r["ok"] and r["constexprs"].get("FROM_GT")]
    assert {(r["kernel"], r["cc"]) for r in from_gt} >= {("_sigmoid_bce_fwd_kernel", cc) for cc in TARGETS}, \
        "no audit rows of the loss kernels with targets from gt"

    def same_as_plain(r):
        base = plain.get((r["name"].replace("FROM_GT=1", "FROM_GT=0"), r["cc"]))
        return base is not None and r["approx_div"] == base
    _check(from_gt, same_as_plain, "the mask targets projected in the loss kernel (mask_targets._projected_target) "
                                   "must divide correctly rounded: as many div.full.f32 as with dense targets")


# ----------------------------------------------------------------------------------------------
# the audit's own pieces, on fixed inputs
# ----------------------------------------------------------------------------------------------
SASS = """
        /*0070*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0080*/              @!P0 LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0090*/                   LDG.E.64.CONSTANT R10, desc[UR4][R6.64] ;
        /*00a0*/                   LDG.E.LTC128B R12, desc[UR4][R6.64] ;
        /*00b0*/               @P1 STG.E.U8 desc[UR4][R2.64], R4 ;
        /*00c0*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*00d0*/                   RED.E.ADD.64.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*00e0*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R3, desc[UR4][R2.64], R8 ;
        /*00f0*/                   STL.64 [R1], R8 ;
        /*0100*/                   LDS.128 R8, [R2] ;
"""


def test_sass_access_widths():
    got = sass_access(SASS)
    assert got["load"] == {16: 1, 32: 1, 64: 1, 128: 1}  # .LTC128B is a cache hint, not a width
    assert got["store"] == {8: 1}
    assert got["atomic"] == {32: 1, 64: 1, 128: 1}
    assert got["local_store"] == {64: 1} and got["local_load"] == {}


def test_ptx_access_widths():
    ptx = """
\t@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];
\tld.global.b16 %rs1, [ %rd2 + 0 ];
\t@%p3 atom.global.gpu.relaxed.add.v4.f32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ], { %r5, %r6, %r7, %r8 };
\t@%p4 red.global.gpu.relaxed.add.u64 [ %rd14 + 0 ], %rd15;
\tst.global.v2.b32 [ %rd5 + 0 ], { %r1, %r2 };
\tst.local.b32 [ %rd6 + 0 ], %r1;
"""
    got = ptx_access(ptx)
    assert got["load"] == {128: 1, 16: 1} and got["store"] == {64: 1}
    assert got["atomic"] == {128: 1, 64: 1} and got["local_store"] == {32: 1}


def test_approx_division_count():
    ptx = """
\tdiv.full.f32 \t%r5, %r3, %r4;
\tdiv.approx.ftz.f32 %r6, %r3, %r4;
\tdiv.rn.f32 \t%r7, %r3, %r4;
\tdiv.rn.f64 \t%fd3, %fd1, %fd2;
\tdiv.s32 \t%r8, %r1, %r2;
"""
    assert approx_divisions(ptx) == 2


def test_capture_applies_the_jit_specialization():
    """ints == 1 become constants, ints divisible by 16 and 16-byte aligned pointers get divisibility 16."""
    import torch
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from kernels._audit import capture

    def toy(x_ptr, n, one, odd, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))

    kernel = JITFunction(toy)  # a real JITFunction even where TRITON_INTERPRET=1 made triton.jit interpret
    x = torch.zeros(64)
    original = JITFunction.run
    with capture(case="toy") as got:
        kernel[(1,)](x, 32, 1, 17, BLOCK=16, num_warps=2)
        kernel[(1,)](x[1:], 32, 1, 2**40, BLOCK=16)
    a, b = got
    assert a.specialization() == "x_ptr:*fp32/16 n:i32/16 one=1 odd:i32"
    assert b.specialization() == "x_ptr:*fp32 n:i32/16 one=1 odd:i64/16"
    assert a.declared() == {"BLOCK": 16} and a.num_warps == 2 and b.num_warps == 4
    assert a.key() != b.key() and a.variant() == (a.variant()[0], a.variant()[1], (("x_ptr", "*fp32"),),
                                                   "[('BLOCK', 16)]", 2, a.num_stages)
    assert JITFunction.run is original  # restored
