"""Shared memory, registers and spills of every GDN-2 chunk-kernel launch on a GPU architecture,
compiled offline: no GPU needed (Triton ships ptxas). Checks a launch configuration before device
time is spent on it; the CPU tests run it for Hopper, whose configuration is the H200's.

    python benchmarks/kernel_resources.py [--arch 9] [--cases bf16:128:128,fp32:64:256] [--all]
                                          [--kernel-config state_bv=128]

For each case (dtype, K, V, sequence-heads, with or without an initial and a final state) it runs
the real launch code of a forward and its backward (`launch_plan`: nothing launches, the tensors
are empty) with the architecture's KernelConfig, compiles each distinct launch for the target and
prints one line per launch. Exit status 1 when a launch needs more shared memory than the
architecture has. Must run without TRITON_INTERPRET (the interpreter has no compiler).
"""
import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from gdn2_kernels.gdn2 import chunk
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table)
SHARED_LIMIT = {8: 166912, 9: 232448}
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                 torch.int32: "*i32", torch.int64: "*i64"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# dtype:K:V, each with every HEADS and with and without states. fp32 compiles slowly (its exact
# products): one case by default; --all adds the rest (fp16 has bf16's tile sizes)
CASES = "bf16:128:128,bf16:128:256,bf16:256:256,bf16:64:64,fp32:128:128"
MORE_CASES = "fp32:128:256,fp32:256:256,fp32:64:64,bf16:256:64,bf16:64:256,bf16:32:32,fp16:128:128"
HEADS = (1, 16, 128)   # one sequence: narrow, normal and wide state blocks on Hopper
CUOBJDUMP = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                      "bin", "cuobjdump")


def launches(arch, dtype, key, value, heads, states):
    """[(kernel, grid, args, kwargs)] of one forward and backward with `arch`'s configuration."""
    q, k, b = (torch.empty(1, 64, heads, key, dtype=dtype) for _ in range(3))
    g = torch.empty(1, 64, heads, key, dtype=torch.float32)
    v, w = (torch.empty(1, 64, heads, value, dtype=dtype) for _ in range(2))
    idx = dataclasses.replace(chunk.ChunkIndex.build(q, v, None), cfg=chunk.arch_config(arch, dtype, key))
    h0 = torch.empty(1, heads, key, value) if states else None
    plan = []
    chunk.launch_plan(lambda *launch: plan.append(launch), q, k, v, g, b, w, key ** -0.5, h0, states, idx,
                      grads=True, h0_grad=states)
    return plan


def source(kernel, args, kwargs):
    """Triton's compile input for one launch: (ASTSource, options)."""
    values = dict(zip(kernel.arg_names, args), **{n: x for n, x in kwargs.items() if n in kernel.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        x = values[param.name]
        if param.is_constexpr or x is None:
            signature[param.name], constexprs[param.name] = "constexpr", x
        elif isinstance(x, torch.Tensor):
            signature[param.name] = POINTER_TYPES[x.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32" if isinstance(x, float) else "i32"
    options = {n: x for n, x in kwargs.items() if n not in kernel.arg_names}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), options


def compile_launch(arch, src, options):
    """{"shared", "registers", "spill"} of one launch (`source`) compiled for `arch` (registers and
    spill only where cuobjdump is found)."""
    compiled = triton.compile(src, target=GPUTarget("cuda", arch * 10, 32), options=options)
    result = {"shared": compiled.metadata.shared, "registers": None, "spill": None}
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
        result.update(registers=int(found.get("REG", 0)), spill=int(found.get("STACK", 0)))
    return result


def parse_cases(spec):
    """"bf16:128:128,fp32:64:256" -> [(torch.bfloat16, 128, 128), (torch.float32, 64, 256)]."""
    cases = []
    for item in filter(None, spec.split(",")):
        dtype, key, value = item.split(":")
        if dtype not in DTYPES:
            raise ValueError(f"--cases: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        cases.append((DTYPES[dtype], int(key), int(value)))
    return cases


def resources(arch, cases, heads=HEADS):
    """[(case label, kernel name, options, result)] of every distinct launch, compiled on threads."""
    distinct = {}
    for dtype, key, value in cases:
        for n_heads in heads:
            for states in (False, True):
                label = f"{str(dtype)[6:]} K={key} V={value} heads={n_heads}{' states' if states else ''}"
                for kernel, _, args, kwargs in launches(arch, dtype, key, value, n_heads, states):
                    src, options = source(kernel, args, kwargs)
                    spec = (kernel.fn.__name__, src.hash(), tuple(sorted(options.items())))
                    distinct.setdefault(spec, (label, kernel.fn.__name__, src, options))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = pool.map(lambda item: compile_launch(arch, *item[2:]), distinct.values())
        return [(label, name, options, result)
                for (label, name, _, options), result in zip(distinct.values(), results)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=9, choices=sorted(SHARED_LIMIT),
                        help="CUDA compute capability major (9: H100/H200)")
    parser.add_argument("--cases", default=CASES, help=f"dtype:K:V list (default {CASES})")
    parser.add_argument("--all", action="store_true", help=f"also {MORE_CASES}")
    parser.add_argument("--kernel-config", default="", help="field=value overrides of the arch's config")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_resources.py compiles kernels: run it without TRITON_INTERPRET=1")
    chunk.override_arch_config(args.arch, args.kernel_config)
    limit = SHARED_LIMIT[args.arch]
    rows = resources(args.arch, parse_cases(args.cases + ("," + MORE_CASES if args.all else "")))
    over = 0
    for label, name, options, result in rows:
        flag = "  OVER THE LIMIT" if result["shared"] > limit else ""
        over += bool(flag)
        print(f"{name:26s} {label:36s} warps {options.get('num_warps', 4)} stages "
              f"{options.get('num_stages', 3)}  shared {result['shared']:>6}  registers "
              f"{result['registers']}  spill {result['spill']}{flag}")
    print(f"{len(rows)} distinct launches for sm_{args.arch}0, shared memory limit {limit} B: "
          f"{over} over the limit")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
