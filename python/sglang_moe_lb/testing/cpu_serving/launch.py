"""TEST AND DEMO ONLY: run ``sglang.launch_server`` with the AMX platform fact forced on.

Usage (what the harness runs)::

    python -m sglang_moe_lb.testing.cpu_serving.launch <sglang.launch_server args>

Why: SGLang 0.5.23 rewrites ``--attention-backend intel_amx`` to ``torch_native`` on a
CPU without AMX (``srt/arg_groups/overrides.py``), and ``torch_native`` cannot run
DeepSeek MLA prefill. The override is installed in *this launcher process only*,
where server arguments are resolved; the spawned scheduler processes re-probe the
real CPU, see no AMX, and so use the torch paths (native MoE forward, the
``sgl_kernel`` stand-in for attention). Not for production use.
"""

from __future__ import annotations

import runpy
import sys

from sglang_moe_lb.testing.cpu_serving import _state
from sglang_moe_lb.versions import sglang_version as _sglang_version

WRITTEN_FOR_SGLANG = "0.5.23"


def install_amx_override() -> None:
    """Make ``get_platform().has_amx`` answer True in this process."""
    try:
        from sglang.srt.runtime_context import override_platform
    except ImportError as e:
        raise SystemExit(
            "sglang_moe_lb CPU launcher: sglang.srt.runtime_context.override_platform not found "
            f"(written for sglang=={WRITTEN_FOR_SGLANG}, found sglang=={_sglang_version()}): {e}"
        ) from None
    override_platform(has_amx=True).install()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    install_amx_override()
    # The CPU-shims plugin skips its hooks here: this process never runs the model.
    _state.IN_LAUNCHER = True
    sys.argv = ["sglang.launch_server", *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
