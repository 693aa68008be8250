"""Per-scheduler-process state of the plugin: one layer state per MoE layer, the gate, and
the bookkeeping that keeps every EP rank's collectives in step.

Each MoE layer has, as its mode needs:

* a plan's maps (plan schedule): ``[levels, E, W]`` physical slots on the device, solved in
  the EPLB cycle (``rebalance.py``) and written in place; a batch gathers its ids from the
  level of its size (``plan.apply_plan``: one indexing op, as SGLang's static dispatch);
* one ``LayerPath`` for per-batch work (``layer_path.make_layer_path`` of the class
  ``hot_path.pick`` chooses: the kernels on CUDA where installed, the core's chain otherwise):
  the per-batch split where a gated plan opens, or every batch with the per-batch schedule;
  Waterfill on fixed ids.

Both live on the layer's ``layers.LayerState``, built (``layers.LayerBuild``) at
``prepare_moe_topk`` (model loaded, before CUDA-graph capture) for SGLang's placement of
that layer (``ExpertLocationMetadata.physical_to_logical_map_cpu[layer]``) and sized by
``call_capacity``, then updated in place; a placement that does not fit its path
rebuilds it, with a log line. The placement follows SGLang's metadata in lockstep (hooked at
``ExpertLocationMetadata.update``): a token must never be sent to a slot that no longer
holds its expert, so a new placement gets the even plan (every copy used, as SGLang's
dispatch) at once, and its solved plan at a later pass boundary.

Sync: with ``mode.collective`` and an a2a backend, every MoE layer runs one int32
all-gather of ``LayerPath.stats`` rows over the EP group (``comm.py``) on every rank, idle
ranks included (``join_empty``, and the DeepEP dispatcher safety net ``ensure_joined``).
Local sync, plans and runs without an a2a backend (every rank sees every token,
so the counts are already global) run no collective.

The gate (``mode.gate``): per batch, ``gate.Gate.open(tokens_per_rank)`` on a batch size
every rank shares (``shared_tokens``); closed, the plan runs (plan schedule) or the dispatch
hook returns None (SGLang's own mapping runs), the shared expert stays on its home rank, and
no rank enters the collective. A plan's level comes from the same shared size
(``gate_cache.GateCache`` memoises both per size).

With a per-batch split and Waterfill, the dispatch hook decides each token's shared rank with
the split and leaves it on the layer's state (``LayerState.pending_shared``; ``HOME`` when the
gate was closed); the ``TopK`` Waterfill hook of the same layer takes it.

Nothing here decides anything about balancing: each per-batch decision is one layer-path call.
"""

from __future__ import annotations

import logging
import threading

import torch

from ..chain import stats_width
from ..cost import GPUS, CostModel
from ..gate import Gate, Overheads
from ..layer_path import path_mode
from ..mode import BalanceMode
from ..plan import DEFAULT_HASH_SLOTS, DEFAULT_LEVELS, apply_plan, hash_offsets
from . import comm
from .gate_cache import GateCache
from .layers import HOME, LayerBuild, LayerState
from .options import ERRORS, MoeLbConfigError, MoeLbOptions
from .rebalance import Rebalancer

__all__ = ["LayerState", "Runtime", "get_runtime", "activate", "deactivate", "call_capacity", "cost_model_for"]

logger = logging.getLogger("sglang_moe_lb.plugin")

_RUNTIME: "Runtime | None" = None
_LOCK = threading.Lock()


def get_runtime() -> "Runtime | None":
    """The active runtime of this process, or None (plugin off / not a scheduler)."""
    return _RUNTIME


