"""``sglang-moe-lb replay``: what would dispatch-time balancing gain on this traffic?

Feeds a recording (SGLang expert-distribution recorder dumps, the bundled OLMoE data or a
synthetic generator) through SGLang's own placement and dispatch modes and through ours,
using the same ``chain.balance_layer`` the server plugin calls, and reports balancedness,
the gap to the per-batch LP bound and the modelled MoE-layer time (cost model + overhead),
optionally over a sweep of batch sizes. Stages: setup (``setup``) -> read (``sources``,
``dumps``, ``read``) -> placement timeline (``timeline``) -> evaluate (``evaluate``) ->
aggregate (``aggregate``) -> sweep (``sweep``) -> report (``report``), run in order by
``simulate``; the CLI's flags are walked once in ``command``. See docs/replay.md.
"""

from .dumps import load_recorder
from .mode_names import ReplayMode, parse_mode, parse_modes, server_default
from .simulate import DEFAULT_MODES, ReplayConfig, ReplayResult, make_setup, run_replay
from .sources import Batch, Trace, TraceFormatError, bundled_trace, synthetic_trace

__all__ = [
    "run_replay",
    "make_setup",
    "ReplayConfig",
    "ReplayResult",
    "ReplayMode",
    "parse_mode",
    "parse_modes",
    "server_default",
    "DEFAULT_MODES",
    "Trace",
    "Batch",
    "TraceFormatError",
    "bundled_trace",
    "synthetic_trace",
    "load_recorder",
]
