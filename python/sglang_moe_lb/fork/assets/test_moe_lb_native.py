"""CPU unit tests for the native --moe-lb (added by the sglang-moe-lb patch series).

Run: python -m pytest test/registered/eplb/test_moe_lb_native.py (no GPU, no model).
Skipped when the optional sglang-moe-lb package is not installed.
"""

import argparse
import importlib
import unittest

try:
    from sglang_moe_lb.plugin import manifest, native
except ImportError:
    manifest = native = None


def _module_of(target: str) -> str:
    parts = target.split(".")
    while parts:
        try:
            return importlib.import_module(".".join(parts)).__name__
        except ImportError:
            parts.pop()
    raise ImportError(target)


@unittest.skipIf(native is None, "sglang-moe-lb is not installed")
class TestMoeLbNative(unittest.TestCase):
    def test_every_hooked_function_is_decorated(self):
        for h in manifest.HOOKS:
            _module_of(h.target)  # importing the module runs its decorators
        self.assertEqual(native.decorated(), sorted(h.target for h in manifest.HOOKS))
        self.assertTrue(native.patched())

    def test_forward_path_is_off_until_a_scheduler_activates_a_mode(self):
        for h in manifest.HOOKS:
            _module_of(h.target)
        light = sorted(h.target for h in manifest.HOOKS if h.stage == "light")
        self.assertEqual(native.enabled(), light)

    def test_decorated_function_keeps_its_result_when_off(self):
        from sglang.srt.eplb import expert_location_dispatch as eld

        fn = eld.topk_ids_logical_to_physical
        self.assertTrue(hasattr(fn, "__wrapped__"))
        self.assertNotIn("sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical", native.enabled())

        import torch

        ids = torch.tensor([[0, 1], [1, 0]])
        self.assertTrue(torch.equal(fn(ids, None), fn.__wrapped__(ids, None)))

    def test_parser_takes_moe_lb(self):
        from sglang.srt.server_args import ServerArgs

        parser = argparse.ArgumentParser(exit_on_error=False)
        ServerArgs.add_cli_args(parser)
        args = parser.parse_args(["--model-path", "m", "--moe-lb", "lplb"])
        self.assertEqual(args.moe_lb, "lplb")
        with self.assertRaises((SystemExit, argparse.ArgumentError)):
            parser.parse_args(["--model-path", "m", "--moe-lb", "sideways"])


if __name__ == "__main__":
    unittest.main()
