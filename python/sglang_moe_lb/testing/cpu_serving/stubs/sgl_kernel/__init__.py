"""TEST AND DEMO ONLY: a torch stand-in for the CPU build of ``sgl_kernel``.

This is not a product path and not a kernel library. SGLang's CPU engine
(``SGLANG_USE_CPU_ENGINE=1``) imports ``sgl_kernel`` for its ``*_cpu`` ops, and the
CPU build of that package is not on PyPI (the ``sgl-kernel`` / ``sglang-kernel``
wheels are CUDA-only). The CPU serving harness in
``sglang_moe_lb.testing.cpu_serving`` puts the directory holding this package on
``PYTHONPATH`` of the server it launches, and nowhere else, so that SGLang
0.5.23 can serve a tiny model on a laptop-class CPU for end-to-end tests.

Only the ops that the tiny DeepSeek-V3 actually reaches are implemented, with
plain torch (slow, straightforward, float32 math):

* ``assign_req_to_token_pool_cpu``  (``srt/mem_cache/allocation.py``)
* ``extend_attention_cpu`` / ``decode_attention_cpu`` (``srt/layers/attention/intel_amx_backend.py``)

Every other ``*_cpu`` name can be imported (SGLang imports several at module
level) but raises ``NotImplementedError`` naming the op when called. Set
``SGLANG_MOE_LB_STUB_LOG=/path`` to log which names are imported or called.

It also adds ``torch.cpu.is_current_stream_capturing`` and
``torch.cpu.empty_cache``, which SGLang's EPLB recorder and updater reach via
``torch.get_device_module()``.
"""

from __future__ import annotations

import os

import torch

from sglang_moe_lb.versions import sglang_version as _sglang_version

__version__ = "0.0.0+sglang_moe_lb.cpu_test_stub"
_WRITTEN_FOR_SGLANG = "0.5.23"
_LOG_PATH = os.environ.get("SGLANG_MOE_LB_STUB_LOG")


def _log(msg: str) -> None:
    if not _LOG_PATH:
        return
    try:
        with open(_LOG_PATH, "a") as f:
            f.write(f"{os.getpid()} {msg}\n")
    except OSError:
        pass


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"sglang_moe_lb CPU test stub of sgl_kernel: {what} is not supported "
        f"(stub written for sglang=={_WRITTEN_FOR_SGLANG}, found sglang=={_sglang_version()})"
    )


# --------------------------------------------------------------------------- KV index op


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """req_to_token[row, start:end] = the next (end - start) entries of out_cache_loc, request by request."""
    rows = req_pool_indices.tolist()
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n <= 0:
            continue
        req_to_token[row, start:end] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


# --------------------------------------------------------------------------- attention ops


