"""`gdn2-eval`: perplexity on a text file and LAMBADA for an HF directory or a Megatron checkpoint."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megatron_gdn2.evaluation.loading import load_model
from megatron_gdn2.evaluation.tasks import lambada, read_lambada, text_perplexity

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdn2-eval", description=__doc__)
    parser.add_argument("model",
                        help="HF directory, or Megatron checkpoint (iter_XXXXXXX or --save directory)")
    parser.add_argument("--text", default=str(DATA / "wikitext2_raw_test.lf.txt"),
                        help="text file for perplexity ('' to skip)")
    parser.add_argument("--lambada", default=str(DATA / "lambada_openai.jsonl"),
                        help="LAMBADA jsonl with context/continuation records ('' to skip)")
    parser.add_argument("--tokenizer",
                        help="tokenizer (default: the HF directory's, or the one the checkpoint records)")
    parser.add_argument("--model-config", help="model config name for a checkpoint that does not record one")
    parser.add_argument("--seq-length", type=int, default=2048, help="perplexity window (tokens of context)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens of --text")
    parser.add_argument("--max-examples", type=int, help="score only the first N LAMBADA records")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the results as JSON to this file")
    return parser


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value")]
    for task, metrics in results["tasks"].items():
        for metric, value in metrics.items():
            rows.append((task, metric, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def evaluate(args) -> dict:
    for flag, value in (("--batch-size", args.batch_size), ("--seq-length", args.seq_length)):
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not args.text and not args.lambada:
        raise ValueError("nothing to evaluate: both --text and --lambada are empty")
    for flag, path in (("--text", args.text), ("--lambada", args.lambada)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path} does not exist")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                   else torch.float32)
    start = time.time()
    model, tokenizer = load_model(args.model, tokenizer=args.tokenizer, model=args.model_config, dtype=dtype,
                                  device=args.device)
    tasks = {}
    if args.text:
        tasks["perplexity"] = {"file": args.text, **text_perplexity(
            model, tokenizer, Path(args.text).read_text(), args.seq_length, args.batch_size, args.max_tokens)}
    if args.lambada:
        records = read_lambada(args.lambada, args.max_examples)
        tasks["lambada"] = {"file": args.lambada, **lambada(model, tokenizer, records, args.batch_size)}
    return {"model": str(args.model), "dtype": str(dtype).removeprefix("torch."),
            "seq_length": args.seq_length, "seconds": round(time.time() - start, 1), "tasks": tasks}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        results = evaluate(args)
    except ValueError as err:
        print(f"gdn2-eval: error: {err}", file=sys.stderr)
        return 2
    table_results = {"tasks": {task: {k: v for k, v in metrics.items() if k != "file"}
                               for task, metrics in results["tasks"].items()}}
    print(format_table(table_results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
