"""HSTU layer: target == full layer's T rows; GQA (and Hkv == Hq multi-head) against an
independent dense implementation written from DESIGN.md's formulas; the HTA stack (which runs
target layers on the T rows only) against those dense layers applied one after another."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from model_test_utils import REPO, random_table
from mtfm.kernels.group_layer_norm import group_layer_norm
from mtfm.model import Collator
from mtfm.model.context_kv import context_keys_values
from mtfm.model.layers import AttentionParams, HSTULayer, HTAStack, JaggedContext
from mtfm.model.token_split import TokenSplit
from mtfm.platform.registry import load_registry

REGISTRY = load_registry(REPO / "configs")
GROUPS = ("history", "realtime", "hp", "phf", "sqs")
SCENARIOS = ("hp", "phf", "sqs")
D_MODEL = 16


def make_layer(kind, heads, kv_heads, head_dim, seed):
    torch.manual_seed(seed)
    attn = AttentionParams(heads, kv_heads, head_dim, alpha=1 / math.sqrt(head_dim), norm=64.0, impl="reference")
    layer = HSTULayer(kind, GROUPS, SCENARIOS, D_MODEL, attn, norm_impl="reference").double()
    with torch.no_grad():  # non-trivial GLN parameters, so a wrong group would show
        for p in layer.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return layer.eval()


def batch_and_input(seed, users=3):
    table = random_table(REGISTRY, users, seed, lengths={"history": (0, 6), "realtime": (0, 5), "hp": (0, 3),
                                                         "phf": (0, 3), "sqs": (0, 2)})
    batch = Collator(REGISTRY)(table)
    x = torch.randn(batch.num_tokens, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return batch, x


def dense_layer(layer, batch, x):
    """The HSTU layer, token by token and head by head, with the mask from its definition."""
    a = layer.attn
    kinds, ts, groups = batch.kind.tolist(), batch.ts.tolist(), batch.group.tolist()
    bounds = batch.offsets.tolist()

    def gln(norm, v, i):
        name = batch.group_names[groups[i]]
        return F.layer_norm(v, v.shape, norm.weight[name], norm.bias[name], eps=norm.eps)

    h = torch.stack([gln(layer.input_norm, x[i], i) for i in range(len(x))])
    qu = F.silu(h @ layer.query_gate.weight.T + layer.query_gate.bias)
    kv = F.silu(h @ layer.key_value.weight.T + layer.key_value.bias)
    q, u = qu[:, : a.num_heads * a.head_dim], qu[:, a.num_heads * a.head_dim:]
    k, v = kv[:, : a.num_kv_heads * a.head_dim], kv[:, a.num_kv_heads * a.head_dim:]
    out = x.clone()
    for b in range(len(bounds) - 1):
        for i in range(bounds[b], bounds[b + 1]):
            if layer.kind == "target" and kinds[i] != 2:
                continue
            heads = []
            for hq in range(a.num_heads):
                g = hq // (a.num_heads // a.num_kv_heads)
                qi = q[i, hq * a.head_dim:(hq + 1) * a.head_dim]
                acc = torch.zeros(a.head_dim, dtype=x.dtype)
                for j in range(bounds[b], bounds[b + 1]):
                    if kinds[j] == 0 or (kinds[j] == 1 and ts[j] < ts[i]) or i == j:
                        kj = k[j, g * a.head_dim:(g + 1) * a.head_dim]
                        vj = v[j, g * a.head_dim:(g + 1) * a.head_dim]
                        acc = acc + F.silu(a.alpha * qi @ kj) / a.norm * vj
                heads.append(acc * u[i, hq * a.head_dim:(hq + 1) * a.head_dim])
            gated = torch.cat(heads)
            out[i] = x[i] + layer.output(gln(layer.output_norm, gated, i))
    return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(2, 2, 4), (3, 3, 2), (4, 2, 3), (4, 1, 4)]))
def test_full_layer_matches_dense_multi_head_and_gqa(seed, shape):
    heads, kv_heads, head_dim = shape
    layer = make_layer("full", heads, kv_heads, head_dim, seed)
    batch, x = batch_and_input(seed)
    torch.testing.assert_close(layer(x, JaggedContext.from_batch(batch)), dense_layer(layer, batch, x))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(2, 2, 4), (4, 2, 3), (2, 1, 4)]))
def test_target_layer_equals_full_layer_on_t_rows_and_passes_others_through(seed, shape):
    full = make_layer("full", *shape, seed)
    target = make_layer("target", *shape, seed + 1)
    target.load_state_dict(full.state_dict(), strict=False)  # a target layer has no sequence output GLN
    batch, x = batch_and_input(seed, users=4)
    ctx = JaggedContext.from_batch(batch)
    y_full, y_target = full(x, ctx), target(x, ctx)
    t = batch.target_index
    torch.testing.assert_close(y_target[t], y_full[t])
    others = torch.ones(batch.num_tokens, dtype=torch.bool)
    others[t] = False
    assert torch.equal(y_target[others], x[others])
    torch.testing.assert_close(y_target, dense_layer(target, batch, x))


def test_gqa_with_kv_heads_equal_to_heads_is_plain_multi_head():
    """Hkv == Hq: every query head has its own key/value head (g = h)."""
    layer = make_layer("full", 3, 3, 4, seed=5)
    batch, x = batch_and_input(5)
    torch.testing.assert_close(layer(x, JaggedContext.from_batch(batch)), dense_layer(layer, batch, x))


def make_stack(kinds, seed, recompute_context):
    attn = AttentionParams(2, 1, 3, alpha=0.4, norm=64.0, impl="reference")
    torch.manual_seed(seed)
    stack = HTAStack(kinds, GROUPS, SCENARIOS, D_MODEL, attn, norm_impl="reference",
                     recompute_context=recompute_context).double()
    with torch.no_grad():
        for p in stack.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return stack


@pytest.mark.parametrize("recompute_context", [False, True])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       kinds=st.sampled_from([("target", "target", "full", "target"), ("full", "target", "target"),
                              ("target", "full", "full", "target"), ("full", "target")]))
def test_stack_equals_dense_layers_in_turn_with_gradients(recompute_context, seed, kinds):
    """The stack carries only the T rows through a run of target layers and writes them back
    before a full layer; its output and every gradient must equal the plain composition, also
    when target layers recompute their H/R rows' keys and values in backward."""
    stack = make_stack(kinds, seed, recompute_context)
    batch, x = batch_and_input(seed, users=3)
    weights = torch.randn(batch.num_targets, D_MODEL, dtype=torch.float64)

    x_stack = x.clone().requires_grad_()
    out = stack(x_stack, JaggedContext.from_batch(batch))
    (out * weights).sum().backward()

    x_dense = x.clone().requires_grad_()
    y = x_dense
    for layer in stack.layers:
        y = dense_layer(layer, batch, y)
    expected = y[batch.target_index]
    dense_grads = torch.autograd.grad((expected * weights).sum(), [x_dense, *stack.parameters()], allow_unused=True)

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x_stack.grad, dense_grads[0])
    for (name, p), g in zip(stack.named_parameters(), dense_grads[1:]):
        zero = torch.zeros_like(p)  # a group absent from the batch gets no gradient
        torch.testing.assert_close(zero if p.grad is None else p.grad, zero if g is None else g, msg=name)


