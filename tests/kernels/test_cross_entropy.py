"""gdn2_kernels.vocab_parallel_cross_entropy against torch's cross entropy over the whole
vocabulary in fp64: the per-token loss and the logits' gradient, both backends (the Triton kernels
in the interpreter on CPU, compiled on a GPU), a vocabulary not a multiple of the block and split
over two ranks."""
import pytest
import torch
import torch.nn.functional as F
from gdn2_kernels import vocab_parallel_cross_entropy

from tests.harness import run_distributed
from tests.kernels.gdn2_testing import rel_err


def make_case(rows, vocab, seed=0, device="cpu", scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    dloss = torch.randn(rows, generator=gen, dtype=torch.float64).to(device)
    return logits, labels, dloss


def reference(logits, labels, dloss):
    x = logits.double().detach().requires_grad_()
    loss = F.cross_entropy(x, labels, reduction="none")
    loss.backward(dloss.double())
    return loss.detach(), x.grad


def ours(logits, labels, dloss, dtype, backend, group=None):
    x = logits.to(dtype).detach().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, labels, group=group, backend=backend)
    loss.backward(dloss.to(torch.float32))
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rows, vocab", [(7, 100), (3, 5000)])  # one partial block; three blocks
def test_matches_torch_cross_entropy_fp32(backend, rows, vocab):
    logits, labels, dloss = make_case(rows, vocab)
    loss_ref, grad_ref = reference(logits, labels, dloss)
    loss, grad = ours(logits, labels, dloss, torch.float32, backend)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_err(loss, loss_ref) < 1e-6
    assert rel_err(grad, grad_ref) < 1e-6


def test_batch_dimensions_and_large_logits():
    """[s, b, V] as Megatron passes it; logits far past exp's fp32 range (|x| ~ 200) stay finite.
    An fp32 log-sum-exp of ~200 is exact to ~1e-5, which bounds the probabilities' accuracy."""
    logits, labels, dloss = make_case(12, 300, seed=1, scale=60.0)
    logits = logits.float().double()
    loss_ref, grad_ref = reference(logits, labels, dloss)
    loss, grad = ours(logits.view(4, 3, 300), labels.view(4, 3), dloss.view(4, 3), torch.float32, "triton")
    assert loss.shape == (4, 3) and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss.flatten(), loss_ref) < 1e-6
    assert rel_err(grad.view(12, 300), grad_ref) < 1e-4


def test_bad_input_names_the_argument():
    logits, labels, _ = make_case(4, 10)
    with pytest.raises(ValueError, match="labels' shape"):
        vocab_parallel_cross_entropy(logits.float(), labels[:3])
    with pytest.raises(ValueError, match="labels must be int"):
        vocab_parallel_cross_entropy(logits.float(), labels.float())
    with pytest.raises(ValueError, match="backend must be"):
        vocab_parallel_cross_entropy(logits.float(), labels, backend="cuda")


def vocab_split_over_ranks(backend):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    logits, labels, dloss = make_case(9, 64, seed=2)
    rank, size = dist.get_rank(), dist.get_world_size()
    local = logits[:, rank * 32:(rank + 1) * 32]
    group = ps.get_tensor_model_parallel_group()
    loss, grad = ours(local, labels, dloss, torch.float32, backend, group=group)
    assert size == 2
    loss_ref, grad_ref = reference(logits, labels, dloss)
    return {"loss": rel_err(loss, loss_ref), "grad": rel_err(grad, grad_ref[:, rank * 32:(rank + 1) * 32])}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocabulary_split_over_two_ranks(backend):
    for out in run_distributed(vocab_split_over_ranks, world_size=2, tp=2, args=(backend,), timeout=300):
        assert out["loss"] < 1e-6 and out["grad"] < 1e-6, out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu(dtype, tol):
    logits, labels, dloss = make_case(2048, 32000, device="cuda")
    logits = logits.to(dtype).double()  # the reference sees the rounded logits
    loss_ref, grad_ref = reference(logits, labels, dloss)
    loss, grad = ours(logits, labels, dloss, dtype, "triton")
    assert grad.dtype == dtype
    assert rel_err(loss, loss_ref) < 1e-5  # fp32 arithmetic on exactly representable inputs
    assert rel_err(grad, grad_ref) < tol
