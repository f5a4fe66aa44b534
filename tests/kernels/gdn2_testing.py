"""Shared helpers for the Gated DeltaNet-2 kernel tests: random inputs and error measures."""
import torch

INPUT_NAMES = ("q", "k", "v", "g", "b", "w")


def make_inputs(batch, length, heads, key_dim, value_dim, dtype=torch.float64, g_min=-1.0,
                with_state=False, n_seq=None, seed=0, requires_grad=False, device="cpu"):
    """Random q, k, v, g, b, w (and an initial state) in fla's [B, T, H, D] layout.

    g is uniform in [g_min, 0]; b, w in [0, 1]; q, k are unit-scale (not normalised).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    qk_shape = (batch, length, heads, key_dim)
    v_shape = (batch, length, heads, value_dim)
    tensors = {
        "q": randn(*qk_shape),
        "k": randn(*qk_shape) / key_dim ** 0.5,
        "v": randn(*v_shape),
        "g": rand(*qk_shape) * g_min,
        "b": rand(*qk_shape),
        "w": rand(*v_shape),
    }
    if with_state:
        tensors["initial_state"] = randn(n_seq or batch, heads, key_dim, value_dim)
    for name, x in tensors.items():
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        x = x.to(device=device, dtype=state_dtype if name == "initial_state" else dtype)
        tensors[name] = x.requires_grad_(requires_grad)
    return tensors


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(fn, tensors, seed=1, **kwargs):
    """Runs fn(**tensors, **kwargs) with output_final_state and returns (o, final_state, grads) where
    grads are d(<o, do> + <S, dS>) for random do, dS w.r.t. every tensor input."""
    o, final_state = fn(**tensors, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    d_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    d_s = torch.randn(final_state.shape, generator=gen, dtype=torch.float64).to(final_state)
    loss = (o * d_o).sum() + (final_state * d_s).sum()
    names = list(tensors)
    grads = torch.autograd.grad(loss, [tensors[n] for n in names])
    return o.detach(), final_state.detach(), dict(zip(names, grads))
