"""The SWA layers' query/key/value split with the rotary embedding: Megatron's fused projection
output [s, b, groups, (heads_per_group + 2) * d] to query and key with RoPE and value, each
[b, heads, s, d] as the core attention takes them."""
from .interface import split_rotary

__all__ = ["split_rotary"]