def _attention(q, k, v, scale, logit_cap, first_visible_offset):
    """Softmax attention in float32.

    q [Tq, H, Dqk], k [Tk, Hk, Dqk], v [Tk, Hk, Dv] -> [Tq, H, Dv]. When
    ``first_visible_offset`` is not None, query row j may see key rows 0..offset+j
    (causal attention over a cached prefix of length ``offset``).
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads != num_heads:
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    qh = q.float().permute(1, 0, 2)  # [H, Tq, D]
    kh = k.float().permute(1, 0, 2)  # [H, Tk, D]
    vh = v.float().permute(1, 0, 2)  # [H, Tk, Dv]
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale  # [H, Tq, Tk]
    if logit_cap is not None and logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if first_visible_offset is not None:
        tq, tk = q.shape[0], k.shape[0]
        hidden = torch.arange(tk).unsqueeze(0) > (torch.arange(tq).unsqueeze(1) + first_visible_offset)
        scores = scores.masked_fill(hidden.unsqueeze(0), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vh).permute(1, 0, 2)  # [Tq, H, Dv]


def _check_plain(k_buffer, is_cross, sliding_window, encoder_lens, sinks, tree_mask=None):
    if k_buffer.dtype == getattr(torch, "float8_e4m3fn", None):
        raise _unsupported("an fp8 KV cache")
    if is_cross or encoder_lens is not None:
        raise _unsupported("cross attention")
    if sliding_window is not None and sliding_window > 0:
        raise _unsupported("sliding-window attention")
    if sinks is not None:
        raise _unsupported("attention sinks")
    if tree_mask is not None:
        raise _unsupported("tree-masked (speculative) attention")


def extend_attention_cpu(
    q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, k_scale, v_scale,
    req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc,
    max_len_extend, sm_scale, logit_cap, is_cross=False, sliding_window=0,
    encoder_lens=None, sinks=None, tree_mask=None, is_causal=True,
):  # fmt: skip
    """Prefill/extend attention: each request's new tokens attend to its cached prefix and to themselves."""
    _check_plain(k_buffer, is_cross, sliding_window, encoder_lens, sinks, tree_mask)
    dtype = q_extend.dtype
    for i in range(seq_lens.shape[0]):
        total = int(seq_lens[i])
        new = int(extend_seq_lens[i])
        start = int(extend_start_loc[i])
        prefix = total - new
        k = k_extend[start : start + new].to(dtype)
        v = v_extend[start : start + new].to(dtype)
        if prefix > 0:
            slots = req_to_token[int(req_pool_indices[i]), :prefix].long()
            k = torch.cat([k_buffer[slots].to(dtype), k], dim=0)
            v = torch.cat([v_buffer[slots].to(dtype), v], dim=0)
        out = _attention(q_extend[start : start + new], k, v, sm_scale, logit_cap, prefix if is_causal else None)
        o_extend[start : start + new] = out.to(o_extend.dtype)


def decode_attention_cpu(
    query, k_buffer, v_buffer, k_scale, v_scale, output, key, value, loc, attn_logits,
    req_to_token, req_pool_indices, seq_lens, sm_scale, logit_cap, is_cross=False,
    sliding_window=0, encoder_lens=None, sinks=None,
):  # fmt: skip
    """One-token decode attention; also writes this step's key/value into the cache at ``loc``."""
    _check_plain(k_buffer, is_cross, sliding_window, encoder_lens, sinks)
    if key is not None:
        k_buffer[loc.long()] = key.to(k_buffer.dtype)
        # MLA's value buffer is a view into the key buffer: writing the key wrote it.
        if value is not None and v_buffer.data_ptr() != k_buffer.data_ptr():
            v_buffer[loc.long()] = value.to(v_buffer.dtype)
    dtype = query.dtype
    for i in range(seq_lens.shape[0]):
        length = int(seq_lens[i])
        slots = req_to_token[int(req_pool_indices[i]), :length].long()
        out = _attention(query[i : i + 1], k_buffer[slots].to(dtype), v_buffer[slots].to(dtype), sm_scale, logit_cap, None)
        output[i : i + 1] = out.to(output.dtype)


# SGLang looks the attention ops up as torch.ops.sgl_kernel.<name>.
torch.ops.sgl_kernel.extend_attention_cpu = extend_attention_cpu
torch.ops.sgl_kernel.decode_attention_cpu = decode_attention_cpu

_IMPLEMENTED = ("assign_req_to_token_pool_cpu", "extend_attention_cpu", "decode_attention_cpu")


def __getattr__(name: str):
    """Import-time names: any other ``*_cpu`` op imports fine and fails only when called."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name.endswith("_cpu"):
        _log(f"import {name}")

        def _not_implemented(*args, **kwargs):
            _log(f"CALL {name}")
            raise _unsupported(f"op {name}")

        _not_implemented.__name__ = name
        return _not_implemented
    _log(f"refused {name}")
    raise AttributeError(f"sglang_moe_lb CPU test stub of sgl_kernel has no {name!r}")


# --------------------------------------------------------------------------- torch.cpu shims

# sglang.srt.eplb calls these through torch.get_device_module(); torch.cpu lacks them.
for _name, _fn in (("is_current_stream_capturing", lambda: False), ("empty_cache", lambda: None)):
    if not hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, _fn)
        _log(f"shim torch.cpu.{_name}")
