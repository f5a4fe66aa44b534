"""The Gated DeltaNet-2 token mixer as a Megatron-Core module (design doc section 5).

From hidden x (width d), H key heads of d_k and H_v value heads of d_v (H_v a multiple of H):

    q, k, v = silu(conv4(W_q x)), silu(conv4(W_k x)), silu(conv4(W_v x))   depthwise causal conv
    g = -exp(A_log[head]) * softplus(W_f2 W_f1 x + dt_bias)                 fp32, rank r_f
    b = sigmoid(W_b x) (x 2 with allow_neg_eigval),  w = sigmoid(W_w x)
    o = chunk_gdn2(q, k, v, g, b, w)     q, k L2-normalised first; q, k, g, b repeated
                                         over each group of H_v / H value heads
    y = W_o(RMSNorm_per_head(o) * silu(W_g2 W_g1 x + bias))                  rank r_g

Tensor parallelism (t ranks) splits heads. Parameters of one layer (shapes per rank):

    in_proj.weight       [(3 H d_k + 2 H_v d_v) / t, d]  column-parallel, rows [q | k | v | b | w]
    conv_weight          [(2 H d_k + H_v d_v) / t, 4]    channels [q | k | v], split with them
    decay_proj.down_weight [r_f, d]                      W_f1, replicated
    decay_proj.up_weight   [H d_k / t, r_f]              W_f2, column-parallel
    A_log                [H / t]                         per key head
    dt_bias              [H d_k / t]                     per key channel
    gate_proj.down_weight  [r_g, d]                      W_g1, replicated
    gate_proj.up_weight    [H_v d_v / t, r_g]            W_g2, column-parallel
    gate_proj.up_bias      [H_v d_v / t]
    out_norm.weight      [d_v]                           shared by all heads, replicated
    out_proj.weight      [d, H_v d_v / t]                row-parallel

In a distributed checkpoint `in_proj.weight` and `conv_weight` are stored per role
(`in_proj.weight.q`, ... `.w`; `conv_weight.q`, `.k`, `.v`), each a global tensor, so any TP layout
loads any other. Gradients of the replicated parameters: the low-rank inputs pass through
copy_to_tensor_model_parallel_region (gather_from_sequence_parallel_region under sequence
parallelism), whose backward sums the partial input gradients of the local heads, so W_f1 and
W_g1 get the full gradient on every rank; under sequence parallelism each rank sees only its
tokens, so they carry `sequence_parallel = True` like norm weights and `finalize_model_grads` sums
them. The shared out_norm weight sees only the local heads on each rank; its gradient is summed by
an all-reduce in the backward pass.

Initialisation (the paper's): linear weights Xavier-uniform with gain 2^-2.5 using each linear's
own fan-in/fan-out (per role of the fused in_proj), biases zero, A_log = log U(1, 16), dt_bias the
inverse softplus of a log-uniform sample in [1e-3, 1e-1], conv weights PyTorch's Conv1d default
U(-1/sqrt(4), 1/sqrt(4)). A_log and dt_bias carry `_no_weight_decay = True` (they are 1-D, so
Megatron's default parameter groups already exclude them from weight decay).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gdn2_kernels
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_gdn2.layers.gdn2_pointwise import gated_norm_output, mixer_inputs, positions_in_sequence
from megatron_gdn2.layers.params import new_parameter
from megatron_gdn2.layers.sharding import own_parameters_sharded, split_by_role

XAVIER_GAIN = 2**-2.5
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)


@dataclass
class GatedDeltaNet2Submodules:
    in_proj: ModuleSpec | type = IdentityOp  # column-parallel linear
    out_proj: ModuleSpec | type = IdentityOp  # row-parallel linear


def xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = XAVIER_GAIN * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def initialized_by_mixer(weight: torch.Tensor) -> None:
    """init_method for the Megatron linears of the mixer: GatedDeltaNet2.reset_parameters fills them,
    since the fused in_proj needs a different Xavier bound per role, which a shape-only init
    method cannot know."""


class LowRankColumnParallel(MegatronModule):
    """x -> up(down(x)) with a replicated down factor [rank, d] and a column-parallel up factor.

    Takes the layer input (sequence-sharded under sequence parallelism) and returns the full
    sequence for the local output columns: only the rank-wide activation crosses ranks.
    """

    def __init__(self, config, input_size: int, rank: int, output_size: int, bias: bool, tp_group):
        super().__init__(config)
        self.tp_group = tp_group
        self.sequence_parallel = config.sequence_parallel
        self.input_size, self.rank, self.output_size = input_size, rank, output_size
        self.down_weight = new_parameter(config, rank, input_size)
        self.down_weight.sequence_parallel = config.sequence_parallel
        local_out = output_size // tp_group.size()
        self.up_weight = new_parameter(config, local_out, rank)
        set_tensor_model_parallel_attributes(self.up_weight, True, 0, 1)
        self.up_bias = None
        if bias:
            self.up_bias = new_parameter(config, local_out)
            set_tensor_model_parallel_attributes(self.up_bias, True, 0, 1)

    def reset_parameters(self) -> None:
        """down from the default generator (identical on all TP ranks), up from the TP tracker."""
        xavier_uniform_(self.down_weight, self.input_size, self.rank)
        with get_cuda_rng_tracker().fork():
            xavier_uniform_(self.up_weight, self.rank, self.output_size)
        if self.up_bias is not None:
            with torch.no_grad():
                self.up_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(x, self.down_weight)
        if self.sequence_parallel:
            low = gather_from_sequence_parallel_region(low, tensor_parallel_output_grad=True,
                                                       group=self.tp_group)
        else:
            low = copy_to_tensor_model_parallel_region(low, group=self.tp_group)
        return F.linear(low, self.up_weight, self.up_bias)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return own_parameters_sharded(self, prefix, {"up_weight": 0, "up_bias": 0}, sharded_offsets,
                                      metadata, self.tp_group)


class HeadwiseGatedRMSNorm(torch.nn.Module):
    """RMSNorm over each head's d_v channels with one weight shared by all heads, times silu(gate)
    (gdn2_pointwise.gated_norm_output). Each rank holds some heads, so the weight's gradient is
    summed over the TP group."""

    def __init__(self, config, head_dim: int, eps: float, tp_group):
        super().__init__()
        self.eps = eps
        self.tp_group = tp_group
        self.weight = new_parameter(config, head_dim, fill=1.0)

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o [b, s, heads, d], gate [s, b, heads * d] -> [s, b, heads * d]."""
        weight = copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
        return gated_norm_output(o, gate, weight, self.eps)


