"""Cross entropy over a (vocabulary-parallel) logits tensor: one pass over the logits forward, one
backward, fp32 arithmetic on bf16/fp16/fp32 logits."""
from .interface import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy"]
