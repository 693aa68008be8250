"""Recorder counts near the int64 limit: exact, or one clean error line naming the file and step.

The oracle is plain Python integers (exact at any size), never the code under test.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sglang_moe_lb.replay.dumps import exact_sum, load_recorder
from sglang_moe_lb.replay.read import count_layers
from sglang_moe_lb.replay.sampling import MAX_BATCH_BYTES, draw_bytes
from sglang_moe_lb.replay.sources import TraceFormatError

INT64_MAX = 2**63 - 1
TOP_K = 2
# Small counts (steps get built and counted), huge ones, and the edges of the int64 halves.
COUNT = st.one_of(st.integers(0, 40), st.integers(0, INT64_MAX),
                  st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**62, INT64_MAX - 1, INT64_MAX]))


def _too_big(step: list[list[int]]) -> bool:
    """Would the step's batch exceed the memory limit (tokens_from_counts' T, exact ints)?"""
    T = max(max(-(-sum(layer) // TOP_K), max(layer)) for layer in step)
    return draw_bytes(len(step), T, TOP_K) > MAX_BATCH_BYTES


def _check_error(err: TraceFormatError, path: Path) -> None:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg


@settings(max_examples=80, deadline=None)
@given(x=st.lists(COUNT, min_size=1, max_size=9))
def test_exact_sum_matches_python_integers(x):
    total, fits = exact_sum(torch.tensor(x, dtype=torch.long), 0)
    assert bool(fits) == (sum(x) <= INT64_MAX)
    assert int(total) == (sum(x) if sum(x) <= INT64_MAX else 0)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.lists(st.lists(COUNT, min_size=3, max_size=3), min_size=2, max_size=2), min_size=1, max_size=3))
@example(counts=[[[INT64_MAX, INT64_MAX, 2], [1, 0, 0]]])  # wraps to 0 in int64: was dropped as "empty"
def test_stat_counts_are_exact_or_one_clean_error(counts):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "stat.pt"
        torch.save({"logical_count": torch.tensor(counts, dtype=torch.long)}, path)
        nonempty = [step for step in counts if any(v > 0 for layer in step for v in layer)]
        overflow = any(sum(layer) > INT64_MAX for step in nonempty for layer in step)
        bad = overflow or any(_too_big(step) for step in nonempty)
        if not nonempty:
            with pytest.raises(TraceFormatError, match="no step with any routed token") as e:
                load_recorder([path], num_ranks=2, top_k=TOP_K)
            return _check_error(e.value, path)
        if bad:
            with pytest.raises(TraceFormatError, match="2\\*\\*63 - 1" if overflow else "GiB to replay") as e:
                load_recorder([path], num_ranks=2, top_k=TOP_K)
            return _check_error(e.value, path)
        trace = load_recorder([path], num_ranks=2, top_k=TOP_K)
    assert trace.step_counts.tolist() == nonempty  # every non-empty step kept, counts exact
    for t, step in enumerate(nonempty):
        if max(max(layer) for layer in step) <= 200:  # build small batches: tokens conserved exactly
            assert count_layers(trace.batch(t).topk, 3).long().tolist() == step


P2L = torch.tensor([[0, 1, 0, 2]])  # 1 layer, 3 experts on 4 slots; expert 0 has copies 0 and 2


@settings(max_examples=60, deadline=None)
@given(ranks=st.lists(st.lists(COUNT, min_size=4, max_size=4), min_size=2, max_size=2))
def test_per_pass_sums_over_ranks_and_copies_are_exact_or_one_clean_error(ranks):
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for r, phys in enumerate(ranks):
            paths.append(Path(d) / f"rank{r}.pt")
            rec = {"forward_pass_id": 0, "rank": r, "global_physical_count": torch.tensor([phys], dtype=torch.long)}
            torch.save({"records": [rec], "last_physical_to_logical_map": P2L}, paths[-1])
        logical = [sum(phys[p] for phys in ranks for p in range(4) if int(P2L[0, p]) == e) for e in range(3)]
        step = [logical]
        if not any(logical):
            with pytest.raises(TraceFormatError, match="no forward pass with any routed token"):
                load_recorder(paths, num_ranks=2, top_k=TOP_K)
            return
        if max(logical) > INT64_MAX:
            with pytest.raises(TraceFormatError, match="summed over ranks and copies is more than 2\\*\\*63 - 1") as e:
                load_recorder(paths, num_ranks=2, top_k=TOP_K)
            return _check_error(e.value, paths[0])
        if sum(logical) > INT64_MAX or _too_big(step):
            with pytest.raises(TraceFormatError, match="forward pass 0, layer 0") as e:
                load_recorder(paths, num_ranks=2, top_k=TOP_K)
            return _check_error(e.value, paths[0])
        trace = load_recorder(paths, num_ranks=2, top_k=TOP_K)
    assert trace.step_counts.tolist() == [step]
