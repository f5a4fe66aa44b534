"""Shared by the model tests; every function here runs inside a `run_distributed` rank."""
import torch

MICRO_BATCH, NUM_MICROBATCHES = 2, 2


def use_layout(tp: int, pp: int, seed: int = 1234) -> None:
    """Re-initialise Megatron's parallel state on the ranks of this launch for another layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)


def build(name: str, **config_kwargs):
    """The named model for the current parallel state (this pipeline stage's part)."""
    from megatron.core import parallel_state as ps

    from megatron_gdn2.configs import get_model_config
    from megatron_gdn2.models import build_model, make_transformer_config

    model_cfg = get_model_config(name)
    config = make_transformer_config(
        model_cfg, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(), **config_kwargs)
    return build_model(model_cfg, config, pre_process=ps.is_pipeline_first_stage(),
                       post_process=ps.is_pipeline_last_stage())


def gpu_hybrid_case(layer_pattern: str):
    """A small hybrid model config for the GPU tests and two sequences of tokens (+1 for labels) on
    the GPU: head dims of 64 (Triton's dot needs >= 16), three 64-token chunks per sequence."""
    from megatron_gdn2.configs import ModelConfig

    model_cfg = ModelConfig(name="gpu_hybrid", layer_pattern=layer_pattern, hidden_size=256,
                            ffn_hidden_size=512, num_heads=4, head_k_dim=64, head_v_dim=64,
                            swa_num_heads=4, swa_head_dim=64, swa_window=96, vocab_size=1024,
                            seq_length=192)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length + 1), generator=gen).cuda()
    return model_cfg, tokens


def batches(vocab: int, seq_len: int, device="cpu"):
    gen = torch.Generator().manual_seed(7)
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, vocab, (MICRO_BATCH, seq_len + 1), generator=gen).to(device)
        yield tokens[:, :-1], tokens[:, 1:]


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    per_token = model(tokens, position_ids, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return per_token, loss_func


def train_step(model, vocab: int, seq_len: int, device="cpu") -> float:
    """One forward/backward over NUM_MICROBATCHES micro-batches through Megatron's pipeline schedule,
    DDP and finalize_model_grads (the training path); returns the loss on every rank (the schedule
    reports each micro-batch's mean loss divided by the number of micro-batches) and leaves the
    reduced gradients in `param.main_grad`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches(vocab, seq_len, device), model=[ddp],
        num_microbatches=NUM_MICROBATCHES, seq_length=seq_len, micro_batch_size=MICRO_BATCH,
        forward_only=False)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        total += sum(out["lm loss"].double() for out in losses)
    dist.all_reduce(total, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return total.item()


def flex_backward_on_cpu():
    """Context in which FlexAttention runs its backward on CPU tensors. torch's public entry refuses
    CPU backward (its compiled CPU kernel has none) but the eager implementation, the one used on
    CPU with dynamo disabled, has a full autograd formula; the check is lifted only around calls."""
    from unittest import mock

    import torch.nn.attention.flex_attention as flex_module

    return mock.patch.object(flex_module, "_validate_device", lambda query, key, value: None)
