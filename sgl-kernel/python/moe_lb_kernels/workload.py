"""Synthetic EP workloads for the kernel benchmarks and compile checks (``sglang_moe_lb.testing.workloads``)."""

from sglang_moe_lb.testing.workloads import batch_topk, greedy_placement, zipf_popularity

__all__ = ["greedy_placement", "zipf_popularity", "batch_topk"]
