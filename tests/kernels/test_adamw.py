"""adamw_step against torch.optim.AdamW (fused, with its grad_scale): three steps over tensors of
sizes that do and do not fill the kernel's blocks, with weight decay; in Triton's interpreter on
CPU and compiled on a GPU."""
import pytest
import torch
from gdn2_kernels import adamw_step
from gdn2_kernels.adamw.fused import BLOCK

SHAPES = [(3, 5), (BLOCK,), (2, BLOCK + 7), (1,)]


def _compare(device):
    gen = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]
    ours = [p.detach().clone() for p in ref]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    adam = torch.optim.AdamW(ref, fused=True, **hyper)
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    step = torch.zeros((), device=device)
    for i in range(3):
        grads = [torch.randn(s, generator=gen).to(device) * 10 ** i for s in SHAPES]
        scale = torch.tensor(3.0 ** i, device=device)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        adam.grad_scale = scale
        adam.step()
        step += 1
        adamw_step(ours, grads, exp_avgs, exp_avg_sqs, step, lr=hyper["lr"], beta1=0.9, beta2=0.95,
                   eps=1e-8, weight_decay=0.1, grad_scale=scale)
        for g, unscaled in zip(grads, (p.grad for p in ref)):
            assert not torch.equal(g, unscaled) or i == 0, "the gradient was written back"
    for p, q, m, v in zip(ref, ours, exp_avgs, exp_avg_sqs):
        state = adam.state[p]
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_interpreter_matches_torch_adamw():
    _compare("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_torch_adamw():
    _compare("cuda")


def test_bad_input_names_the_list():
    p = [torch.zeros(4)]
    with pytest.raises(ValueError, match="exp_avg_sqs"):
        adamw_step(p, [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4, dtype=torch.float64)],
                   torch.ones(()), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
