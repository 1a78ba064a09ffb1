"""column_blocks: a projection's gradient from its blocks' gradients, handed on whole when the
attention laid them out as one buffer, built by copies otherwise; values against autograd of
plain slices."""
from __future__ import annotations

import pytest
import torch

from mtfm.kernels.hstu_attention import hstu_attention
from mtfm.kernels.mask import TokenKind
from mtfm.model.column_blocks import column_blocks

HEADS, KV_HEADS, DIM = 2, 1, 4
BLOCKS = [(HEADS, DIM), (HEADS, DIM), (KV_HEADS, DIM), (KV_HEADS, DIM)]
WIDTH = 2 * (HEADS + KV_HEADS) * DIM


def jagged_batch(seed: int):
    """Two users (H H H R T T, then H R T), as the attention op takes them."""
    kind = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1, 2], dtype=torch.int8)
    ts = torch.tensor([1, 2, 3, 5, 9, 9, 1, 4, 6])
    offsets = torch.tensor([0, 6, 9])
    assert kind.tolist().count(TokenKind.T) == 3
    x = torch.randn(9, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x, offsets, kind, ts


def plain_blocks(x):
    """The same views by plain slicing: autograd concatenates their gradients."""
    out, start = [], 0
    for heads, dim in BLOCKS:
        out.append(x[:, start:start + heads * dim].reshape(-1, heads, dim))
        start += heads * dim
    return out


def gated_attention(q, u, k, v, offsets, kind, ts, fused_gate=True):
    args = dict(alpha=0.5, norm=16.0, impl="reference")
    if fused_gate:
        return hstu_attention(q, k, v, offsets, kind, ts, gate=u, **args)
    return hstu_attention(q, k, v, offsets, kind, ts, **args) * u


def test_blocks_are_views_of_the_input():
    x = torch.randn(5, WIDTH, requires_grad=True)
    q, u, k, v = column_blocks(x, BLOCKS)
    for block, plain in zip((q, u, k, v), plain_blocks(x)):
        assert block.data_ptr() == plain.data_ptr() and block.stride() == plain.stride()
        assert torch.equal(block, plain)


def test_gradient_laid_out_as_one_buffer_is_handed_on_without_a_copy():
    x, offsets, kind, ts = jagged_batch(0)
    weights = torch.randn(9, HEADS, DIM, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    projected = leaf * 1.0  # the projection's output: a non-leaf, as in a layer
    seen = {}
    projected.register_hook(lambda g: seen.setdefault("whole", g))
    q, u, k, v = column_blocks(projected, BLOCKS)
    q.register_hook(lambda g: seen.setdefault("dq", g))
    (gated_attention(q, u, k, v, offsets, kind, ts) * weights).sum().backward()

    plain = x.clone().requires_grad_()
    (gated_attention(*plain_blocks(plain), offsets, kind, ts, fused_gate=False) * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, plain.grad)
    assert seen["dq"]._base is seen["whole"]  # the attention's buffer itself, no concatenation


@pytest.mark.parametrize("case", ["gate outside the op", "unused blocks"])
def test_gradients_laid_out_otherwise_are_copied_into_place(case):
    """The gate multiplied outside the op (U's gradient apart from the others) and blocks without
    a gradient (zeros): the projection's gradient is still every block's in its columns."""
    x, offsets, kind, ts = jagged_batch(1)
    weights = torch.randn(9, HEADS, DIM, dtype=torch.float64)

    def loss(q, u, k, v):
        if case == "unused blocks":
            return (q * weights).sum() + k.square().sum()
        return (gated_attention(q, u, k, v, offsets, kind, ts, fused_gate=False) * weights).sum()

    blocks_input = x.clone().requires_grad_()
    loss(*column_blocks(blocks_input * 1.0, BLOCKS)).backward()
    plain = x.clone().requires_grad_()
    loss(*plain_blocks(plain)).backward()
    torch.testing.assert_close(blocks_input.grad, plain.grad)
    if case == "unused blocks":
        assert not blocks_input.grad[:, HEADS * DIM:2 * HEADS * DIM].any()


def test_without_gradients_blocks_are_plain_views():
    x = torch.randn(4, WIDTH, requires_grad=True)
    with torch.no_grad():
        q, _, _, v = column_blocks(x, BLOCKS)
    assert q.grad_fn is None and v._base is x


def test_second_order_gradients_through_blocks_and_gate():
    """A backward that is differentiated itself (create_graph) shares no buffer: with the
    reference attention, the gradient of a gradient equals that of plain slices."""
    x, offsets, kind, ts = jagged_batch(2)

    def grad_norm(x, blocks, fused_gate):
        out = gated_attention(*blocks(x), offsets, kind, ts, fused_gate=fused_gate)
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return grad.square().sum()

    leaf = x.clone().requires_grad_()
    grad_norm(leaf, lambda t: column_blocks(t * 1.0, BLOCKS), True).backward()
    plain = x.clone().requires_grad_()
    grad_norm(plain, plain_blocks, False).backward()
    torch.testing.assert_close(leaf.grad, plain.grad)


def test_blocks_and_gate_under_torch_compile():
    x, offsets, kind, ts = jagged_batch(3)

    def loss(x):
        return gated_attention(*column_blocks(x * 1.0, BLOCKS), offsets, kind, ts).square().sum()

    compiled_input, eager_input = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(compiled_input).backward()
    loss(eager_input).backward()
    torch.testing.assert_close(compiled_input.grad, eager_input.grad)
