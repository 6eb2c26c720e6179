"""Correctly rounded division for the Triton kernels (NMS, RoIAlign, RoIPool, the mask targets).

fp32 ``/`` in Triton compiles to PTX ``div.full.f32``, an approximation (a reciprocal times the dividend,
with operand scaling) up to 2 ulp off. torch and torchvision's CUDA kernels divide correctly rounded (nvcc's
default ``-prec-div=true``), and so does Triton's interpreter (numpy), so no CPU test sees the difference.
Where a quotient decides something discrete, one ulp moves the result by a whole step: an IoU against its
threshold (NMS), a RoI's bin edges (RoIPool: floor/ceil of ph * size / P; emulating div.full.f32 as
a * RN(1/P) moves an edge for 171 of the integer sizes 1..399 at P = 7) or its adaptive sampling grid
(RoIAlign: ceil(size / P); at P = 28 the sizes 84, 168, 196, ... get one sample row more).

Two ways to divide correctly rounded (fp64 ``/`` already is ``div.rn.f64``; both use it for fp64):

* :func:`div_rn` -- ``tl.math.div_rn`` (PTX ``div.rn.f32``), any operands. ptxas expands it into a fast
  path and a ``CALL`` to a slow-path subroutine (denormals, extreme exponents): ~100 more SASS instructions
  per kernel (RoIAlign's channels_last forward: 856-888 instead of 744-792), and the call's ABI constrains
  register allocation (in a layout of RoIAlign's loops tried on the way, its two calls cost the fp16/bf16
  channels_last forward an 8-byte spill on sm_80). NMS uses it.
* :func:`div_rn_int` -- for a positive integer divisor (a bin count, a sampling grid, a sample count):
  fp32 straight-line code (~11 instructions, no branch, no call, no fp64). The RoI kernels use it.
  q0 = a * y with y = rsqrt(n)**2 (within 2**-21.7 of 1/n, so q0 within 6 ulp); the remainder
  r = a - n * q0 computed exactly by splitting q0 into its top 12 and bottom 12 significand bits (for
  n < 2**12 every product and difference involved is exact, with or without FMA contraction, i.e. on the GPU
  and in the interpreter, which rounds a * b + c twice); then q = q0 + r * y. a / n lies at least
  2**-25 / n (relative) from every fp32 rounding midpoint (it is never one: a has 24 bits, a midpoint 25),
  i.e. 2**-14 ulp for n <= 2**12, and q0 + r * y is within 2**-19 ulp of a / n, so it rounds to
  RN(a / n). Exact for 1 <= n <= 4096 and any fp32 a (inf and NaN pass through); for larger n (only a sample
  count beyond 64 x 64 gets there) within 1.5 ulp. tests/test_division.py checks this arithmetic against
  numpy's division for every n <= 4096 (4.7e6 operand pairs per FMA semantics, the rsqrt seed perturbed
  by rsqrt.approx's worst case x 4; an offline run over 5e8 pairs found no difference either), and the
  kernels in the interpreter with fp32 '/' made approximate.

``tl.math.div_rn`` and ``tl.math.rsqrt`` have the same signatures in triton 3.6 and 3.8 (``tl.math.div_rn``
takes fp32 only, hence the fp64 branches); the interpreter evaluates both with numpy. The compile audit
counts what is left of ``div.full.f32`` per kernel (``approx_div``, kernels/_audit.py; gated in
tests/test_compile.py).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def div_rn(a, b):
    """``a / b`` correctly rounded, in ``a``'s dtype: ``a`` an fp32 or fp64 tensor, ``b`` a tensor or a
    number (converted to ``a``'s dtype first)."""
    b = tl.cast(b, a.dtype)
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def div_rn_int(a, n):
    """``a / n`` correctly rounded, in ``a``'s dtype (an fp32 or fp64 tensor ``a``), for an integer
    ``1 <= n <= 4096`` (int or integer-valued float, scalar or tensor; within 1.5 ulp for larger n), without
    ``div_rn``'s slow-path call (module docstring)."""
    if a.dtype == tl.float64:
        q = a / tl.cast(n, tl.float64)
    else:
        nf = tl.cast(n, tl.float32)
        r = tl.math.rsqrt(nf)
        y = r * r  # 1 / n within 2**-21.7
        q0 = a * y  # within 6 ulp of a / n
        hi = (q0.to(tl.int32, bitcast=True) & -4096).to(tl.float32, bitcast=True)  # top 12 significand bits
        rem = (a - nf * hi) - nf * (q0 - hi)  # a - n * q0, exactly
        q1 = q0 + rem * y
        q = tl.where(rem == rem, q1, q0)  # a = +-inf: rem is NaN, q0 = +-inf
    return q
