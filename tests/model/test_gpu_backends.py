"""GPU: the hybrid model in bf16 gives the same loss and gradients with the Triton GDN-2 kernels as
with the torch backend (same weights; Transformer Engine layers when TE is installed)."""
import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed


def hybrid_bf16_backends():
    from megatron_gdn2.configs import ModelConfig
    from megatron_gdn2.models import build_model, make_transformer_config

    # Head dims of 64 (Triton's dot needs >= 16); three 64-token chunks per sequence.
    model_cfg = ModelConfig(name="gpu_hybrid", layer_pattern="(GA)*2", hidden_size=256, ffn_hidden_size=512,
                            num_heads=4, head_k_dim=64, head_v_dim=64, swa_num_heads=4, swa_head_dim=64,
                            swa_window=96, vocab_size=1024, seq_length=192)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length + 1), generator=gen).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    state, results = None, {}
    for backend in ("torch", "triton"):
        config = make_transformer_config(model_cfg, params_dtype=torch.bfloat16, bf16=True,
                                         kernel_backend=backend)
        model = build_model(model_cfg, config)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        logits = model(inputs, None, None)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters()})
        impl = config.transformer_impl
    (loss_torch, grads_torch), (loss_triton, grads_triton) = results["torch"], results["triton"]
    relative = {n: ((grads_triton[n] - g).abs().max() / g.abs().max()).item() for n, g in grads_torch.items()}
    worst = max(relative, key=relative.get)
    return {"loss_torch": loss_torch, "loss_triton": loss_triton, "worst_param": worst,
            "grad_rel_diff": relative[worst], "transformer_impl": impl}


@pytest.mark.gpu
def test_hybrid_bf16_triton_matches_torch_backend():
    (out,) = run_distributed(hybrid_bf16_backends, world_size=1, timeout=600)
    print(out)
    assert abs(out["loss_triton"] - out["loss_torch"]) < 1e-2, out
    assert out["grad_rel_diff"] < 5e-2, out
