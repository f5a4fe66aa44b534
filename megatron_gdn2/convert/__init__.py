"""Checkpoint conversion between Megatron distributed checkpoints and Hugging Face directories.

    gdn2-convert to-hf CHECKPOINT OUT_DIR [--tokenizer PATH] [--dtype auto|bf16|fp16|fp32]
    gdn2-convert from-hf HF_DIR OUT_DIR [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P]
"""