def call_capacity(rank_invariant: bool) -> tuple[int, str]:
    """Rows of ``topk_ids`` one MoE call may see on this rank, from SGLang's published config.

    The largest of: the largest captured decode batch (``cuda_graph_config.decode``:
    ``max_bs`` / ``bs``) and ``max_running_requests`` (eager decode), both times
    ``speculative_num_draft_tokens``; and the prefill maximum (``max_prefill_tokens``,
    ``chunked_prefill_size``). Without an a2a backend the MoE sees every DP rank's tokens,
    so times ``attn_dp_size``. A call beyond it still works (the path grows, eagerly, logged).
    """
    from sglang.srt.runtime_context import get_exec, get_parallel, get_schedule, get_spec

    g = getattr(get_exec().graph, "cuda_graph_config", None)
    decode = max([*(getattr(g.decode, "bs", None) or []), getattr(g.decode, "max_bs", None) or 0]) if g else 0
    s = get_schedule()
    draft = getattr(get_spec(), "speculative_num_draft_tokens", None) or 1
    running = getattr(s, "max_running_requests", None) or 0
    prefill = max(getattr(s, "max_prefill_tokens", None) or 0, getattr(s, "chunked_prefill_size", None) or 0)
    n = max(decode * draft, running * draft, prefill, 1)
    dp = int(getattr(get_parallel(), "attn_dp_size", 1) or 1) if rank_invariant else 1
    why = (f"decode graph max {decode} x {draft} draft, max_running_requests {running}, prefill max {prefill}"
           + (f", x {dp} DP ranks (no a2a)" if dp > 1 else ""))
    return n * dp, why


def _detect_gpu() -> tuple[str, str]:
    """A ``cost.GPUS`` key for this process's device, and a note when it is a guess."""
    try:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for key in sorted(GPUS, key=len, reverse=True):
                if key.lower() in name.lower():
                    return key, ""
            return "H200", f"GPU {name!r} is not in the cost model's table; using H200's numbers (--moe-lb-gpu)"
    except Exception as err:  # noqa: BLE001 - detection is best effort
        return "H200", f"could not read the GPU name ({err}); using H200's numbers (--moe-lb-gpu)"
    return "H200", "no CUDA device; the cost model uses H200's numbers (--moe-lb-gpu)"


def _model_dtype(model_config) -> str:
    """``fp8`` for an fp8-quantised model, else ``bf16``."""
    hf = getattr(model_config, "hf_config", None)
    q = getattr(model_config, "quantization", None)
    qc = getattr(hf, "quantization_config", None) if hf is not None else None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return "fp8" if "fp8" in str(q or method or "").lower() else "bf16"


def cost_model_for(opts: MoeLbOptions, model_config) -> CostModel | None:
    """The cost model the mode needs (plans, tile objective or gate), or None."""
    m = opts.mode
    if not (m.plan or m.objective == "tiles" or m.gate):
        return None
    c = opts.cost
    gpu = c.gpu
    if gpu is None:
        gpu, note = _detect_gpu()
        if note:
            logger.info("[moe-lb] %s", note)
    dtype = c.dtype or _model_dtype(model_config)
    hf = getattr(model_config, "hf_config", model_config)
    return CostModel.for_model(hf, gpu=gpu, dtype=dtype, calibration=c.calibration, tile_tokens=c.tile_tokens)


def gate_mode(mode: BalanceMode, collective: bool) -> BalanceMode:
    """The mode as the gate prices it: no collective where none runs (no a2a backend)."""
    if mode.collective and not collective:
        return mode.with_(lplb_sync="local") if mode.splits else mode.with_(waterfill_sync="local")
    return mode


def mask_padded(topk_ids: torch.Tensor) -> torch.Tensor:
    """Rows past the batch's real tokens (graph padding; SGLang's forward context) route nowhere: -1."""
    try:
        from sglang.srt.model_executor.forward_context import get_forward_context, has_forward_context
    except ImportError:  # pragma: no cover
        return topk_ids
    if not has_forward_context():
        return topk_ids
    getter = get_forward_context().moe_num_token_non_padded
    n = getter() if getter is not None else None
    if n is None:
        return topk_ids
    rows = torch.arange(topk_ids.shape[0], device=topk_ids.device)
    return torch.where((rows < n)[:, None], topk_ids, torch.full_like(topk_ids, -1))


