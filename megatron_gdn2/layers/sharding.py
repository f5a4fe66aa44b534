"""Distributed-checkpoint metadata for parameters the GDN-2 layers hold themselves.

A fused column-parallel weight stores, on every tensor-parallel rank, the rank's slice of each role
one after another ([q_r | k_r | v_r | ...]); saved as one tensor, the global layout would depend on
the TP size. `split_by_role` saves every role as its own global tensor instead, so a checkpoint
written at one TP size loads exactly at any other.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)


def own_parameters_sharded(module: torch.nn.Module, prefix: str, tp_axis_map: dict[str, int],
                           sharded_offsets, metadata, tp_group) -> dict:
    """ShardedTensors for the parameters registered directly on `module` (not its children):
    those named in `tp_axis_map` are split across tensor-parallel ranks along the given axis, the
    rest are replicated."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    state = {}
    module._save_to_state_dict(state, "", keep_vars=True)
    return make_sharded_tensors_for_checkpoint(
        state, prefix, tp_axis_map, sharded_offsets, tp_group=tp_group,
        dp_cp_group=metadata["dp_cp_group"])


def split_by_role(sharded: ShardedTensor, sections: list[int], names: list[str],
                  dim: int = 0) -> ShardedTensorFactory:
    """Saves the local sections of a fused TP-sharded tensor as separate tensors `<key>.<name>`,
    each TP-sharded on its own; loading concatenates them back into the local layout."""
    if sum(sections) != sharded.local_shape[dim]:
        raise ValueError(f"{sharded.key}: role sections {sections} do not add up to the local size "
                         f"{sharded.local_shape[dim]} along dim {dim}")
    template = sharded.without_data()

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise ValueError(f"{key}: flattened (fully_sharded_model_space) optimizer checkpoints are not "
                             "supported for fused GDN-2 weights; use the dp_reshardable or "
                             "fully_reshardable distributed-optimizer format")
        whole = replace(template, key=key, data=data, dtype=data.dtype, replica_id=replica_id)
        parts, start = [], 0
        for size, name in zip(sections, names):
            (part,) = whole.narrow(dim, start, size)
            part.key = f"{key}.{name}"
            parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(parts):
        return torch.cat(parts, dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
