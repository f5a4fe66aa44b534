"""Pretraining on Megatron-Core: configuration, optimizer and schedule, checkpoints, the loop.

Entry points: ``gdn2-pretrain`` (``pretrain.main``), ``pretrain.run(PretrainConfig)``, and
``python -m megatron_gdn2.training.generate`` (greedy text from a checkpoint).
"""
