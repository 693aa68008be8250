"""Trace sources: bundled data, synthetic generator, SGLang recorder dumps (round trip, malformed input)."""

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from sglang_moe_lb.replay.dumps import load_recorder
from sglang_moe_lb.replay.sources import TraceFormatError, bundled_trace, synthetic_trace

from .conftest import DUMP_P2L, DUMP_PASSES, DUMP_RANKS, DUMP_TOPK, dump_tokens

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "olmoe_domains.json"


def _logical(pid: int, rank: int) -> torch.Tensor:
    ids = dump_tokens(pid, rank).long()
    return torch.stack([DUMP_P2L[layer][ids[layer]] for layer in range(2)])


# ------------------------------------------------------------------------------------------
# Bundled data
# ------------------------------------------------------------------------------------------
def test_bundled_data_and_provenance_are_shipped():
    pkg = resources.files("sglang_moe_lb").joinpath("data")
    text = pkg.joinpath("olmoe_domains.json").read_bytes()
    prov = pkg.joinpath("PROVENANCE.md").read_text()
    assert hashlib.sha256(text).hexdigest() in prov
    assert "allenai/OLMoE" in prov and "Apache-2.0" in prov
    if SHARED_DATA.exists():
        assert SHARED_DATA.read_bytes() == text


def test_bundled_trace_shapes_shift_and_determinism():
    tr = bundled_trace(steps=10, tokens=(512, 1024), num_ranks=8, seed=3)
    assert (tr.num_logical, tr.top_k, tr.num_layers) == (64, 8, 3)
    assert tr.phases == [(0, "github"), (5, "arxiv")]
    data = json.loads(resources.files("sglang_moe_lb").joinpath("data/olmoe_domains.json").read_text())
    assert torch.equal(tr.calibration, torch.tensor(data["models"]["olmoe"]["domains"]["c4"], dtype=torch.float64))
    b0, b0again, b7 = tr.batch(0), tr.batch(0), tr.batch(7)
    assert torch.equal(b0.topk, b0again.topk)
    assert b0.label == "github" and b7.label == "arxiv"
    L, T, k = b0.topk.shape
    assert L == 3 and k == 8 and 512 <= T <= 1024 and T % 8 == 0
    assert b0.rank_sizes == [T // 8] * 8
    assert all(len(set(r)) == 8 for r in b0.topk[0].tolist())
    with pytest.raises(IndexError):
        tr.batch(10)


def test_bundled_trace_follows_the_domain_popularity():
    # Many tokens: the hottest arxiv expert of layer 0 (expert 0, ~98% of tokens) must dominate.
    tr = bundled_trace(steps=2, tokens=(8192, 8192), num_ranks=8, serving=("arxiv",))
    ids = tr.batch(1).topk[0]
    share = float((ids == 0).any(1).double().mean())
    data = json.loads(resources.files("sglang_moe_lb").joinpath("data/olmoe_domains.json").read_text())
    arxiv0 = data["models"]["olmoe"]["domains"]["arxiv"][0]
    expected = arxiv0[0] / (sum(arxiv0) / 8)
    assert abs(share - expected) < 0.01


def test_bundled_trace_rejects_unknown_domain():
    with pytest.raises(ValueError, match="no domain 'nope'"):
        bundled_trace(serving=("nope",))


# ------------------------------------------------------------------------------------------
# Synthetic generator
# ------------------------------------------------------------------------------------------
def test_synthetic_knobs():
    tr = synthetic_trace(steps=6, tokens=(256, 256), num_ranks=4, experts=32, top_k=4, layers=2, skew=1.5,
                         drift=0.0, shift_at=3, seed=1)
    assert (tr.num_logical, tr.top_k, tr.num_layers, tr.num_steps) == (32, 4, 2, 6)
    b = tr.batch(0)
    assert b.topk.shape == (2, 256, 4) and b.rank_sizes == [64] * 4
    # drift 0: steps before the shift share one popularity, the shift redraws it.
    def hottest(step):
        return torch.bincount(tr.batch(step).topk[0].flatten(), minlength=32).argmax().item()
    assert hottest(0) == hottest(2)
    assert hottest(0) != hottest(4)


def test_synthetic_skew_zero_is_uniform():
    tr = synthetic_trace(steps=1, tokens=(4096, 4096), num_ranks=1, experts=16, top_k=2, layers=1, skew=0.0, drift=0.0)
    freq = torch.bincount(tr.batch(0).topk.flatten(), minlength=16).double() / 4096
    assert torch.allclose(freq, torch.full((16,), 2 / 16, dtype=torch.float64), atol=0.025)


# ------------------------------------------------------------------------------------------
# SGLang recorder dumps, written by SGLang's recorder (conftest.recorder_dumps)
# ------------------------------------------------------------------------------------------
def test_stat_dump_round_trip(recorder_dumps):
    (f,) = recorder_dumps["stat"]
    raw = torch.load(f, weights_only=True)
    assert raw["logical_count"].shape == (DUMP_PASSES, 2, 3)
    tr = load_recorder([f], num_ranks=DUMP_RANKS, top_k=DUMP_TOPK)
    assert tr.info["kind"] == "stat" and tr.num_steps == DUMP_PASSES and tr.num_logical == 3
    for pid in range(DUMP_PASSES):
        want = torch.cat([_logical(pid, r) for r in range(DUMP_RANKS)], 1)
        got = tr.batch(pid).topk
        for layer in range(2):
            assert torch.equal(
                torch.bincount(got[layer][got[layer] >= 0], minlength=3), torch.bincount(want[layer].flatten(), minlength=3)
            )


def test_per_pass_dump_round_trip(recorder_dumps):
    files = recorder_dumps["per_pass"]
    assert len(files) == DUMP_RANKS
    tr = load_recorder(files, num_ranks=DUMP_RANKS, top_k=DUMP_TOPK)
    assert tr.info["kind"] == "per_pass" and tr.num_steps == DUMP_PASSES
    assert torch.equal(tr.recorded_placement, DUMP_P2L)
    for pid in range(DUMP_PASSES):
        want = torch.cat([_logical(pid, r) for r in range(DUMP_RANKS)], 1)
        got = tr.batch(pid).topk
        for layer in range(2):
            assert torch.equal(
                torch.bincount(got[layer][got[layer] >= 0], minlength=3), torch.bincount(want[layer].flatten(), minlength=3)
            )


def test_per_token_dump_round_trip(recorder_dumps):
    files = recorder_dumps["per_token"]
    tr = load_recorder(files, num_ranks=DUMP_RANKS)
    assert tr.info["kind"] == "per_token" and tr.top_k == DUMP_TOPK and tr.num_steps == DUMP_PASSES
    for pid in range(DUMP_PASSES):
        b = tr.batch(pid)
        assert b.rank_sizes == [dump_tokens(pid, r).shape[1] for r in range(DUMP_RANKS)]
        assert torch.equal(b.topk, torch.cat([_logical(pid, r) for r in range(DUMP_RANKS)], 1))
    # A different EP size keeps the tokens but re-splits them evenly.
    tr4 = load_recorder(files, num_ranks=4)
    assert tr4.batch(0).rank_sizes is None and "re-split" in tr4.info["source_split"]


def _save(tmp_path, name, obj):
    p = tmp_path / name
    torch.save(obj, p)
    return p


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"rank": 0}, "missing key 'logical_count'"),
        ({"logical_count": torch.zeros(3, 4, dtype=torch.int32) + 1, "rank": 0}, None),  # 2-D is accepted as one step
        ({"logical_count": torch.ones(4, dtype=torch.int32)}, r"'logical_count' must be int \[steps, layers, experts\], got shape \[4\]"),
        ({"logical_count": torch.ones(2, 3, 4)}, "'logical_count' must hold integers"),
        ({"logical_count": torch.zeros(2, 3, 4, dtype=torch.int32)}, "no step with any routed token"),
        ({"logical_count": -torch.ones(2, 3, 4, dtype=torch.int32)}, "negative"),
        ({"records": []}, "missing key 'last_physical_to_logical_map'"),
        ({"records": [{"forward_pass_id": 0}], "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.long)},
         r"records\[0\] is missing key 'global_physical_count'"),
        ({"records": [{"forward_pass_id": 0, "topk_ids_of_layer": torch.zeros(2, 3, dtype=torch.int32)}],
          "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.long)},
         r"records\[0\].topk_ids_of_layer' must be int \[layers, tokens, k\], got shape \[2, 3\]"),
        ({"records": [{"forward_pass_id": 0, "global_physical_count": torch.ones(2, 5, dtype=torch.int32)}],
          "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.long)},
         r"global_physical_count has shape \[2, 5\], expected \[2, 4\]"),
        ([1, 2], "expected a dict"),
    ],
)
def test_malformed_dumps_name_the_problem(tmp_path, obj, message):
    p = _save(tmp_path, "dump.pt", obj)
    if message is None:
        assert load_recorder([p], num_ranks=2).num_steps == 1
        return
    with pytest.raises(TraceFormatError, match=message) as err:
        load_recorder([p], num_ranks=2)
    assert str(p) in str(err.value)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_text("not a torch file")
    with pytest.raises(TraceFormatError, match="not a readable torch .pt file"):
        load_recorder([bad], num_ranks=2)
    with pytest.raises(TraceFormatError, match="no such file"):
        load_recorder([tmp_path / "absent.pt"], num_ranks=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TraceFormatError, match="no .pt recorder dumps"):
        load_recorder([empty], num_ranks=2)


def test_mixed_dump_kinds_are_rejected(recorder_dumps):
    with pytest.raises(TraceFormatError, match="mixed dump kinds"):
        load_recorder([recorder_dumps["stat"][0], recorder_dumps["per_pass"][0]], num_ranks=2)


# ------------------------------------------------------------------------------------------
# Conflicting or duplicate inputs are rejected, never merged
# ------------------------------------------------------------------------------------------
def test_the_same_file_twice_is_rejected(recorder_dumps, tmp_path):
    f = recorder_dumps["stat"][0]
    with pytest.raises(TraceFormatError, match="given twice"):
        load_recorder([f, f], num_ranks=2)
    with pytest.raises(TraceFormatError, match="given twice"):  # once as a file, once inside its directory
        load_recorder([f.parent, f], num_ranks=2)
    link = tmp_path / "alias.pt"
    link.symlink_to(f)
    with pytest.raises(TraceFormatError, match="given twice"):
        load_recorder([f, link], num_ranks=2)


@pytest.mark.parametrize("kind", ["per_pass", "per_token"])
def test_two_files_of_one_rank_are_rejected(recorder_dumps, tmp_path, kind):
    a = recorder_dumps[kind][0]
    copy = _save(tmp_path, "copy.pt", torch.load(a, weights_only=True))
    with pytest.raises(TraceFormatError, match=r"copy.pt: rank 0 again \(also .*\); give one file per rank"):
        load_recorder([a, copy], num_ranks=2)


def test_a_pass_recorded_twice_in_one_file_is_rejected(recorder_dumps, tmp_path):
    obj = torch.load(recorder_dumps["per_token"][0], weights_only=True)
    obj["records"].append(obj["records"][0])
    p = _save(tmp_path, "dup.pt", obj)
    with pytest.raises(TraceFormatError, match=r"dup.pt: forward pass 0 is recorded twice"):
        load_recorder([p], num_ranks=2)


def test_files_of_different_dumps_are_rejected(recorder_dumps, tmp_path):
    a, b = recorder_dumps["per_pass"]
    obj = torch.load(b, weights_only=True)
    obj["last_physical_to_logical_map"] = obj["last_physical_to_logical_map"].flip(1)
    other = _save(tmp_path, "other.pt", obj)
    with pytest.raises(TraceFormatError, match="other.pt: 'last_physical_to_logical_map' differs from"):
        load_recorder([a, other], num_ranks=2)


def test_top_k_narrower_than_per_token_rows_is_rejected(recorder_dumps):
    files = recorder_dumps["per_token"]
    with pytest.raises(TraceFormatError, match=f"rows route up to {DUMP_TOPK} experts per token; --top-k 1 would drop"):
        load_recorder(files, num_ranks=DUMP_RANKS, top_k=1)
    wide = load_recorder(files, num_ranks=DUMP_RANKS, top_k=DUMP_TOPK + 2)  # wider: padding only, same tokens
    narrow = load_recorder(files, num_ranks=DUMP_RANKS)
    b, w = narrow.batch(0).topk, wide.batch(0).topk
    assert torch.equal(w[..., :DUMP_TOPK], b) and (w[..., DUMP_TOPK:] == -1).all()


def test_counts_dump_notes_a_doubtful_top_k(recorder_dumps):
    (f,) = recorder_dumps["stat"]
    tr = load_recorder([f], num_ranks=DUMP_RANKS, top_k=3)  # the dump was recorded with top-2
    assert any("not a multiple of --top-k 3" in n for n in tr.info["notes"])
    with pytest.raises(TraceFormatError, match="--top-k 9 is more than the dump's 3 experts"):
        load_recorder([f], num_ranks=DUMP_RANKS, top_k=9)
