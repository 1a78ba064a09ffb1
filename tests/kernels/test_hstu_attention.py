"""HSTU attention: the Triton kernels against the reference, and the reference against
independent computations and the invariants of DESIGN.md (2, 3, 4, 5 at the kernel level)."""

import itertools
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.kernels import hstu_attention_reference as reference
from mtfm.kernels import hstu_attention_triton as triton_kernels
from mtfm.kernels.backends import resolve_impl
from mtfm.kernels.hstu_attention import hstu_attention, hstu_split_target_attention, hstu_target_attention
from mtfm.kernels.mask import TokenKind, build_dynamic_mask

HQ, D, DV = 4, 16, 32
ALPHA, NORM = 0.4, 40.0

# Per user (history, realtime, target) counts: empty R, no T, T only, a single token, an
# empty user, and lengths that cross the interpreter's 16-row tiles.
_users = st.tuples(st.integers(0, 40), st.integers(0, 12), st.integers(0, 10))
_layouts = st.lists(_users, min_size=1, max_size=4).map(lambda u: u + [(5, 0, 3), (3, 4, 0), (0, 0, 2), (0, 0, 0)])


def make_batch(layout, hkv, seed, dtype=torch.float32, hq=HQ):
    """Random jagged batch in the documented token order; small ts ranges make ties common."""
    g = torch.Generator().manual_seed(seed)
    kinds, stamps, lengths, targets = [], [], [], []
    for n_h, n_r, n_t in layout:
        ts_h = torch.randint(0, 30, (n_h,), generator=g)
        ts_r = torch.randint(20, 40, (n_r,), generator=g).sort().values
        ts_t = torch.randint(20, 45, (n_t,), generator=g)
        ts_t = torch.cat([part.sort().values for part in ts_t.chunk(2)]) if n_t else ts_t  # two scenarios
        kinds.append(torch.tensor([TokenKind.H] * n_h + [TokenKind.R] * n_r + [TokenKind.T] * n_t, dtype=torch.int8))
        stamps.append(torch.cat([ts_h, ts_r, ts_t]))
        lengths.append(n_h + n_r + n_t)
        targets.append(n_t)
    n = sum(lengths)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    target_offsets = torch.tensor([0] + targets).cumsum(0)
    target_rows = torch.cat([torch.arange(end - t, end) for end, t in zip(offsets[1:].tolist(), targets)])
    return dict(
        q=torch.randn(n, hq, D, generator=g, dtype=dtype),
        k=torch.randn(n, hkv, D, generator=g, dtype=dtype),
        v=torch.randn(n, hkv, DV, generator=g, dtype=dtype),
        grad=torch.randn(n, hq, DV, generator=g, dtype=dtype),
        offsets=offsets, kind=torch.cat(kinds), ts=torch.cat(stamps),
        target_offsets=target_offsets, target_rows=target_rows,
    )


@contextmanager
def heads_packed(pack: bool):
    """The Triton kernels with a kv head's query heads sharing tile rows (as on the GPU at head
    dim 256) or one head per tile, whatever the head dim."""
    saved = triton_kernels.PACK_HEADS_MIN_DIM
    triton_kernels.PACK_HEADS_MIN_DIM = 0 if pack else 10**9
    try:
        yield
    finally:
        triton_kernels.PACK_HEADS_MIN_DIM = saved


def full_attention_and_grads(b, impl):
    q, k, v = (b[name].clone().requires_grad_() for name in "qkv")
    out = hstu_attention(q, k, v, b["offsets"], b["kind"], b["ts"], alpha=ALPHA, norm=NORM, impl=impl)
    out.backward(b["grad"])
    return out.detach(), q.grad, k.grad, v.grad


def target_attention_and_grads(b, impl):
    q_t = b["q"][b["target_rows"]].clone().requires_grad_()
    k, v = (b[name].clone().requires_grad_() for name in "kv")
    out = hstu_target_attention(q_t, k, v, b["offsets"], b["kind"], b["ts"], b["target_offsets"],
                                alpha=ALPHA, norm=NORM, impl=impl)
    out.backward(b["grad"][b["target_rows"]])
    return out.detach(), q_t.grad, k.grad, v.grad


