"""Token-wise Gated DeltaNet-2 recurrence: the reference every other backend is tested against."""
import torch

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last axis; every backend uses this exact formula so that they agree."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _recurrence(q, k, v, g, b, w, state):
    """Runs one batch of equal-length sequences; q..w are [N, T, H, *], state [N, H, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp().unsqueeze(-1)
        read = torch.einsum("nhk,nhkv->nhv", b[:, t] * k[:, t], state)
        state = state + k[:, t].unsqueeze(-1) * (w[:, t] * v[:, t] - read).unsqueeze(-2)
        outputs.append(torch.einsum("nhk,nhkv->nhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def recurrent_gdn2(
    q, k, v, g, b, w, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
    compute_dtype=torch.float64,
):
    """Gated DeltaNet-2, one token at a time (inputs already validated, `scale` a float).

    Computes in `compute_dtype` (fp64 for the reference); returns the output in q's dtype and the
    final state in fp32 (fp64 when the inputs are fp64).
    """
    out_dtype = q.dtype
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, b, w = (x.to(compute_dtype) for x in (q, k, v, g, b, w))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]

    if cu_seqlens is None:
        spans = [(None, None)]
        n_seq = batch
    else:
        bounds = cu_seqlens.tolist()
        spans = list(zip(bounds[:-1], bounds[1:]))
        n_seq = len(spans)
    if initial_state is None:
        initial_state = q.new_zeros(n_seq, heads, key_dim, value_dim)
    initial_state = initial_state.to(compute_dtype)

    outputs, states = [], []
    for i, (start, end) in enumerate(spans):
        if start is None:
            o, s = _recurrence(q, k, v, g, b, w, initial_state)
        else:
            sl = slice(start, end)
            o, s = _recurrence(q[:, sl], k[:, sl], v[:, sl], g[:, sl], b[:, sl], w[:, sl],
                               initial_state[i:i + 1])
        outputs.append(o)
        states.append(s)
    o = torch.cat(outputs, dim=1).to(out_dtype)
    final_state = torch.cat(states, dim=0).to(state_dtype) if output_final_state else None
    return o, final_state
