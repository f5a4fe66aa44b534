"""GDN-2 kernel benchmark on one GPU: our Triton backend side by side with fla-core's chunk_gdn2 and
chunk_kda and torch SDPA causal attention, in one process.

Reports forward and forward+backward median times (triton.testing.do_bench), achieved bandwidth and
FLOP rate of our kernels against ceilings measured in the same run (device copy, bf16 GEMM), the
first-call latency at a new shape, and a per-kernel breakdown. Writes a markdown table to
--out (default $OUT or .) and stdout.

    python benchmarks/bench_gdn2.py [--no-fla] [--shapes 4x4096,1x16384] [--breakdown]
    python benchmarks/bench_gdn2.py --sweep "intra_bwd_warps=8;scores_bk=32,scores_warps=2"

--sweep times our kernels at the first shape under each KernelConfig variant (`;`-separated,
each a `,`-separated list of field=value overrides of this GPU's configuration), with the
per-kernel breakdown, and stops: it is how the per-architecture configurations were chosen.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from gdn2_kernels.gdn2 import chunk as chunk_module
from gdn2_kernels.gdn2.chunk import chunk_gdn2_triton
from triton.testing import do_bench

HEADS, DIM = 16, 128
SHAPES = {"4x4096": (4, 4096), "1x16384": (1, 16384), "8x2048": (8, 2048)}
PACKED_TOTAL, PACKED_N = 16384, 16


def log(msg):
    print(msg, flush=True)


def measure_ceilings():
    """Device copy bandwidth (bytes read + written) and bf16 GEMM rate on random data."""
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    copy_tbs = 2 * x.numel() * x.element_size() / ms / 1e9
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    gemm_tflops = 2 * n ** 3 / ms / 1e9
    return copy_tbs, gemm_tflops


def make_inputs(batch, length, seed=0):
    """Model-like inputs: q, k l2-normalised, g from the layer's decay parametrisation (fp32),
    b and w sigmoids, all else bf16."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, length, HEADS, DIM)

    def randn():
        return torch.randn(shape, generator=gen, device="cuda")

    a_log = torch.empty(HEADS, device="cuda").uniform_(1, 16, generator=gen).log()
    dt_bias = torch.empty(HEADS, DIM, device="cuda").uniform_(-7.0, -2.3, generator=gen)
    g = -a_log.exp()[:, None] * F.softplus(randn() + dt_bias)
    bf = torch.bfloat16
    return {
        "q": F.normalize(randn(), dim=-1).to(bf), "k": F.normalize(randn(), dim=-1).to(bf),
        "v": randn().to(bf), "g": g.float(), "b": torch.sigmoid(randn()).to(bf),
        "w": torch.sigmoid(randn()).to(bf),
    }


def ours(t, cu_seqlens=None):
    return chunk_gdn2_triton(t["q"], t["k"], t["v"], t["g"], t["b"], t["w"], DIM ** -0.5, None, False,
                             False, cu_seqlens)[0]


def fla_gdn2(t, cu_seqlens=None):
    from fla.ops.gdn2 import chunk_gdn2
    return chunk_gdn2(t["q"], t["k"], t["v"], t["g"], t["b"], t["w"], scale=DIM ** -0.5,
                      cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())[0]


def fla_kda(t, cu_seqlens=None):
    from fla.ops.kda import chunk_kda
    return chunk_kda(t["q"], t["k"], t["v"], t["g"], t["beta"], scale=DIM ** -0.5,
                     cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())[0]


def sdpa(t, cu_seqlens=None):
    q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def time_fn(fn, t, cu_seqlens):
    """Median forward and forward+backward times in ms."""
    leaves = [t[n] for n in ("q", "k", "v", "g", "b", "w", "beta") if n in t]
    fwd = do_bench(lambda: fn(t, cu_seqlens), return_mode="median")
    for x in leaves:
        x.requires_grad_(True)
    do = torch.randn_like(t["v"])

    def step():
        fn(t, cu_seqlens).backward(do)

    fwd_bwd = do_bench(step, grad_to_none=leaves, return_mode="median")
    for x in leaves:
        x.requires_grad_(False)
        x.grad = None
    return fwd, fwd_bwd


def traffic_and_flops(batch, length):
    """Fewest bytes the op must move (inputs read once, output written once; fwd+bwd also reads
    do and writes every gradient) and the chunkwise algorithm's matrix FLOPs."""
    tokens = batch * length * HEADS
    bf, f32 = 2, 4
    fwd_bytes = tokens * DIM * (5 * bf + f32) + tokens * DIM * bf
    bwd_bytes = fwd_bytes + tokens * DIM * bf + tokens * DIM * (5 * bf + f32)
    chunks = tokens / 64
    d = DIM
    # per chunk and head: Aqk, T (2 x 64x64xd), Y, U (2 x 64x64xd), R, state, output (3 x 64xdxd),
    # Aqk R (64x64xd)
    fwd_flops = chunks * 2 * (5 * 64 * 64 * d + 3 * 64 * d * d)
    return fwd_bytes, bwd_bytes, fwd_flops, 3.5 * fwd_flops


