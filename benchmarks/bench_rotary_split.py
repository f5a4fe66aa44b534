"""The SWA layers' query/key/value split with RoPE on one GPU at the 1.3B hybrid's heads (18 groups
of one query head, d = 128, bf16): gdn2_kernels' Triton kernel beside the same PyTorch function
compiled by torch.compile (the layer's previous path), in one process. Forward and
forward+backward median times, and the rate at the bytes each direction must move (read the
projection, write q, k and v; the backward the reverse).

    python benchmarks/bench_rotary_split.py [--shapes 8x2048,4x4096,1x16384]
"""
import argparse
import os

import torch
from gdn2_kernels.rotary_split import split_rotary
from gdn2_kernels.rotary_split.naive import split_rotary_torch
from triton.testing import do_bench

from megatron_gdn2.layers.compiled import compiled_on_gpu

GROUPS, HEADS_PER_GROUP, HEAD_DIM = 18, 1, 128


def time_impl(fn, mixed, freqs, grads):
    """Median forward and forward+backward ms after a compiling and a warm call."""
    def fwd_bwd():
        torch.autograd.backward(fn(mixed, freqs, freqs, HEADS_PER_GROUP), grads)
    for _ in range(2):
        fwd_bwd()
    with torch.no_grad():
        fwd = do_bench(lambda: fn(mixed, freqs, freqs, HEADS_PER_GROUP), return_mode="median")
    return fwd, do_bench(fwd_bwd, return_mode="median", grad_to_none=[mixed])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048,4x4096,1x16384")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    impls = {"triton (gdn2_kernels.rotary_split)": lambda *a: split_rotary(*a, backend="triton"),
             "torch.compile": compiled_on_gpu(split_rotary_torch)}
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| shape | implementation | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s |",
             "|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        batch, seq_len = map(int, shape.split("x"))
        width = (HEADS_PER_GROUP + 2) * HEAD_DIM
        mixed = torch.randn(seq_len, batch, GROUPS, width, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True)
        inv_freq = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
        angles = torch.arange(seq_len, device="cuda")[:, None] * inv_freq
        freqs = torch.cat((angles, angles), -1)[:, None, None, :]
        grads = [torch.randn_like(o) for o in split_rotary(mixed, freqs, freqs, HEADS_PER_GROUP)]
        moved = 2 * mixed.numel() * mixed.element_size()  # read once, write once
        for name, fn in impls.items():
            fwd, both = time_impl(fn, mixed, freqs, grads)
            lines.append(f"| {shape} | {name} | {fwd:.3f} | {both:.3f} | {moved / fwd / 1e6:.0f} | "
                         f"{2 * moved / both / 1e6:.0f} |")
            print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_rotary_split.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