def split_inputs(b):
    """b's keys and metadata as the two halves split target attention takes: (k_context, v_context,
    k_t, v_t, context_offsets, target_offsets, context_kind, context_ts, target_ts) and the context rows."""
    is_target = torch.zeros(b["k"].shape[0], dtype=torch.bool)
    is_target[b["target_rows"]] = True
    context_rows, target_rows = (~is_target).nonzero().squeeze(1), b["target_rows"]
    halves = [b[name][rows].clone() for name in "kv" for rows in (context_rows, target_rows)]
    return (halves[0], halves[2], halves[1], halves[3], b["offsets"] - b["target_offsets"], b["target_offsets"],
            b["kind"][context_rows], b["ts"][context_rows], b["ts"][target_rows]), context_rows


def split_attention_and_grads(b, impl):
    """Split target attention's output and gradients, the key gradients merged back onto b's rows."""
    (k_c, v_c, k_t, v_t, *meta), context_rows = split_inputs(b)
    q_t = b["q"][b["target_rows"]].clone().requires_grad_()
    k_c, v_c, k_t, v_t = (t.requires_grad_() for t in (k_c, v_c, k_t, v_t))
    out = hstu_split_target_attention(q_t, k_c, v_c, k_t, v_t, *meta, alpha=ALPHA, norm=NORM, impl=impl)
    out.backward(b["grad"][b["target_rows"]])
    dk = torch.empty_like(b["k"]).index_copy_(0, context_rows, k_c.grad).index_copy_(0, b["target_rows"], k_t.grad)
    dv = torch.empty_like(b["v"]).index_copy_(0, context_rows, v_c.grad).index_copy_(0, b["target_rows"], v_t.grad)
    return out.detach(), q_t.grad, dk, dv


def assert_close(actual, expected, names=("out", "dq", "dk", "dv")):
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("hkv, pack", [(1, False), (1, True), (2, True), (HQ, False)])
@settings(max_examples=3, deadline=None)
@given(layout=_layouts, seed=st.integers(0, 2**31))
def test_triton_full_attention_matches_reference(hkv, pack, layout, seed):
    b = make_batch(layout, hkv, seed)
    with heads_packed(pack):
        assert_close(full_attention_and_grads(b, "triton"), full_attention_and_grads(b, "reference"))


@pytest.mark.parametrize("hkv", [1, HQ])
@settings(max_examples=3, deadline=None)
@given(layout=_layouts, seed=st.integers(0, 2**31))
def test_triton_target_attention_matches_reference(hkv, layout, seed):
    b = make_batch(layout, hkv, seed)
    assert_close(target_attention_and_grads(b, "triton"), target_attention_and_grads(b, "reference"))


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("hkv", [1, 2])
@settings(max_examples=3, deadline=None)
@given(layout=_layouts, seed=st.integers(0, 2**31))
def test_split_target_attention_equals_merged_target_attention(impl, hkv, layout, seed):
    """Keys given as H/R rows and T rows apart: output and every gradient equal the merged axis's
    target attention (the reference), the T rows' dK/dV (their diagonal terms) included."""
    b = make_batch(layout, hkv, seed)
    assert_close(split_attention_and_grads(b, impl), target_attention_and_grads(b, "reference"))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("hq, hkv", [(3, 1), (6, 2), (20, 1)])
def test_triton_packs_query_heads_of_any_group_size(hq, hkv, pack):
    """Packed, a tile's rows are (query, head) pairs of a kv head's query heads: with 3 heads per kv
    head the interpreter's 16-row tiles hold 5 queries and a spare row; 20 heads do not fit in 16
    rows, so the tiles grow to 32 (one query, 12 spare rows). Packed or not (the GPU packs at head
    dim 256 only), full, target and split target attention, every gradient, against the reference."""
    b = make_batch([(23, 7, 9), (0, 3, 5), (17, 0, 1), (4, 2, 0)], hkv, seed=11, hq=hq)
    expected = target_attention_and_grads(b, "reference")
    with heads_packed(pack):
        assert_close(full_attention_and_grads(b, "triton"), full_attention_and_grads(b, "reference"))
        assert_close(target_attention_and_grads(b, "triton"), expected)
        assert_close(split_attention_and_grads(b, "triton"), expected)


