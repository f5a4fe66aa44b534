"""TP=2, PP=2 (even and uneven), TP=2 x PP=2 and sequence parallelism give the loss and gradients
of TP=1, for the recurrent and the hybrid model, all loaded from one dist checkpoint saved at TP=1.

Gradients are compared the way weights are resharded: each layout saves its reduced gradients as a
dist checkpoint (in place of the weights), which is loaded back into a TP=1 model. A parameter
replicated across TP ranks is saved from one rank only, so the test also checks that every
replicated parameter is initialised identically and ends with the same gradient on all TP ranks.

One launch of 4 ranks runs every layout of both families (re-initialising the parallel state).
"""
import os

import pytest
import torch

from tests.harness import run_distributed
from tests.model.helpers import build, train_step, use_layout

# the hybrid runs its SWA layers as on a GPU (our split of the query/key/value projection with
# RoPE, then the core attention), not through Megatron's local attention
FAMILIES = {"gdn2_tiny": {}, "swa_gdn2_tiny": {"swa_attention_impl": "sdpa"}}
LAYOUTS = {  # name: (tp, pp, config overrides)
    "tp2": (2, 1, {}),
    "pp2": (1, 2, {}),
    "pp2_uneven": (1, 2, {"num_layers_in_first_pipeline_stage": 1}),
    "tp2pp2": (2, 2, {}),
    "tp2_sp": (2, 1, {"sequence_parallel": True}),
    "tp2pp2_sp": (2, 2, {"sequence_parallel": True}),
}
WORLD = 4


def _save(state, directory):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    dist_checkpointing.save(state, directory)


def _save_grads(model, directory):
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.main_grad)
    _save(model.sharded_state_dict(), directory)


def _replicated_spread(model, tensor_of) -> float:
    """Largest difference between TP ranks of `tensor_of(param)` over the TP-replicated parameters."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    spread = 0.0
    for param in model.parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        tensor = tensor_of(param).contiguous()
        copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(copies, tensor, group=group)
        spread = max(spread, max((c - copies[0]).abs().max().item() for c in copies))
    return spread


def _load_params(name, directory):
    from megatron.core import dist_checkpointing

    model = build(name, **FAMILIES[name])
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
    return {key: p.detach().clone() for key, p in model.named_parameters()}


def compare_layouts(root):
    from megatron_gdn2.configs import get_model_config

    out = {}
    for name, family in FAMILIES.items():
        cfg = get_model_config(name)
        base = os.path.join(root, name)
        use_layout(1, 1)
        model = build(name, **family)
        _save(model.sharded_state_dict(), os.path.join(base, "weights"))
        ref_loss = train_step(model, cfg.vocab_size, cfg.seq_length)
        _save_grads(model, os.path.join(base, "grads_tp1"))
        for index, (layout, (tp, pp, overrides)) in enumerate(LAYOUTS.items()):
            from megatron.core import dist_checkpointing

            use_layout(tp, pp, seed=100 + index)  # a different init: the loaded weights must matter
            model = build(name, **family, **overrides)
            init_spread = _replicated_spread(model, lambda p: p.detach())
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(),
                                                          os.path.join(base, "weights")))
            loss = train_step(model, cfg.vocab_size, cfg.seq_length)
            spread = _replicated_spread(model, lambda p: p.main_grad)
            _save_grads(model, os.path.join(base, f"grads_{layout}"))
            out[(name, layout)] = {"loss": loss, "ref_loss": ref_loss, "replicated_grad_spread": spread,
                                   "replicated_init_spread": init_spread}
        use_layout(1, 1)
        ref = _load_params(name, os.path.join(base, "grads_tp1"))
        for layout in LAYOUTS:
            grads = _load_params(name, os.path.join(base, f"grads_{layout}"))
            assert grads.keys() == ref.keys()
            # Relative to each parameter's largest reference gradient: gradients of the tiny
            # models span orders of magnitude, an absolute bound would miss errors in the small ones.
            relative = {key: ((grads[key] - ref[key]).abs().max() / ref[key].abs().max()).item()
                        for key in ref}
            worst = max(relative, key=relative.get)
            out[(name, layout)].update(grad_rel_diff=relative[worst], worst_param=worst)
        out[(name, "smallest_ref_grad_max")] = min(g.abs().max().item() for g in ref.values())
    return out


@pytest.mark.slow
def test_layouts_match_tp1(tmp_path):
    results = run_distributed(compare_layouts, world_size=WORLD, args=(str(tmp_path),), timeout=900)
    out = results[0]
    for name in FAMILIES:
        assert out[(name, "smallest_ref_grad_max")] > 0, f"{name}: a reference gradient is all zero"
        for layout in LAYOUTS:
            r = out[(name, layout)]
            assert abs(r["loss"] - r["ref_loss"]) < 1e-5, (name, layout, r)
            assert r["grad_rel_diff"] < 1e-5, (name, layout, r)
            assert r["replicated_grad_spread"] < 1e-6, (name, layout, r)
            assert r["replicated_init_spread"] == 0, (name, layout, r)
