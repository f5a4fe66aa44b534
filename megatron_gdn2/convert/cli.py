"""`gdn2-convert`: Megatron checkpoint <-> Hugging Face directory."""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_gdn2.convert.mapping import ConversionError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdn2-convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    to_hf = commands.add_parser("to-hf", help="Megatron distributed checkpoint (any TP/PP) -> HF directory")
    to_hf.add_argument("checkpoint", help="an iter_XXXXXXX directory, or a --save directory (its latest one)")
    to_hf.add_argument("out", help="the HF directory to write")
    to_hf.add_argument("--tokenizer", help="tokenizer.json, SentencePiece .model or GPT-2 encoder.json/"
                                           "vocab.bpe directory (default: the one the training run recorded)")
    to_hf.add_argument("--model", help="model config name (default: the one the training run recorded)")
    to_hf.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                       help="weights dtype (auto: the checkpoint's)")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0)
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    from_hf = commands.add_parser("from-hf",
                                  help="HF directory -> Megatron checkpoint gdn2-pretrain can continue from")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("out", help="checkpoint directory to write (iter_0000000 + the latest pointer)")
    from_hf.add_argument("--tensor-model-parallel-size", type=int, default=1)
    from_hf.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    from_hf.add_argument("--model", help="model config name (default: the registered config with this "
                                         "architecture)")
    from_hf.add_argument("--tokenizer", help="tokenizer to record for training (default: the HF directory)")
    from_hf.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                         help="parameter dtype (auto: the HF weights')")
    from_hf.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "to-hf":
            from megatron_gdn2.convert.to_hf import export_to_hf

            out = export_to_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, model=args.model,
                               dtype=args.dtype, max_shard_size_gb=args.max_shard_size_gb,
                               overwrite=args.overwrite)
        else:
            from megatron_gdn2.convert.from_hf import import_from_hf

            out = import_from_hf(args.hf_dir, args.out, tensor_parallel=args.tensor_model_parallel_size,
                                 pipeline_parallel=args.pipeline_model_parallel_size, model=args.model,
                                 tokenizer=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    except (ConversionError, ValueError) as err:
        print(f"gdn2-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