def test_triton_reads_rows_of_any_stride():
    """q, k, v as views into wider rows (a layer's [Q | U] and [K | V] projections), their other
    half NaN so that a read outside the view would show: outputs and gradients as contiguous."""
    b = make_batch([(30, 6, 5), (9, 3, 2), (0, 0, 3)], 2, seed=7)
    wide = {name: torch.cat([b[name], torch.full_like(b[name], float("nan"))], 1).requires_grad_() for name in "qkv"}
    views = [wide[name][:, :b[name].shape[1]] for name in "qkv"]
    assert not any(view.is_contiguous() for view in views)
    out = hstu_attention(*views, b["offsets"], b["kind"], b["ts"], alpha=ALPHA, norm=NORM, impl="triton")
    out.backward(b["grad"])
    grads = [wide[name].grad[:, :b[name].shape[1]] for name in "qkv"]
    assert_close([out.detach()] + grads, full_attention_and_grads(b, "reference"))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_gate_multiplies_the_output_and_gets_its_gradient(impl):
    """`gate`: the op returns out * gate; every gradient, the gate's included, equals autograd's of
    that product, for full and split target attention."""
    b = make_batch([(20, 5, 6), (7, 0, 3), (0, 0, 2)], 2, seed=12)
    gate = torch.randn(b["q"].shape[0], HQ, DV, generator=torch.Generator().manual_seed(1))
    q, k, v, g = (t.clone().requires_grad_() for t in (b["q"], b["k"], b["v"], gate))
    meta = (b["offsets"], b["kind"], b["ts"])
    gated = hstu_attention(q, k, v, *meta, alpha=ALPHA, norm=NORM, impl=impl, gate=g)
    grads = torch.autograd.grad(gated, (q, k, v, g), b["grad"])
    q2, k2, v2, g2 = (t.clone().requires_grad_() for t in (b["q"], b["k"], b["v"], gate))
    expected = hstu_attention(q2, k2, v2, *meta, alpha=ALPHA, norm=NORM, impl="reference") * g2
    expected_grads = torch.autograd.grad(expected, (q2, k2, v2, g2), b["grad"])
    assert_close((gated, *grads), (expected, *expected_grads), ("out", "dq", "dk", "dv", "dgate"))

    (k_c, v_c, k_t, v_t, *split_meta), _ = split_inputs(b)
    rows = b["target_rows"]
    inputs = [t.clone().requires_grad_() for t in (b["q"][rows], k_c, v_c, k_t, v_t, gate[rows])]
    gated = hstu_split_target_attention(*inputs[:5], *split_meta, alpha=ALPHA, norm=NORM, impl=impl, gate=inputs[5])
    grads = torch.autograd.grad(gated, inputs, b["grad"][rows])
    plain = [t.detach().clone().requires_grad_() for t in inputs]
    expected = hstu_split_target_attention(*plain[:5], *split_meta, alpha=ALPHA, norm=NORM, impl="reference") * plain[5]
    expected_grads = torch.autograd.grad(expected, plain, b["grad"][rows])
    assert_close((gated, *grads), (expected, *expected_grads), ("out", "dq_t", "dk_c", "dv_c", "dk_t", "dv_t", "du"))