@pytest.mark.parametrize("recompute_context", [False, True])
def test_target_layers_keep_only_keys_values_per_token_when_recomputing(recompute_context):
    """What autograd keeps for backward from a run of target layers, as distinct storages with a
    row per token or per H/R row (per layer of the run), in elements: with recompute_context each layer's K and V (views
    into one buffer for the whole run, the projections' activations, which the attention reads in
    place) and, once for the run, the H/R rows; without it also each layer's normalised input of
    the K/V projection (N - NT, d_model) and its pre-activation (N - NT, 2 * Hkv * dh).
    The H/R rows' and the T rows' keys stay apart (split target attention), so nothing of N rows
    is kept."""
    stack = make_stack(("target", "target", "target"), seed=3, recompute_context=recompute_context)
    batch, x = batch_and_input(3, users=3)
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = stack(x.clone().requires_grad_(), JaggedContext.from_batch(batch))
    n, n_context = batch.num_tokens, batch.num_tokens - batch.num_targets
    storages = {}
    for t in saved:
        per_row = t.dim() and (t.shape[0] in (n, n_context) or (t.dim() > 1 and t.shape[1] == n_context))
        if t.is_floating_point() and per_row:  # rows first, or per layer of the run, then rows
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
    kv = 3 * n_context * 6  # [K | V] of three layers, Hkv 1, dh 3
    expected = [n_context * D_MODEL, kv]  # the H/R rows, once; the run's keys and values
    if not recompute_context:  # the run's normalised inputs and pre-activations, one buffer each
        expected += [3 * n_context * D_MODEL, kv]
    assert sorted(storages.values()) == sorted(expected)
    out.sum().backward()


