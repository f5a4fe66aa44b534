"""Hugging Face model directory -> Megatron distributed checkpoint that gdn2-pretrain continues from.

The model is built once at TP=1 / PP=1 on the CPU (a one-process gloo group), filled tensor by
tensor from the safetensors shards, and saved with Megatron's dist_checkpointing through its own
`sharded_state_dict()`, so the checkpoint has exactly the keys training writes. A torch_dist
checkpoint holds global tensors and loads at any TP/PP; the layout asked for is validated against
the model (heads and layers must split evenly) and recorded as the run's parallel config. The
architecture is recorded as a registered model config name plus the `--model-override`s that turn
it into the HF config's (none for an export of a registered config).

Directory layout is the training one (megatron_gdn2.training.checkpointing):
`<out>/iter_0000000/` and `<out>/latest_checkpointed_iteration.txt`. The checkpoint holds weights
only (no optimizer or RNG state, `weights_only: True` in its common state): continue with
`gdn2-pretrain --load <out> ...` (the loader skips the absent optimizer and RNG state).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from megatron_gdn2.configs import ModelConfig
from megatron_gdn2.convert.mapping import ConversionError, model_config_for, tensor_maps
from megatron_gdn2.hf import GDN2Config

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
IMPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class HFWeights:
    """Lazy access to the tensors of an HF directory (sharded with an index, or one file)."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConversionError(f"{directory}: no {INDEX_FILE} or model.safetensors")
        self.directory, self.weight_map = directory, weight_map
        self._files = {}

    def _file(self, name: str):
        if not self.has(name):
            raise ConversionError(f"{self.directory}: tensor {name} is missing from the safetensors files")
        return self._files[self.weight_map[name]]

    def has(self, name: str) -> bool:
        filename = self.weight_map.get(name)
        if filename is None:
            return False
        if filename not in self._files:
            if not (self.directory / filename).is_file():
                raise ConversionError(f"{self.directory}: {filename}, named in the index, does not exist")
            self._files[filename] = safe_open(self.directory / filename, "pt")
        return name in self._files[filename].keys()

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())


def check_hf_weights(weights: HFWeights, model_cfg: ModelConfig) -> None:
    """Every tensor the model needs is there with its shape (read from the headers only)."""
    problems = []
    for m in tensor_maps(model_cfg):
        if not weights.has(m.hf_name):
            problems.append(f"{m.hf_name} is missing")
        elif weights.shape(m.hf_name) != m.hf_shape:
            problems.append(f"{m.hf_name} has shape {weights.shape(m.hf_name)}, expected {m.hf_shape}")
    if problems:
        raise ConversionError(f"{weights.directory} does not hold the weights of {model_cfg.name}: "
                              + "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)"
                                                             if len(problems) > 10 else ""))


def _init_single_process_megatron():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gdn2.training.cpu_support import enable_megatron_on_cpu

    enable_megatron_on_cpu()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConversionError("from-hf runs in one process; do not launch it with torchrun")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def check_layout(model_cfg: ModelConfig, tp: int, pp: int) -> None:
    """ValueError naming the field when the model does not split into TP x PP."""
    from megatron_gdn2.models import make_transformer_config

    if pp > model_cfg.num_layers:
        raise ConversionError(f"--pipeline-model-parallel-size {pp} exceeds the {model_cfg.num_layers} "
                              f"layers of {model_cfg.name}")
    if model_cfg.num_layers % pp:
        raise ConversionError(f"{model_cfg.name}: num_layers={model_cfg.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}")
    make_transformer_config(model_cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def build_megatron_model(model_cfg: ModelConfig, dtype: torch.dtype):
    from megatron_gdn2.models import build_model, make_transformer_config

    config = make_transformer_config(model_cfg, params_dtype=dtype, perform_initialization=False,
                                     use_cpu_initialization=True, transformer_impl="local")
    return build_model(model_cfg, config)


def fill_from_hf(model, weights: HFWeights, model_cfg: ModelConfig) -> None:
    """Copies every HF tensor into its rows of the model's parameters; every parameter row must be
    written exactly once."""
    params = model.state_dict(keep_vars=True)
    written = {name: torch.zeros(p.shape[0] if p.dim() else 1, dtype=torch.int32)
               for name, p in params.items() if not name.endswith("_extra_state")}
    with torch.no_grad():
        for m in tqdm(tensor_maps(model_cfg), desc="import tensors", unit="tensor"):
            if m.megatron_name not in params:
                raise ConversionError(f"the Megatron model of {model_cfg.name} has no parameter "
                                      f"{m.megatron_name}")
            tensor = weights.get(m.hf_name)
            target = params[m.megatron_name]
            m.write_megatron(target.data, tensor.to(target.dtype))
            written[m.megatron_name][slice(None) if m.rows is None else m.rows] += 1
    wrong = [name for name, count in written.items() if not torch.all(count == 1)]
    if wrong:
        raise ConversionError(f"parameters not written exactly once from the HF tensors: {wrong[:5]}")


def _write_latest(directory: Path, iteration: int) -> None:
    from megatron_gdn2.training.checkpointing import LATEST_FILE

    tmp = directory / (LATEST_FILE + ".tmp")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, directory / LATEST_FILE)


def import_from_hf(hf_dir: str | Path, out: str | Path, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                   model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                   overwrite: bool = False) -> Path:
    """Writes `<out>/iter_0000000` (+ the latest pointer); returns the iteration directory."""
    from megatron.core import dist_checkpointing

    from megatron_gdn2.training.checkpointing import TrainState, checkpoint_path
    from megatron_gdn2.training.config import DataSettings, ParallelConfig, PretrainConfig

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} exists and is not empty (pass --overwrite)")
    config = GDN2Config.from_pretrained(hf_dir)
    model_cfg, overrides = model_config_for(config, model)
    if overrides:
        log.info("%s is %s with --model-override %s", hf_dir, model_cfg.name, " ".join(overrides))
    check_layout(model_cfg, tensor_parallel, pipeline_parallel)
    weights = HFWeights(hf_dir)
    check_hf_weights(weights, model_cfg)
    if dtype == "auto":
        torch_dtype = weights.get("model.embed_tokens.weight").dtype
    elif dtype in IMPORT_DTYPES:
        torch_dtype = IMPORT_DTYPES[dtype]
    else:
        raise ConversionError(f"--dtype must be auto, {', '.join(IMPORT_DTYPES)}; got {dtype!r}")

    _init_single_process_megatron()
    megatron_model = build_megatron_model(model_cfg, torch_dtype)
    fill_from_hf(megatron_model, weights, model_cfg)

    run = PretrainConfig(
        model=model_cfg.name, model_overrides=overrides, seq_length=model_cfg.seq_length,
        parallel=ParallelConfig(tensor_model_parallel_size=tensor_parallel,
                                pipeline_model_parallel_size=pipeline_parallel),
        data=DataSettings(tokenizer=str(tokenizer or hf_dir)),
    )
    layout = {"tensor_model_parallel_size": tensor_parallel,
              "pipeline_model_parallel_size": pipeline_parallel, "data_parallel_size": 1}
    final = checkpoint_path(out, 0)
    partial = final.with_name(final.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    common = {"train_state": asdict(TrainState()), "layout": layout, "config": run.to_dict(),
              "model_config": asdict(model_cfg), "weights_only": True}
    dist_checkpointing.save({"model": megatron_model.sharded_state_dict(), **common}, str(partial))
    info = {**common, "converted_from": str(hf_dir)}
    (partial / "train_state.json").write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    _write_latest(out, 0)
    log.info("imported %s (%s) into %s", hf_dir, model_cfg.name, final)
    return final
