"""A real SGLang 0.5.23 server on CPU, one per ``--moe-lb`` mode, EP=2 with EPLB.

Each mode's server is started once (module-scoped, parametrized fixture) with the tiny
DeepSeek-V3, dummy weights that do not depend on expert placement (see
``sglang_moe_lb.testing.cpu_serving.dummy_weights``) and ``--dtype float32``, so greedy
outputs are decided by real margins, not by bf16 rounding. Then, per mode:
greedy generation (repeatable), ``sglang.bench_serving`` (all requests complete), the
expert distribution recorder (dump is ``logical_count[steps, layers, experts]``), the
EPLB rebalance log line, and greedy outputs equal to those of ``off``.

To cover another mode, add it to ``MODES`` (``--moe-lb MODE`` is passed when MODE != "off").
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from sglang_moe_lb.testing.cpu_serving.ep_moe import moe_forward_native_ep
from sglang_moe_lb.testing.cpu_serving.model_dir import prepare_model_dir
from sglang_moe_lb.testing.cpu_serving.server import EP2_EPLB_ARGS, EPLB_REBALANCE_RE, launch_cpu_server, omp_bind

MODES = ["off"]  # add "lplb", "waterfill", "waterfill+lplb" as they land
# Try other modes without editing: SGLANG_MOE_LB_E2E_MODES=off,lplb. "off" runs first: it is the
# reference of test_outputs_equal_off (a module-scoped parametrized fixture runs in param order).
MODES = [m.strip() for m in os.environ.get("SGLANG_MOE_LB_E2E_MODES", ",".join(MODES)).split(",") if m.strip()]
MODES.sort(key=lambda m: m != "off")

# float32: LB modes move (token, expert) pairs between ranks, which changes float summation
# order. In bf16 even repeating a request (prefix-cache hit, EPLB moved experts) flipped greedy
# tokens of this random model; in float32 the smallest top-2 log-prob gap seen (2.6e-4) is
# far above the rounding differences.
SERVER_ARGS = [*EP2_EPLB_ARGS, "--dtype", "float32"]

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):\n    print(",
    "x = [1, 2, 3]\ny = ",
    "while True:\n    line = f.readline()",
    "# Copyright (c) Python Software Foundation",
    "return None",
]
MAX_NEW_TOKENS = 16

CONFIG = json.loads((prepare_model_dir() / "config.json").read_text())


def mode_args(mode: str) -> list[str]:
    return list(SERVER_ARGS) + ([] if mode == "off" else ["--moe-lb", mode])


@pytest.fixture(scope="module", params=MODES)
def server(request, e2e_log_dir, e2e_timings):
    mode = request.param
    log = e2e_log_dir / f"server_{mode.replace('+', '_')}.log"
    t0 = time.monotonic()
    srv = launch_cpu_server(mode_args(mode), ep=2, log_path=log, recorder_dir=e2e_log_dir / f"recorder_{mode.replace('+', '_')}")
    e2e_timings[f"server start [{mode}]"] = time.monotonic() - t0
    srv.mode = mode
    try:
        yield srv
    finally:
        t1 = time.monotonic()
        srv.stop()
        e2e_timings[f"server stop [{mode}]"] = time.monotonic() - t1
        left = srv.alive_pids()
        assert not left, f"server processes left after stop: {left}"
        assert not srv.leaked_shm(), f"/dev/shm segments left after stop: {srv.leaked_shm()}"


def _ids(outputs):
    return [o["output_ids"] for o in outputs]


@pytest.mark.e2e
def test_greedy_generate(server, greedy_results):
    first = server.generate(PROMPTS, greedy=True, max_new_tokens=MAX_NEW_TOKENS, return_logprob=True, top_logprobs_num=2)
    assert len(first) == len(PROMPTS)
    for out in first:
        assert len(out["output_ids"]) == MAX_NEW_TOKENS
        assert all(0 <= t < CONFIG["vocab_size"] for t in out["output_ids"])
        assert isinstance(out["text"], str)
        assert out["meta_info"]["finish_reason"]["type"] == "length"
    # The placement-invariant dummy weights give real logit margins (not a uniform distribution).
    margins = [top[0][0] - top[1][0] for out in first for top in out["meta_info"]["output_top_logprobs"]]
    assert max(margins) > 0.1, "logits look uniform: are the placement-invariant dummy weights installed?"
    # Same request again (prefix cache hit, and EPLB has moved experts in between): same tokens.
    again = server.generate(PROMPTS, greedy=True, max_new_tokens=MAX_NEW_TOKENS)
    assert _ids(again) == _ids(first), "greedy generation is not repeatable within one server"
    greedy_results[server.mode] = {"ids": _ids(first), "min_margin": min(margins)}


@pytest.mark.e2e
def test_bench_serving_completes(server, e2e_log_dir):
    num_prompts = 8
    result = server.bench_serving(
        num_prompts=num_prompts, input_len=32, output_len=8,
        output_file=e2e_log_dir / f"bench_{server.mode.replace('+', '_')}.jsonl",
    )  # fmt: skip
    assert result["completed"] == num_prompts, result["_log"][-3000:]
    assert result["total_output_tokens"] == num_prompts * 8
    assert result["output_throughput"] > 0


@pytest.mark.e2e
def test_expert_distribution_recorder_dump(server):
    before = set(server.recorder_dumps())
    server.start_expert_distribution_record()
    try:
        server.generate(PROMPTS, greedy=True, max_new_tokens=7)
        server.stop_expert_distribution_record()
        server.dump_expert_distribution_record()
    finally:
        server.start_expert_distribution_record()  # EPLB reads the same recorder: leave it recording
    deadline = time.monotonic() + 30
    while not (new := sorted(set(server.recorder_dumps()) - before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(new) == 1, f"expected one new dump in {server.recorder_dir}, got {new}"
    dump = torch.load(new[0], weights_only=False)
    count = dump["logical_count"]
    assert count.dim() == 3, count.shape
    steps, layers, experts = count.shape
    assert steps >= 1
    assert (layers, experts) == (CONFIG["num_hidden_layers"], CONFIG["n_routed_experts"])
    assert int(count.min()) >= 0
    # Dense layers (before first_k_dense_replace) route nothing.
    assert int(count[:, : CONFIG["first_k_dense_replace"]].sum()) == 0


@pytest.mark.e2e
def test_eplb_rebalanced(server):
    # bench_serving and generation above ran many more than --eplb-rebalance-num-iterations passes.
    found = server.wait_for_log(EPLB_REBALANCE_RE, timeout=5)
    if not found:
        server.generate(PROMPTS[:2], greedy=True, max_new_tokens=24)
        found = server.wait_for_log(EPLB_REBALANCE_RE, timeout=30)
    assert found, f"no '[EPLBManager] rebalance end' line in {server.log_path}"
    ranks = {ln.split("]")[0] for ln in server.log_text().splitlines() if EPLB_REBALANCE_RE.search(ln)}
    assert any("TP0" in r for r in ranks) and any("TP1" in r for r in ranks), ranks


@pytest.mark.e2e
def test_outputs_equal_off(server, greedy_results):
    if server.mode == "off":
        pytest.skip("reference mode")
    if "off" not in greedy_results or server.mode not in greedy_results:
        pytest.skip("needs test_greedy_generate of 'off' and of this mode in the same session")
    assert greedy_results[server.mode]["ids"] == greedy_results["off"]["ids"]


# --------------------------------------------------------------------------- no server needed


def _reference_moe(x, weights, ids, experts):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e >= 0:
                out[t] += weights[t, s] * experts[e](x[t])
    return out


def test_ep_moe_wrapper_drops_foreign_experts():
    torch.manual_seed(0)
    experts = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, -1], [-1, -1], [2, 1], [-1, 2], [1, 1]])
    weights = torch.rand(5, 2)

    calls = []

    def upstream(layer, xs, topk_output, cfg):  # stands in for moe_forward_native (no -1 support)
        w, i = topk_output[0], topk_output[1]
        assert int(i.min()) >= 0
        calls.append(i.shape)
        return _reference_moe(xs, w, i, experts)

    with torch.no_grad():
        got = moe_forward_native_ep(upstream, None, x, (weights, ids, None), None)
        want = _reference_moe(x, weights, ids, experts)
    torch.testing.assert_close(got, want)
    assert calls == [(6, 1)]  # only the 6 local (token, slot) pairs, one per row
    assert torch.all(got[1] == 0)
    # No -1: upstream is called unchanged.
    full = torch.tensor([[0, 1]] * 5)
    with torch.no_grad():
        torch.testing.assert_close(moe_forward_native_ep(upstream, None, x, (weights, full, None), None), _reference_moe(x, weights, full, experts))


def test_omp_bind_splits_cpus():
    parts = omp_bind(2).split("|")
    assert len(parts) == 2 and all(parts)


def test_tiny_model_dir(tmp_path):
    d = prepare_model_dir()
    assert CONFIG["n_shared_experts"] == 1 and CONFIG["rope_scaling"]["type"] == "yarn"
    tok = json.loads((d / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) + len(tok.get("added_tokens", [])) >= CONFIG["vocab_size"] - 3
    variant = prepare_model_dir({"num_hidden_layers": 2}, cache_dir=tmp_path / "variant")
    assert json.loads((variant / "config.json").read_text())["num_hidden_layers"] == 2
    assert (variant / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()


def test_shims_plugin_is_opt_in_and_fails_loudly(monkeypatch):
    from sglang_moe_lb.testing.cpu_serving import plugin

    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.register()  # not enabled: must not import SGLang or register anything
    assert not plugin._registered
    with pytest.raises(SystemExit, match=r"written for sglang==0\.5\.23, found sglang=="):
        plugin._require("sglang_moe_lb_no_such_module.layer.fn")


_STUB_CHECK = r"""
import torch, torch.nn.functional as F, sgl_kernel
torch.manual_seed(0)
H, D, Dv, P, E = 4, 40, 32, 5, 3           # heads, qk dim, v dim, cached prefix, new tokens
pool = torch.randn(64, 1, D)               # MLA-like: one KV head, value = first Dv dims of the key
req_to_token = torch.zeros(2, 32, dtype=torch.int64)
sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([1]), req_to_token, torch.tensor([0]), torch.tensor([P + E]),
                                        torch.arange(10, 10 + P + E), 32)
