"""Everything that depends on the installed Triton version, in one place.

Tested versions: triton 3.6 (the lent GPU machines' stack) and 3.8 (torch 2.14's). The kernels use
only ``tl`` functions present in both. What differs between them:

* **Interpreter scalars.** Before 3.7 the interpreter turns a program's scalar into a Python int with
  ``int(ndarray)``; its scalars are 1-element 1-d arrays, which numpy >= 2.4 refuses to convert
  ("only 0-dimensional arrays can be converted to Python scalars"). Any loop bound built from a
  loaded value (RoIAlign's sampling grid, NMS's box count) then fails in the interpreter only.
  :func:`patch_interpreter` gives ``tl.tensor.__index__`` 3.7's behaviour (squeeze first).
  Compiled code is unaffected.
* **Offline compile API.** ``ASTSource``/``GPUTarget`` live where :func:`compile_kernel` imports them
  on every version since 3.3; their ``constexprs`` argument is keyed by argument name.
* **Launch specialization** (the compile audit, :mod:`kernels._audit`). :func:`launch_specialization` calls
  the JIT's internals that ``JITFunction.run`` uses before compiling -- ``create_function_from_signature``
  (the per-kernel binder over ``native_specialize_impl``) and ``JITFunction._pack_args`` -- whose
  signatures are the same in 3.6 and 3.8.
"""
from __future__ import annotations

import triton

TESTED = ("3.6", "3.8")


def version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def patch_interpreter() -> bool:
    """Make the interpreter convert 1-element scalars to ints as triton >= 3.7 does; True if patched.

    Idempotent, and a no-op where the installed interpreter already squeezes.
    """
    if version() >= (3, 7):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_maskrcnn_fast_patched", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the scope restores attributes last-in first-out, so this override unwinds cleanly too
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._maskrcnn_fast_patched = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


def compile_kernel(fn, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int):
    """``triton.compile`` for ``sm_<cc>`` with no GPU present (PTX and cubin through ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def launch_specialization(fn, backend, args: tuple, kwargs: dict):
    """What ``JITFunction.run`` derives from a launch's arguments before compiling it for ``backend``:
    ``(bound_args, signature, constexprs, attrs, options)``, ``options`` being the launch options left over
    after binding (num_warps, num_stages, debug, ...). The binder is cached on ``fn``."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binders = fn.__dict__.setdefault("_maskrcnn_fast_binders", {})
    if backend.target not in binders:
        binders[backend.target] = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binders[backend.target](*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return bound, signature, constexprs, attrs, options
