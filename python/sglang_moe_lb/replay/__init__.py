"""``sglang-moe-lb replay``: what would dispatch-time balancing gain on this traffic?

Feeds a recording (SGLang expert-distribution recorder dumps, the bundled OLMoE data or a
synthetic generator) through SGLang's own placement and dispatch modes and through ours,
using the same ``joint.balance_layer`` the server plugin calls, and reports balancedness, the
gap to the per-batch LP bound and the modelled MoE-layer time. See docs/replay.md.
"""

from .simulate import DEFAULT_MODES, MODES, Mode, ReplayConfig, ReplayResult, run_replay
from .sources import Batch, Trace, TraceFormatError, bundled_trace, load_recorder, synthetic_trace

__all__ = [
    "run_replay",
    "ReplayConfig",
    "ReplayResult",
    "Mode",
    "MODES",
    "DEFAULT_MODES",
    "Trace",
    "Batch",
    "TraceFormatError",
    "bundled_trace",
    "synthetic_trace",
    "load_recorder",
]
