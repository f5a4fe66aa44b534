"""Megatron distributed checkpoint (any TP/PP layout) -> Hugging Face model directory.

Tensors stream from the checkpoint to safetensors shards: only the tensors of the shard being
written are in memory. The directory is assembled under `<out>.partial` and renamed into place at
the end, so an interrupted export never leaves a directory that looks complete.

Output: config.json (with auto_map for trust_remote_code), model-0000i-of-0000n.safetensors and
model.safetensors.index.json, configuration_gdn2.py + modeling_gdn2.py, the tokenizer files
(tokenizer.json, tokenizer_config.json) and generation_config.json.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import GenerationConfig

from megatron_gdn2.configs import ModelConfig, get_model_config
from megatron_gdn2.convert.mapping import (
    ConversionError,
    TensorMap,
    hf_config_for,
    megatron_shapes,
    tensor_maps,
)
from megatron_gdn2.convert.megatron_checkpoint import MegatronCheckpoint
from megatron_gdn2.convert.tokenizer import hf_tokenizer
from megatron_gdn2.hf import AUTO_MAP, MODEL_FILES, GDN2Config

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_model_config(ckpt: MegatronCheckpoint, model: str | None) -> ModelConfig:
    """The model config the training run recorded in the checkpoint (its exact shapes, padded
    vocabulary included), or the registered config `model` when one is named."""
    if model is not None:
        return get_model_config(model)
    recorded = ckpt.common.get("model_config")
    if recorded is not None:
        return ModelConfig(**recorded)
    name = (ckpt.common.get("config") or {}).get("model")
    if name is None:
        raise ConversionError(f"{ckpt.path} does not record its model config; pass --model NAME")
    return get_model_config(name)


def checkpoint_tokenizer(ckpt: MegatronCheckpoint, tokenizer: str | Path | None) -> str | Path:
    """`tokenizer` when given, else the tokenizer the training run recorded in the checkpoint."""
    tokenizer = tokenizer or (ckpt.common.get("config") or {}).get("data", {}).get("tokenizer")
    if tokenizer is None:
        raise ConversionError(f"{ckpt.path} does not record its tokenizer; pass --tokenizer PATH")
    return tokenizer


def check_checkpoint_shapes(ckpt: MegatronCheckpoint, maps: list[TensorMap], model_cfg: ModelConfig) -> None:
    """Every tensor the model config needs is in the checkpoint, with the expected TP=1 shape."""
    problems = []
    for name, expected in megatron_shapes(maps).items():
        if not ckpt.has(name):
            problems.append(f"{name} is missing")
        elif ckpt.shape(name) != expected:
            problems.append(f"{name} has shape {ckpt.shape(name)}, expected {expected}")
    if problems:
        raise ConversionError(f"checkpoint {ckpt.path} does not fit model config {model_cfg.name!r}: "
                              + "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)"
                                                             if len(problems) > 10 else ""))


def plan_shards(maps: list[TensorMap], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorMap]]:
    shards, current, size = [], [], 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for m in maps:
        nbytes = m.numel * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(m)
        size += nbytes
    return shards + [current]


def shard_tensors(ckpt: MegatronCheckpoint, shard: list[TensorMap],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sources = ckpt.tensors(dict.fromkeys(m.megatron_name for m in shard))
    return {m.hf_name: m.to_hf(sources[m.megatron_name]).to(dtype).contiguous() for m in shard}


def iter_hf_state_dict(ckpt: MegatronCheckpoint, model_cfg: ModelConfig,
                       dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of the checkpoint, one layer's worth read at a time."""
    maps = tensor_maps(model_cfg)
    check_checkpoint_shapes(ckpt, maps, model_cfg)
    layers: dict[str, list[TensorMap]] = {}
    for m in maps:
        layers.setdefault(".".join(m.hf_name.split(".")[:3]), []).append(m)
    for group in layers.values():
        target = dtype or ckpt.dtype(group[0].megatron_name)
        yield from shard_tensors(ckpt, group, target).items()


def export_to_hf(checkpoint: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                 model: str | None = None, dtype: str = "auto", max_shard_size_gb: float = 5.0,
                 overwrite: bool = False) -> Path:
    """Writes the HF directory `out` for a Megatron checkpoint; returns its path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} exists and is not empty (pass --overwrite)")
    ckpt = MegatronCheckpoint(checkpoint)
    model_cfg = checkpoint_model_config(ckpt, model)
    maps = tensor_maps(model_cfg)
    check_checkpoint_shapes(ckpt, maps, model_cfg)
    if dtype == "auto":
        torch_dtype = ckpt.dtype("embedding.word_embeddings.weight")
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ConversionError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    tokenizer = checkpoint_tokenizer(ckpt, tokenizer)
    hf_tok, source_tok = hf_tokenizer(tokenizer)
    if source_tok.vocab_size > model_cfg.vocab_size:
        raise ConversionError(f"--tokenizer {tokenizer} has {source_tok.vocab_size} tokens but model config "
                              f"{model_cfg.name!r} has vocab_size {model_cfg.vocab_size}")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = plan_shards(maps, torch_dtype, int(max_shard_size_gb * 2**30))
    weight_map, total = {}, 0
    with tqdm(total=len(maps), desc="export tensors", unit="tensor") as progress:
        for index, shard in enumerate(shards, start=1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = shard_tensors(ckpt, shard, torch_dtype)
            save_file(tensors, str(partial / filename), metadata={"format": "pt"})
            for name, tensor in tensors.items():
                weight_map[name] = filename
                total += tensor.numel() * tensor.element_size()
            progress.update(len(shard))
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    token_ids = dict(eos_token_id=source_tok.eod, pad_token_id=source_tok.eod,
                     bos_token_id=hf_tok.bos_token_id)
    config: GDN2Config = hf_config_for(model_cfg, **token_ids)
    config.architectures = ["GDN2ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = torch_dtype
    config.save_pretrained(partial)
    GenerationConfig(**token_ids).save_pretrained(partial)
    for source in MODEL_FILES:
        shutil.copyfile(source, partial / source.name)
    hf_tok.save_pretrained(partial)

    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    log.info("exported %s (%s, %d tensors, %.1f MB) to %s", ckpt.path, model_cfg.name, len(maps),
             total / 2**20, out)
    return out
