"""The v2 kernel set (not the default: docs/kernels-v2.md).

int32 fixed point (``V2_SPEC``), relaxed count atomics, a sort-free block step, every program
solving the layer's split itself (two launches, one at decode sizes), the tile objective on
the device; selected with ``SGLANG_MOE_LB_KERNELS=v2`` through ``seam.make_layer_path``.
"""

from .seam import CUDA_GRAPH_SAFE, KERNELS_VERSION, VERIFIED_VERSIONS, LayerPathV2, make_layer_path, supports
from .spec import V2_SPEC

__all__ = ["V2_SPEC", "KERNELS_VERSION", "VERIFIED_VERSIONS", "CUDA_GRAPH_SAFE", "LayerPathV2", "make_layer_path", "supports"]