def check_gdn2_shapes(config, tp_size: int) -> None:
    """ValueError naming the config field when heads do not split evenly or are inconsistent."""
    heads, v_heads = config.gdn2_num_heads, config.gdn2_num_v_heads
    if v_heads % heads:
        raise ValueError(f"gdn2_num_v_heads={v_heads} must be a multiple of gdn2_num_heads={heads}")
    for field, value in (("gdn2_num_heads", heads), ("gdn2_num_v_heads", v_heads)):
        if value % tp_size:
            raise ValueError(f"{field}={value} is not divisible by tensor_model_parallel_size={tp_size}")


class GatedDeltaNet2(MegatronModule):
    """GDN-2 mixer: [s, b, d] -> ([s, b, d], None), s being the rank's sequence shard under sequence
    parallelism. Built by TransformerLayer as its self_attention, which also passes cp_comm_type
    (context parallelism, refused here) and, from megatron-core 0.17, the module name."""

    def __init__(self, config, submodules: GatedDeltaNet2Submodules, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None, cp_comm_type: str | None = None,
                 name: str | None = None):
        super().__init__(config)
        if config.context_parallel_size != 1:
            raise ValueError("GatedDeltaNet2 does not support context parallelism "
                             f"(context_parallel_size={config.context_parallel_size})")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()
        check_gdn2_shapes(config, tp_size)
        self.layer_number = layer_number
        self.head_k_dim, self.head_v_dim = config.gdn2_head_k_dim, config.gdn2_head_v_dim
        self.key_dim = config.gdn2_num_heads * self.head_k_dim
        self.value_dim = config.gdn2_num_v_heads * self.head_v_dim
        self.local_heads = config.gdn2_num_heads // tp_size
        self.local_v_heads = config.gdn2_num_v_heads // tp_size
        self.local_key_dim, self.local_value_dim = self.key_dim // tp_size, self.value_dim // tp_size
        self.erase_scale = 2.0 if config.gdn2_allow_neg_eigval else 1.0
        self.kernel_backend = config.gdn2_kernel_backend
        d = config.hidden_size

        self.in_proj = build_module(
            submodules.in_proj, d, 3 * self.key_dim + 2 * self.value_dim, config=config,
            init_method=initialized_by_mixer, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group)
        conv_channels = 2 * self.local_key_dim + self.local_value_dim
        self.conv_weight = new_parameter(config, conv_channels, config.gdn2_conv_kernel)
        set_tensor_model_parallel_attributes(self.conv_weight, True, 0, 1)
        self.decay_proj = LowRankColumnParallel(config, d, config.gdn2_decay_low_rank_dim, self.key_dim,
                                                bias=False, tp_group=self.tp_group)
        self.A_log = new_parameter(config, self.local_heads)
        self.dt_bias = new_parameter(config, self.local_key_dim)
        for param in (self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(param, True, 0, 1)
            param._no_weight_decay = True
        self.gate_proj = LowRankColumnParallel(config, d, config.gdn2_gate_low_rank_dim, self.value_dim,
                                               bias=True, tp_group=self.tp_group)
        self.out_norm = HeadwiseGatedRMSNorm(config, self.head_v_dim, config.layernorm_epsilon, self.tp_group)
        self.out_proj = build_module(
            submodules.out_proj, self.value_dim, d, config=config, init_method=initialized_by_mixer,
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="fc2", tp_group=self.tp_group)
        if config.perform_initialization:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.hidden_size
        in_roles = self._in_proj_roles()
        with torch.no_grad(), get_cuda_rng_tracker().fork():
            rows = self.in_proj.weight.split([size for _, size, _ in in_roles])
            for (_, _, fan_out), block in zip(in_roles, rows):
                xavier_uniform_(block, d, fan_out)
            bound = 1.0 / math.sqrt(self.conv_weight.shape[1])
            self.conv_weight.uniform_(-bound, bound)
            self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*A_INIT_RANGE).log())
            low, high = (math.log(x) for x in DT_INIT_RANGE)
            dt = torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(low, high).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
            xavier_uniform_(self.out_proj.weight, self.value_dim, d)
        self.decay_proj.reset_parameters()
        self.gate_proj.reset_parameters()

    def _in_proj_roles(self):
        """(name, local rows, full fan-out) of each role of the fused in_proj, in row order."""
        key, value = (self.local_key_dim, self.key_dim), (self.local_value_dim, self.value_dim)
        return [(name, *dims) for name, dims in
                (("q", key), ("k", key), ("v", value), ("b", key), ("w", value))]

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None,
                packed_seq_params: PackedSeqParams | None = None, **attention_only_kwargs):
        """attention_mask is unused (the mixer is causal); rotary embeddings and the other
        attention-only arguments the TransformerLayer passes are ignored."""
        if inference_context is not None:
            raise NotImplementedError("GatedDeltaNet2 has no Megatron inference path; generate with the "
                                      "exported Hugging Face model")
        cu_seqlens = self._packed_boundaries(packed_seq_params)
        projected, _ = self.in_proj(hidden_states)  # [s, b, q | k | v | erase | write]
        seq_len, batch = projected.shape[:2]
        q, k, v, g, erase, write = mixer_inputs(
            projected, self.conv_weight, positions_in_sequence(seq_len, batch, cu_seqlens, projected.device),
            self.decay_proj(hidden_states), self.A_log, self.dt_bias, self.erase_scale, self.head_k_dim,
            self.head_v_dim, kernel_backend=self.kernel_backend)
        group = self.local_v_heads // self.local_heads
        if group > 1:
            q, k, g, erase = (x.repeat_interleave(group, dim=2) for x in (q, k, g, erase))
        out, _ = gdn2_kernels.chunk_gdn2(
            q, k, v, g, erase, write, scale=None, initial_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=False,  # mixer_inputs normalised q and k
            cu_seqlens=cu_seqlens, backend=self.kernel_backend,
            # g <= 0 by construction and Megatron built cu_seqlens: no per-step GPU sync.
            check_values=False)
        return self.out_proj(self.out_norm(out, self.gate_proj(hidden_states)))

    @staticmethod
    def _packed_boundaries(packed_seq_params: PackedSeqParams | None) -> torch.Tensor | None:
        if packed_seq_params is None:
            return None
        if packed_seq_params.qkv_format != "thd":
            raise ValueError("packed_seq_params.qkv_format must be 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        padded = packed_seq_params.cu_seqlens_q_padded
        return packed_seq_params.cu_seqlens_q if padded is None else padded

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = own_parameters_sharded(self, prefix, {"A_log": 0, "dt_bias": 0, "conv_weight": 0},
                                         sharded_offsets, metadata, self.tp_group)
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        roles = self._in_proj_roles()
        in_key = f"{prefix}in_proj.weight"
        sharded[in_key] = split_by_role(sharded[in_key], [rows for _, rows, _ in roles],
                                        [name for name, _, _ in roles])
        conv_key = f"{prefix}conv_weight"
        sharded[conv_key] = split_by_role(sharded[conv_key], [rows for _, rows, _ in roles[:3]],
                                          [name for name, _, _ in roles[:3]])
        return sharded
