"""Proves the CPU harness: a tiny Megatron-Core GPTModel saved at TP=1 with dist_checkpointing and
loaded at TP=2, PP=2 and TP=2 x PP=2 gives the same loss and gradients (fp32)."""
import torch

from tests.harness import run_distributed

VOCAB, SEQ, MBS, NUM_MICROBATCHES = 96, 16, 2, 2


def _build_gpt():
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )


def _batches():
    gen = torch.Generator().manual_seed(7)
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        yield tokens[:, :-1], tokens[:, 1:]


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    per_token = model(tokens, position_ids, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return per_token, loss_func


def _loss_and_backward(model):
    """Mean loss over the micro-batches (broadcast to every rank); gradients left in .grad."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=_batches(), model=[model],
        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=MBS,
        forward_only=False)
    total = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        total += sum(out["lm loss"].double() for out in losses) / NUM_MICROBATCHES
    dist.all_reduce(total, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return total.item()


def _save_grads_as_checkpoint(model, directory):
    """Writes the gradients in place of the weights, so dist_checkpointing reshards them into any
    other layout exactly as it reshards weights."""
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    dist_checkpointing.save(model.sharded_state_dict(), directory)


def save_reference(weights_dir, grads_dir):
    from megatron.core import dist_checkpointing

    model = _build_gpt()
    dist_checkpointing.save(model.sharded_state_dict(), weights_dir)
    loss = _loss_and_backward(model)
    _save_grads_as_checkpoint(model, grads_dir)
    return loss


def load_and_step(weights_dir, grads_dir):
    from megatron.core import dist_checkpointing

    model = _build_gpt()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights_dir))
    loss = _loss_and_backward(model)
    _save_grads_as_checkpoint(model, grads_dir)
    return loss


def max_grad_differences(reference_dir, other_dirs):
    """Loads each gradient checkpoint into a TP=1 model; the largest elementwise difference of every
    gradient against the reference, per layout."""
    from megatron.core import dist_checkpointing

    def load(directory):
        model = _build_gpt()
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    ref = load(reference_dir)
    out = {}
    for directory in other_dirs:
        grads = load(directory)
        assert grads.keys() == ref.keys()
        out[directory] = max((grads[n] - ref[n]).abs().max().item() for n in ref)
    return out, min(v.abs().max().item() for v in ref.values())


def test_gpt_tp_pp_layouts_match_tp1(tmp_path):
    for name in ("weights", "grads_tp1", "grads_tp2", "grads_pp2", "grads_tp2pp2"):
        (tmp_path / name).mkdir()
    weights, ref_grads = str(tmp_path / "weights"), str(tmp_path / "grads_tp1")
    (ref_loss,) = run_distributed(save_reference, world_size=1, args=(weights, ref_grads))
    layouts = {"tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
    grad_dirs = []
    for name, (tp, pp) in layouts.items():
        grad_dir = str(tmp_path / f"grads_{name}")
        losses = run_distributed(load_and_step, world_size=tp * pp, tp=tp, pp=pp,
                                 args=(weights, grad_dir))
        assert max(abs(x - ref_loss) for x in losses) < 1e-5, (name, losses, ref_loss)
        grad_dirs.append(grad_dir)
    (result,) = run_distributed(max_grad_differences, world_size=1, args=(ref_grads, grad_dirs))
    diffs, smallest_max = result
    assert smallest_max > 0, "a reference gradient is identically zero: the comparison is vacuous"
    for directory, diff in diffs.items():
        assert diff < 1e-5, f"{directory}: max gradient difference {diff:.3e}"