def packed_cu_seqlens(seed=0):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(PACKED_TOTAL - 1, generator=gen)[:PACKED_N - 1] + 1
    cu = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([PACKED_TOTAL])])
    return cu.to(device="cuda", dtype=torch.int32)


def breakdown(fn, t, label, iters=5):
    """Per-kernel CUDA time of one forward+backward, from the torch profiler."""
    leaves = [t[n] for n in ("q", "k", "v", "g", "b", "w", "beta") if n in t]
    for x in leaves:
        x.requires_grad_(True)
    do = torch.randn_like(t["v"])
    fn(t).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for x in leaves:
                x.grad = None  # else every backward after the first adds into .grad (not the op's cost)
            fn(t).backward(do)
        torch.cuda.synchronize()
    for x in leaves:
        x.requires_grad_(False)
        x.grad = None
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev_us > 0:
            rows.append((dev_us / iters / 1e3, ev.key[:60], ev.count // iters))
    rows.sort(reverse=True)
    lines = [f"\n{label}: per-kernel device time of one fwd+bwd (ms, launches)"]
    lines += [f"  {ms:7.3f}  x{n:<3d} {name}" for ms, name, n in rows[:16]]
    lines.append(f"  {sum(r[0] for r in rows):7.3f}  total")
    return "\n".join(lines)


def output_and_grads(t, dtype=None):
    """Our o and input gradients for a fixed random dO, with the inputs cast to `dtype` (None: as
    they are)."""
    leaves = {n: x.detach().to(dtype or x.dtype).requires_grad_(True) for n, x in t.items() if n != "beta"}
    o = ours(leaves)
    o.backward(torch.randn(o.shape, generator=torch.Generator(device="cuda").manual_seed(1),
                           device="cuda").to(o.dtype))
    return [o.detach().float()] + [leaves[n].grad.float() for n in sorted(leaves)]


def max_rel_err(actual, expected):
    """max over o and the gradients of max |actual - expected| / max |expected|."""
    return max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))


def sweep(spec, shape):
    """Times our kernels under each configuration variant of `spec` (see the module docstring), and
    gives each variant's largest relative error (o and every input gradient) against our kernels
    in fp32 (exact products) on the same inputs, since some variants trade precision."""
    device = torch.device("cuda")
    major = torch.cuda.get_device_capability()[0]
    base = chunk_module.kernel_config(device)
    batch, length = SHAPES[shape]
    t = make_inputs(batch, length)
    reference = output_and_grads(t, torch.float32)
    lines = [f"sweep at {shape} (B={batch}, T={length}), base {base}"]
    for variant in ["", *spec.split(";")]:
        chunk_module.CONFIGS[major] = base
        try:
            chunk_module.override_kernel_config(device, variant)
            fwd, fwd_bwd = time_fn(ours, t, None)
            err = max_rel_err(output_and_grads(t), reference)
            lines.append(f"{variant or 'base':50s} fwd {fwd:7.3f} ms  fwd+bwd {fwd_bwd:7.3f} ms"
                         f"  rel err {err:.2e}")
            lines.append(breakdown(ours, t, variant or "base", iters=3))
        except Exception as exc:  # a variant that does not compile or fit must not end the sweep
            lines.append(f"{variant:50s} failed: {type(exc).__name__}: {str(exc)[:200]}")
        log("\n".join(lines[-2:]))
    chunk_module.CONFIGS[major] = base
    return "\n".join(lines)


def time_first_call():
    """Seconds of one forward+backward at 1x1024 (inputs made, CUDA started, before the clock), and
    where they went: Triton's one-time driver set-up, then until the last kernel compiled."""
    import triton

    t = make_inputs(1, 1024)
    for x in t.values():
        x.requires_grad_(True)
    compiled = []
    triton.knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(time.perf_counter())
    torch.cuda.synchronize()
    start = time.perf_counter()
    triton.runtime.driver.active.utils  # noqa: B018 (builds and loads Triton's CUDA helpers)
    driver_s = time.perf_counter() - start
    ours(t).backward(torch.randn_like(t["v"]))
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    log(f"first call: driver set-up {driver_s:.2f} s, last of {len(compiled)} kernels compiled at "
        f"{max(compiled, default=start) - start:.2f} s")
    return total_s


