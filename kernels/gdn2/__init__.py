"""Gated DeltaNet-2 (gated delta rule with channel-wise erase and write gates)."""
from .interface import chunk_gdn2, fused_recurrent_gdn2, naive_recurrent_gdn2
from .naive import L2NORM_EPS

__all__ = ["L2NORM_EPS", "chunk_gdn2", "fused_recurrent_gdn2", "naive_recurrent_gdn2"]
