"""Triton kernels for sglang-moe-lb (placeholder until the kernels land)."""
