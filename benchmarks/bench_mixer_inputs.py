"""The GDN-2 mixer's input stage on one GPU at the 1.3B widths: gdn2_kernels' fused Triton stage
beside the PyTorch form compiled by torch.compile (checkpointed, as the layer runs it without the
Triton chunk kernels), in one process. Forward and forward+backward median times and the bytes
each direction must move at least.

    python benchmarks/bench_mixer_inputs.py [--shapes 4x4096,1x16384]
"""
import argparse
import os

import torch
from gdn2_kernels.mixer_inputs import mixer_inputs
from triton.testing import do_bench

from megatron_gdn2.layers.gdn2_pointwise import _mixer_inputs_checkpointed

HEADS, HEAD_DIM, WIDTH = 16, 128, 4


def make_inputs(batch, seq_len):
    key = value = HEADS * HEAD_DIM
    dev = dict(device="cuda")
    t = {
        "projected": torch.randn(seq_len, batch, 3 * key + 2 * value, dtype=torch.bfloat16, **dev),
        "conv_weight": torch.randn(2 * key + value, WIDTH, dtype=torch.bfloat16, **dev) * 0.5,
        "decay": torch.randn(seq_len, batch, key, dtype=torch.bfloat16, **dev),
        "A_log": torch.rand(HEADS, **dev),
        "dt_bias": torch.randn(key, **dev),
    }
    return {n: x.requires_grad_() for n, x in t.items()}, torch.arange(seq_len, **dev)[:, None]


def run(fn, t, positions, grads=None):
    outs = fn(t["projected"], t["conv_weight"], positions, t["decay"], t["A_log"], t["dt_bias"], 2.0,
              HEAD_DIM, HEAD_DIM)
    if grads is not None:
        torch.autograd.backward(outs, grads)
    return outs


def time_impl(fn, t, positions, grads):
    """Median forward and forward+backward ms after a compiling and a warm call."""
    for _ in range(2):
        run(fn, t, positions, grads)
    with torch.no_grad():
        fwd = do_bench(lambda: run(fn, t, positions), return_mode="median")
    both = do_bench(lambda: run(fn, t, positions, grads), return_mode="median", grad_to_none=list(t.values()))
    return fwd, both


def min_bytes(batch, seq_len):
    """(forward, forward + backward). Forward: read projected and decay, write q, k, v, erase,
    write (bf16) and g (fp32). Backward: read the inputs and the six output gradients, write the
    input gradients."""
    tokens, key = batch * seq_len, HEADS * HEAD_DIM
    inputs = tokens * (5 * key + key) * 2
    outputs = tokens * (5 * key * 2 + key * 4)
    return inputs + outputs, 3 * inputs + 2 * outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4x4096,1x16384")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    impls = {
        "triton (gdn2_kernels.mixer_inputs)": lambda *a: mixer_inputs(*a, backend="triton"),
        "torch.compile (checkpointed)": _mixer_inputs_checkpointed,
    }
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| shape | implementation | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s |",
             "|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        batch, seq_len = map(int, shape.split("x"))
        t, positions = make_inputs(batch, seq_len)
        grads = [torch.randn_like(o) for o in run(mixer_inputs, t, positions)]
        fwd_bytes, both_bytes = min_bytes(batch, seq_len)
        for name, fn in impls.items():
            fwd, both = time_impl(fn, t, positions, grads)
            lines.append(f"| {shape} | {name} | {fwd:.3f} | {both:.3f} | {fwd_bytes / fwd / 1e6:.0f} | "
                         f"{both_bytes / both / 1e6:.0f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_mixer_inputs.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
