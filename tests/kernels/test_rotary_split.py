"""The SWA layers' split with the rotary embedding (Triton kernel, forward and backward) against
the PyTorch reference in fp64: query, key and value, and the gradient of the projection. On CPU the
kernel runs in Triton's interpreter (fp32); the `gpu` test runs it compiled in fp32 and bf16 at the
1.3B hybrid's head shapes."""
import math

import pytest
import torch
from gdn2_kernels.rotary_split import split_rotary
from gdn2_kernels.rotary_split.naive import split_rotary_torch

from tests.kernels.gdn2_testing import rel_err


def make_case(seq_len, batch, groups, heads_per_group, head_dim, device="cpu", seed=0, shared=False):
    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randn(seq_len, batch, groups, (heads_per_group + 2) * head_dim, generator=gen,
                        dtype=torch.float64)
    # Megatron's angles: position x inverse frequency, the same for both halves of a head; unless
    # `shared` (one tensor for both, as self-attention passes them) the keys get other angles so
    # that a query/key mix-up shows
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq
    q_freqs = torch.cat((angles, angles), -1)[:, None, None, :].float().to(device)
    k_freqs = q_freqs if shared else q_freqs * 0.5 + 0.3
    return mixed.to(device), q_freqs, k_freqs


def run(mixed, q_freqs, k_freqs, heads_per_group, dtype, grads_out, backend):
    leaf = mixed.detach().to(dtype).requires_grad_()
    outs = split_rotary(leaf, q_freqs, k_freqs, heads_per_group, backend=backend)
    sum((o.double() * g).sum() for o, g in zip(outs, grads_out)).backward()
    return [o.detach() for o in outs], leaf.grad


def check(seq_len, batch, groups, heads_per_group, head_dim, dtype, device, tol, shared=False):
    mixed, q_freqs, k_freqs = make_case(seq_len, batch, groups, heads_per_group, head_dim, device,
                                        shared=shared)
    mixed = mixed.to(dtype).double()  # the reference sees the same rounded input
    shapes = [o.shape for o in split_rotary_torch(mixed, q_freqs, k_freqs, heads_per_group)]
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for shape in shapes]
    ref_out, ref_grad = run(mixed, q_freqs, k_freqs, heads_per_group, torch.float64, grads_out, "torch")
    out, grad = run(mixed, q_freqs, k_freqs, heads_per_group, dtype, grads_out, "triton")
    assert all(o.dtype == dtype and o.is_contiguous() for o in out)
    errors = {name: rel_err(a, b) for name, a, b in zip("qkv", out, ref_out)}
    errors["d_mixed"] = rel_err(grad, ref_grad)
    for name, err in errors.items():
        assert math.isfinite(err) and err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} ({errors})"


@pytest.mark.parametrize("seq_len, batch, groups, heads_per_group, head_dim, shared", [
    (37, 2, 3, 1, 16, False),  # one head per group (the 1.3B hybrid's case), a partial row block
    (37, 2, 3, 1, 16, True),   # the same with one angle tensor for queries and keys
    (20, 1, 2, 2, 24, False),  # grouped-query heads; half a head (12) is not a power of two
    (64, 3, 1, 3, 8, False),   # three query heads per group, two whole row blocks
])
def test_interpreter_fp32(seq_len, batch, groups, heads_per_group, head_dim, shared):
    check(seq_len, batch, groups, heads_per_group, head_dim, torch.float32, "cpu", 1e-6, shared=shared)


def test_keeps_only_the_angles_for_the_backward():
    mixed, q_freqs, k_freqs = make_case(37, 2, 3, 1, 16)
    leaf = mixed.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        split_rotary(leaf, q_freqs, k_freqs, 1, backend="triton")
    assert sum(x.numel() for x in saved) == q_freqs.numel() + k_freqs.numel()


@pytest.mark.parametrize("change, message", [
    (dict(heads_per_group=3), "heads_per_group=3"),      # 3 * 16 is not 5 * d
    (dict(q_freqs=torch.zeros(37, 1, 1, 8)), "q_freqs"),
    (dict(k_freqs=torch.zeros(36, 1, 1, 16)), "k_freqs"),
    (dict(mixed=torch.zeros(37, 2, 48)), "mixed"),
])
def test_bad_input_names_the_argument(change, message):
    mixed, q_freqs, k_freqs = make_case(37, 2, 3, 1, 16)
    args = {**dict(mixed=mixed.float(), q_freqs=q_freqs, k_freqs=k_freqs, heads_per_group=1), **change}
    with pytest.raises(ValueError, match=message):
        split_rotary(args["mixed"], args["q_freqs"], args["k_freqs"], args["heads_per_group"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu(dtype, tol):
    check(2048, 2, 18, 1, 128, dtype, "cuda", tol)  # swa_gdn2_1.3B's heads
    check(300, 1, 4, 2, 64, dtype, "cuda", tol)
