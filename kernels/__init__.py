"""gdn2_kernels: Gated DeltaNet-2 (gated delta rule with channel-wise erase and write gates).

Depends only on torch and triton.
"""
from .cross_entropy import vocab_parallel_cross_entropy
from .gdn2 import L2NORM_EPS, chunk_gdn2, fused_recurrent_gdn2, naive_recurrent_gdn2

__all__ = ["L2NORM_EPS", "chunk_gdn2", "fused_recurrent_gdn2", "naive_recurrent_gdn2",
           "vocab_parallel_cross_entropy"]
