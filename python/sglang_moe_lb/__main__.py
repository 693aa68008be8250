"""``python -m sglang_moe_lb``: the ``sglang-moe-lb`` command line."""

import sys

from .cli import main

sys.exit(main())