def first_call_seconds():
    """time_first_call in a fresh process with an empty Triton cache: what a new user's first call
    pays, every kernel compiled (this process's own cache may already hold them)."""
    with tempfile.TemporaryDirectory() as cache:
        result = subprocess.run([sys.executable, __file__, "--first-call"], check=True, capture_output=True,
                                text=True, env=dict(os.environ, TRITON_CACHE_DIR=cache))
    log(result.stdout.strip())
    return float(result.stdout.split("first call s:")[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-fla", action="store_true", help="skip fla-core (not installed)")
    parser.add_argument("--no-packed", action="store_true")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--breakdown", action="store_true", help="per-kernel profile at the first shape")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sweep", default=None, help="configuration variants to time (see above)")
    parser.add_argument("--first-call", action="store_true",
                        help="only time one first forward+backward (run by first_call_seconds)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.first_call:
        log(f"first call s: {time_first_call():.3f}")
        return
    if args.sweep is not None:
        text = sweep(args.sweep, args.shapes.split(",")[0])
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_sweep.md"), "w") as f:
            f.write(text + "\n")
        return
    impls = {"ours": ours}
    if not args.no_fla:
        impls.update({"fla chunk_gdn2": fla_gdn2, "fla chunk_kda": fla_kda})
    impls["sdpa causal"] = sdpa
    shapes = [s for s in args.shapes.split(",") if s]

    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    compile_s = first_call_seconds()
    log(f"ours: first call in a new process with an empty Triton cache (compiles every kernel): "
        f"{compile_s:.1f} s")

    copy_tbs, gemm_tflops = measure_ceilings()
    log(f"ceilings: copy {copy_tbs:.2f} TB/s, bf16 GEMM {gemm_tflops:.0f} TFLOP/s")

    cases = [(s, *SHAPES[s], None) for s in shapes]
    if not args.no_packed:
        cases.append((f"packed {PACKED_N} seqs / {PACKED_TOTAL}", 1, PACKED_TOTAL, packed_cu_seqlens()))
    results, notes = [], []
    for label, batch, length, cu in cases:
        t = make_inputs(batch, length)
        t["beta"] = torch.sigmoid(torch.randn(batch, length, HEADS, device="cuda")).to(torch.bfloat16)
        for name, fn in impls.items():
            if name == "sdpa causal" and cu is not None:
                continue
            if name.startswith("fla"):
                start = time.perf_counter()
                # fla autotunes at new shapes: warm it up outside the timed region
                for _ in range(2):
                    time_fn(fn, t, cu)
                log(f"  {name} warm-up at {label}: {time.perf_counter() - start:.0f} s")
            fwd, fwd_bwd = time_fn(fn, t, cu)
            results.append((label, name, fwd, fwd_bwd))
            log(f"{label:>26s} {name:16s} fwd {fwd:7.3f} ms  fwd+bwd {fwd_bwd:7.3f} ms")
        fb, bb, ff, bf_ = traffic_and_flops(batch, length)
        fwd, fwd_bwd = next((r[2], r[3]) for r in results if r[0] == label and r[1] == "ours")
        notes.append(
            f"| {label} | fwd {fb / fwd / 1e9:.2f} TB/s ({100 * fb / fwd / 1e9 / copy_tbs:.0f}%), "
            f"{ff / fwd / 1e9:.0f} TFLOP/s ({100 * ff / fwd / 1e9 / gemm_tflops:.0f}%) | "
            f"fwd+bwd {bb / fwd_bwd / 1e9:.2f} TB/s ({100 * bb / fwd_bwd / 1e9 / copy_tbs:.0f}%), "
            f"{bf_ / fwd_bwd / 1e9:.0f} TFLOP/s ({100 * bf_ / fwd_bwd / 1e9 / gemm_tflops:.0f}%) |"
        )

    # a new length after the kernels exist: no compilation, no tuning
    t = make_inputs(3, 3001)
    for x in t.values():
        x.requires_grad_(True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ours(t).backward(torch.randn_like(t["v"]))
    torch.cuda.synchronize()
    new_shape_s = time.perf_counter() - start
    cu2 = packed_cu_seqlens(seed=1)
    t = make_inputs(1, PACKED_TOTAL, seed=1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ours(t, cu2)
    torch.cuda.synchronize()
    new_packed_s = time.perf_counter() - start

    names = list(impls)
    table = ["| shape (H=16, K=V=128, bf16) | " + " | ".join(f"{n} fwd / fwd+bwd (ms)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label in dict.fromkeys(r[0] for r in results):
        cells = []
        for n in names:
            r = next((r for r in results if r[0] == label and r[1] == n), None)
            cells.append("-" if r is None else f"{r[2]:.3f} / {r[3]:.3f}")
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    report = [
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}",
        f"measured ceilings: copy {copy_tbs:.2f} TB/s, bf16 GEMM {gemm_tflops:.0f} TFLOP/s",
        "", *table, "",
        "| ours | forward: bandwidth, FLOP rate (of ceiling) | forward+backward |", "|---|---|---|",
        *notes, "",
        f"first call in a new process with an empty Triton cache (T=1024, every kernel compiled): "
        f"{compile_s:.1f} s; "
        f"first fwd+bwd at a new shape (B=3, T=3001): {new_shape_s * 1e3:.0f} ms; "
        f"first fwd of a packed batch with new lengths: {new_packed_s * 1e3:.0f} ms",
    ]
    if args.breakdown:
        label, batch, length, _ = cases[0]
        t = make_inputs(batch, length)
        t["beta"] = torch.sigmoid(torch.randn(batch, length, HEADS, device="cuda")).to(torch.bfloat16)
        for name in names:
            if name != "sdpa causal":
                report.append(breakdown(impls[name], t, f"{name} at {label}"))
    text = "\n".join(report)
    log("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gdn2.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
