"""Greedy text from a ``gdn2-pretrain`` checkpoint (a smoke test of a trained model).

    python -m megatron_gdn2.training.generate --load DIR --prompt "The history of" --max-new-tokens 40

One process, TP = PP = 1 (dist_checkpointing reshards a checkpoint of any layout into it). Every
new token re-runs the whole sequence through the Megatron model (full recomputation, no recurrent
state cache): simple and exact, quadratic in length; not a serving path. The tokenizer is the one
recorded in the checkpoint's configuration unless ``--tokenizer`` is given.
"""
from __future__ import annotations

import argparse
import sys

import torch

from megatron_gdn2.training.pretrain import configure_logging

__all__ = ["greedy_generate", "main"]


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, *, vocab_size: int,
                    eod: int | None = None, device: torch.device) -> list[int]:
    """The new token ids (stops early at `eod`); `vocab_size` excludes the padded logits."""
    ids = list(prompt_ids)
    model.eval()
    for _ in range(max_new_tokens):
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device).unsqueeze(0)
        logits = model(tokens, positions, None)
        next_id = int(logits[0, -1, :vocab_size].argmax())
        ids.append(next_id)
        if next_id == eod:
            break
    return ids[len(prompt_ids):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_gdn2.training.generate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (as given to --save)")
    p.add_argument("--load-iteration", type=int, default=None)
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--tokenizer", default=None, help="default: the one the run was trained with")
    args = p.parse_args(argv)
    configure_logging()

    from megatron.core import dist_checkpointing

    from megatron_gdn2.configs import ModelConfig
    from megatron_gdn2.data.tokenizers import load_tokenizer
    from megatron_gdn2.models import build_model, make_transformer_config
    from megatron_gdn2.training.checkpointing import resolve_load_path
    from megatron_gdn2.training.config import ConfigError, PretrainConfig
    from megatron_gdn2.training.cpu_support import enable_megatron_on_cpu
    from megatron_gdn2.training.distributed import device, init_distributed, set_seeds, shutdown_distributed

    probe = PretrainConfig()
    probe.checkpoint.load, probe.checkpoint.load_iteration = args.load, args.load_iteration
    try:
        path = resolve_load_path(probe)
    except ConfigError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    if path is None:
        print(f"generate: error: no checkpoint in {args.load}", file=sys.stderr)
        return 2
    common = dist_checkpointing.load_common_state_dict(str(path))
    cfg = PretrainConfig.from_dict(common["config"])
    model_cfg = ModelConfig(**common["model_config"])
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer)

    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    created = init_distributed(cfg.parallel)
    try:
        set_seeds(cfg.seed)
        bf16 = torch.cuda.is_available()
        tc = make_transformer_config(model_cfg, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                     bf16=bf16, kernel_backend=cfg.kernel_backend)
        model = build_model(model_cfg, tc)
        if torch.cuda.is_available():
            model.cuda()
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(loaded["model"], strict=True)
        print(f"loaded {path} ({model_cfg.name}, iteration {common['train_state']['iteration']})")
        for prompt in args.prompt:
            ids = tokenizer.encode(prompt)
            new = greedy_generate(model, ids, args.max_new_tokens, vocab_size=tokenizer.vocab_size,
                                  eod=tokenizer.eod, device=device())
            print(f"--- prompt: {prompt!r}\n{tokenizer.decode(ids + new)}", flush=True)
    finally:
        if created:
            shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
