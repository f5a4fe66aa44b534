"""Weight gradients accumulated into Megatron's fp32 main_grad by the weight-gradient GEMM itself.

Megatron's linear layers do this with `gradient_accumulation_fusion`, through apex's CUDA extension
`fused_weight_gradient_mlp_cuda`. Without apex, each bf16 weight gradient is written to its own
tensor and then added to the fp32 buffer by DDP's hook: one extra pass over every weight per step
(6.1 ms of the H200 profile of swa_gdn2_1.3B at 4K x 4, benchmarks/RESULTS.md). torch's
`addmm(..., out_dtype=torch.float32)` (CUDA) runs the bf16 GEMM with the fp32 buffer as both the
addend and the output, which is what apex's extension does.

`install()` offers the two functions below to Megatron under the extension's name when apex's is
missing; the training setup turns `gradient_accumulation_fusion` on only where it returns True.
"""
from __future__ import annotations

import sys
import types

import torch

EXTENSION = "fused_weight_gradient_mlp_cuda"


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """main_grad (fp32, [out, in]) += grad_output^T total_input ([tokens, out], [tokens, in])."""
    if total_input.dtype == torch.float32:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """The same for a bf16/fp16 main_grad (DDP without grad_reduce_in_fp32)."""
    main_grad.addmm_(grad_output.t(), total_input)


def _addmm_fp32_out_works() -> bool:
    a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    acc = torch.ones(16, 16, device="cuda", dtype=torch.float32)
    try:
        wgrad_gemm_accum_fp32(a, a, acc)
    except (RuntimeError, TypeError):  # a torch without addmm's out_dtype
        return False
    return bool((acc == 17).all())


def install() -> bool:
    """Whether Megatron's linear layers may fuse the weight-gradient accumulation: apex's extension
    is importable, or (on a GPU whose torch has addmm's out_dtype) this module now stands in for it."""
    import megatron.core.tensor_parallel.layers as layers

    if not torch.cuda.is_available():  # Megatron's fused path allocates on the current CUDA device
        return False
    if getattr(layers, "_grad_accum_fusion_available", False):
        return True
    if not _addmm_fp32_out_works():
        return False
    extension = types.ModuleType(EXTENSION, __doc__)
    extension.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    extension.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    # megatron.core.utils imports the extension by name when it defers the embedding's wgrad
    sys.modules.setdefault(EXTENSION, extension)
    layers.fused_weight_gradient_mlp_cuda = extension
    layers._grad_accum_fusion_available = True
    return True
