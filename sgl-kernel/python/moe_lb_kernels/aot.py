"""Ahead-of-time compilation of recorded launches for a GPU target, on a machine without a GPU.

``python -m moe_lb_kernels.aot SPECS.json`` compiles every spec (see ``_launch.spec_of``)
through Triton's full pipeline down to a cubin with the bundled ptxas, and writes
``SPECS.json.out`` with per-spec ``ok``/``error``, registers, local memory and shared memory.
Run it without ``TRITON_INTERPRET`` (``aot_compile_specs`` does that in a subprocess).
"""

from __future__ import annotations


def aot_compile_spec(spec: dict, arch: int = 90):
    """Compile one launch spec for ``sm_<arch>`` without a GPU (needs TRITON_INTERPRET unset)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    src = ASTSource(kernel, dict(spec["signature"]), dict(spec["constexprs"]))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))


def aot_compile_specs(specs: list[dict], arch: int = 90, timeout: float = 600.0,
                      pythonpath: str | None = None) -> list[dict]:
    """Compile specs in a fresh process without the interpreter; returns per-spec results
    (``ok``, ``error``, ``regs``/``local``/``shared``/``global_scratch``/``profile_scratch`` where
    the compiler reports them)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "specs.json")
        with open(path, "w") as f:
            json.dump({"arch": arch, "specs": specs}, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if pythonpath:  # e.g. another Triton version, to check it compiles the same kernels
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "moe_lb_kernels.aot", path], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile process failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        with open(path + ".out") as f:
            return json.load(f)


def _main(path: str) -> None:
    import json
    import re
    import subprocess
    import tempfile

    import triton

    with open(path) as f:
        job = json.load(f)
    results = []
    for spec in job["specs"]:
        res = {"name": spec["name"], "constexprs": spec["constexprs"], "ok": False, "triton": triton.__version__}
        try:
            ck = aot_compile_spec(spec, job["arch"])
            res["ok"] = bool(ck.asm.get("cubin"))
            res["shared"] = int(getattr(ck.metadata, "shared", 0))
            # scratch a launch asks Triton's allocator for: must be 0 for a call that allocates nothing
            res["global_scratch"] = int(getattr(ck.metadata, "global_scratch_size", 0) or 0)
            res["profile_scratch"] = int(getattr(ck.metadata, "profile_scratch_size", 0) or 0)
            try:  # registers / local memory from the cubin
                import triton

                tool = __import__("os").path.join(__import__("os").path.dirname(triton.__file__),
                                                  "backends", "nvidia", "bin", "cuobjdump")
                with tempfile.NamedTemporaryFile(suffix=".cubin") as cf:
                    cf.write(ck.asm["cubin"])
                    cf.flush()
                    out = subprocess.run([tool, "--dump-resource-usage", cf.name], capture_output=True, text=True).stdout
                m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
                if m:
                    res["regs"], res["local"] = int(m.group(1)), int(m.group(2))
            except Exception:  # noqa: BLE001
                pass
        except Exception as err:  # noqa: BLE001
            res["error"] = f"{type(err).__name__}: {str(err)[-2000:]}"
        results.append(res)
    with open(path + ".out", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
