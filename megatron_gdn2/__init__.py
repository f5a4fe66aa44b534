"""Megatron-Core integration of Gated DeltaNet-2: layers, specs, models, training, conversion."""
