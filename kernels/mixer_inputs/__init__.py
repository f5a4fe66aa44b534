"""The GDN-2 mixer's input stage: causal depthwise conv, SiLU and q/k L2 normalisation, the decay
and the erase/write gates, from sequence-major projections to the chunk kernel's inputs."""
from .interface import mixer_inputs

__all__ = ["mixer_inputs"]
