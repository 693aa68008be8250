"""Ahead-of-time compile of recorded launches for a GPU target, with a resource report, no GPU needed.

``record_specs(fn)`` records the launches ``fn`` makes (``_launch.spec_of``) instead of running
them. ``compile_specs(specs)`` runs ``python -m moe_lb_kernels.aot JOB.json`` (a fresh process
without ``TRITON_INTERPRET``; optionally another Triton first on ``PYTHONPATH``) through
Triton's full pipeline down to a cubin with the bundled ptxas, and returns, per spec:
``ok``/``error``, ``regs``, ``stack`` and ``local`` bytes (cuobjdump resource usage),
``spill_ops`` (``LDL``/``STL`` instructions in the SASS: local-memory traffic, i.e. spills),
``sass`` (static instruction count: the latency model of shared/notes/kernel-plan.md),
``shared`` bytes, Triton's ``global_scratch``/``profile_scratch``, ``seconds`` to compile and the
``triton`` version. Specs are split over ``jobs`` processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

__all__ = ["aot_compile_spec", "compile_specs", "record_specs", "spec_key"]


def aot_compile_spec(spec: dict, arch: int = 90):
    """Compile one launch spec for ``sm_<arch>`` without a GPU (needs TRITON_INTERPRET unset)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    src = ASTSource(kernel, dict(spec["signature"]), dict(spec["constexprs"]))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))


def spec_key(spec: dict) -> str:
    """What makes two recorded launches the same compile job."""
    return repr((spec["name"], sorted(spec["signature"].items()), sorted(spec["constexprs"].items()),
                 sorted(spec["options"].items())))


def record_specs(fn, modules) -> list[dict]:
    """Run ``fn()`` with the launches of ``modules`` (those that call ``launch``: ``balancer``)
    recorded instead of executed; distinct specs in order."""
    from . import _launch

    rec: list[dict] = []

    def fake(kernel, grid, *args, **kwargs):
        rec.append(_launch.spec_of(kernel, args, kwargs))

    real = [m.launch for m in modules]
    for m in modules:
        m.launch = fake
    try:
        fn()
    finally:
        for m, r in zip(modules, real):
            m.launch = r
    seen: dict[str, dict] = {}
    for s in rec:
        seen.setdefault(spec_key(s), s)
    return list(seen.values())


def compile_specs(specs: list[dict], arch: int = 90, pythonpath: str | None = None, jobs: int = 1,
                  timeout: float = 1800.0) -> list[dict]:
    jobs = max(1, min(jobs, len(specs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sgl-kernel/python
    paths = [p for p in (pythonpath, here, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for j in range(jobs):
            path = os.path.join(d, f"job{j}.json")
            with open(path, "w") as f:
                json.dump({"arch": arch, "specs": specs[j::jobs]}, f)
            procs.append((path, subprocess.Popen([sys.executable, "-m", "moe_lb_kernels.aot", path], env=env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        parts = []
        for path, p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"AOT compile process failed:\n{out[-3000:]}\n{err[-3000:]}")
            with open(path + ".out") as f:
                parts.append(json.load(f))
    results = [None] * len(specs)
    for j, part in enumerate(parts):
        for i, r in enumerate(part):
            results[j + i * jobs] = r
    return results


def _resources(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out: dict = {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cf:
        cf.write(cubin)
        cf.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cf.name], capture_output=True, text=True).stdout
        for key in ("REG", "STACK", "SHARED", "LOCAL"):
            m = re.search(rf"\b{key}:(\d+)", usage)
            if m:
                out[key.lower() if key != "SHARED" else "shared_static"] = int(m.group(1))
        sass = subprocess.run([tool, "--dump-sass", cf.name], capture_output=True, text=True).stdout
    ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_.]*)", sass)
    out["regs"] = out.pop("reg", None)
    out["sass"] = len(ins)
    out["spill_ops"] = sum(1 for i in ins if i.startswith(("LDL", "STL")))
    return out


def _main(path: str) -> None:
    import triton

    with open(path) as f:
        job = json.load(f)
    results = []
    for spec in job["specs"]:
        res = {"name": spec["name"], "constexprs": spec["constexprs"], "options": spec["options"], "ok": False,
               "triton": triton.__version__}
        t0 = time.time()
        try:
            ck = aot_compile_spec(spec, job["arch"])
            res["ok"] = bool(ck.asm.get("cubin"))
            res["shared"] = int(getattr(ck.metadata, "shared", 0))
            # scratch a launch asks Triton's allocator for: 0 for a call that allocates nothing
            res["global_scratch"] = int(getattr(ck.metadata, "global_scratch_size", 0) or 0)
            res["profile_scratch"] = int(getattr(ck.metadata, "profile_scratch_size", 0) or 0)
            res.update(_resources(ck.asm["cubin"]))
        except Exception as err:  # noqa: BLE001 - reported per spec
            res["error"] = f"{type(err).__name__}: {str(err)[-2000:]}"
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
    with open(path + ".out", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _main(sys.argv[1])
