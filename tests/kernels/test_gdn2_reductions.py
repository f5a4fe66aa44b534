"""Tied reductions of Gated DeltaNet-2, checked against recurrences written here independently:
b = w = beta * 1 is Kimi Delta Attention; with a scalar decay as well it is Gated DeltaNet."""
import gdn2_kernels as gk
import pytest
import torch

from tests.kernels.gdn2_testing import make_inputs, rel_err

BATCH, LENGTH, HEADS, KEY_DIM, VALUE_DIM = 2, 90, 2, 8, 12
SCALE = 0.3


def kda_recurrence(q, k, v, g, beta):
    """KDA: S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t * scale.

    beta: [B, T, H]. State laid out [B, H, K, V]."""
    batch, length, heads, key_dim = k.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    outputs = []
    for t in range(length):
        k_t = k[:, t].unsqueeze(-1)  # [B, H, K, 1]
        state = g[:, t].exp().unsqueeze(-1) * state
        prediction = k_t.transpose(-1, -2) @ state  # [B, H, 1, V]
        state = state + beta[:, t, :, None, None] * k_t @ (v[:, t].unsqueeze(-2) - prediction)
        outputs.append((SCALE * q[:, t].unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(outputs, 1)


def gated_deltanet_recurrence(q, k, v, alpha, beta):
    """Gated DeltaNet in its paper form with a [V, K] state:
    S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T, o_t = S_t q_t * scale.

    alpha, beta: [B, T, H]."""
    batch, length, heads, key_dim = k.shape
    eye = torch.eye(key_dim, dtype=q.dtype)
    state = q.new_zeros(batch, heads, v.shape[-1], key_dim)
    outputs = []
    for t in range(length):
        k_col = k[:, t].unsqueeze(-1)
        a, bt = alpha[:, t, :, None, None], beta[:, t, :, None, None]
        transition = a * (eye - bt * k_col @ k_col.transpose(-1, -2))
        state = state @ transition + bt * v[:, t].unsqueeze(-1) @ k_col.transpose(-1, -2)
        outputs.append((state @ (SCALE * q[:, t]).unsqueeze(-1)).squeeze(-1))
    return torch.stack(outputs, 1)


def run_all_backends(tensors):
    ref, _ = gk.naive_recurrent_gdn2(**tensors, scale=SCALE)
    chunked, _ = gk.chunk_gdn2(**tensors, scale=SCALE, backend="torch")
    return ref, chunked


@pytest.fixture
def tensors():
    return make_inputs(BATCH, LENGTH, HEADS, KEY_DIM, VALUE_DIM, g_min=-0.5, seed=21)


def test_tied_gates_are_kimi_delta_attention(tensors):
    beta = tensors["b"][..., 0]
    tensors["b"] = beta.unsqueeze(-1).expand(-1, -1, -1, KEY_DIM)
    tensors["w"] = beta.unsqueeze(-1).expand(-1, -1, -1, VALUE_DIM)
    expected = kda_recurrence(tensors["q"], tensors["k"], tensors["v"], tensors["g"], beta)
    for output in run_all_backends(tensors):
        assert rel_err(output, expected) < 1e-12


def test_tied_gates_and_scalar_decay_are_gated_deltanet(tensors):
    beta = tensors["b"][..., 0]
    log_alpha = tensors["g"][..., 0]
    tensors["b"] = beta.unsqueeze(-1).expand(-1, -1, -1, KEY_DIM)
    tensors["w"] = beta.unsqueeze(-1).expand(-1, -1, -1, VALUE_DIM)
    tensors["g"] = log_alpha.unsqueeze(-1).expand(-1, -1, -1, KEY_DIM)
    expected = gated_deltanet_recurrence(tensors["q"], tensors["k"], tensors["v"], log_alpha.exp(), beta)
    for output in run_all_backends(tensors):
        assert rel_err(output, expected) < 1e-12


def test_no_erase_is_gated_linear_attention(tensors):
    """b = 0, w = 1: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, i.e. a decayed causal sum."""
    tensors["b"] = torch.zeros_like(tensors["b"])
    tensors["w"] = torch.ones_like(tensors["w"])
    G = tensors["g"].cumsum(1)  # [B, T, H, K]
    # o_t = sum_{s<=t} (q_t * exp(G_t - G_s)) . k_s  v_s
    decay = (G.unsqueeze(2) - G.unsqueeze(1)).exp()  # [B, t, s, H, K]
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()[None, :, :, None]
    scores = (SCALE * tensors["q"].unsqueeze(2) * decay * tensors["k"].unsqueeze(1)).sum(-1) * causal
    expected = torch.einsum("btsh,bshv->bthv", scores, tensors["v"])
    for output in run_all_backends(tensors):
        assert rel_err(output, expected) < 1e-12
