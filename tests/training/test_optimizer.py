"""fuse_adamw: the fused AdamW kernel gives the default AdamW's update, also after a checkpoint
load left the step counters as Python numbers."""
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


def test_foreach_scale_matches_megatrons_local_scale():
    from megatron.core.utils import local_multi_tensor_scale

    from megatron_gdn2.training.optimizer import foreach_scale

    for same in (True, False):
        src = [t.detach().clone() for t in _params(3)]
        dst = src if same else [torch.zeros_like(t) for t in src]
        expected_src = [t.clone() for t in src]
        expected_dst = [t.clone() for t in dst]
        local_multi_tensor_scale(2048, None, [expected_src, expected_src if same else expected_dst], 0.3)
        foreach_scale(2048, None, [src, dst], 0.3)
        for got, want in zip(dst, expected_src if same else expected_dst):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
