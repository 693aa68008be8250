"""The fork form: ``sglang-moe-lb export-patch`` writes the feature as a patch series of SGLang.

* ``tree``     the ``--sglang-src`` tree (checkout or installed package) and the ``--out`` folder
* ``series``   the patches, generated from ``plugin/manifest.HOOKS`` (the plugin's own list)
* ``command``  the subcommand
* ``assets/``  the two files the series adds: ``sglang/srt/moe_lb.py`` and the CPU unit tests

What the patched SGLang calls is ``plugin/native.py``. docs/upstream-pr.md is the PR text.
"""
