"""Kernel A (counting) against the core's count_experts / routed_rank_load."""

import random

import pytest
import torch

from moe_lb_kernels.count import count_experts, routed_rank_load
from sglang_moe_lb.quota_dispatch import count_experts as core_count
from sglang_moe_lb.waterfill import routed_rank_load as core_routed

from .helpers import random_ids


@pytest.mark.parametrize("T", [0, 1, 7, 100])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_count_experts(device, T, K, dtype):
    rng = random.Random(T * 31 + K)
    E = 13
    ids = random_ids(rng, T, K, E).to(dtype)
    got = count_experts(ids.to(device), E)
    assert torch.equal(got.cpu(), core_count(ids, E))


def test_count_single_hot_expert(device):
    ids = torch.full((64, 4), -1, dtype=torch.int32)
    ids[:, 0] = 5
    got = count_experts(ids.to(device), 9)
    assert got.tolist() == [0, 0, 0, 0, 0, 64, 0, 0, 0]


@pytest.mark.parametrize("T", [0, 5, 90])
def test_routed_rank_load(device, T):
    rng = random.Random(T)
    R, S = 6, 3
    ids = random_ids(rng, T, 4, R * S)
    got = routed_rank_load(ids.to(device), R, S)
    assert torch.equal(got.cpu(), core_routed(ids, R, S))
