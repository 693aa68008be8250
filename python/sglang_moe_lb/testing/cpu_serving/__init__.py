"""TEST AND DEMO ONLY: run the real SGLang 0.5.23 server on a CPU with a tiny model.

Not a product path. It exists so that end-to-end tests and demos can drive a real
SGLang server (HTTP ``/generate``, ``sglang.bench_serving``, EPLB, the expert
distribution recorder) on a machine without a GPU. Pieces:

* ``stubs/sgl_kernel``: torch stand-ins for the three CPU kernels the tiny model
  reaches (on ``PYTHONPATH`` of launched servers only; never importable otherwise);
* ``launch``: ``python -m sglang_moe_lb.testing.cpu_serving.launch <launch_server args>``,
  forcing the AMX platform fact in the launcher process only;
* ``plugin`` (+ ``ep_moe``, ``dummy_weights``): an opt-in SGLang plugin
  (``SGLANG_MOE_LB_CPU_SHIMS=1``) with an EP-aware native MoE forward (and, with
  ``SGLANG_MOE_LB_CPU_SLOT_LOG=<dir>``, a log of what each rank executed per MoE call) and
  placement-invariant dummy weights;
* ``model_dir``: the tiny DeepSeek-V3 (``test/data/tiny_dsv3``);
* ``server``: ``launch_cpu_server(...)`` -> ``ServerHandle`` (start, wait healthy,
  generate, recorder, bench_serving, stop every server process by PID);
* ``serve``: ``python -m sglang_moe_lb.testing.cpu_serving.serve`` keeps one server up until
  signalled (what ``scripts/demo_server.sh`` runs).

How it fits together, and what it does not cover: docs/cpu-demo.md.
"""

from sglang_moe_lb.testing.cpu_serving.model_dir import prepare_model_dir, source_model_dir
from sglang_moe_lb.testing.cpu_serving.server import (
    BASE_ARGS,
    EP2_EPLB_ARGS,
    STUBS_DIR,
    ServerHandle,
    ServerStartError,
    launch_cpu_server,
)

__all__ = [
    "BASE_ARGS",
    "EP2_EPLB_ARGS",
    "STUBS_DIR",
    "ServerHandle",
    "ServerStartError",
    "launch_cpu_server",
    "prepare_model_dir",
    "source_model_dir",
]
