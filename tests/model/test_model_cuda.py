"""The model on CUDA with the Triton kernels: equal to the same model on the PyTorch reference
kernels (forward and gradients), bf16 autocast steps, the subgraph and the user-side split.
Skipped without CUDA (CI); run on a GPU machine."""
from __future__ import annotations

import pytest
import torch

from model_test_utils import REPO, random_table, tiny_config
from mtfm.model import Collator, build_model, multitask_bce_loss
from mtfm.platform.registry import load_registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the Triton kernels")
REGISTRY = load_registry(REPO / "configs")
CUDA = torch.device("cuda")


def model_pair(**changes):
    """The same weights on the Triton kernels and on the reference kernels, on CUDA."""
    torch.manual_seed(0)
    triton_model = build_model(tiny_config(**changes).replace(attention_impl="triton", norm_impl="triton"), REGISTRY)
    reference = build_model(tiny_config(**changes), REGISTRY)
    reference.load_state_dict(triton_model.state_dict())
    return triton_model.to(CUDA), reference.to(CUDA)


def batch_on_cuda(seed=0, users=6):
    table = random_table(REGISTRY, users, seed, lengths={"history": (0, 300), "realtime": (0, 40), "hp": (0, 30),
                                                         "phf": (0, 20), "sqs": (0, 10)})
    return Collator(REGISTRY)(table).to(CUDA)


def test_to_cuda_keeps_every_tensor():
    table = random_table(REGISTRY, 4, 1)
    batch = Collator(REGISTRY)(table)
    moved = batch.to(CUDA)
    for a, b in zip(batch.tensors(), moved.tensors()):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())


@pytest.mark.parametrize("layout,kv_heads", [("(1:1)*1", 1), ("(0:2)*1", 2), ("(2:1)*1", 2)])
def test_triton_model_equals_reference_model_forward_and_gradients(layout, kv_heads):
    torch.backends.cuda.matmul.allow_tf32 = False
    triton_model, reference = model_pair(hta_layout=layout, num_kv_heads=kv_heads)
    batch = batch_on_cuda()
    losses = []
    for model in (triton_model, reference):
        out = model(batch)
        loss, _ = multitask_bce_loss(out, batch)
        loss.backward()
        losses.append((out.probabilities(), loss))
    for s in losses[1][0]:
        torch.testing.assert_close(losses[0][0][s], losses[1][0][s], atol=2e-4, rtol=1e-3)
    grads = dict(reference.named_parameters())
    for name, p in triton_model.named_parameters():
        ref = grads[name].grad
        assert (p.grad is None) == (ref is None), name
        if ref is not None:
            scale = ref.abs().max().clamp_min(1e-6)
            assert (p.grad - ref).abs().max() / scale < 2e-3, name


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    config = tiny_config(d_model=128, num_heads=4, num_kv_heads=2, hta_layout="(2:1)*2", compute_dtype="bfloat16",
                         tokenizer_hidden_dim=128).replace(attention_impl="auto", norm_impl="auto")
    model = build_model(config, REGISTRY).to(CUDA)
    batch = batch_on_cuda(seed=3, users=16)
    with model.autocast("cuda"):
        out = model(batch)
    loss, terms = multitask_bce_loss(out, batch)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():  # the same weights in float32: bf16 may round, not change the loss
        reference_loss, reference_terms = multitask_bce_loss(model(batch), batch)
    torch.testing.assert_close(loss.float(), reference_loss, rtol=2e-2, atol=1e-3)
    for task, value in terms.items():  # NaN only for a task with no label in the batch, in both
        assert bool(torch.isnan(value)) == bool(torch.isnan(reference_terms[task])), task
        if not torch.isnan(value):
            torch.testing.assert_close(value.float(), reference_terms[task], rtol=2e-2, atol=1e-3, msg=task)


def test_subgraph_and_user_side_split_on_triton():
    triton_model, _ = model_pair(hta_layout="(1:1)*2", num_kv_heads=1)
    triton_model.eval()
    table = random_table(REGISTRY, 5, 7, lengths={"history": (0, 200), "realtime": (0, 30), "phf": (1, 20)})
    with torch.no_grad():
        full = triton_model(Collator(REGISTRY)(table).to(CUDA)).probabilities()["phf"]
        ranker = triton_model.subgraph("phf")
        batch = ranker.collator()(table).to(CUDA)
        one_pass = ranker(batch)
        split = ranker.score_candidates(ranker.encode_users(batch), batch)
    torch.testing.assert_close(one_pass, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(split, one_pass, atol=1e-5, rtol=1e-4)
