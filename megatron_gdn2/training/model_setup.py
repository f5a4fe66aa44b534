"""The model of a run: its ModelConfig (vocabulary and length as trained), the Megatron model of
this pipeline stage, wrapped for bf16 and data parallelism.

Vocabulary: the tokenizer's size rounded up to a multiple of 128 x TP (Megatron's padding), so
the embedding and output layer split evenly. A resumed run takes the padded size (and checks the
layer shapes) from the checkpoint, so a checkpoint loads at any TP that divides its vocabulary.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from megatron_gdn2.configs import ModelConfig, get_model_config
from megatron_gdn2.layers import wgrad_accumulation
from megatron_gdn2.models import GDN2TransformerConfig, build_model, make_transformer_config
from megatron_gdn2.training.config import ConfigError, PretrainConfig
from megatron_gdn2.training.optimizer_step import DeferredTokenScaling

__all__ = ["ModelBundle", "build_model_bundle", "padded_vocab_size", "resolve_model_config"]

# Fields that may differ between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = {"name", "seq_length", "published_params"}


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    multiple = 128 * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def _coerce(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if "bool" in kind:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--model-override {field.name}={text}: expected true or false")
        return text.lower() in ("true", "1")
    for cast in ((int,) if "int" in kind else ()) + ((float,) if "float" in kind else ()):
        try:
            return cast(text)
        except ValueError:
            continue
    if "int" in kind or "float" in kind:
        raise ConfigError(f"--model-override {field.name}={text}: expected a number")
    return text


def parse_model_overrides(items: list[str]) -> dict:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--model-override {item!r}: expected FIELD=VALUE with FIELD one of "
                              f"{', '.join(n for n in fields if n != 'name')}")
        out[key] = _coerce(fields[key], value)
    return out


def resolve_model_config(cfg: PretrainConfig, tokenizer_vocab_size: int,
                         saved: dict | None = None) -> ModelConfig:
    """The run's ModelConfig; `saved` is the model config stored in the checkpoint resumed from."""
    tp = cfg.parallel.tensor_model_parallel_size
    vocab = padded_vocab_size(tokenizer_vocab_size, tp)
    if saved is not None:
        if saved["vocab_size"] < tokenizer_vocab_size:
            raise ConfigError(f"the checkpoint's vocabulary ({saved['vocab_size']}) is smaller than "
                              f"the tokenizer's ({tokenizer_vocab_size}): wrong --tokenizer?")
        if saved["vocab_size"] % tp:
            raise ConfigError(f"the checkpoint's padded vocabulary {saved['vocab_size']} does not "
                              f"split over --tensor-model-parallel-size {tp}")
        vocab = saved["vocab_size"]
    try:
        model_cfg = get_model_config(cfg.model, vocab_size=vocab, seq_length=cfg.seq_length,
                                     **parse_model_overrides(cfg.model_overrides))
    except ValueError as e:
        raise ConfigError(f"--model {cfg.model}: {e}") from e
    if saved is not None:
        current = dataclasses.asdict(model_cfg)
        changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            raise ConfigError("the checkpoint was written by a different model: " + ", ".join(
                f"{k} {saved.get(k)!r} (checkpoint) vs {current[k]!r} (now)" for k in changed))
    return model_cfg


@dataclasses.dataclass
class ModelBundle:
    model: DistributedDataParallel  # what the schedules run
    module: torch.nn.Module  # the GPTModel inside (state dicts, generation)
    config: GDN2TransformerConfig
    token_scaling: DeferredTokenScaling  # the gradients' pending 1/tokens, for optimizer_step


def build_model_bundle(cfg: PretrainConfig, model_cfg: ModelConfig, *, bf16: bool) -> ModelBundle:
    p = cfg.parallel
    tc = make_transformer_config(
        model_cfg,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        kernel_backend=cfg.kernel_backend,
        swa_attention_impl=cfg.swa_attention_impl,
        recompute=p.recompute,
        calculate_per_token_loss=True,
        # the weight-gradient GEMMs add into DDP's main_grad buffers, which only training has
        gradient_accumulation_fusion=cfg.gradient_accumulation_fusion and wgrad_accumulation.install(),
    )
    module = build_model(model_cfg, tc, pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage())
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    wrapped = Float16Module(tc, module) if bf16 else module
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    model = DistributedDataParallel(tc, ddp_config, wrapped)
    token_scaling = tc.finalize_model_grads_func = DeferredTokenScaling()
    tc.no_sync_func = model.no_sync
    if p.overlap_grad_reduce and p.pipeline_model_parallel_size > 1:
        # With pipelining, the schedule starts the reduction after the last micro-batch's
        # backward of each stage, so stages reduce together instead of waiting on each other.
        tc.grad_sync_func = model.start_grad_sync
    return ModelBundle(model=model, module=module, config=tc, token_scaling=token_scaling)
