"""Chunkwise Gated DeltaNet-2 in plain PyTorch (the "torch" backend; gradients come from autograd).

Implements the WY form of design section 2 with chunks of C = 64 tokens. Everything except the
state pass is batched over all chunks at once; the state pass is one small matmul step per chunk,
batched over sequences and heads. Decay factors only ever appear as exp(G_r - G_s) with r >= s, so
they stay <= 1 for any decay strength.
"""
import torch
import torch.nn.functional as F

from .naive import l2norm

CHUNK = 64
# Diagonal 16 x 16 blocks of the intra-chunk scores form their decay ratios directly; off-diagonal
# blocks factor them through a reference row, so no C x C x K tensor is ever built.
SUB_CHUNK = 16


def _intra_chunk_scores(left: torch.Tensor, right: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """scores[..., r, s] = [r >= s] sum_k left[r, k] right[s, k] exp(G[r, k] - G[s, k]).

    left: [X, ..., C, K] (several left operands stacked on X); right and G: [..., C, K].
    """
    n_sub = CHUNK // SUB_CHUNK
    device = G.device
    Gs = G.unflatten(-2, (n_sub, SUB_CHUNK))
    ls = left.unflatten(-2, (n_sub, SUB_CHUNK))
    rs = right.unflatten(-2, (n_sub, SUB_CHUNK))

    causal = torch.ones(SUB_CHUNK, SUB_CHUNK, dtype=torch.bool, device=device).tril()
    diff = Gs.unsqueeze(-2) - Gs.unsqueeze(-3)  # [..., n_sub, r, s, K]
    decay = torch.where(causal.unsqueeze(-1), diff, float("-inf")).exp()
    diag = torch.einsum("x...rk,...rsk->x...rs", ls, decay * rs.unsqueeze(-3))  # [X, ..., n_sub, S, S]
    eye = torch.eye(n_sub, dtype=diag.dtype, device=device)
    diag = (diag.unsqueeze(-2) * eye[:, None, :, None]).flatten(-4, -3).flatten(-2, -1)

    # Block column j (j < n_sub - 1) below the diagonal, through reference row n_j = last row of
    # sub-chunk j: exp(G_r - G_n) for rows r after n_j and exp(G_n - G_s) for s in sub-chunk j.
    G_ref = Gs[..., :-1, -1, :]  # [..., n_sub - 1, K]
    rows = torch.arange(CHUNK, device=device)
    after_ref = rows[None, :] >= (torch.arange(1, n_sub, device=device) * SUB_CHUNK)[:, None]
    left_exponent = G.unsqueeze(-3) - G_ref.unsqueeze(-2)  # [..., n_sub - 1, C, K]
    left_decay = torch.where(after_ref.unsqueeze(-1), left_exponent, float("-inf")).exp()
    right_decayed = rs[..., :-1, :, :] * (G_ref.unsqueeze(-2) - Gs[..., :-1, :, :]).exp()
    off = (left.unsqueeze(-3) * left_decay) @ right_decayed.transpose(-1, -2)  # [X, ..., n_sub-1, C, S]
    off = F.pad(off.transpose(-3, -2).flatten(-2, -1), (0, SUB_CHUNK))
    return diag + off


def _to_chunks(x: torch.Tensor, dest: torch.Tensor, n_seq: int, padded_len: int) -> torch.Tensor:
    """Packed [1, T, H, D] -> [N, H, n_chunks, C, D], each sequence zero-padded to padded_len."""
    heads, dim = x.shape[-2:]
    padded = x.new_zeros(n_seq * padded_len, heads, dim).index_copy(0, dest, x[0])
    return padded.view(n_seq, padded_len // CHUNK, CHUNK, heads, dim).permute(0, 3, 1, 2, 4)


def chunk_gdn2_torch(
    q, k, v, g, b, w, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
):
    """Inputs already validated and `scale` a float. Returns (o in q's dtype, fp32/fp64 state or None)."""
    out_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    device = q.device

    # Sequences (the batch rows, or the packed spans) are laid out side by side, each padded to a
    # common multiple of C with zeros: a token with k = 0 and g = 0 leaves the state unchanged.
    if cu_seqlens is None:
        lengths = [length] * batch
    else:
        lengths = cu_seqlens.diff().tolist()
    n_seq = len(lengths)
    padded_len = -(-max(lengths) // CHUNK) * CHUNK
    dest = torch.cat([torch.arange(n, device=device) + i * padded_len for i, n in enumerate(lengths)])

    q, k, v, g, b, w = (x.to(dtype).reshape(1, batch * length, heads, -1) for x in (q, k, v, g, b, w))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, g, b, w = (_to_chunks(x, dest, n_seq, padded_len) for x in (q * scale, k, v, g, b, w))

    G = g.cumsum(-2)
    scores = _intra_chunk_scores(torch.stack([q, b * k]), k, G)
    qk_scores, kk_scores = scores[0], scores[1].tril(-1)
    # (I + T) is unit lower triangular: the solver reads only its strict lower part.
    erase_write = torch.linalg.solve_triangular(
        kk_scores, torch.cat([G.exp() * b * k, w * v], -1), upper=False, unitriangular=True
    )
    Y, U = erase_write.split([key_dim, value_dim], -1)
    G_last = G[..., -1:, :]
    k_tail = k * (G_last - G).exp()
    chunk_decay = G_last.exp().transpose(-1, -2)  # [N, H, n_chunks, K, 1]
    q_decayed = q * G.exp()

    state = (torch.zeros(n_seq, heads, key_dim, value_dim, dtype=dtype, device=device)
             if initial_state is None else initial_state.to(dtype))
    states_in, residuals = [], []
    # unbind (not indexing) keeps the backward of the loop linear in the number of chunks.
    for u, y, decay, tail in zip(U.unbind(2), Y.unbind(2), chunk_decay.unbind(2),
                                 k_tail.transpose(-1, -2).unbind(2)):
        states_in.append(state)
        residual = u - y @ state
        residuals.append(residual)
        state = decay * state + tail @ residual
    o = q_decayed @ torch.stack(states_in, 2) + qk_scores @ torch.stack(residuals, 2)

    o = o.permute(0, 2, 3, 1, 4).reshape(n_seq * padded_len, heads, value_dim).index_select(0, dest)
    o = o.view(batch, length, heads, value_dim).to(out_dtype)
    return o, (state if output_final_state else None)
