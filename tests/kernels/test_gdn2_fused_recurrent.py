"""fused_recurrent_gdn2 (decoding) against the fp64 token-wise reference: the torch path on CPU,
the Triton kernel in the interpreter (fp32/fp16, tiny shapes) and on the GPU."""
import os

import gdn2_kernels as gk
import pytest
import torch

from tests.kernels.gdn2_testing import make_inputs, rel_err

CASES = [
    # batch, length, heads, key_dim, value_dim, initial state, l2norm, packed offsets
    (2, 9, 2, 16, 24, True, True, None),
    (1, 13, 2, 20, 8, True, False, [0, 5, 6, 13]),
    (1, 5, 1, 256, 40, False, True, None),  # K = 256: two blocks of value columns
]


def triton_available_here():
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def compare(case, backend, dtype, device, tolerance):
    batch, length, heads, key_dim, value_dim, with_state, l2norm, offsets = case
    n_seq = batch if offsets is None else len(offsets) - 1
    tensors = make_inputs(batch, length, heads, key_dim, value_dim, dtype=dtype, with_state=with_state,
                          n_seq=n_seq, seed=length, device=device)
    cu_seqlens = None if offsets is None else torch.tensor(offsets, device=device)
    kwargs = dict(output_final_state=True, use_qk_l2norm_in_kernel=l2norm, cu_seqlens=cu_seqlens)
    o, s = gk.fused_recurrent_gdn2(**tensors, **kwargs, backend=backend)
    o_ref, s_ref = gk.naive_recurrent_gdn2(**tensors, **kwargs)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel_err(o, o_ref) < tolerance and rel_err(s, s_ref) < tolerance


@pytest.mark.parametrize("case", CASES, ids=["batch", "packed", "k256"])
def test_torch_path(case):
    compare(case, "torch", torch.float32, "cpu", 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=["batch", "packed", "k256"])
def test_triton_kernel_in_interpreter(case, dtype):
    if not triton_available_here():
        pytest.fail("no CUDA and TRITON_INTERPRET!=1: tests/conftest.py should set the interpreter")
    compare(case, "triton", dtype, "cpu", 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=["batch", "packed", "k256"])
def test_triton_kernel_on_gpu(case, dtype):
    compare(case, "triton", dtype, "cuda", 1e-4 if dtype == torch.float32 else 1e-2)


def test_is_forward_only():
    tensors = make_inputs(1, 4, 1, 4, 4, requires_grad=True)
    o, _ = gk.fused_recurrent_gdn2(**tensors, backend="torch")
    assert not o.requires_grad


def test_continuing_from_final_state_equals_one_pass():
    """Decoding feeds the state back in token by token; that must equal one pass over the sequence."""
    tensors = make_inputs(2, 12, 2, 8, 8, dtype=torch.float32, seed=4)
    o_full, s_full = gk.fused_recurrent_gdn2(**tensors, output_final_state=True)
    state = None
    for t in range(12):
        step = {name: x[:, t:t + 1] for name, x in tensors.items()}
        o_t, state = gk.fused_recurrent_gdn2(**step, initial_state=state, output_final_state=True)
        assert rel_err(o_t, o_full[:, t:t + 1]) < 1e-6
    assert rel_err(state, s_full) < 1e-6
