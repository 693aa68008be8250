"""sglang-moe-lb: dispatch-time MoE load balancing under expert parallelism (``--moe-lb``).

Added by the sglang-moe-lb patch series. ``moe_lb_hook(target)`` marks a function the
feature builds on. With the ``sglang-moe-lb`` package installed it is that package's hook
(``sglang_moe_lb.plugin.native.hook``): the function calls the feature's handler when a
``--moe-lb`` mode needs it, and is unchanged otherwise. Without the package the function is
returned as it is, and ``--moe-lb`` is not an argument.
"""

from typing import Callable

try:
    from sglang_moe_lb.plugin.native import hook as _hook
except ImportError:  # the package is an optional dependency, like SGLang's kernel packages
    _hook = None


def moe_lb_hook(target: str) -> Callable[[Callable], Callable]:
    """Decorator: ``target`` is the function's dotted path, the name sglang-moe-lb hooks it by."""
    if _hook is None:
        return lambda fn: fn
    return _hook(target)
