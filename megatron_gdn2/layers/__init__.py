"""Megatron-Core modules of GDN-2 models: the GDN-2 token mixer, sliding-window attention cores,
RMSNorm for the local specs, and distributed-checkpoint helpers."""
