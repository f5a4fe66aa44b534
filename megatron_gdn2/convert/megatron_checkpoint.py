"""Reading model tensors out of a Megatron-Core distributed (torch_dist) checkpoint, at TP=1.

A torch_dist checkpoint stores every sharded tensor under its global key and global shape, however
many ranks wrote it, so any tensor of the TP=1 model can be read with torch.distributed.checkpoint
alone: no process group, no Megatron model, and only the requested region is read from disk.

Key conventions handled (see megatron_gdn2.models for the model's state-dict keys):
- layers stacked along a leading axis of num_layers (`decoder.layers.<name>`, homogeneous layers)
  or stored one by one (`decoder.layers.<i>.<name>`);
- fused weights stored per role (`in_proj.weight.q`, ..., `conv_weight.v`) and reassembled in role
  order; the SwiGLU fc1 stored whole or as `linear_fc1.weight_w` / `linear_fc1.weight_v`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

LATEST_FILE = "latest_checkpointed_iteration.txt"
LAYER_PREFIX = "decoder.layers."
# Role order of the fused weights of the GDN-2 mixer (megatron_gdn2.layers.gdn2_mixer).
FUSED_ROLES = {
    "self_attention.in_proj.weight": ("q", "k", "v", "b", "w"),
    "self_attention.conv_weight": ("q", "k", "v"),
}
SWIGLU_HALVES = {"mlp.linear_fc1.weight": ("_w", "_v")}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or lacks a tensor the model needs."""


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """An iteration directory (`.../iter_0000200`), or a save directory whose
    latest_checkpointed_iteration.txt names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    tracker = path / LATEST_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
        path = path / f"iter_{int(text):07d}"
    if not (path / "metadata.json").is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a complete torch_dist checkpoint (metadata.json and .metadata "
                              f"expected; pass an iter_XXXXXXX directory or a --save directory with "
                              f"{LATEST_FILE})")
    return path


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads one region of each requested checkpoint tensor into a given destination tensor."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.regions[index.fqn][1]


class MegatronCheckpoint:
    """Random access to the TP=1 model tensors of one checkpoint (`tensor(name)` with the names of
    the TP=1 `model.state_dict()`), plus its common state (`common`)."""

    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint_dir(path)
        self._reader = dcp.FileSystemReader(str(self.path))
        metadata = self._reader.read_metadata().state_dict_metadata
        tensors = {key: md for key, md in metadata.items() if isinstance(md, TensorStorageMetadata)}
        self.shapes = {key: tuple(md.size) for key, md in tensors.items()}
        self.dtypes = {key: md.properties.dtype for key, md in tensors.items()}
        self.common = torch.load(self.path / "common.pt", map_location="cpu", weights_only=False) \
            if (self.path / "common.pt").is_file() else {}

    def _locate(self, name: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(checkpoint key, offsets, region shape) of the pieces of model tensor `name`, in order.
        A piece of a stacked key has a leading axis of 1 (its layer)."""
        layer, suffix = None, name
        if name.startswith(LAYER_PREFIX):
            index, suffix = name[len(LAYER_PREFIX):].split(".", 1)
            layer = int(index)
        layouts = [("",)]
        layouts += [tuple(f".{role}" for role in FUSED_ROLES[suffix])] if suffix in FUSED_ROLES else []
        layouts += [SWIGLU_HALVES[suffix]] if suffix in SWIGLU_HALVES else []
        for parts in layouts:
            keys = [suffix + part for part in parts]
            if layer is not None:
                per_layer = [f"{LAYER_PREFIX}{layer}.{k}" for k in keys]
                if all(k in self.shapes for k in per_layer):
                    keys = per_layer
                else:
                    keys = [f"{LAYER_PREFIX}{k}" for k in keys]
                    if all(k in self.shapes for k in keys):
                        return [self._layer_of_stack(name, k, layer) for k in keys]
            if all(k in self.shapes for k in keys):
                return [(k, (0,) * len(self.shapes[k]), self.shapes[k]) for k in keys]
        raise CheckpointError(f"{self.path}: the checkpoint has no tensor for {name} (model tensors there: "
                              f"{self.model_key_summary()})")

    def _layer_of_stack(self, name, key, layer):
        shape = self.shapes[key]
        if layer >= shape[0]:
            raise CheckpointError(f"{self.path}: {name}: layer {layer} is beyond the {shape[0]} layers "
                                  f"stacked in {key}")
        return key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])

    def model_key_summary(self) -> str:
        keys = sorted(k for k in self.shapes if not k.startswith("optimizer."))
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    def shape(self, name: str) -> tuple[int, ...]:
        """The TP=1 shape of model tensor `name` as stored."""
        shapes = [shape if shape == self.shapes[key] else shape[1:] for key, _, shape in self._locate(name)]
        return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else tuple(shapes[0])

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes[self._locate(name)[0][0]]

    def has(self, name: str) -> bool:
        try:
            self._locate(name)
        except CheckpointError:
            return False
        return True

    def tensor(self, name: str) -> torch.Tensor:
        """The TP=1 tensor `name` (a key of the TP=1 model.state_dict()), in the checkpoint's dtype."""
        return self.tensors([name])[name]

    def tensors(self, names) -> dict[str, torch.Tensor]:
        """Several TP=1 tensors, read from disk in one pass."""
        located = {name: self._locate(name) for name in names}
        regions = {key: (offsets, torch.empty(shape, dtype=self.dtypes[key]))
                   for pieces in located.values() for key, offsets, shape in pieces}
        with warnings.catch_warnings():
            # One process reading on purpose (no_dist=True); torch warns about it on every call.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({key: dest for key, (_, dest) in regions.items()}, storage_reader=self._reader,
                     planner=_RegionLoadPlanner(regions), no_dist=True)
        out = {}
        for name, pieces in located.items():
            parts = [regions[key][1] if shape == self.shapes[key] else regions[key][1][0]
                     for key, _, shape in pieces]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out
