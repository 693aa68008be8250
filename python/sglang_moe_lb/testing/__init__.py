"""Test and demo utilities of sglang_moe_lb. Nothing here is a product path.

``cpu_serving``: a harness that runs the real SGLang server on a CPU with a tiny
model, for end-to-end tests and demos only.
"""
