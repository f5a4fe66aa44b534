"""The chunked "torch" backend against the fp64 token-wise reference: outputs, final state and the
gradient of every input, over awkward shapes, packed sequences and strong decay."""
import gdn2_kernels as gk
import pytest
import torch

from tests.kernels.gdn2_testing import make_inputs, outputs_and_grads, rel_err


def chunk_torch(**kwargs):
    return gk.chunk_gdn2(**kwargs, backend="torch")


CASES = [
    # batch, length, heads, key_dim, value_dim, initial state, l2norm in kernel
    (2, 100, 2, 16, 8, True, True),
    (1, 64, 1, 8, 32, False, False),
    (3, 37, 2, 12, 20, True, False),
    (1, 193, 1, 32, 16, False, True),
    (2, 1, 1, 4, 4, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-K{}-V{}-h0{}-l2{}".format(*c))
def test_matches_reference_with_gradients(case):
    batch, length, heads, key_dim, value_dim, with_state, l2norm = case
    tensors = make_inputs(batch, length, heads, key_dim, value_dim, with_state=with_state,
                          requires_grad=True, seed=length)
    o_ref, s_ref, grads_ref = outputs_and_grads(gk.naive_recurrent_gdn2, tensors,
                                                use_qk_l2norm_in_kernel=l2norm)
    o, s, grads = outputs_and_grads(chunk_torch, tensors, use_qk_l2norm_in_kernel=l2norm)
    assert o.dtype == s.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-9
    assert rel_err(s, s_ref) < 1e-9
    for name, grad_ref in grads_ref.items():
        assert rel_err(grads[name], grad_ref) < 1e-9, name


def test_packed_sequences_equal_running_each_alone():
    offsets = [0, 30, 101, 190, 200]
    tensors = make_inputs(1, offsets[-1], 2, 16, 12, with_state=True, n_seq=len(offsets) - 1,
                          requires_grad=True, seed=3)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32)
    o, s, grads = outputs_and_grads(chunk_torch, tensors, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref, grads_ref = outputs_and_grads(gk.naive_recurrent_gdn2, tensors, cu_seqlens=cu_seqlens,
                                                use_qk_l2norm_in_kernel=True)
    assert rel_err(o, o_ref) < 1e-9 and rel_err(s, s_ref) < 1e-9
    for name, grad_ref in grads_ref.items():
        assert rel_err(grads[name], grad_ref) < 1e-9, name

    with torch.no_grad():
        for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            alone = {name: x[:, start:end] for name, x in tensors.items() if name != "initial_state"}
            o_alone, s_alone = chunk_torch(**alone, initial_state=tensors["initial_state"][i:i + 1],
                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
            assert rel_err(o[:, start:end], o_alone) < 1e-12
            assert rel_err(s[i:i + 1], s_alone) < 1e-12


def test_strong_decay_matches_reference_with_gradients():
    """g down to -20 per token: the cumulative decay inside one chunk reaches exp(-1280)."""
    tensors = make_inputs(1, 150, 2, 8, 8, g_min=-20.0, with_state=True, requires_grad=True, seed=5)
    o_ref, s_ref, grads_ref = outputs_and_grads(gk.naive_recurrent_gdn2, tensors)
    o, s, grads = outputs_and_grads(chunk_torch, tensors)
    assert rel_err(o, o_ref) < 1e-9 and rel_err(s, s_ref) < 1e-9
    for name, grad_ref in grads_ref.items():
        assert rel_err(grads[name], grad_ref) < 1e-9, name


def test_strong_decay_16k_tokens_fp32_is_finite_and_accurate():
    tensors = make_inputs(1, 16384, 1, 16, 16, dtype=torch.float32, g_min=-20.0, requires_grad=True, seed=7)
    o, s, grads = outputs_and_grads(chunk_torch, tensors, use_qk_l2norm_in_kernel=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert o.isfinite().all() and s.isfinite().all()
    for name, grad in grads.items():
        assert grad.isfinite().all(), name
    with torch.no_grad():
        o_ref, s_ref = gk.naive_recurrent_gdn2(**tensors, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_keep_dtype_and_fp32_state(dtype):
    tensors = make_inputs(2, 70, 2, 16, 16, dtype=dtype, with_state=True, seed=11)
    o, s = chunk_torch(**tensors, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = gk.naive_recurrent_gdn2(**tensors, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(o, o_ref) < tolerance and rel_err(s, s_ref) < tolerance


def test_default_backend_on_cpu_is_torch():
    tensors = make_inputs(1, 20, 1, 4, 4, seed=2)
    o_default, _ = gk.chunk_gdn2(**tensors)
    o_torch, _ = chunk_torch(**tensors)
    assert torch.equal(o_default, o_torch)
