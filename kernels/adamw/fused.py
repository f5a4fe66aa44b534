"""One AdamW step (torch.optim.AdamW's update, decoupled weight decay) over a list of fp32
tensors in one Triton launch.

The tensors live in separate allocations, so the kernel reads their addresses from a table: each
program updates BLOCK elements of one tensor (a block table maps programs to tensors and offsets;
it is built once per set of tensors and cached). A gradient divided by `grad_scale` is not
written back, where torch's fused kernel writes every unscaled gradient back (4 bytes per
parameter that nothing reads).
"""
import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def adamw_kernel(block_tensor, block_start, numels, param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                 step, grad_scale, lr, beta1, beta2, eps, weight_decay,
                 HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    f32 = tl.pointer_type(tl.float32)
    p_ptr = tl.load(param_ptrs + t).to(f32)
    g_ptr = tl.load(grad_ptrs + t).to(f32)
    m_ptr = tl.load(exp_avg_ptrs + t).to(f32)
    v_ptr = tl.load(exp_avg_sq_ptrs + t).to(f32)
    g = tl.load(g_ptr + offs, mask=mask)
    if HAS_SCALE:
        g = g / tl.load(grad_scale)
    p = tl.load(p_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    n = tl.load(step)
    bias1 = 1.0 - tl.exp(n * tl.log(beta1))
    bias2_sqrt = tl.sqrt(1.0 - tl.exp(n * tl.log(beta2)))
    p = p - lr * weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


_TABLES = {}
_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs")


def _check(lists):
    params = lists[0]
    for name, tensors in zip(_NAMES, lists):
        if len(tensors) != len(params):
            raise ValueError(f"adamw_step: {name} has {len(tensors)} tensors for {len(params)} params")
        for x, p in zip(tensors, params):
            if (x.dtype != torch.float32 or not x.is_contiguous() or x.shape != p.shape
                    or x.device != p.device):
                raise ValueError(f"adamw_step: {name} must be contiguous fp32 tensors shaped and placed "
                                 f"like params, got {x.dtype} {tuple(x.shape)} on {x.device}")


def _tables(lists):
    """Device tensors (numels, program -> tensor, program -> first element, one address table per
    list), cached on the tensors' addresses: the same parameters, gradient views and moments come
    back every step, and are checked once."""
    key = tuple(tuple(x.data_ptr() for x in tensors) for tensors in lists)
    if key not in _TABLES:
        _check(lists)
        if len(_TABLES) >= 16:  # tensors that move every step would otherwise pile up tables
            _TABLES.clear()
        numels = [x.numel() for x in lists[0]]
        blocks = torch.tensor([triton.cdiv(n, BLOCK) for n in numels])
        tables = [torch.tensor(numels), torch.repeat_interleave(torch.arange(len(numels)), blocks),
                  torch.cat([torch.arange(b) * BLOCK for b in blocks.tolist()])]
        tables = [x.to(torch.int32) for x in tables] + [torch.tensor(a, dtype=torch.int64) for a in key]
        _TABLES[key] = [x.to(lists[0][0].device) for x in tables]
    return _TABLES[key]


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, beta1, beta2, eps, weight_decay,
               grad_scale=None):
    """Updates params, exp_avgs and exp_avg_sqs in place (fp32, contiguous, on one device) with
    grads divided by `grad_scale` (a one-element fp32 tensor) when given; `step` is the one-element
    fp32 step count after this step's increment, as torch keeps it."""
    if not params:
        return
    numels, tensor_of, first, *addresses = _tables((params, grads, exp_avgs, exp_avg_sqs))
    adamw_kernel[(tensor_of.numel(),)](
        tensor_of, first, numels, *addresses, step, grad_scale, float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), HAS_SCALE=grad_scale is not None, BLOCK=BLOCK, num_warps=8)
