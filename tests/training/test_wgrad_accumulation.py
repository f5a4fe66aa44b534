"""Weight gradients accumulated into the fp32 main_grad by their GEMM (layers/wgrad_accumulation.py):
against fp64 for the op, and against the unfused path for a bf16 model under Megatron's DDP."""
import pytest
import torch
import torch.nn.functional as F

from megatron_gdn2.layers import wgrad_accumulation
from tests.harness import run_distributed
from tests.model.helpers import gpu_hybrid_case


def test_off_without_a_gpu():
    """Megatron's fused path allocates on the current CUDA device: never offered on a CPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert wgrad_accumulation.install() is False


def test_fp32_accumulation_is_in_place_and_exact():
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(50, 24, generator=gen), torch.randn(50, 12, generator=gen)
    acc = torch.randn(12, 24, generator=gen)
    expected = acc.double() + dy.double().t() @ x.double()
    ptr = acc.data_ptr()
    wgrad_accumulation.wgrad_gemm_accum_fp32(x, dy, acc)
    assert acc.data_ptr() == ptr and acc.dtype == torch.float32
    assert torch.allclose(acc.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bf16_accumulation_into_fp32_on_gpu():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 256, generator=gen).cuda().bfloat16()
    dy = torch.randn(4096, 128, generator=gen).cuda().bfloat16()
    acc = torch.randn(128, 256, generator=gen).cuda()
    expected = acc.double() + dy.double().t() @ x.double()
    ptr = acc.data_ptr()
    wgrad_accumulation.wgrad_gemm_accum_fp32(x, dy, acc)
    assert acc.data_ptr() == ptr and acc.dtype == torch.float32
    # fp32 accumulation of exact bf16 products: far inside bf16's own rounding of the result
    assert ((acc.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def main_grads_with_and_without_fusion():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_gdn2.models import build_model, make_transformer_config

    model_cfg, tokens = gpu_hybrid_case("GA")
    state, grads, installed = None, {}, wgrad_accumulation.install()
    for fusion in (False, True):
        config = make_transformer_config(model_cfg, params_dtype=torch.bfloat16, bf16=True,
                                         gradient_accumulation_fusion=fusion)
        module = build_model(model_cfg, config).cuda()
        if state is None:
            state = module.state_dict()
        module.load_state_dict(state)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                      Float16Module(config, module))
        for _ in range(2):  # the second backward accumulates onto the first
            logits = ddp(tokens[:, :-1], None, None)
            # without overlapped reduction the backward hooks (or the fused GEMMs) fill main_grad
            F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads[fusion] = {n: p.main_grad.double().cpu() for n, p in module.named_parameters()}
    relative = {n: ((grads[True][n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                for n, g in grads[False].items()}
    worst = max(relative, key=relative.get)
    fused_linears = sum(1 for m in module.modules() if getattr(m, "gradient_accumulation_fusion", False))
    return {"installed": installed, "worst_param": worst, "rel_diff": relative[worst],
            "fused_linears": fused_linears}


@pytest.mark.gpu
def test_fused_main_grads_match_the_separate_add():
    (out,) = run_distributed(main_grads_with_and_without_fusion, world_size=1, timeout=600)
    print(out)
    assert out["installed"] and out["fused_linears"] > 0, out
    # the unfused path rounds each weight gradient to bf16 before the add
    assert out["rel_diff"] < 1e-2, out
