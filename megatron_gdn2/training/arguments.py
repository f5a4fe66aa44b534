"""Command line of ``gdn2-pretrain``: Megatron-style flags, plus the GDN-2 reference release's flags.

Native flags (dashes), for example::

    gdn2-pretrain --model swa_gdn2_1.3B --tokenizer tok.model \\
        --train-data /data/fineweb_text_document --seq-length 4096 \\
        --micro-batch-size 4 --global-batch-size 128 --train-tokens 100B \\
        --tensor-model-parallel-size 1 --use-distributed-optimizer --save /ckpt/run1

The reference release's flags (underscores) also work, with its meanings::

    gdn2-pretrain --train_data_dir DIR --val_data_dir DIR --output_root OUT --exp_name NAME \\
        --model_name swa_gdn2_1.3B --train_config tsz512x4k_20B --eval_iters 15 \\
        --learning_rate 4e-4 --micro_batch_size 0 --interactive_job --debug

- ``--train_config tsz{G}x{S}_{T}``: global batch of G sequences of S tokens (``4k`` = 4096) for T
  tokens (``20B`` = 2e10); e.g. ``tsz512x4k_20B``. As in the release, warm-up is 1% of T and the
  cosine floor is 10% of the peak (explicit --lr-warmup-tokens / --min-lr-ratio win).
- ``--train_data_dir`` / ``--val_data_dir``: directories; every ``*.bin``/``*.idx`` pair in them
  is used (the training blend weights them by size). Without ``--val_data_dir`` validation is a
  split of the training data. ``--tokenizer_path`` (as in the release) names the tokenizer the data
  was preprocessed with.
- Checkpoints go to ``{output_root}/outputs/{train_config}_{exp_name}``, wandb files to
  ``{output_root}/wandb/{train_config}_{exp_name}``; an existing checkpoint there is resumed.
- ``--micro_batch_size 0`` picks the largest micro batch <= 8 (<= 4 for 1.3B models) that divides
  the per-data-parallel-rank batch.
- ``--debug`` disables wandb (as in the release) and logs every step; ``--interactive_job`` is
  accepted for compatibility (the release used it to pick an FSDP sharding; here the layout comes
  from the TP/PP flags, so it changes nothing).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from megatron_gdn2.training.config import (
    CheckpointConfig,
    ConfigError,
    DataSettings,
    LoggingConfig,
    OptimizerSettings,
    ParallelConfig,
    PretrainConfig,
    parse_count,
)

__all__ = ["build_parser", "config_from_args", "parse_train_config"]


def parse_train_config(name: str) -> tuple[int, int, int]:
    """``"tsz512x4k_20B" -> (512, 4096, 20_000_000_000)``: (sequences per step, sequence length,
    training tokens)."""
    m = re.fullmatch(r"tsz(\d+)x(\d+)([kK]?)_([0-9.]+[KMBTkmbt]?)", name)
    if not m:
        raise ConfigError(
            f"--train_config {name!r}: expected tsz{{SEQS}}x{{LEN}}_{{TOKENS}}, e.g. tsz512x4k_20B "
            "(512 sequences of 4096 tokens per step, 20B tokens)")
    seq_length = int(m.group(2)) * (1024 if m.group(3) else 1)
    return int(m.group(1)), seq_length, parse_count(m.group(4), "--train_config tokens")


def _count(what):
    def parse(text):
        try:
            return parse_count(text, what)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gdn2-pretrain",
        description="Pretrain a Gated DeltaNet-2 language model with Megatron-Core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", "--model_name", dest="model", default="swa_gdn2_tiny",
                   help="model config name, e.g. swa_gdn2_1.3B, gdn2_tiny")
    g.add_argument("--model-override", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a field of the model config, e.g. hidden_size=128 (repeatable)")
    g.add_argument("--tokenizer", "--tokenizer_path", dest="tokenizer", default=None,
                   help="tokenizer.json, SentencePiece .model, or a directory with GPT-2 files")
    g.add_argument("--train-data", nargs="+", default=None, metavar="PREFIX",
                   help="dataset prefixes (.bin/.idx), optionally weighted: W1 P1 W2 P2")
    g.add_argument("--valid-data", nargs="+", default=None, metavar="PREFIX")
    g.add_argument("--split", default="98,2,0", help="train,valid,test split of --train-data")
    g.add_argument("--data-cache-dir", default=None, help="where Megatron writes dataset indices")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--data-backend", choices=("torch", "dali"), default="torch",
                   help="micro-batch loader: torch (default) or dali (same batches, needs the dali extra)")
    g.add_argument("--seq-length", type=_count("--seq-length"), default=None)
    g.add_argument("--kernel-backend", default=None, help="GDN-2 kernel backend (default: model's)")
    g.add_argument("--swa-attention-impl", default=None,
                   help="SWA core attention: te, cudnn, flex, sdpa or local (default: te with Transformer "
                        "Engine, else cudnn on a GPU with nvidia-cudnn-frontend installed, else flex)")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion",
                   action="store_false",
                   help="add each weight gradient to the fp32 main_grad in a separate pass instead of in "
                        "its GEMM (the fused form needs a GPU and apex or a torch with addmm's out_dtype)")

    g = p.add_argument_group("batch and length")
    g.add_argument("--micro-batch-size", "--micro_batch_size", dest="micro_batch_size", type=int,
                   default=None,
                   help="default 1 (reference command line: 0); 0: automatic, the largest <= 8 "
                        "(<= 4 for 1.3B models) that divides the per-data-parallel-rank batch")
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-tokens", type=_count("--train-tokens"), default=None, help="e.g. 100B")
    g.add_argument("--train-iters", type=int, default=None)

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=4e-4,
                   help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor / peak (default 0.1)")
    g.add_argument("--lr-warmup-tokens", type=_count("--lr-warmup-tokens"), default=None,
                   help="default 1B (reference CLI: 1%% of the tokens)")
    g.add_argument("--lr-decay-tokens", type=_count("--lr-decay-tokens"), default=None)
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", "--beta1", dest="adam_beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", "--beta2", dest="adam_beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", "--grad_clip", dest="clip_grad", type=float, default=1.0)

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets over data-parallel ranks while backward runs")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather the distributed optimizer's updated parameters bucket by bucket "
                        "during the next forward pass")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                   help="activation recomputation")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="stop (after saving the last good state) after this many non-finite "
                        "losses in a row; each one skips its step")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory (resumed from if it has one)")
    g.add_argument("--load", default=None, help="start from this checkpoint directory instead")
    g.add_argument("--load-iteration", type=int, default=None, help="load this iteration, not latest")
    g.add_argument("--save-interval", "--save_step_interval", dest="save_interval", type=int,
                   default=1000)
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (0: all)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit at multiples of N")
    g.add_argument("--exit-duration-mins", type=float, default=None,
                   help="save and exit after this much wall time")
    g.add_argument("--ckpt-optim-format", choices=["fully_reshardable", "dp_reshardable"],
                   default="fully_reshardable",
                   help="distributed-optimizer state: loadable at any layout, or parallel per-rank "
                        "shards loadable only at the same TP/PP")
    g.add_argument("--signal-exit-code", type=int, default=0,
                   help="exit status after a SIGTERM/SIGUSR1-triggered save")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", "--log_step_interval", dest="log_interval", type=int, default=10)
    g.add_argument("--eval-interval", "--eval_step_interval", dest="eval_interval", type=int,
                   default=1000)
    g.add_argument("--eval-iters", "--eval_iters", dest="eval_iters", type=int, default=None,
                   help="validation steps (global batches) per evaluation (default 15)")
    g.add_argument("--wandb-project", default=None, help="enables wandb logging")
    g.add_argument("--wandb-name", default=None)
    g.add_argument("--wandb-group", "--exp_group", dest="wandb_group", default=None)
    g.add_argument("--wandb-dir", "--wandb_dir", dest="wandb_dir", default=None)
    g.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: from the GPU model)")
    g.add_argument("--profile", action="store_true",
                   help="torch.profiler over a window of steps: a Chrome trace per profiled rank and "
                        "a summary of kernel, communication and overlapped time")
    g.add_argument("--profile-step-start", type=int, default=5)
    g.add_argument("--profile-step-end", type=int, default=7)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--profile-dir", default=None, help="default: <save>/profile, else ./profile")

    g = p.add_argument_group("GDN-2 reference release command line")
    g.add_argument("--train_data_dir", default=None)
    g.add_argument("--val_data_dir", default=None)
    g.add_argument("--output_root", default=None)
    g.add_argument("--exp_name", default=None)
    g.add_argument("--train_config", default=None, help="e.g. tsz512x4k_20B")
    g.add_argument("--interactive_job", action="store_true")
    g.add_argument("--debug", action="store_true")
    return p


def _dataset_prefixes(directory: str, flag: str) -> list[str]:
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"{flag}: {directory} is not a directory")
    prefixes = sorted(str(idx.with_suffix("")) for idx in path.glob("*.idx"))
    if not prefixes:
        raise ConfigError(f"{flag}: no preprocessed dataset (*.idx/*.bin) in {directory}; "
                          "run gdn2-preprocess first")
    return prefixes


def _auto_micro_batch(per_rank_batch: int, model_name: str) -> int:
    cap = 4 if "1.3b" in model_name.lower() else 8
    return max(m for m in range(1, cap + 1) if per_rank_batch % m == 0)


def config_from_args(argv: list[str] | None = None, world_size: int | None = None) -> PretrainConfig:
    """Parses the command line into a PretrainConfig (validated later, by PretrainConfig.validate)."""
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = PretrainConfig(
        model=args.model,
        model_overrides=list(args.model_override),
        seq_length=args.seq_length or 4096,
        micro_batch_size=1 if args.micro_batch_size is None else args.micro_batch_size,
        global_batch_size=args.global_batch_size or 128,
        train_tokens=args.train_tokens,
        train_iters=args.train_iters,
        seed=args.seed,
        precision=args.precision,
        kernel_backend=args.kernel_backend,
        swa_attention_impl=args.swa_attention_impl,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        max_nonfinite_steps=args.max_nonfinite_steps,
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            sequence_parallel=args.sequence_parallel,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather,
            recompute=None if args.recompute == "none" else args.recompute,
        ),
        data=DataSettings(
            train_data=list(args.train_data or []), valid_data=list(args.valid_data or []),
            split=args.split, tokenizer=args.tokenizer, num_workers=args.num_workers,
            cache_dir=args.data_cache_dir, backend=args.data_backend,
        ),
        optim=OptimizerSettings(
            lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
            decay_tokens=args.lr_decay_tokens,
        ),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval, keep_last=args.keep_last,
            load_iteration=args.load_iteration, no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng, exit_interval=args.exit_interval,
            exit_duration_mins=args.exit_duration_mins, signal_exit_code=args.signal_exit_code,
            optim_format=args.ckpt_optim_format,
        ),
        logging=LoggingConfig(
            log_interval=args.log_interval, eval_interval=args.eval_interval,
            eval_iters=15 if args.eval_iters is None else args.eval_iters,
            wandb_project=args.wandb_project, wandb_name=args.wandb_name, wandb_group=args.wandb_group,
            wandb_dir=args.wandb_dir, wandb_mode=args.wandb_mode, peak_tflops=args.peak_tflops,
            profile=args.profile, profile_step_start=args.profile_step_start,
            profile_step_end=args.profile_step_end, profile_ranks=args.profile_ranks,
            profile_dir=args.profile_dir,
        ),
    )
    if any(v is not None for v in (args.train_data_dir, args.val_data_dir, args.train_config,
                                   args.output_root, args.exp_name)):
        _apply_reference_cli(cfg, args)
        if args.micro_batch_size is None:
            cfg.micro_batch_size = 0
    if args.min_lr_ratio is not None:
        cfg.optim.min_lr_ratio = args.min_lr_ratio
    if args.lr_warmup_tokens is not None:
        cfg.optim.warmup_tokens = args.lr_warmup_tokens
    if cfg.micro_batch_size == 0:
        dp = max(1, cfg.parallel.data_parallel_size(world_size))
        cfg.micro_batch_size = _auto_micro_batch(max(1, cfg.global_batch_size // dp), cfg.model)
    return cfg


def _apply_reference_cli(cfg: PretrainConfig, args: argparse.Namespace) -> None:
    for flag in ("train_config", "output_root", "exp_name", "train_data_dir"):
        if getattr(args, flag) is None:
            raise ConfigError(f"the reference command line needs --{flag} (got --train_data_dir, "
                              "--output_root, --exp_name, --train_config together)")
    if args.train_data or args.valid_data or args.save or args.train_tokens or args.train_iters \
            or args.global_batch_size or args.seq_length:
        raise ConfigError("the reference command line (--train_data_dir ...) sets the data, batch, "
                          "length and checkpoint directory itself: drop --train-data/--valid-data/"
                          "--save/--train-tokens/--train-iters/--global-batch-size/--seq-length")
    gbs, seq, tokens = parse_train_config(args.train_config)
    cfg.global_batch_size, cfg.seq_length, cfg.train_tokens = gbs, seq, tokens
    cfg.train_iters = None
    cfg.optim.warmup_tokens = tokens // 100
    cfg.data.train_data = _dataset_prefixes(args.train_data_dir, "--train_data_dir")
    if args.val_data_dir:
        cfg.data.valid_data = _dataset_prefixes(args.val_data_dir, "--val_data_dir")
    run_name = f"{args.train_config}_{args.exp_name}"
    cfg.checkpoint.save = str(Path(args.output_root) / "outputs" / run_name)
    cfg.logging.wandb_dir = cfg.logging.wandb_dir or str(Path(args.output_root) / "wandb" / run_name)
    cfg.logging.wandb_name = cfg.logging.wandb_name or args.exp_name
    if args.debug:
        cfg.logging.wandb_mode = "disabled"
        cfg.logging.log_interval = 1
