"""The SGLang adapter: SGLang's placement, dispatch and Waterfill as the replay calls them."""

import pytest
import torch

from sglang_moe_lb.replay.upstream import UpstreamSGLang


@pytest.fixture(scope="module")
def up():
    return UpstreamSGLang(num_logical=8, num_physical=12, ep_size=4, num_layers=2)


def test_rebalance_places_every_expert_and_replicates_the_hot_one(up):
    w = torch.ones(5, 2, 8)
    w[:, :, 3] = 50.0  # expert 3 is hot in both layers
    p2l, l2p = up.rebalance(w)
    assert p2l.shape == (2, 12)
    for layer in range(2):
        copies = torch.bincount(p2l[layer], minlength=8)
        assert (copies >= 1).all() and copies[3] == copies.max() >= 2
        for e in range(8):  # log2phy lists exactly the slots holding e
            listed = sorted(x for x in l2p[layer, e].tolist() if x >= 0)
            assert listed == (p2l[layer] == e).nonzero().flatten().tolist()


def test_static_prefers_the_local_copy_and_dynamic_spreads(up):
    # Expert 0 on every rank; the rest once.
    p2l = torch.tensor([[0, 1, 2, 0, 3, 4, 0, 5, 6, 0, 7, 1]] * 2)
    state = up.install(p2l, None)
    ids = torch.zeros(400, 1, dtype=torch.long)
    for r in range(4):
        phys = up.to_physical(ids, state.static_info[r][0])
        assert (phys // 3 == r).all()  # SGLang static: each rank uses its own copy
        assert (p2l[0][phys] == 0).all()
    # An EPLB result (log2phy given, no collapse): dynamic spreads over all 4 copies.
    l2p = torch.full((2, 8, 4), -1)
    for layer in range(2):
        for e in range(8):
            s = (p2l[layer] == e).nonzero().flatten()
            l2p[layer, e, : len(s)] = s
    state = up.install(p2l, l2p)
    torch.manual_seed(0)
    phys = up.to_physical(ids, state.dynamic_info[1][0])
    assert set((phys // 3).flatten().tolist()) == {0, 1, 2, 3}
    # Padding stays padding.
    assert up.to_physical(torch.tensor([[1, -1]]), state.static_info[0][0])[0, 1] == -1


def test_waterfill_layout_and_fast_count_match_sglang(up):
    g = torch.Generator().manual_seed(0)
    phys = [torch.randint(0, 12, (96 + 8 * r, 3), generator=g) for r in range(4)]
    a = up.waterfill(phys, 0, fast_count=False)  # SGLang's Triton count kernel (interpreter)
    b = up.waterfill(phys, 0, fast_count=True)
    for r in range(4):
        assert torch.equal(a[r], b[r])
        f = a[r]
        assert f.shape == (phys[r].shape[0], 4)
        assert torch.equal(f[:, :3], phys[r] + phys[r] // 3)  # routed slot p -> p + p // S
        assert ((f[:, 3] % 4) == 3).all()  # shared slot of some rank
    d = up.waterfill(phys, 0, dynamic=True)
    assert all(x.shape == y.shape for x, y in zip(d, a))