assert req_to_token[1, : P + E].tolist() == list(range(10, 10 + P + E))
q = torch.randn(E, H, D)
k_new, v_new = pool[10 + P : 10 + P + E], pool[10 + P : 10 + P + E, :, :Dv]
o = torch.empty(E, H, Dv)
sgl_kernel.extend_attention_cpu(q, k_new, v_new, o, pool, pool[..., :Dv], 1.0, 1.0, req_to_token, torch.tensor([1]),
                                torch.tensor([P + E]), torch.tensor([E]), torch.tensor([0]), E, 0.3, 0.0)
k_all = pool[10 : 10 + P + E].expand(-1, H, -1).transpose(0, 1)
mask = torch.ones(E, P + E, dtype=torch.bool).tril(diagonal=P)
ref = F.scaled_dot_product_attention(q.transpose(0, 1), k_all, k_all[..., :Dv], attn_mask=mask, scale=0.3).transpose(0, 1)
torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
out = torch.empty(1, H, Dv)
sgl_kernel.decode_attention_cpu(q[-1:], pool, pool[..., :Dv], 1.0, 1.0, out, None, None, None, None, req_to_token,
                                torch.tensor([1]), torch.tensor([P + E]), 0.3, 0.0)
torch.testing.assert_close(out, ref[-1:], atol=1e-5, rtol=1e-5)
assert torch.cpu.is_current_stream_capturing() is False
try:
    sgl_kernel.fused_experts_cpu()
except NotImplementedError as e:
    assert "fused_experts_cpu" in str(e) and "sglang==" in str(e)
else:
    raise AssertionError("unimplemented op did not raise")
print("ok")
"""


def test_sgl_kernel_stub_matches_sdpa():
    """The stand-in's attention equals torch SDPA (run in a subprocess: importing it patches torch.ops)."""
    import subprocess
    import sys

    from sglang_moe_lb.testing.cpu_serving import STUBS_DIR

    env = {**os.environ, "PYTHONPATH": str(STUBS_DIR)}
    res = subprocess.run([sys.executable, "-c", _STUB_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
