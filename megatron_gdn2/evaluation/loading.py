"""The model and tokenizer to evaluate, from a Hugging Face directory or a Megatron checkpoint.

A Megatron checkpoint (any TP/PP layout) is converted in memory, layer by layer, into the same
transformers model an export would produce (megatron_gdn2.convert), so both inputs are evaluated by
one code path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from megatron_gdn2.convert.mapping import ConversionError, hf_config_for
from megatron_gdn2.convert.megatron_checkpoint import MegatronCheckpoint
from megatron_gdn2.convert.to_hf import checkpoint_model_config, checkpoint_tokenizer, iter_hf_state_dict
from megatron_gdn2.convert.tokenizer import hf_tokenizer
from megatron_gdn2.hf import GDN2ForCausalLM


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_model(path: str | Path, *, tokenizer: str | None = None, model: str | None = None,
               dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, tokenizer) for an HF directory or a Megatron checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"model path {path} does not exist")
    if is_hf_directory(path):
        lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(tokenizer or path, trust_remote_code=True)
        return lm.to(device).eval(), tok

    ckpt = MegatronCheckpoint(path)
    model_cfg = checkpoint_model_config(ckpt, model)
    tok, source = hf_tokenizer(checkpoint_tokenizer(ckpt, tokenizer))
    config = hf_config_for(model_cfg, eos_token_id=source.eod, pad_token_id=source.eod)
    with torch.device("meta"):
        lm = GDN2ForCausalLM(config)
    lm.load_state_dict(dict(iter_hf_state_dict(ckpt, model_cfg, dtype)), strict=True, assign=True)
    return lm.to(device).eval(), tok