@pytest.mark.parametrize("recompute_context", [False, True])
def test_stack_on_a_batch_of_t_tokens_only(recompute_context):
    """No H or R rows at all (every user has candidates only): the split has an empty context
    half, and the stack still equals the dense layers in turn, gradients included."""
    stack = make_stack(("target", "full", "target"), seed=7, recompute_context=recompute_context)
    table = random_table(REGISTRY, 3, 7, lengths={"history": (0, 0), "realtime": (0, 0), "hp": (1, 3),
                                                  "phf": (0, 3), "sqs": (0, 2)})
    batch = Collator(REGISTRY)(table)
    assert batch.num_tokens == batch.num_targets > 0
    x = torch.randn(batch.num_tokens, D_MODEL, dtype=torch.float64, requires_grad=True)
    out = stack(x, JaggedContext.from_batch(batch))
    (out.sum()).backward()
    x_dense = x.detach().clone().requires_grad_()
    y = x_dense
    for layer in stack.layers:
        y = dense_layer(layer, batch, y)
    expected = y[batch.target_index]
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_dense.grad)


@pytest.mark.parametrize("dtype, impl, recompute", [(torch.float64, "reference", True), (torch.bfloat16, "reference", True),
                                                    (torch.bfloat16, "triton", True), (torch.float64, "reference", False),
                                                    (torch.bfloat16, "triton", False)])
