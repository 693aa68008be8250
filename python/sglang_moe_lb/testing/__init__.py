"""Test and demo utilities of sglang_moe_lb. Nothing here is a product path.

``cpu_serving``: a harness that runs the real SGLang server on a CPU with a tiny
model, for end-to-end tests and demos only.

``gloo_deepep``: the token transport of SGLang's DeepEP dispatcher (normal mode) over gloo,
so the real ``DeepseekV2MoE`` with its fused shared-expert slots runs across CPU ranks
(the Waterfill test, which the CPU server cannot serve). See docs/cpu-demo.md.

``gloo_ranks``: spawn one process per EP rank over gloo, one deadline, every rank's error
(``free_port``, ``run_ranks``, ``count_all_gathers``).

``windows``: recorded-window stand-ins (``skewed_window``).
"""