def column_views(tensors):
    """`tensors` (rows, heads, dim) each as views into one new (rows, width) buffer, side by side."""
    rows = tensors[0].shape[0]
    buffer = torch.cat([t.reshape(rows, -1) for t in tensors], 1)
    widths = [t.shape[1] * t.shape[2] for t in tensors]
    return [block.view(t.shape) for block, t in zip(buffer.split(widths, 1), tensors)]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_gradients_of_column_blocks_of_one_buffer_come_as_one_buffer(impl):
    """Split target attention with q_t, k_t, v_t and the gate as views into one buffer (a layer's
    projection of its T rows) and the context keys and values into another: the gradients come
    back as views into two new buffers laid out the same way, with the values of separate tensors.
    Blocks that leave a hole in their buffer (no gate) get gradients of their own."""
    b = make_batch([(20, 5, 6), (7, 0, 3), (0, 0, 2)], 1, seed=13)
    (k_c, v_c, k_t, v_t, *split_meta), _ = split_inputs(b)
    rows = b["target_rows"]
    gate = torch.randn(rows.shape[0], HQ, DV, generator=torch.Generator().manual_seed(2))
    separate = [t.clone().requires_grad_() for t in (b["q"][rows], k_c, v_c, k_t, v_t, gate)]
    out = hstu_split_target_attention(*separate[:5], *split_meta, alpha=ALPHA, norm=NORM, impl=impl, gate=separate[5])
    expected = torch.autograd.grad(out, separate, b["grad"][rows])

    q_t, u, k_t, v_t = column_views([b["q"][rows], gate, k_t, v_t])
    k_c, v_c = column_views([k_c, v_c])
    views = [t.requires_grad_() for t in (q_t, k_c, v_c, k_t, v_t, u)]
    out = hstu_split_target_attention(*views[:5], *split_meta, alpha=ALPHA, norm=NORM, impl=impl, gate=views[5])
    grads = torch.autograd.grad(out, views, b["grad"][rows])
    assert_close(grads, expected, ("dq_t", "dk_c", "dv_c", "dk_t", "dv_t", "du"))
    for view, grad in zip(views, grads):
        assert grad.stride() == view.stride()
    dq_t, dk_c, dv_c, dk_t, dv_t, du = grads
    assert dq_t._base is not None and all(g._base is dq_t._base for g in (du, dk_t, dv_t))
    assert dq_t._base.shape == (rows.shape[0], HQ * (D + DV) + D + DV)
    assert dk_c._base is not None and dv_c._base is dk_c._base is not dq_t._base

    q_t, k_t, v_t = (t.detach().requires_grad_() for t in (q_t, k_t, v_t))  # u's columns unused: a hole
    out = hstu_split_target_attention(q_t, k_c.detach(), v_c.detach(), k_t, v_t, *split_meta, alpha=ALPHA,
                                      norm=NORM, impl=impl)
    grads = torch.autograd.grad(out, (q_t, k_t, v_t), b["grad"][rows])
    assert all(g._base is None for g in grads)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("key_splits", [2, 3])
