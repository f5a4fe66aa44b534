"""The SWA layers' core attention on one GPU at the 1.3B hybrid's shapes (18 heads of 128, window
2048, bf16): cuDNN's windowed attention (when the cuDNN frontend is installed) and our compiled
FlexAttention with its sliding-window block mask under FlexAttention's kernel options, beside
causal SDPA over the same tokens (the cost of a window that covers the sequence),
forward+backward median times, in one process.

    python benchmarks/bench_swa.py [--shapes 4x4096,1x16384] [--profile]
        [--variants 'default;BLOCK_M=128,BLOCK_N=64']

A variant is a `,`-separated list of kernel option=value (ints); one that does not compile is
reported and skipped.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

from megatron_gdn2.layers import cudnn_attention
from megatron_gdn2.layers.swa import sliding_window_block_mask

HEADS, HEAD_DIM, WINDOW = 18, 128, 2048
# ROWS_GUARANTEED_SAFE=1 times at most 0.6% faster and gave a NaN loss in training (run 16)
VARIANTS = ("default;"
            "BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3;"
            "BLOCK_M1=64,BLOCK_N1=128,BLOCK_M2=128,BLOCK_N2=64,num_warps=8,num_stages=3")


def parse(variant):
    if variant == "default":
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in variant.split(","))}


def fwd_bwd(fn, q, k, v, grad):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out


def max_errors(fn, q, k, v, grad, expected):
    """Max |difference| / max |expected| of the output and the three input gradients."""
    results = [fwd_bwd(fn, q, k, v, grad).detach(), q.grad, k.grad, v.grad]
    return [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(results, expected)]


def fwd_bwd_ms(fn, q, k, v, grad):
    fwd_bwd(fn, q, k, v, grad)
    fwd_bwd(fn, q, k, v, grad)
    return do_bench(lambda: fwd_bwd(fn, q, k, v, grad), return_mode="median")


def kernel_table(fn, q, k, v, grad, steps=5):
    """The CUDA kernels of `steps` forward+backward calls, by device time per call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fwd_bwd(fn, q, k, v, grad)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4x4096,1x16384")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--profile", action="store_true",
                        help="also each row's kernels over 5 steps (torch profiler): bench_swa_profile.txt")
    args = parser.parse_args()
    # every variant and shape is a new graph: past torch's default limit (8) flex_attention would
    # fall back to its eager form, which materialises the scores
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(flex_attention, dynamic=False)
    profiles = []
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {HEADS} heads of "
             f"{HEAD_DIM}, window {WINDOW}, bf16, forward+backward median ms", "",
             "| shape | core attention | fwd+bwd ms | max error against fp32 Flex: o, dq, dk, dv |",
             "|---|---|---|---|"]
    for shape in args.shapes.split(","):
        batch, seq_len = map(int, shape.split("x"))
        q, k, v = (torch.randn(batch, HEADS, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        mask = sliding_window_block_mask(seq_len, WINDOW, q.device)
        # the window's reference: FlexAttention in fp32 on the same inputs
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        out = fwd_bwd(lambda q, k, v, m=mask: compiled(q, k, v, block_mask=m), *leaves, grad.float())
        expected = [out.detach(), *(x.grad for x in leaves)]
        rows = [("SDPA, full causal (reference)",
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
        if cudnn_attention.available():
            rows.append(("cudnn, window", lambda q, k, v: cudnn_attention.cudnn_window_attention(
                q, k, v, WINDOW, HEAD_DIM ** -0.5)))
        for variant in args.variants.split(";"):
            options = parse(variant)
            rows.append((f"flex, window: {variant}", lambda q, k, v, o=options, m=mask:
                         compiled(q, k, v, block_mask=m, kernel_options=o or None)))
        for name, fn in rows:
            errors = "-"
            try:
                ms = f"{fwd_bwd_ms(fn, q, k, v, grad):.3f}"
                if "window" in name:
                    errors = ", ".join(f"{e:.1e}" for e in max_errors(fn, q, k, v, grad, expected))
            except Exception as exc:  # a variant that does not compile must not end the run
                ms = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            lines.append(f"| {shape} | {name} | {ms} | {errors} |")
            print(lines[-1], flush=True)
            if args.profile and not ms.startswith("failed"):
                profiles.append(f"## {shape}, {name}: {ms} ms\n\n{kernel_table(fn, q, k, v, grad)}\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_swa.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if profiles:
        with open(os.path.join(args.out, "bench_swa_profile.txt"), "w") as f:
            f.write("\n".join(profiles))


if __name__ == "__main__":
    main()
