"""AdamW over many tensors in one launch: each gradient read once, divided by an optional device
scale as it is read, and never written back."""
from .fused import adamw_step

__all__ = ["adamw_step"]