def test_context_keys_values_equals_autograd_of_the_plain_composition(dtype, impl, recompute):
    """The run's autograd Function (3 layers; recomputing or keeping its activations) against GLN ->
    linear -> silu per layer, differentiated by autograd, in float64 and under bfloat16 autocast. With the reference GLN
    these are the same ops on the same values up to the order of summation (the layers' dx summed
    inside one GLN backward, matmuls batched), so they agree to rounding; a backward that cast at
    other points, or a layer that took another layer's parameters, would not."""
    torch.manual_seed(0)
    batch, _ = batch_and_input(11, users=4)
    split = TokenSplit.of(JaggedContext.from_batch(batch))
    n_context, layers = split.context_index.shape[0], 3
    master = torch.float64 if dtype == torch.float64 else torch.float32
    x_context = torch.randn(n_context, D_MODEL, dtype=master, requires_grad=True)
    norm_weight = (1 + 0.3 * torch.randn(layers, len(GROUPS), D_MODEL, dtype=master)).requires_grad_()
    norm_bias = (0.3 * torch.randn(layers, len(GROUPS), D_MODEL, dtype=master)).requires_grad_()
    weight = (0.3 * torch.randn(layers, 6, D_MODEL, dtype=master)).requires_grad_()
    bias = (0.3 * torch.randn(layers, 6, dtype=master)).requires_grad_()
    inputs = [x_context, norm_weight, norm_bias, weight, bias]
    grad_kv = torch.randn(layers, n_context, 6, dtype=dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    with autocast:
        kv = context_keys_values(x_context, split.context_group, norm_weight, norm_bias, weight, bias, eps=1e-5,
                                 impl=impl, recompute=recompute)
    grads = torch.autograd.grad(kv, inputs, grad_kv.unbind(0))
    with autocast:
        expected = [F.silu(F.linear(group_layer_norm(x_context, split.context_group, norm_weight[l], norm_bias[l],
                                                     impl="reference").to(dtype), weight[l], bias[l]))
                    for l in range(layers)]
    expected_grads = torch.autograd.grad(expected, inputs, grad_kv.unbind(0))

    # The reference: dx's summation order only (float32 under autocast). Triton: the interpreter
    # truncates to bfloat16 where the reference rounds (the normalised input, the pre-activation's
    # gradient), which leaves a few bfloat16 ulps on elements where sums cancel: compared as a
    # relative error over the whole tensor there.
    tol = 2e-2 if impl == "triton" else 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(kv, expected):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
    for name, got, want in zip(["x_context", "norm_weight", "norm_bias", "weight", "bias"], grads, expected_grads):
        assert got.dtype == want.dtype, name
        if impl == "triton":
            error = (got.double() - want.double()).norm() / want.double().norm()
            assert error < 1e-2, f"{name}: relative error {error:.2e}"
            continue
        # The bias gradient is summed in float32 before rounding; autograd under autocast sums the
        # bfloat16 pre-activation gradients into a bfloat16 sum (one bfloat16 ulp apart).
        bias_tol = 1e-2 if name == "bias" and dtype == torch.bfloat16 else tol
        torch.testing.assert_close(got.double(), want.double(), msg=name, rtol=bias_tol, atol=bias_tol)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_token_split_hand_worked(impl, monkeypatch):
    """Kinds H H T R T H T (one user, then the next): the context rows are the non-T positions in
    order; split and merge are inverse, and their gradients are the same permutations. The merges
    (merge's forward, split's backward) run the implementation the split was given."""
    from mtfm.kernels import merge_rows_triton

    triton_merges = []
    real = merge_rows_triton.merge_rows
    monkeypatch.setattr(merge_rows_triton, "merge_rows", lambda *a: triton_merges.append(1) or real(*a))
    kind = torch.tensor([0, 0, 2, 1, 2, 0, 2], dtype=torch.int8)
    target_index = torch.tensor([2, 4, 6])
    group = torch.tensor([0, 0, 2, 1, 3, 0, 2])
    ctx = JaggedContext(torch.tensor([0, 5, 7]), torch.tensor([0, 2, 3]), kind, torch.arange(7), target_index,
                        group, GROUPS, torch.tensor([0, 1, 0]), SCENARIOS)
    split = TokenSplit.of(ctx, impl)
    assert split.context_index.tolist() == [0, 1, 3, 5]
    assert split.merge_source.tolist() == [0, 1, 4, 2, 5, 3, 6]
    assert split.context_group.tolist() == [0, 0, 1, 0]
    assert split.target_group.tolist() == [2, 3, 2]
    x = torch.arange(14.0).view(7, 2).requires_grad_()
    context_rows, target_rows = split.split(x)
    assert context_rows[:, 0].tolist() == [0.0, 2.0, 6.0, 10.0] and target_rows[:, 0].tolist() == [4.0, 8.0, 12.0]
    merged = split.merge(context_rows, target_rows)
    assert torch.equal(merged, x)
    weights = torch.randn(7, 2)
    (merged * weights).sum().backward()
    assert torch.equal(x.grad, weights)
    assert len(triton_merges) == (2 if impl == "triton" else 0)


def test_stack_refuses_a_top_layer_that_is_not_target():
    """The config's `run_layer_kinds` makes the top layer target; a stack given another is a bug."""
    with pytest.raises(ValueError, match="top layer runs as target attention"):
        make_stack(("target", "full"), seed=0, recompute_context=False)
