"""The models' loss (gdn2_kernels' vocabulary-parallel cross entropy inside GDN2GPTModel) equals
torch's cross entropy over the logits the same model returns without labels: per token, and in
the gradient it sends back through the output layer."""
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.kernels.gdn2_testing import rel_err
from tests.model.helpers import batches, build


def loss_and_output_grad(model, with_labels: bool):
    tokens, labels = next(batches(model.vocab_size, 64))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if with_labels:
        loss = model(tokens, positions, None, labels=labels)
    else:
        logits = model(tokens, positions, None)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    model.zero_grad()
    loss.sum().backward()
    return loss.detach(), model.output_layer.weight.grad.clone()


def compare():
    model = build("swa_gdn2_tiny")
    ours, ours_grad = loss_and_output_grad(model, True)
    ref, ref_grad = loss_and_output_grad(model, False)
    return {"shape": tuple(ours.shape) == tuple(ref.shape), "loss": rel_err(ours, ref),
            "grad": rel_err(ours_grad, ref_grad)}


def test_model_loss_is_cross_entropy_of_its_logits():
    (out,) = run_distributed(compare, world_size=1, timeout=300)
    assert out["shape"] and out["loss"] < 1e-6 and out["grad"] < 1e-5, out
