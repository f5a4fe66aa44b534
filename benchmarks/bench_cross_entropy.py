"""The language-model loss over a 32,000-token vocabulary on one GPU, bf16 logits: gdn2_kernels'
one-pass cross entropy (what the models use) beside Megatron-Core's native fused vocab-parallel
cross entropy and its unfused one, and torch's F.cross_entropy on fp32 logits, in one process.
Median forward+backward ms and the bytes the op must move at least (read the logits twice, write
their gradient).

    python benchmarks/bench_cross_entropy.py [--tokens 16384,32768]
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gdn2_kernels import vocab_parallel_cross_entropy
from triton.testing import do_bench

VOCAB = 32000


def implementations():
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_unfused

    group = ps.get_tensor_model_parallel_group()
    return {
        "gdn2_kernels (ours)": lambda x, y: vocab_parallel_cross_entropy(x, y, group=group),
        "megatron native fused": lambda x, y: fused_vocab_parallel_cross_entropy(x, y, group),
        "megatron unfused": megatron_unfused,
        "torch F.cross_entropy (fp32 logits)": lambda x, y: F.cross_entropy(
            x.float().flatten(0, 1), y.flatten(), reduction="none"),
    }


def fwd_bwd_ms(fn, logits, labels):
    def step():
        fn(logits, labels).sum().backward()

    for _ in range(3):  # compiles Megatron's fused functions
        step()
    return do_bench(step, return_mode="median", grad_to_none=[logits])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="16384,32768")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    from megatron.core import parallel_state as ps

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        ps.initialize_model_parallel()
        lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; vocabulary {VOCAB}, "
                 "bf16 logits [tokens, 1, vocab]; median forward+backward ms", "",
                 "| tokens | implementation | fwd+bwd ms | GB/s of the minimum traffic |",
                 "|---|---|---|---|"]
        for tokens in (int(t) for t in args.tokens.split(",")):
            logits = torch.randn(tokens, 1, VOCAB, device="cuda", dtype=torch.bfloat16).mul_(3)
            logits.requires_grad_()
            labels = torch.randint(0, VOCAB, (tokens, 1), device="cuda")
            least = 3 * logits.numel() * logits.element_size()
            for name, fn in implementations().items():
                ms = fwd_bwd_ms(fn, logits, labels)
                lines.append(f"| {tokens} | {name} | {ms:.3f} | {least / ms / 1e6:.0f} |")
                print(lines[-1], flush=True)
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cross_entropy.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
