"""``TorchOps``: a CPU proof that code is CUDA-graph safe (tests and benchmarks only).

A captured CUDA graph replays the device work recorded at capture, with the addresses it saw
then. So a per-batch call must (a) allocate no tensor the caller cannot hold at a fixed
address, (b) read its tables through tensors that keep their address when new ones are
installed, and (c) never wait for the device on the host (a host sync is illegal during
capture, and a data-dependent shape cannot be replayed).

``TorchOps`` is a ``TorchDispatchMode``: every ATen op the code issues passes through it and is
recorded (``calls``). An op *allocates* when one of its outputs lives in a storage none of its
inputs (``out=`` included) owns: views, in-place and ``out=`` ops do not. A *host sync* is an op
tagged ``data_dependent_output`` (``.item()``, ``int()``, ``bool()``, ``equal``) or
``dynamic_output_shape`` (``nonzero``, ``unique``, ``bincount``, boolean-mask indexing), or a
boolean-mask ``index_put_``; ``.tolist()``, ``.numpy()`` and ``.cpu()`` read data without an ATen
op on a CPU tensor, so they are patched to report too. Kernel launches of ``launch_modules``
(their ``launch``) are counted and paused in: under ``TRITON_INTERPRET=1`` the interpreter's
copies are the emulator's work, not the hot path's.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "TorchOps", "storages"]

aten = torch.ops.aten
_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostSync(AssertionError):
    pass


def storages(obj, out: set | None = None) -> set:
    """Data pointers of every non-empty tensor storage in ``obj`` (nested lists, tuples, dicts)."""
    out = set() if out is None else out
    if isinstance(obj, torch.Tensor):
        if obj.numel():
            out.add(obj.untyped_storage().data_ptr())
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            storages(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            storages(x, out)
    return out


def _is_sync(func, args) -> bool:
    if func in _MASK_INDEXING:  # integer indexing is fine, a boolean mask is a nonzero
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx or ())
    return any(t in func.tags for t in _SYNC_TAGS)


class TorchOps(TorchDispatchMode):
    """Records allocations and host syncs of the code run inside it (kernel launches excluded)."""

    def __init__(self, raise_on_sync: bool = True, launch_modules: tuple = ()):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.launch_modules = launch_modules  # modules whose ``launch`` is counted and paused in
        self.allocs: list[str] = []
        self.syncs: list[str] = []
        self.launches = 0
        self.ops = 0  # ATen ops seen (outside launches)
        self.calls: list[str] = []  # their names, in order
        self._paused = 0
        self._patches = []

    def _sync(self, what: str):
        if self._paused:
            return
        self.syncs.append(what)
        if self.raise_on_sync:
            raise HostSync(f"host sync: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            self.ops += 1
            self.calls.append(str(func))
            if _is_sync(func, args):
                self._sync(str(func))
        out = func(*args, **kwargs)
        if not self._paused:
            fresh = storages(out, set()) - storages(args, set()) - storages(kwargs, set())
            if fresh:
                self.allocs.append(str(func))
        return out

    def __enter__(self):
        checker = self
        for name in ("tolist", "numpy", "cpu"):
            orig = getattr(torch.Tensor, name)

            def patched(t, *a, _orig=orig, _name=name, **k):
                checker._sync(f"Tensor.{_name}")
                return _orig(t, *a, **k)

            self._patches.append((name, orig))
            setattr(torch.Tensor, name, patched)
        for mod in self.launch_modules:
            def launch(*a, _orig=mod.launch, **k):
                checker.launches += 1
                checker._paused += 1
                try:
                    return _orig(*a, **k)
                finally:
                    checker._paused -= 1

            self._patches.append((mod, mod.launch))
            mod.launch = launch
        return super().__enter__()

    def __exit__(self, *exc):
        for what, orig in reversed(self._patches):
            if isinstance(what, str):
                setattr(torch.Tensor, what, orig)
            else:
                what.launch = orig
        self._patches.clear()
        return super().__exit__(*exc)
