"""Test-only: recorded-window stand-ins (what SGLang's expert-distribution recorder dumps)."""

from __future__ import annotations

import torch

__all__ = ["skewed_window"]


def skewed_window(num_experts: int, steps: int = 8, layers: int = 4, seed: int = 0) -> torch.Tensor:
    """``logical_count [steps, layers, experts]`` int64, skewed towards a few hot experts (a random
    permutation of a 3x..0.2x ramp), so EPLB replicates them and a split table has work to do."""
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(3.0, 0.2, num_experts)[torch.randperm(num_experts, generator=g)]
    return (torch.rand(steps, layers, num_experts, generator=g) * 100 * skew).to(torch.int64)
