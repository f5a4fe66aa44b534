"""Triton chunkwise GDN-2 kernels against the fp64 token-wise recurrence: output, final state and
every gradient (q, k, v, g, b, w, initial_state). On CPU the kernels run in Triton's interpreter
(fp32/fp16, tiny shapes); the `gpu` tests run the compiled kernels in fp32 and bf16."""
import math

import pytest
import torch
from gdn2_kernels.gdn2.chunk import chunk_gdn2_triton
from gdn2_kernels.gdn2.naive import recurrent_gdn2

from tests.kernels.gdn2_testing import make_inputs, rel_err


def _run(fn, tensors, d_o, d_s, **kwargs):
    """o, final state and the gradients of <o, d_o> + <S, d_s> w.r.t. every input (no final state
    when d_s is None)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
    o, s = fn(*(leaves[n] for n in ("q", "k", "v", "g", "b", "w")), kwargs["scale"],
              leaves.get("initial_state"), d_s is not None, kwargs["l2norm"], kwargs["cu_seqlens"])
    loss = (o.double() * d_o).sum()
    if d_s is not None:
        loss = loss + (s.double() * d_s).sum()
        s = s.detach()
    loss.backward()
    return o.detach(), s, {n: leaves[n].grad for n in leaves}


def check_against_reference(batch, length, heads, key_dim, value_dim, dtype, device, tol, g_min=-1.0,
                            with_state=True, l2norm=False, cu_seqlens=None, seed=0, final_state=True):
    n_seq = batch if cu_seqlens is None else len(cu_seqlens) - 1
    base = make_inputs(batch, length, heads, key_dim, value_dim, dtype=torch.float64, g_min=g_min,
                       with_state=with_state, n_seq=n_seq, seed=seed, device=device)
    test_in = {n: t.to(torch.float32 if n == "initial_state" else dtype) for n, t in base.items()}
    # the reference sees the same (rounded) inputs, so only the kernels' error is measured
    ref_in = {n: t.double() for n, t in test_in.items()}
    kwargs = dict(scale=key_dim ** -0.5, l2norm=l2norm,
                  cu_seqlens=None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device))
    gen = torch.Generator().manual_seed(seed + 1)
    d_o = torch.randn(batch, length, heads, value_dim, generator=gen, dtype=torch.float64).to(device)
    d_s = torch.randn(n_seq, heads, key_dim, value_dim, generator=gen, dtype=torch.float64).to(device)
    d_s = d_s if final_state else None

    o_ref, s_ref, g_ref = _run(recurrent_gdn2, ref_in, d_o, d_s, **kwargs)
    o, s, grads = _run(chunk_gdn2_triton, test_in, d_o, d_s, **kwargs)

    errors = {"o": rel_err(o, o_ref)}
    if final_state:
        errors["final_state"] = rel_err(s, s_ref)
    errors.update({f"d{n}": rel_err(grads[n], g_ref[n]) for n in grads})
    for name, err in errors.items():
        assert math.isfinite(err) and err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} ({errors})"
    return errors


# ---------------------------------------------------------------- CPU (Triton interpreter)

@pytest.mark.parametrize(
    "batch, length, heads, key_dim, value_dim, g_min, l2norm",
    [
        (2, 100, 1, 32, 16, -1.0, False),   # two chunks, T not a multiple of 64, K != V
        (1, 70, 2, 16, 32, -20.0, True),    # strong decay (G reaches -1280 in a chunk), l2norm
        (1, 64, 1, 64, 16, -0.1, False),    # exactly one chunk, two key slices
        (1, 40, 1, 80, 16, -1.0, False),    # K = 80 in a padded width of 128
    ],
)
def test_interpreter_fp32(batch, length, heads, key_dim, value_dim, g_min, l2norm):
    check_against_reference(batch, length, heads, key_dim, value_dim, torch.float32, "cpu", 1e-5,
                            g_min=g_min, l2norm=l2norm)


def test_interpreter_packed_sequences_fp32():
    check_against_reference(1, 90, 1, 16, 16, torch.float32, "cpu", 1e-5,
                            cu_seqlens=[0, 5, 75, 90], seed=3)


def test_interpreter_packed_equals_separate_runs():
    """Packing sequences gives exactly what running each sequence alone gives."""
    tensors = make_inputs(1, 80, 1, 16, 16, dtype=torch.float32, with_state=True, n_seq=2, seed=5)
    args = [tensors[n] for n in ("q", "k", "v", "g", "b", "w")]
    h0 = tensors["initial_state"]
    o, s = chunk_gdn2_triton(*args, 0.25, h0, True, False, torch.tensor([0, 30, 80]))
    for i, (start, end) in enumerate([(0, 30), (30, 80)]):
        o_i, s_i = chunk_gdn2_triton(*(x[:, start:end].contiguous() for x in args), 0.25,
                                     h0[i:i + 1].contiguous(), True, False, None)
        assert rel_err(o[:, start:end], o_i) < 1e-6
        assert rel_err(s[i:i + 1], s_i) < 1e-6


def test_interpreter_fp16_without_initial_state():
    check_against_reference(1, 80, 1, 16, 16, torch.float16, "cpu", 2e-2, with_state=False, seed=7)


# ---------------------------------------------------------------- GPU

# GPU shapes share K = V = 128 and the benchmark's flags, so that few kernel variants are compiled
@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, length, heads, cu_seqlens",
    [(2, 1000, 4, None), (1, 900, 3, [0, 1, 65, 300, 301, 900])],
)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_gpu_against_reference(batch, length, heads, cu_seqlens, dtype, tol):
    check_against_reference(batch, length, heads, 128, 128, dtype, "cuda", tol, g_min=-2.0,
                            cu_seqlens=cu_seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_strong_decay_long_sequence(dtype):
    """g down to -20 per token over T = 16K: finite everywhere and equal to the fp32 recurrence."""
    length = 16384
    t = make_inputs(1, length, 1, 128, 128, dtype=torch.float32, g_min=-20.0, with_state=True, seed=11,
                    device="cuda")
    args = [t[n].to(dtype) for n in ("q", "k", "v", "g", "b", "w")]
    leaves = [x.clone().requires_grad_() for x in args]
    o, s = chunk_gdn2_triton(*leaves, 128 ** -0.5, t["initial_state"], True, False, None)
    (o.float().square().mean() + s.square().mean()).backward()
    for name, x in [("o", o), ("final_state", s)] + [(f"d{n}", x.grad) for n, x in zip("qkvgbw", leaves)]:
        assert torch.isfinite(x).all(), f"{name} has inf/NaN"
    with torch.no_grad():
        o_ref, s_ref = recurrent_gdn2(*args, 128 ** -0.5, t["initial_state"], True, False, None,
                                      compute_dtype=torch.float32)
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert rel_err(o, o_ref) < tol
    assert rel_err(s, s_ref) < tol


@pytest.mark.gpu
def test_gpu_largest_key_dim_and_unequal_value_dim():
    """K = 256 (the largest the API accepts) with V = 64: every tile size still fits the GPU."""
    check_against_reference(1, 300, 2, 256, 64, torch.bfloat16, "cuda", 1e-2, g_min=-2.0)


@pytest.mark.gpu
def test_gpu_first_call_compiles_every_kernel_before_launching(monkeypatch):
    """The first call compiles the kernels of its forward and backward on parallel threads
    (`precompile`, Triton's warm-up: nothing runs); its launches then compile nothing more, and the
    result is still right."""
    import triton

    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda **kw: compiled.append((kw["fn"].name, kw["is_manual_warmup"])))
    # K = 96, V = 48 with an initial state: a specialization no other test compiles in this process
    check_against_reference(1, 200, 2, 96, 48, torch.bfloat16, "cuda", 1e-2, g_min=-2.0)
    # the inverse kernel does not depend on K or V: earlier tests may have compiled it already
    assert {name for name, _ in compiled} >= {
        "chunk_cumsum_kernel", "chunk_scores_kernel", "chunk_wy_fwd_kernel", "chunk_state_fwd_kernel",
        "chunk_state_bwd_kernel", "chunk_wy_bwd_kernel", "chunk_state_grads_kernel", "chunk_intra_bwd_kernel",
    }, compiled
    assert all(warmup for _, warmup in compiled), f"compiled at launch: {compiled}"


def test_interpreter_recomputed_intra_tensors_give_the_same_gradients(monkeypatch):
    """KernelConfig.recompute_intra (memory for time: the backward runs the per-chunk forward
    kernels again instead of keeping their tensors) changes no number."""
    tensors = make_inputs(1, 80, 1, 16, 16, dtype=torch.float32, with_state=True, seed=9)
    d_o = torch.randn(1, 80, 1, 16, dtype=torch.float64)
    d_s = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    kwargs = dict(scale=0.25, l2norm=True, cu_seqlens=None)
    kept = _run(chunk_gdn2_triton, tensors, d_o, d_s, **kwargs)
    _with_config(monkeypatch, recompute_intra=True)
    recomputed = _run(chunk_gdn2_triton, tensors, d_o, d_s, **kwargs)
    assert torch.equal(kept[0], recomputed[0]) and torch.equal(kept[1], recomputed[1])
    for name, grad in kept[2].items():
        assert torch.equal(grad, recomputed[2][name]), name


def _with_config(monkeypatch, **fields):
    """Every launch of this test uses the architecture's KernelConfig with `fields` replaced."""
    import dataclasses

    from gdn2_kernels.gdn2 import chunk

    default = chunk.kernel_config
    monkeypatch.setattr(chunk, "kernel_config", lambda *a: dataclasses.replace(default(*a), **fields))


def test_interpreter_narrow_state_blocks(monkeypatch):
    """Few sequences and heads: the state kernels halve their value blocks (here 32 -> 16) for
    more programs, with their own pipeline depth; against fp64 with an initial and a final state."""
    from gdn2_kernels.gdn2 import chunk

    _with_config(monkeypatch, state_min_programs=1000, state_stages=2, state_narrow_stages=3)
    launches = []
    monkeypatch.setattr(chunk, "_state_launch", _recorded(launches, chunk._state_launch))
    check_against_reference(1, 100, 1, 16, 32, torch.float32, "cpu", 1e-5)
    assert launches and set(launches) == {(16, 3, 4)}


def _recorded(launches, state_launch):
    def recorded(idx, heads, backward=False, carried=False):
        launches.append(state_launch(idx, heads, backward, carried))
        return launches[-1]
    return recorded


def test_interpreter_wide_state_blocks(monkeypatch):
    """Many sequences and heads: the state kernels take wide value blocks (here 16 -> 32) while
    they still give state_min_programs programs, the backward with its own warp count."""
    from gdn2_kernels.gdn2 import chunk

    _with_config(monkeypatch, state_bv=16, state_wide_bv=32, state_min_programs=4, state_stages=1,
                 state_wide_bwd_warps=2)
    launches = []
    monkeypatch.setattr(chunk, "_state_launch", _recorded(launches, chunk._state_launch))
    check_against_reference(2, 70, 2, 16, 32, torch.float32, "cpu", 1e-5, with_state=False, final_state=False)
    assert launches and set(launches) == {(32, 1, 4), (32, 1, 2)}
    # an initial and a final state keep state_bv
    launches.clear()
    check_against_reference(2, 70, 2, 16, 32, torch.float32, "cpu", 1e-5)
    assert launches and {bv for bv, _, _ in launches} == {16}


@pytest.mark.gpu
def test_gpu_wide_state_blocks(monkeypatch):
    """6 x 16 sequence-heads in bf16 without an initial or final state: on Hopper the state kernels
    take 128-wide value blocks (with states they keep 64: test_gpu_against_reference)."""
    from gdn2_kernels.gdn2 import chunk

    launches = []
    monkeypatch.setattr(chunk, "_state_launch", _recorded(launches, chunk._state_launch))
    check_against_reference(6, 300, 16, 128, 128, torch.bfloat16, "cuda", 1e-2, g_min=-2.0, with_state=False,
                            final_state=False)
    if torch.cuda.get_device_capability()[0] == 9:
        assert launches and {bv for bv, _, _ in launches} == {128}, launches


def test_kernel_config_override_names_a_bad_field():
    from gdn2_kernels.gdn2 import chunk

    with pytest.raises(ValueError, match="no field 'state_bw'"):
        chunk.override_kernel_config(torch.device("cpu"), "state_bw=32")


def test_interpreter_chunk_decay_totals():
    """G_C per chunk is the sum of g over the chunk's rows, and 0 in the padding channels up to the
    power-of-two width that the state kernels read (K = 80 in a width of 128)."""
    from gdn2_kernels.gdn2 import chunk

    t = make_inputs(1, 100, 2, 80, 16, dtype=torch.float32, seed=4)
    args = [t[n] for n in ("q", "k", "v", "g", "b", "w")]
    idx = chunk.ChunkIndex.build(args[0], args[2], None)
    gc = chunk._intra(*args, 0.1, idx)["gc"].view(2, 2, 128)  # chunk, head, channel
    g = torch.nn.functional.pad(t["g"][0], (0, 0, 0, 0, 0, 28)).view(2, 64, 2, 80)
    assert torch.allclose(gc[..., :80], g.sum(1), atol=1e-5)
    assert torch.equal(gc[..., 80:], torch.zeros(2, 2, 48))