def home_ranks(phys_ids: torch.Tensor, rank: int) -> torch.Tensor:
    """``[T]`` long: every token's shared expert on this rank."""
    return torch.full((phys_ids.shape[0],), rank, dtype=torch.long, device=phys_ids.device)


class Runtime:
    """The plugin's state in one scheduler process (see module docstring)."""

    def __init__(self, opts: MoeLbOptions, *, rank_invariant: bool):
        self.opts = opts
        # No a2a backend: every EP rank runs the MoE over the same tokens and must pick the
        # same copy for each of them; counts are then already global and no collective runs.
        self.rank_invariant = rank_invariant
        m = opts.mode
        # Without an a2a backend this rank's tokens are the whole batch: a per-batch split of
        # them is the global split (full tile, no collective).
        self.mode: BalanceMode = m.with_(lplb_sync="global") if (rank_invariant and m.splits) else m
        self.path_mode = path_mode(self.mode)
        self.collective = m.collective and not rank_invariant
        self.layers: dict[int, LayerState] = {}
        self.num_logical = self.num_ranks = self.slots_per_rank = None
        self.device: torch.device | None = None
        self.topk = 0
        self.max_tokens = 0
        self.cost: CostModel | None = None
        self.gate: Gate | None = None
        self.levels: tuple[int, ...] = DEFAULT_LEVELS
        self.hash_slots = DEFAULT_HASH_SLOTS
        self.sizes = GateCache(None, self.levels)
        self.attached = False
        self.moe_layers: set[int] = set()  # layers with a (non-draft) TopK; empty = unknown, all layers
        self.joined: dict[int, int] = {}  # layer -> collectives done by the TopK path, not yet matched
        self._ep: comm.EpGroup | None = None
        self._warned: set[str] = set()
        self.offsets: torch.Tensor | None = None  # [rows, k] hash slots (plan.hash_offsets), built once
        self.model_config = None
        self.eplb_model_config = None  # the model config of an init_by_eplb call in progress
        self.rebalancer = Rebalancer(self) if m.plan else None
        self.last_report: dict | None = None

    # -- topology --------------------------------------------------------------------------
    @property
    def ep(self) -> comm.EpGroup:
        if self._ep is None:
            self._ep = comm.current_ep_group()
        return self._ep

    @property
    def source_rank(self) -> int:
        return 0 if self.rank_invariant else self.ep.rank

    def warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("[moe-lb] " + msg, *args)

    def is_log_rank(self) -> bool:
        try:
            return self.ep.rank == 0
        except Exception:  # noqa: BLE001 - no EP group yet (tests): log
            return True

    # -- building ------------------------------------------------------------------------
    def configure(self, *, topk: int, max_tokens: int, model_config=None) -> None:
        """Shapes and cost model, before ``attach_metadata`` builds the paths."""
        self.topk = int(topk)
        self.max_tokens = int(max_tokens)
        if model_config is not None:
            self.model_config = model_config
            self.cost = cost_model_for(self.opts, model_config)

    def build(self) -> LayerBuild:
        """What a layer is built from, now (shapes can grow: ``_grow``)."""
        return LayerBuild(self.path_mode, self.mode.plan, self.num_ranks, self.num_logical, self.device, self.topk,
                          self.max_tokens, self.source_rank, self.cost, self.levels, self.hash_slots)

    def attach_metadata(self, metadata) -> None:
        """(Re)build every MoE layer's path from SGLang's expert-location metadata."""
        p2l = metadata.physical_to_logical_map_cpu
        shape = (int(metadata.num_logical_experts), int(metadata.ep_size), int(metadata.num_local_physical_experts))
        if shape != (self.num_logical, self.num_ranks, self.slots_per_rank):
            self.layers = {}  # a new topology: nothing carries over
        self.num_logical, self.num_ranks, self.slots_per_rank = shape
        self.device = metadata.physical_to_logical_map.device
        if self.mode.gate and self.cost is not None:
            self.gate = Gate(gate_mode(self.mode, self.collective), self.cost,
                             self.opts.cost.overheads or Overheads.measured(), top_k=self.topk or 1,
                             slots_per_rank=self.slots_per_rank, num_ranks=self.num_ranks,
                             expected_gain=self.opts.cost.expected_gain)
        self.sizes = GateCache(self.gate, self.levels)
        if self.mode.plan and (self.offsets is None or self.offsets.shape[0] < max(1, self.max_tokens)):
            self.offsets = hash_offsets(max(1, self.max_tokens), self.topk or 1, self.hash_slots,
                                        salt=self.source_rank).to(self.device)
        wanted = sorted(self.moe_layers) if self.moe_layers else range(p2l.shape[0])
        build = self.build()
        layers = {}
        for layer in wanted:
            old = self.layers.get(layer)
            layers[layer] = old if old is not None and torch.equal(old.row, p2l[layer]) else build.layer(p2l[layer])
        self.layers = layers
        self.attached = True

    def set_placement(self, layer: int, row_cpu: torch.Tensor) -> bool:
        """Follow SGLang's placement of one layer, in place (the even plan until a solve arrives)."""
        st = self.layers.get(layer)
        if st is None or torch.equal(st.row, row_cpu):
            return False
        rebuilt = self.build().follow(st, row_cpu)
        if rebuilt is not None:
            logger.info("[moe-lb] layer %d: new placement does not fit its layer path (%s); rebuilt it", layer, rebuilt)
        return True

    def install_plan(self, layer: int, row_cpu: torch.Tensor, maps: torch.Tensor, source: str) -> bool:
        """Install a solved plan ``[levels, E, W]`` if its layer still serves the placement it was solved for."""
        st = self.layers.get(layer)
        if st is None or st.maps is None or not torch.equal(st.row, row_cpu):
            return False
        st.maps.copy_(maps)
        st.source = source
        return True

    def served_rows(self) -> dict:
        """layer -> the physical->logical row being served now (CPU)."""
        return {layer: st.row for layer, st in self.layers.items()}

    def counters(self) -> dict:
        """Summed layer-path counters (read off the critical path: at rebalance, in reports)."""
        total: dict = {}
        for st in self.layers.values():
            if st.path is None:
                continue
            for k, v in st.path.counters().items():
                v = int(v)
                total[k] = max(total.get(k, v), v) if k.startswith("max") else total.get(k, 0) + v
        return total

    def _grow(self, layer: int, rows: int) -> None:
        """A call larger than the path was sized for (only outside CUDA graphs): rebuild it bigger."""
        st = self.layers[layer]
        self.warn_once(f"grow-{layer}", "layer %d: a batch of %d rows exceeds the %d rows its layer path was sized "
                       "for; rebuilt larger (eager only)", layer, rows, st.path.max_tokens)
        self.max_tokens = max(self.max_tokens, 2 * rows)
        st.path = self.build().path(st.placement)

    # -- the gate --------------------------------------------------------------------------
    def shared_tokens(self, rows: int) -> int | None:
        """The batch size the gate decides on: identical on every rank that may join a collective.

        * DP attention: the largest DP rank's tokens (``get_dp_global_num_tokens()``, what
          SGLang gathers for padding; under CUDA graphs the captured bucket's).
        * No a2a backend: every rank sees the same rows: ``ceil(rows / EP size)``.
        * Otherwise: this rank's rows if no collective runs (each rank decides for its own
          tokens), else None (nothing shared: the gate stays open).
        """
        if self.rank_invariant:
            return -(-rows // max(1, self.num_ranks or 1))
        try:
            from sglang.srt.layers.dp_attention import get_dp_global_num_tokens

            dp = get_dp_global_num_tokens()
        except Exception:  # noqa: BLE001 - no DP state (tests, other layouts)
            dp = None
        if dp:
            return int(max(dp))
        return None if self.collective else rows

    def gate_open(self, rows: int) -> bool:
        return True if self.gate is None else self._opened(self.shared_tokens(rows))

    def _opened(self, n: int | None) -> bool:
        """The gate at the shared size ``n`` (None: nothing shared, the gate stays open)."""
        return True if self.gate is None or n is None else self.sizes.open(n)

    # -- the forward path ----------------------------------------------------------------
    def collective_rows(self, layer: int, row: torch.Tensor) -> torch.Tensor:
        """The layer's one EP all-gather (int32 rows); counted so the dispatcher net can match it."""
        out = comm.all_gather_rows(row.to(torch.int32), self.ep)
        self.joined[layer] = self.joined.get(layer, 0) + 1
        return out

    def _zero_row(self, layer: int, device) -> torch.Tensor:
        return torch.zeros(stats_width(self.layers[layer].placement, self.path_mode), dtype=torch.int32, device=device)

    def plan_ids(self, st: LayerState, topk_ids: torch.Tensor, n: int | None) -> torch.Tensor:
        """The plan's physical ids: one gather from the map of this batch's level (as SGLang's
        static dispatch, padded rows included: SGLang masks them after). ``n``: the batch size
        every rank shares (``shared_tokens``), else None: the level is this rank's rows'."""
        rows = topk_ids.shape[0]
        if rows > self.offsets.shape[0]:  # eager only: graphs are captured within the capacity
            self.warn_once("grow-offsets", "a batch of %d rows exceeds the %d rows the plan's hash slots were built "
                           "for; rebuilt larger (eager only)", rows, self.offsets.shape[0])
            self.offsets = hash_offsets(2 * rows, topk_ids.shape[1], self.hash_slots,
                                        salt=self.source_rank).to(self.offsets.device)
        out = apply_plan(st.maps[self.sizes.level(rows if n is None else n)], topk_ids, self.offsets)
        return out if out.dtype == topk_ids.dtype else out.to(topk_ids.dtype)

    def dispatch(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor | None:
        """LPLB (and, with a per-batch split, the shared ranks) for one layer: logical ``[T, k]`` -> physical.

        Returns None when this layer has no state or the gate is closed without a plan (the
        caller then keeps SGLang's mapping). With Waterfill, leaves the layer's shared-rank
        decision on its state (``pending_shared``) for ``shared_ranks``."""
        st = self.layers.get(layer)
        if st is None:
            return None
        # The shared batch size, once per call: it decides the gate and the plan's level.
        n = self.shared_tokens(topk_ids.shape[0]) if self.gate is not None or self.mode.plan else None
        opened = self._opened(n)
        waterfill = self.mode.waterfill is not None
        if self.mode.plan and not (self.mode.gate and opened):
            if self.mode.gate and waterfill:
                st.pending_shared = HOME  # the closed form keeps the shared expert at home
            return self.plan_ids(st, topk_ids, n)
        if not opened:
            if waterfill:
                st.pending_shared = HOME
            return None
        ids = mask_padded(topk_ids)
        if ids.shape[0] > st.path.max_tokens:
            self._grow(layer, ids.shape[0])
        gathered = self.collective_rows(layer, st.path.stats(ids)) if self.collective else None
        res = st.path(ids, gathered=gathered)
        if waterfill:
            st.pending_shared = res.shared_rank
        return res.phys_ids.to(topk_ids.dtype)

    def join_empty(self, layer: int, device) -> None:
        """An idle rank's share of a layer's collective (per-batch split): the same all-gather, a zero row."""
        st = self.layers.get(layer)
        if not self.collective or not self.mode.splits or st is None:
            return
        waterfill = self.mode.waterfill is not None
        if not self.gate_open(0):
            if waterfill:
                st.pending_shared = HOME
            return
        self.collective_rows(layer, self._zero_row(layer, device))
        if waterfill:
            st.pending_shared = torch.zeros(0, dtype=torch.long, device=device)

    def shared_ranks(self, layer: int, phys_ids: torch.Tensor) -> torch.Tensor:
        """Waterfill's rank per token for one layer, from physical routed ids ``[T, k]``."""
        st = self.layers.get(layer)
        if st is None:
            return home_ranks(phys_ids, self.ep.rank)
        if self.mode.splits:  # decided with the split (or the plan: home), in the dispatch hook
            got = st.take_shared()
            if isinstance(got, torch.Tensor) and got.shape[0] == phys_ids.shape[0]:
                return got
            if got is not HOME:
                self.warn_once("joint-miss", "layer %d: no Waterfill decision for this batch; the shared expert stays "
                               "home", layer)
            return home_ranks(phys_ids, self.ep.rank)
        if not self.gate_open(phys_ids.shape[0]):
            return home_ranks(phys_ids, self.ep.rank)
        p2l = st.placement.phy2log[0]
        logical = torch.where(phys_ids >= 0, p2l[phys_ids.clamp(min=0).to(torch.long)], -1)
        if logical.shape[0] > st.path.max_tokens:
            self._grow(layer, logical.shape[0])
        gathered = self.collective_rows(layer, st.path.stats(logical, phys_ids)) if self.collective else None
        return st.path(logical, gathered=gathered, phys_ids=phys_ids).shared_rank

    def ensure_joined(self, layer: int | None, device) -> None:
        """Dispatcher-side safety net: join this layer's collective if the TopK path skipped it.

        Called from the DeepEP dispatcher, which every EP rank must reach for every MoE layer.
        A model that returns early on an idle rank without calling TopK would otherwise leave
        the other ranks waiting in the all-gather.
        """
        if layer is None or not self.collective or layer not in self.layers:
            return
        done = self.joined.get(layer, 0)
        if done > 0:
            self.joined[layer] = done - 1
            return
        if not self.gate_open(0):
            return
        self.warn_once(
            f"net-{layer}",
            "layer %d reached the DeepEP dispatcher without the TopK path on this rank; "
            "joined its collective from the dispatcher",
            layer,
        )
        comm.all_gather_rows(self._zero_row(layer, device), self.ep)


def activate(opts: MoeLbOptions, *, rank_invariant: bool) -> Runtime:
    """Create this process's runtime (idempotent for the same options)."""
    global _RUNTIME
    with _LOCK:
        if _RUNTIME is None or _RUNTIME.opts != opts or _RUNTIME.rank_invariant != rank_invariant:
            _RUNTIME = Runtime(opts, rank_invariant=rank_invariant)
        return _RUNTIME


def deactivate() -> None:
    global _RUNTIME
    with _LOCK:
        if _RUNTIME is not None and _RUNTIME.rebalancer is not None:
            _RUNTIME.rebalancer.shutdown()
        _RUNTIME = None


def fusion_off_error(mode: BalanceMode) -> MoeLbConfigError:
    return MoeLbConfigError(ERRORS["fusion_off_at_load"].format(mode=mode.flag))


def plan_summary(rt: Runtime) -> str:
    """For the ready line: the plan cycle's cadence."""
    reb = rt.rebalancer
    if reb is None:
        return ""
    refresh = f"every {reb.refresh_passes} passes from the last {reb.window_passes}" if reb.refresh_passes else "off"
    from ..decode_placement import resolve_placement

    choice = rt.opts.plan.placement
    placement = resolve_placement(choice, rt.num_ranks) + (" (auto)" if choice == "auto" else "")
    return (f", plans at {len(rt.levels)} levels x {rt.hash_slots} hash slots (placement {placement}, "
            f"refresh {refresh})")


def gate_summary(rt: Runtime) -> str:
    """For the ready line: from which batch size the gate opens."""
    if rt.gate is None:
        return ""
    n = rt.gate.min_tokens()
    return f", gate opens at {n} tokens/rank" if n is not None else ", gate never opens (overhead > modelled gain)"
