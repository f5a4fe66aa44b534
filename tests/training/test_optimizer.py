"""The optimizer pieces: fuse_adamw (the fused AdamW kernel gives the default AdamW's update, also
after a checkpoint load left the step counters as Python numbers), the foreach gradient norm, and
optimizer_step (the same norm and parameters as Megatron's own scaling, clipping and step)."""
import pytest
import torch

from megatron_gdn2.training.optimizer import fuse_adamw


class _Wrapped:  # the shape of Megatron's optimizer wrappers: the torch optimizer as .optimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((5, 3), (7,))]


def _train(fused: bool, steps: int = 3):
    params = _params(0)
    adam = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    if fused:
        fuse_adamw(_Wrapped(adam), device_types=("cpu",))
        assert all(group["fused"] for group in adam.param_groups)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        adam.step()
        if fused and i == 0:  # what a checkpoint load may leave behind
            for state in adam.state.values():
                state["step"] = float(state["step"])
    return params


def test_fused_adamw_matches_the_default_and_survives_python_step_counters():
    for ref, fused in zip(_train(False), _train(True)):
        torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)


def test_fuse_adamw_leaves_other_devices_alone():
    adam = torch.optim.AdamW(_params(0), lr=0.1)
    fuse_adamw(_Wrapped(adam))  # CPU parameters, default device_types=("cuda",)
    assert not any(group.get("fused") for group in adam.param_groups)


def test_foreach_l2_norm_is_the_global_norm():
    from megatron_gdn2.training.optimizer import foreach_l2_norm

    grads = _params(2)
    norm, _ = foreach_l2_norm(2048, None, [grads], False)
    expected = torch.cat([g.detach().flatten() for g in grads]).norm()
    assert norm.shape == (1,)
    torch.testing.assert_close(norm[0], expected)


def _megatron_step_and_ours(cfg_dict: dict, cases: list[tuple[bool, float]]) -> dict:
    """For each (fused AdamW, clip): one step of the same model on the same batches through
    Megatron's path (finalize_model_grads scales the gradients, optimizer.step() clips) and through
    ours (DeferredTokenScaling + optimizer_step)."""
    from functools import partial

    import torch.distributed as dist
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gdn2.training.config import PretrainConfig
    from megatron_gdn2.training.distributed import set_seeds
    from megatron_gdn2.training.forward_step import forward_step
    from megatron_gdn2.training.model_setup import build_model_bundle, resolve_model_config
    from megatron_gdn2.training.optimizer import build_optimizer
    from megatron_gdn2.training.optimizer_step import optimizer_step

    cfg = PretrainConfig.from_dict(cfg_dict)
    model_cfg = resolve_model_config(cfg, 1000)
    gen = torch.Generator().manual_seed(dist.get_rank())  # other tokens and masks on each rank
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, 1000, (cfg.micro_batch_size, cfg.seq_length + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "loss_mask": (torch.rand(tokens[:, 1:].shape, generator=gen) > 0.3).float(),
                        "position_ids": torch.arange(cfg.seq_length).expand(cfg.micro_batch_size, -1)})
    out = {}
    for fused, clip in cases:
        cfg.optim.clip_grad = clip
        runs = {}
        for ours in (False, True):
            set_seeds(cfg.seed)
            bundle = build_model_bundle(cfg, model_cfg, bf16=False)
            optimizer = build_optimizer(cfg, [bundle.model], bf16=False)
            if fused:
                fuse_adamw(optimizer, device_types=("cpu",))
            if not ours:
                bundle.config.finalize_model_grads_func = finalize_model_grads
            before = {n: p.detach().clone() for n, p in bundle.module.named_parameters()}
            bundle.model.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=partial(forward_step, device=torch.device("cpu")),
                data_iterator=iter(batches), model=[bundle.model], num_microbatches=len(batches),
                seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size, forward_only=False)
            if ours:
                updated, norm = optimizer_step(optimizer, bundle.token_scaling.take(), clip)
            else:
                updated, norm, _ = optimizer.step()
            after = {n: p.detach().clone() for n, p in bundle.module.named_parameters()}
            runs[ours] = (updated, norm, before, after)
        (ref_updated, ref_norm, before, ref), (updated, norm, _, got) = runs[False], runs[True]
        # plain numbers: tensors do not survive the trip back from the rank processes
        out[(fused, clip)] = {
            "updated": (ref_updated, updated), "norm": (ref_norm, norm),
            "max_diff": max((got[n] - ref[n]).abs().max().item() for n in ref),
            "moved": max((ref[n] - before[n]).abs().max().item() for n in ref)}
    return out


def test_optimizer_step_is_megatrons_step(corpus, tmp_path):
    """Two data-parallel ranks with the distributed optimizer, fused (grad_scale) and unfused
    (one multiply) AdamW, clipping active (clip far below the norm) and not: the same norm and the
    same parameters as Megatron's own scaling, clipping and step."""
    from tests.harness import run_distributed
    from tests.training.common import make_config

    cfg = make_config(corpus, None, iters=1, global_batch_size=8, parallel__use_distributed_optimizer=True)
    cases = [(True, 1e-3), (True, 1e6), (False, 1e-3)]
    for out in run_distributed(_megatron_step_and_ours, world_size=2, args=(cfg.to_dict(), cases)):
        for fused, clip in cases:
            case = out[(fused, clip)]
            assert case["updated"] == (True, True)
            ref_norm, norm = case["norm"]
            assert norm == pytest.approx(ref_norm, rel=1e-6)
            assert (ref_norm > clip) == (clip < 1), "the clip cases are not what they claim"
            assert case["moved"] > 1e-4, "the step did not change the parameters"
            assert case["max_diff"] < 1e-6, (fused, clip, case)  # a few float32 ulps of O(1) weights
