"""Gated DeltaNet-2 (gated delta rule with channel-wise erase and write gates)."""
from .interface import chunk_gdn2, fused_recurrent_gdn2, naive_recurrent_gdn2

__all__ = ["chunk_gdn2", "fused_recurrent_gdn2", "naive_recurrent_gdn2"]
