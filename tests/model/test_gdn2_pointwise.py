"""The mixer's pointwise stage keeps only its inputs for the backward (it recomputes the rest) and
gives the gradients of the plain function."""
import torch
from gdn2_kernels.mixer_inputs.naive import mixer_inputs_torch

from megatron_gdn2.layers import gdn2_pointwise as gp

SEQ, BATCH, HEADS, DIM = 40, 2, 2, 8


def _inputs():
    gen = torch.Generator().manual_seed(0)
    key_dim = HEADS * DIM
    tensors = {
        "projected": torch.randn(SEQ, BATCH, 5 * key_dim, generator=gen),
        "conv_weight": torch.randn(3 * key_dim, 4, generator=gen),
        "decay": torch.randn(SEQ, BATCH, key_dim, generator=gen),
        "A_log": torch.rand(HEADS, generator=gen),
        "dt_bias": torch.randn(key_dim, generator=gen),
    }
    return {name: t.double().requires_grad_() for name, t in tensors.items()}


def _call(fn, t):
    positions = gp.positions_in_sequence(SEQ, BATCH, None, torch.device("cpu"))
    return fn(t["projected"], t["conv_weight"], positions, t["decay"], t["A_log"], t["dt_bias"], 2.0,
              DIM, DIM)


def test_mixer_inputs_saves_only_its_inputs_and_matches_the_plain_function():
    t = _inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        outs = _call(gp.mixer_inputs, t)
    input_bytes = sum(x.numel() * x.element_size() for x in t.values())
    saved_bytes = sum(x.numel() * x.element_size() for x in saved)
    assert saved_bytes <= input_bytes + SEQ * 8, (saved_bytes, input_bytes)

    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i, o in enumerate(outs)]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), list(t.values()))
    plain = _call(mixer_inputs_torch, t)
    for o, p in zip(outs, plain):
        assert torch.equal(o, p)
    expected = torch.autograd.grad(sum((o * w).sum() for o, w in zip(plain, weights)), list(t.values()))
    for name, g, e in zip(t, grads, expected):
        assert torch.equal(g, e), name
