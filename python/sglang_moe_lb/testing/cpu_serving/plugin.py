"""TEST AND DEMO ONLY: SGLang plugin that installs the CPU serving shims.

Entry point (group ``sglang.srt.plugins``)::

    moe_lb_cpu_shims = sglang_moe_lb.testing.cpu_serving.plugin:register

The harness does not need a pyproject entry: the ``stubs/`` directory it puts on the
server's ``PYTHONPATH`` carries a small ``.dist-info`` that declares this entry point,
so the plugin is discovered only by servers the harness launches. ``register`` does
nothing unless ``SGLANG_MOE_LB_CPU_SHIMS=1``.

Hooks (SGLang 0.5.23):

* AROUND ``sglang.srt.layers.moe.fused_moe_native.moe_forward_native``: a ``-1``
  expert id (expert on another EP rank) contributes 0 (see ``ep_moe``). The caller,
  ``UnquantizedFusedMoEMethod.forward_cpu``, imports the function from its module at
  call time, so patching the module attribute reaches it.
* AFTER ``sglang.srt.model_loader.weight_utils.initialize_dummy_weights``:
  placement-invariant dummy weights when ``SGLANG_MOE_LB_CPU_DUMMY_INIT=placement_invariant``
  (see ``dummy_weights``).

If a hook target is missing (another SGLang version), the process exits with a
message naming the version, instead of serving with a half-installed shim.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from sglang_moe_lb.versions import sglang_version as _sglang_version

logger = logging.getLogger(__name__)

ENV = "SGLANG_MOE_LB_CPU_SHIMS"
WRITTEN_FOR_SGLANG = "0.5.23"
MOE_FORWARD_TARGET = "sglang.srt.layers.moe.fused_moe_native.moe_forward_native"
DUMMY_INIT_TARGET = "sglang.srt.model_loader.weight_utils.initialize_dummy_weights"

_registered = False


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _require(target: str) -> None:
    module_name, attr = target.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
        getattr(module, attr)
    except (ImportError, AttributeError) as e:
        msg = (
            f"sglang_moe_lb CPU shims: hook target {target} not found "
            f"(written for sglang=={WRITTEN_FOR_SGLANG}, found sglang=={_sglang_version()}): {e}"
        )
        print(msg, file=sys.stderr, flush=True)
        # SystemExit passes through load_plugins' `except Exception`, so the server stops here.
        raise SystemExit(msg) from None


def register() -> None:
    """Plugin entry point: register the CPU shims' hooks (only with SGLANG_MOE_LB_CPU_SHIMS=1)."""
    global _registered
    if _registered or not enabled():
        return
    from sglang_moe_lb.testing.cpu_serving import _state

    if _state.IN_LAUNCHER:
        # The launcher process never runs the model; skip importing the MoE modules there.
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_moe_lb.testing.cpu_serving.dummy_weights import after_initialize_dummy_weights, mode
    from sglang_moe_lb.testing.cpu_serving.ep_moe import moe_forward_native_ep

    mode()  # fail early on a bad SGLANG_MOE_LB_CPU_DUMMY_INIT
    for target in (MOE_FORWARD_TARGET, DUMMY_INIT_TARGET):
        _require(target)
    HookRegistry.register(MOE_FORWARD_TARGET, moe_forward_native_ep, HookType.AROUND)
    HookRegistry.register(DUMMY_INIT_TARGET, after_initialize_dummy_weights, HookType.AFTER)
    logger.info("sglang_moe_lb CPU shims registered (TEST AND DEMO ONLY)")
