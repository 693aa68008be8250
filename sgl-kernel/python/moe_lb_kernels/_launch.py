"""Kernel launches go through ``launch`` so tests can record them and compile each
specialization ahead of time for a GPU target on a machine without a GPU (``aot.record_specs``, ``aot.compile_specs``).
"""

from __future__ import annotations

import inspect

import torch

_PTR = {
    torch.int32: "*i32", torch.int64: "*i64", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.bool: "*i1",
}


def launch(kernel, grid, *args, **kwargs) -> None:
    """Every kernel launch goes through here (``aot.record_specs`` swaps it out per module)."""
    kernel[grid](*args, **kwargs)


def signature_of(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one recorded launch, for ``triton.compile``."""
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    names = list(inspect.signature(fn).parameters)
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in opts})
    params = inspect.signature(fn).parameters
    const_names = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    sig, const = {}, {}
    for n in names:
        v = bound[n]
        if n in const_names:
            sig[n] = "constexpr"
            const[n] = v
        elif isinstance(v, torch.Tensor):
            sig[n] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            sig[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            raise TypeError(f"cannot type argument {n}={v!r}")
    return sig, const, opts


def spec_of(kernel, args, kwargs) -> dict:
    """A JSON-able description of one launch: module, kernel name, signature, constexprs, options."""
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    sig, const, opts = signature_of(kernel, args, kwargs)
    return {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": const, "options": opts}
