"""The plugin's CUDA seam (moe_lb_kernels.seam) keeps joint.balance_layer's contract (interpreter)."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from moe_lb_kernels import seam  # noqa: E402
from sglang_moe_lb import Placement, balance_layer, routed_rank_load  # noqa: E402
from sglang_moe_lb.plugin import hot_path  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    E, R, S = 12, 4, 4
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (R * S - E,), generator=g)])[torch.randperm(R * S, generator=g)]
    topk = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(40)])
    return Placement(p2l.to(DEV), R, E), topk.to(DEV)


@pytest.mark.parametrize("waterfill", [None, "all_rank", "conservative"])
def test_seam_matches_core_contract(waterfill):
    pl, topk = _case(0)
    got = seam.balance_layer(pl, topk, waterfill=waterfill)
    ref = balance_layer(pl, topk, waterfill=waterfill)
    assert torch.equal(pl.phy2log[0][got.phys_ids.long()], topk)
    assert torch.equal(torch.bincount(got.phys_ids.reshape(-1).long(), minlength=pl.num_physical), got.quotas.long())
    R, S = pl.num_ranks, pl.slots_per_rank

    def max_load(res):
        load = routed_rank_load(res.phys_ids.long(), R, S)
        if res.shared_rank is not None:
            load = load + torch.bincount(res.shared_rank.long(), minlength=R)
        return int(load.max())

    assert max_load(got) == max_load(ref)  # both exact: the same optimum


def test_seam_follows_a_new_placement_and_a_larger_batch():
    pl, topk = _case(1)
    seam.balance_layer(pl, topk[:10])
    pl2, topk2 = _case(2)
    res = seam.balance_layer(pl2, torch.cat([topk2] * 10))  # 400 rows > the first buffers
    assert torch.equal(pl2.phy2log[0][res.phys_ids.long()], torch.cat([topk2] * 10))


@pytest.mark.parametrize("waterfill", [None, "all_rank"])
def test_seam_dynamic_union_meets_global_quotas(waterfill):
    # Two DP ranks; gathered rows come from the core's local_stats, as in the plugin.
    from sglang_moe_lb import local_stats

    pl, topk = _case(3)
    parts = [topk[:25], topk[25:]]
    R, S, E = pl.num_ranks, pl.slots_per_rank, pl.num_logical
    gathered = torch.zeros(R, E + R + 1, dtype=torch.long, device=DEV)
    for d, part in enumerate(parts):
        gathered[d] = local_stats(part, E, R, S)
    union = torch.zeros(pl.num_physical, dtype=torch.long, device=DEV)
    quotas = None
    for d, part in enumerate(parts):
        res = seam.balance_layer(pl, part, source_rank=d, waterfill=waterfill, gathered=gathered)
        assert torch.equal(pl.phy2log[0][res.phys_ids.long()], part)
        union += torch.bincount(res.phys_ids.reshape(-1).long(), minlength=pl.num_physical)
        quotas = res.quotas.long().clone() if quotas is None else quotas
        assert torch.equal(res.quotas.long(), quotas)
    assert torch.equal(union, quotas)


def test_hot_path_picks_the_seam_on_cuda_only():
    assert hot_path.impl("cpu").name == "core-torch"
    if torch.cuda.is_available():
        assert hot_path.impl("cuda").balance_layer is seam.balance_layer
