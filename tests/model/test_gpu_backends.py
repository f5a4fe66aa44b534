"""GPU: the hybrid model in bf16 gives the same loss and gradients with the Triton GDN-2 kernels as
with the torch backend (same weights; Transformer Engine layers when TE is installed)."""
import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.model.helpers import gpu_hybrid_case


def hybrid_bf16_backends():
    from megatron_gdn2.models import build_model, make_transformer_config

    model_cfg, tokens = gpu_hybrid_case("(GA)*2")
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
