"""The MMoE heads and the tokenizer's embedding lookups against independent references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_test_utils import REPO
from mtfm.model.heads import MMoEHeads
from mtfm.model.tokenizer import embedding_lookups
from mtfm.platform.registry import load_registry


def test_mmoe_heads_equal_a_numpy_reference():
    """logit = tower(sum_k softmax(G x)_k silu(W_k x + b_k)), computed here in NumPy float64."""
    registry = load_registry(REPO / "configs")
    torch.manual_seed(0)
    heads = MMoEHeads(registry, d_model=16, num_experts=3, expert_dim=8, tower_dim=4).double()
    scenario = next(iter(registry.scenarios))
    x = torch.randn(5, 16, dtype=torch.float64)
    logits = heads(x, scenario).detach().numpy()

    def linear(layer, a):
        return a @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()

    def silu(a):
        return a / (1 + np.exp(-a))

    xn = x.numpy()
    experts = silu(linear(heads.experts[0], xn)).reshape(5, 3, 8)
    expected = []
    for task, gate in heads.gates[scenario].items():
        g = np.exp(linear(gate, xn))
        g /= g.sum(axis=1, keepdims=True)
        mixed = np.einsum("ne,ned->nd", g, experts)
        tower = heads.towers[scenario][task]
        expected.append(linear(tower[2], silu(linear(tower[0], mixed))))
    np.testing.assert_allclose(logits, np.concatenate(expected, axis=1), rtol=1e-10, atol=1e-12)
    assert logits.shape == (5, len(heads.gates[scenario]))


def test_embedding_lookups_sharing_a_backward_equal_one_f_embedding_each():
    """Lookups into tables of two widths (three tables of width 4, so that each table's offset into
    the concatenation counts), one table read twice, repeated ids within and across lookups, a
    lookup of no ids, and a table whose only lookup's output goes unused (its gradient: zeros):
    outputs and table gradients equal F.embedding's per lookup, in float64 (the summation order
    alone differs)."""
    gen = torch.Generator().manual_seed(0)
    specs = {"a": (30, 4), "b": (7, 4), "c": (11, 8), "d": (13, 4), "e": (5, 4)}
    lookups = [("a", 25), ("c", 9), ("b", 40), ("d", 0), ("a", 12), ("d", 31), ("c", 5), ("e", 6)]
    used = [0, 1, 2, 3, 4, 5]  # c's second lookup and e's only one go unused

    def tables():
        torch.manual_seed(1)
        return torch.nn.ModuleDict({n: torch.nn.Embedding(rows, dim).double() for n, (rows, dim) in specs.items()})

    ids = [torch.randint(0, specs[name][0], (n,), generator=gen) for name, n in lookups]
    grads = [torch.randn(n, specs[name][1], generator=gen, dtype=torch.float64) for name, n in lookups]
    ours, reference = tables(), tables()
    got = embedding_lookups(ours, [(name, i) for (name, _), i in zip(lookups, ids)])
    expected = [F.embedding(i, reference[name].weight) for (name, _), i in zip(lookups, ids)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    with torch.no_grad():  # serving takes plain lookups
        plain = embedding_lookups(ours, [(name, i) for (name, _), i in zip(lookups, ids)])
    for g, e in zip(plain, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.autograd.backward([got[j] for j in used], [grads[j] for j in used])
    torch.autograd.backward([expected[j] for j in used], [grads[j] for j in used])
    for name in specs:
        want = reference[name].weight.grad
        want = torch.zeros_like(reference[name].weight) if want is None else want
        torch.testing.assert_close(ours[name].weight.grad, want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"table {name}: {m}")
    # A hand-worked row: table d's row r gets the sum of the gradient rows whose id is r.
    r = int(ids[5][0])
    assert torch.allclose(ours["d"].weight.grad[r], grads[5][ids[5] == r].sum(0))


def test_embedding_lookups_refuse_tables_with_options_they_do_not_implement():
    tables = torch.nn.ModuleDict({"a": torch.nn.Embedding(5, 4, padding_idx=0)})
    with pytest.raises(ValueError, match="table 'a'"):
        embedding_lookups(tables, [("a", torch.tensor([1, 2]))])
