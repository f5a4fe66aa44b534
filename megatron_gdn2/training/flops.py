"""Model FLOPs per token of GDN-2 / SWA hybrid models, and MFU.

A FLOP count of a matrix product ``[m, k] x [k, n]`` is ``2 m k n``. Forward FLOPs per token,
with d = hidden size, V = vocabulary, T = sequence length:

GDN-2 layer (``G``), H key heads of d_k, H_v value heads of d_v, K_d = H d_k, V_d = H_v d_v,
low ranks r_f (decay) and r_g (output gate), conv kernel k_c, chunk length c = min(64, T):

    projections  2 [ d (3 K_d + 2 V_d)          q, k, v, erase b, write w
                   + r_f (d + K_d)              W_f2 W_f1 (decay)
                   + r_g (d + V_d)              W_g2 W_g1 (output gate)
                   + V_d d ]                    W_o
    conv         2 k_c (2 K_d + V_d)            depthwise causal conv on q, k, v
    recurrence   2 H_v [ c (3 d_k + 2 d_v)      T = Ebar Kbar^T, Aqk, Y = A Ebar (c d_k each);
                                                U = A Z, Aqk R (c d_v each)
                       + c^2 / 6                (I + T)^-1 by forward substitution
                       + 3 d_k d_v ]            R = U - Y S0, S += Ktail^T R, O = Qg S0

  (the chunkwise algorithm of design doc section 2, per value head; key-side terms are repeated
  per value head, as the kernels do with grouped value heads).

SWA layer (``A``), H_q query heads and H_kv key/value heads of d_h, window w:

    projections  2 [ d (H_q + 2 H_kv) d_h + H_q d_h d ]
    attention    2 x 2 H_q d_h L            QK^T and PV, L = (1/T) sum_{t=1..T} min(t, w):
                                            the keys an average causal query sees

Every layer: SwiGLU MLP ``2 x 3 d F`` (F = ffn size). Once per token: the output layer ``2 d V``.
Norms, activations, gates and softmax are left out (they are O(d) per token, not O(d^2)).

Training FLOPs per token = 3 x forward (the backward pass costs two forwards). Activation
recomputation is *not* counted, so TFLOP/s and MFU are model FLOPs utilisation (MFU) in the
PaLM sense: ``MFU = achieved model TFLOP/s per device / peak dense bf16 TFLOP/s of the device``.
"""
from __future__ import annotations

import torch

__all__ = [
    "PEAK_BF16_TFLOPS",
    "forward_flops_per_token",
    "layer_forward_flops",
    "peak_tflops",
    "training_flops_per_token",
]

CHUNK = 64

# Dense (no sparsity) bf16 tensor-core peaks of common accelerators, TFLOP/s; matched against
# torch.cuda.get_device_name() in order, so longer names come first.
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
)


def _gdn2_forward_flops(cfg) -> float:
    d = cfg.hidden_size
    key_dim = cfg.num_heads * cfg.head_k_dim
    value_dim = cfg.num_v_heads * cfg.head_v_dim
    projections = (d * (3 * key_dim + 2 * value_dim)
                   + cfg.decay_low_rank_dim * (d + key_dim)
                   + cfg.gate_low_rank_dim * (d + value_dim)
                   + value_dim * d)
    conv = cfg.conv_kernel * (2 * key_dim + value_dim)
    c = min(CHUNK, cfg.seq_length)
    dk, dv = cfg.head_k_dim, cfg.head_v_dim
    recurrence = cfg.num_v_heads * (c * (3 * dk + 2 * dv) + c * c / 6 + 3 * dk * dv)
    return 2.0 * (projections + conv + recurrence)


def mean_attended_keys(seq_length: int, window: int) -> float:
    """(1/T) sum_{t=1..T} min(t, w)."""
    t, w = seq_length, min(window, seq_length)
    return (w * (w + 1) / 2 + (t - w) * w) / t


def _swa_forward_flops(cfg) -> float:
    d, head = cfg.hidden_size, cfg.swa_head_dim
    projections = d * (cfg.swa_num_heads + 2 * cfg.swa_num_kv_groups) * head + cfg.swa_num_heads * head * d
    attention = 2 * cfg.swa_num_heads * head * mean_attended_keys(cfg.seq_length, cfg.swa_window)
    return 2.0 * (projections + attention)


def layer_forward_flops(cfg, block: str) -> float:
    """Forward FLOPs per token of one layer ("G" or "A"), MLP included."""
    mixer = {"G": _gdn2_forward_flops, "A": _swa_forward_flops}[block](cfg)
    return mixer + 2.0 * 3 * cfg.hidden_size * cfg.ffn_hidden_size


def forward_flops_per_token(cfg) -> float:
    """`cfg` is a megatron_gdn2.configs.ModelConfig (its seq_length and vocab_size as trained)."""
    layers = sum(layer_forward_flops(cfg, block) for block in cfg.layers)
    return layers + 2.0 * cfg.hidden_size * cfg.vocab_size


def training_flops_per_token(cfg) -> float:
    return 3.0 * forward_flops_per_token(cfg)


def peak_tflops(override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of this process's device; None when unknown (e.g. a CPU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None
