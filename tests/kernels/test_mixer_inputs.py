"""The fused mixer-input kernels (conv, SiLU, q/k L2 norm, decay and gates) against the PyTorch
reference in fp64: every output and the gradient of every input. On CPU the kernels run in
Triton's interpreter (fp32); the `gpu` tests run them compiled in fp32 and bf16."""
import math

import pytest
import torch
from gdn2_kernels.mixer_inputs import mixer_inputs
from gdn2_kernels.mixer_inputs.naive import mixer_inputs_torch

from tests.kernels.gdn2_testing import rel_err

NAMES = ("q", "k", "v", "g", "erase", "write")
INPUTS = ("projected", "conv_weight", "decay", "A_log", "dt_bias")


def make_case(seq_len, batch, heads, v_heads, head_k_dim, head_v_dim, cu_seqlens=None, width=4, seed=0,
              device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    key_dim, value_dim = heads * head_k_dim, v_heads * head_v_dim

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    tensors = {
        "projected": randn(seq_len, batch, 3 * key_dim + 2 * value_dim, scale=2.0),
        "conv_weight": randn(2 * key_dim + value_dim, width, scale=0.5),
        "decay": randn(seq_len, batch, key_dim, scale=3.0),
        "A_log": torch.empty(heads, dtype=torch.float64).uniform_(0, 2.7, generator=gen).to(device),
        "dt_bias": randn(key_dim),
    }
    tokens = torch.arange(seq_len)
    if cu_seqlens is None:
        positions = tokens[:, None]
    else:
        cu = torch.tensor(cu_seqlens)
        positions = (tokens - cu[torch.searchsorted(cu, tokens, right=True) - 1])[:, None]
    return tensors, positions.to(device)


def run(fn, tensors, positions, dtype, grads_out, dims, **kwargs):
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in tensors.items()}
    outs = fn(leaves["projected"], leaves["conv_weight"], positions, leaves["decay"], leaves["A_log"],
              leaves["dt_bias"], 2.0, *dims, **kwargs)
    loss = sum((o.double() * d).sum() for o, d in zip(outs, grads_out))
    loss.backward()
    return dict(zip(NAMES, (o.detach() for o in outs))), {n: leaves[n].grad for n in INPUTS}


def check(seq_len, batch, heads, v_heads, head_k_dim, head_v_dim, dtype, device, tol, cu_seqlens=None,
          seed=0):
    tensors, positions = make_case(seq_len, batch, heads, v_heads, head_k_dim, head_v_dim, cu_seqlens,
                                   seed=seed, device=device)
    # the reference sees the same rounded inputs, so only the kernels' error is measured
    tensors = {n: t.to(dtype).double() for n, t in tensors.items()}
    dims = (head_k_dim, head_v_dim)
    shapes = [o.shape for o in mixer_inputs_torch(tensors["projected"], tensors["conv_weight"], positions,
                                                  tensors["decay"], tensors["A_log"], tensors["dt_bias"],
                                                  2.0, *dims)]
    gen = torch.Generator().manual_seed(seed + 1)
    grads_out = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for shape in shapes]
    ref_out, ref_grad = run(mixer_inputs_torch, tensors, positions, torch.float64, grads_out, dims)
    out, grad = run(mixer_inputs, tensors, positions, dtype, grads_out, dims, backend="triton")
    assert out["g"].dtype == torch.float32 and out["q"].dtype == dtype
    errors = {n: rel_err(out[n], ref_out[n]) for n in NAMES}
    errors.update({f"d_{n}": rel_err(grad[n], ref_grad[n]) for n in INPUTS})
    for name, err in errors.items():
        assert math.isfinite(err) and err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} ({errors})"
    return errors


@pytest.mark.parametrize(
    "seq_len, batch, heads, v_heads, head_k_dim, head_v_dim, cu_seqlens",
    [
        (45, 2, 2, 2, 16, 16, None),            # two row blocks, the second partial
        (37, 1, 1, 2, 16, 8, [0, 1, 5, 30, 37]),  # packed: taps stop at every start; K != V
        (20, 3, 2, 1, 12, 16, None),            # head width not a power of two
    ],
)
def test_interpreter_fp32(seq_len, batch, heads, v_heads, head_k_dim, head_v_dim, cu_seqlens):
    check(seq_len, batch, heads, v_heads, head_k_dim, head_v_dim, torch.float32, "cpu", 1e-5,
          cu_seqlens=cu_seqlens)


def test_packed_boundaries_matter():
    """The packed case is sensitive to its boundaries: positions of one long sequence give other
    outputs (so the packed test above cannot pass by ignoring them)."""
    tensors, positions = make_case(37, 1, 1, 2, 16, 8, [0, 1, 5, 30, 37])
    args = [tensors[n].float() for n in ("projected", "conv_weight")]
    rest = [tensors[n].float() for n in ("decay", "A_log", "dt_bias")]
    packed = mixer_inputs(*args, positions, *rest, 2.0, 16, 8, backend="triton")
    whole = mixer_inputs(*args, torch.arange(37)[:, None], *rest, 2.0, 16, 8, backend="triton")
    assert not torch.allclose(packed[0], whole[0])


def test_keeps_only_its_inputs_for_the_backward():
    tensors, positions = make_case(45, 2, 2, 2, 16, 16)
    leaves = {n: t.float().requires_grad_() for n, t in tensors.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        mixer_inputs(leaves["projected"], leaves["conv_weight"], positions, leaves["decay"], leaves["A_log"],
                     leaves["dt_bias"], 2.0, 16, 16, backend="triton")
    input_bytes = sum(x.numel() * x.element_size() for x in leaves.values())
    positions_bytes = positions.numel() * 2 * positions.element_size()  # expanded to [s, b]
    assert sum(x.numel() * x.element_size() for x in saved) <= input_bytes + positions_bytes


@pytest.mark.parametrize("name, bad, message", [
    ("positions", torch.zeros(5, 1, dtype=torch.long), "positions"),
    ("dt_bias", torch.zeros(3), "dt_bias"),
    ("A_log", torch.zeros(5), "A_log"),
])
def test_bad_input_names_the_argument(name, bad, message):
    tensors, positions = make_case(8, 1, 2, 2, 16, 16)
    args = {**{n: t.float() for n, t in tensors.items()}, "positions": positions, name: bad}
    with pytest.raises(ValueError, match=message):
        mixer_inputs(args["projected"], args["conv_weight"], args["positions"], args["decay"], args["A_log"],
                     args["dt_bias"], 2.0, 16, 16)


def test_refuses_tensors_past_32_bit_offsets():
    tensors, positions = make_case(8, 1, 2, 2, 16, 16)
    rows = 2 ** 31 // 160 + 1  # q | k | v | erase | write, 32 wide each: 2^31 elements and more
    big = torch.empty(rows, 1, 160, dtype=torch.bfloat16, device="meta")
    decay = torch.empty(rows, 1, 32, dtype=torch.bfloat16, device="meta")
    positions = torch.zeros(rows, 1, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        mixer_inputs(big, tensors["conv_weight"].float(), positions, decay, tensors["A_log"].float(),
                     tensors["dt_bias"].float(), 2.0, 16, 16, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu(dtype, tol):
    check(1000, 2, 4, 4, 128, 128, dtype, "cuda", tol)
    check(777, 1, 2, 4, 128, 64, dtype, "cuda", tol, cu_seqlens=[0, 3, 100, 101, 600, 777])