def test_triton_forward_split_over_keys_matches_reference(key_splits, pack):
    """The forward with each program's keys split (serving: few query blocks, many keys), full,
    target and split target attention, against the reference, with 3 query heads per kv head
    packed into tile rows or not. Users long enough for every split to hold tiles of H keys, of
    the H/R boundary and of R keys, and short ones with empty splits."""
    b = make_batch([(70, 20, 6), (40, 9, 3), (3, 2, 2), (0, 0, 4), (20, 0, 0)], 2, seed=3, hq=6)
    offsets, kind, ts = b["offsets"], b["kind"], b["ts"]
    q_t, q_offsets = b["q"][b["target_rows"]], b["target_offsets"]
    (k_c, v_c, k_t, v_t, context_offsets, _, context_kind, context_ts, target_ts), _ = split_inputs(b)
    expected = reference.jagged_hstu_attention(b["q"], b["k"], b["v"], offsets, offsets, kind, ts, ALPHA, NORM)
    expected_t = reference.jagged_hstu_attention(q_t, b["k"], b["v"], offsets, q_offsets, kind, ts, ALPHA, NORM)
    with heads_packed(pack):
        split = triton_kernels.jagged_hstu_attention(b["q"], b["k"], b["v"], offsets, offsets, kind, ts, ALPHA, NORM,
                                                     key_splits=key_splits)
        split_t = triton_kernels.jagged_hstu_attention(q_t, b["k"], b["v"], offsets, q_offsets, kind, ts, ALPHA, NORM,
                                                       key_splits=key_splits)
        halves = triton_kernels.jagged_split_target_attention(q_t, k_c, v_c, k_t, v_t, context_offsets, q_offsets,
                                                              context_kind, context_ts, target_ts, ALPHA, NORM,
                                                              key_splits=key_splits)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split_t, expected_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(halves, expected_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_target_attention_equals_full_attention_rows(impl):
    """Invariant 3, forward and the query gradient; dk, dv match those of the full layer
    when only the T rows carry a gradient."""
    b = make_batch([(30, 6, 7), (12, 0, 5), (9, 4, 0)], 2, seed=1)
    rows = b["target_rows"]
    b["grad"] = torch.zeros_like(b["grad"]).index_copy_(0, rows, b["grad"][rows])
    out, dq, dk, dv = full_attention_and_grads(b, impl)
    out_t, dq_t, dk_t, dv_t = target_attention_and_grads(b, impl)
    assert_close((out_t, dq_t, dk_t, dv_t), (out[rows], dq[rows], dk, dv))


def dense_per_head(q, k, v, offsets, kind, ts):
    """Plain multi-head HSTU, one dense einsum per user with the mask builder, float64."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for (start, end), mask in zip(itertools.pairwise(offsets.tolist()), build_dynamic_mask(offsets, kind, ts)):
        scores = torch.einsum("ihd,jhd->hij", q[start:end].double(), k[start:end].double())
        weights = torch.nn.functional.silu(ALPHA * scores) * mask / NORM
        out[start:end] = torch.einsum("hij,jhd->ihd", weights, v[start:end].double())
    return out


def test_gqa_with_equal_heads_is_multi_head_attention():
    """Invariant 4, and GQA is multi-head attention on k, v repeated per query head."""
    b = make_batch([(20, 5, 6), (7, 0, 3)], HQ, seed=2)
    meta = (b["offsets"], b["kind"], b["ts"])
    out = hstu_attention(b["q"], b["k"], b["v"], *meta, alpha=ALPHA, norm=NORM, impl="reference")
    torch.testing.assert_close(out.double(), dense_per_head(b["q"], b["k"], b["v"], *meta), rtol=1e-5, atol=1e-7)
    g = make_batch([(20, 5, 6), (7, 0, 3)], 2, seed=3)
    out = hstu_attention(g["q"], g["k"], g["v"], *meta, alpha=ALPHA, norm=NORM, impl="reference")
    k, v = (g[name].repeat_interleave(HQ // 2, dim=1) for name in "kv")
    torch.testing.assert_close(out.double(), dense_per_head(g["q"], k, v, *meta), rtol=1e-5, atol=1e-7)


def test_reference_against_numpy_loops_float64():
    """The reference against the mask rule and the formula written out pair by pair."""
    b = make_batch([(3, 2, 3), (2, 1, 1)], 2, seed=4, dtype=torch.float64)
    q, k, v = b["q"].numpy(), b["k"].numpy(), b["v"].numpy()
    kind, ts, offsets = b["kind"].numpy(), b["ts"].numpy(), b["offsets"].tolist()
    expected = np.zeros((q.shape[0], HQ, DV))
    for start, end in itertools.pairwise(offsets):
        for i, j, h in itertools.product(range(start, end), range(start, end), range(HQ)):
            if kind[j] == TokenKind.H or (kind[j] == TokenKind.R and ts[j] < ts[i]) or i == j:
                x = ALPHA * q[i, h] @ k[j, h // 2]
                expected[i, h] += x / (1 + np.exp(-x)) / NORM * v[j, h // 2]
    out = hstu_attention(b["q"], b["k"], b["v"], b["offsets"], b["kind"], b["ts"], alpha=ALPHA, norm=NORM,
                         impl="reference")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_reference_backward_matches_autograd_of_reference_forward():
    b = make_batch([(10, 3, 4), (0, 2, 3)], 2, seed=5, dtype=torch.float64)
    q_offsets = b["target_offsets"]
    q = b["q"][b["target_rows"]].requires_grad_()
    k, v = (b[name].clone().requires_grad_() for name in "kv")
    meta = (b["offsets"], q_offsets, b["kind"], b["ts"], ALPHA, NORM)
    grad = torch.randn(q.shape[0], HQ, DV, dtype=torch.float64)
    out = reference.jagged_hstu_attention(q, k, v, *meta)
    expected = torch.autograd.grad(out, (q, k, v), grad)
    actual = reference.jagged_hstu_attention_backward(grad, q.detach(), k.detach(), v.detach(), *meta)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_target_output_ignores_other_targets_and_later_realtime_events(impl):
    """Invariants 1 and 5 at the kernel level: perturbing the other T-tokens, or an R event
    with ts >= the target's ts, leaves that target's output unchanged."""
    b = make_batch([(12, 6, 6)], 2, seed=6)
    target = 12 + 6 + 2
    b["ts"][12:18] = torch.tensor([21, 24, 27, 30, 33, 36])
    b["ts"][target] = 30
    meta = (b["offsets"], b["kind"], b["ts"])
    out = hstu_attention(b["q"], b["k"], b["v"], *meta, alpha=ALPHA, norm=NORM, impl=impl)
    others = [j for j in range(18, 24) if j != target] + [15, 16, 17]  # R events at ts 30, 33, 36
    for name in "qkv":
        b[name][others] = torch.randn_like(b[name][others])
    moved = hstu_attention(b["q"], b["k"], b["v"], *meta, alpha=ALPHA, norm=NORM, impl=impl)
    torch.testing.assert_close(moved[target], out[target], rtol=1e-6, atol=1e-7)


def test_dispatcher_errors_name_the_argument(monkeypatch):
    b = make_batch([(4, 1, 2)], 2, seed=7)
    meta = (b["offsets"], b["kind"], b["ts"])
    with pytest.raises(ValueError, match="q.shape\\[1\\] \\(query heads\\)"):
        hstu_attention(b["q"][:, :3], b["k"], b["v"], *meta, alpha=ALPHA, norm=NORM)
    with pytest.raises(ValueError, match="kind.dtype"):
        hstu_attention(b["q"], b["k"], b["v"], b["offsets"], b["kind"].long(), b["ts"], alpha=ALPHA, norm=NORM)
    with pytest.raises(ValueError, match=r"k.shape\[1\] \(kv heads\) is 0"):
        hstu_attention(b["q"], b["k"][:, :0], b["v"][:, :0], *meta, alpha=ALPHA, norm=NORM)
    # offsets that index rows q, k or v do not have (the kernels would read past them)
    with pytest.raises(ValueError, match=r"offsets is from 0 to 8, expected non-decreasing from 0 to at most 7"):
        hstu_attention(b["q"], b["k"], b["v"], torch.tensor([0, 8]), b["kind"], b["ts"], alpha=ALPHA, norm=NORM)
    q_t = b["q"][b["target_rows"]]
    with pytest.raises(ValueError, match=r"target_offsets is from 0 to 3, expected non-decreasing from 0 to at most 2"):
        hstu_target_attention(q_t, b["k"], b["v"], *meta, torch.tensor([0, 3]), alpha=ALPHA, norm=NORM)
    with pytest.raises(ValueError, match=r"target_offsets is 2 for user 0, expected at most that user's 1 tokens"):
        hstu_target_attention(q_t, b["k"][:1], b["v"][:1], torch.tensor([0, 1]), b["kind"][:1], b["ts"][:1],
                              b["target_offsets"], alpha=ALPHA, norm=NORM)
    with pytest.raises(ValueError, match="impl must be one of"):
        hstu_attention(b["q"], b["k"], b["v"], *meta, alpha=ALPHA, norm=NORM, impl="cuda")
    with pytest.raises(ValueError, match="head dim D = 12"):
        hstu_attention(b["q"][..., :12], b["k"][..., :12], b["v"], *meta, alpha=ALPHA, norm=NORM, impl="triton")
    (k_c, v_c, k_t, v_t, *split_meta), _ = split_inputs(b)
    q_t = b["q"][b["target_rows"]]
    with pytest.raises(ValueError, match="k_t.shape"):
        hstu_split_target_attention(q_t, k_c, v_c, k_t[:1], v_t, *split_meta, alpha=ALPHA, norm=NORM)
    with pytest.raises(ValueError, match="context_kind.shape"):
        hstu_split_target_attention(q_t, k_c, v_c, k_t, v_t, *split_meta[:2], split_meta[2][:2], *split_meta[3:],
                                    alpha=ALPHA, norm=NORM)
    with pytest.raises(ValueError, match=r"gate.shape is \(7, 4, 16\), expected \(7, 4, 32\)"):
        hstu_attention(b["q"], b["k"], b["v"], *meta, alpha=ALPHA, norm=NORM, gate=b["q"])
    with pytest.raises(ValueError, match="gate.dtype"):
        hstu_split_target_attention(q_t, k_c, v_c, k_t, v_t, *split_meta, alpha=ALPHA, norm=NORM,
                                    gate=torch.zeros(q_t.shape[0], HQ, DV, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^hstu attention: impl='triton' does not support these inputs: dtype "
                                         r"torch.float64; the kernels take float16, bfloat16 or float32$"):
        hstu_attention(*(b[n].double() for n in "qkv"), *meta, alpha=ALPHA, norm=NORM, impl="triton")
    with pytest.raises(ValueError, match=r"^hstu attention: impl='triton' does not support these inputs: head dim D "
                                         r"= 24; the kernels take 16, 32, 64, 128 or 256$"):
        hstu_attention(b["q"].repeat(1, 1, 3)[..., :24], b["k"].repeat(1, 1, 3)[..., :24], b["v"], *meta,
                       alpha=ALPHA, norm=NORM, impl="triton")
    # What the kernels cover is asked only where Triton would run, and "auto" takes the reference otherwise.
    assert resolve_impl("auto", torch.device("cpu"), "op", lambda: 1 / 0) == "reference"
    assert resolve_impl("triton", torch.device("cpu"), "op", lambda: None) == "triton"
    with pytest.raises(ValueError, match=r"^op: impl='triton' does not support these inputs: a reason$"):
        resolve_impl("triton", torch.device("cpu"), "op", lambda: "a reason")
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        resolve_impl("triton", torch.device("cpu"))


def test_custom_op_registration_opcheck():
    b = make_batch([(6, 2, 3), (3, 0, 2)], 2, seed=8)
    for args in (
        (b["q"], b["k"], b["v"], b["offsets"], b["offsets"], b["kind"], b["ts"], ALPHA, NORM, "reference"),
        (b["q"][b["target_rows"]], b["k"], b["v"], b["offsets"], b["target_offsets"], b["kind"], b["ts"],
         ALPHA, NORM, "reference"),
    ):
        args = tuple(a.clone().requires_grad_() if i < 3 else a for i, a in enumerate(args))
        torch.library.opcheck(torch.ops.mtfm.hstu_attention.default, args)
    (k_c, v_c, k_t, v_t, c_offsets, t_offsets, c_kind, c_ts, t_ts), _ = split_inputs(b)
    tensors = [t.requires_grad_() for t in (b["q"][b["target_rows"]], k_c, v_c, k_t, v_t)]
    torch.library.opcheck(torch.ops.mtfm.hstu_split_target_attention.default,
                          (*tensors, c_offsets, t_offsets, c_kind, c_ts, t_ts, ALPHA, NORM, "reference"))


def test_runs_under_torch_compile_with_autograd():
    b = make_batch([(6, 2, 3), (3, 0, 2)], 2, seed=9)
    meta = (b["offsets"], b["kind"], b["ts"])

    def layer(q, k, v):
        return hstu_attention(q, k, v, *meta, alpha=ALPHA, norm=NORM).square().sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    inputs = [b[name].clone().requires_grad_() for name in "qkv"]
    eager_inputs = [b[name].clone().requires_grad_() for name in "qkv"]
    compiled(*inputs).backward()
    layer(*eager_inputs).backward()
    for a, e in zip(inputs, eager_inputs):
        torch.testing.assert_close(a.grad, e.grad)
