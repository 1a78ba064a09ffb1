"""A projection's output read as head views of its column blocks, with a backward that concatenates nothing when it can.

A layer projects its input once into [Q | U | K | V] (a run of target layers its H and R rows into
[K | V] per layer) and reads each block as a (rows, heads, head_dim) view. Autograd's backward of
such a split builds the projection's gradient by concatenating the blocks' gradients: one more
pass over the projection's width per layer and step. The attention op takes U as its gate and,
when its Q, K, V and gate are the blocks of one buffer, writes their gradients as the blocks of one
new buffer of the same layout (`mtfm.kernels.hstu_attention`); `column_blocks` hands that buffer
on whole. Gradients laid out any other way are concatenated, as autograd's split did.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def column_blocks(x: Tensor, heads: Sequence[tuple[int, int]]) -> tuple[Tensor, ...]:
    """x (rows, width) with unit column stride, width = sum of heads * dim over `heads` -> per
    (heads, dim) in order, the (rows, heads, dim) view of its columns."""
    if torch.compiler.is_compiling() or not (x.requires_grad and torch.is_grad_enabled()):
        return _views(x, heads)
    return _ColumnBlocks.apply(x, tuple(heads))


def _views(x: Tensor, heads: Sequence[tuple[int, int]]) -> tuple[Tensor, ...]:
    blocks = x.split([n * dim for n, dim in heads], dim=1)
    return tuple(block.view(-1, n, dim) for block, (n, dim) in zip(blocks, heads))


class _ColumnBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, heads: tuple[tuple[int, int], ...]):
        ctx.heads, ctx.shape = heads, x.shape
        ctx.set_materialize_grads(False)
        return _views(x, heads)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        whole = _whole(grads, ctx.shape, ctx.heads)
        if whole is not None:
            return whole, None
        like = next(g for g in grads if g is not None)
        rows = ctx.shape[0]
        return torch.cat([like.new_zeros(rows, n * dim) if g is None else g.reshape(rows, n * dim)
                          for g, (n, dim) in zip(grads, ctx.heads)], dim=1), None


def _whole(grads: tuple[Tensor | None, ...], shape: torch.Size, heads: tuple[tuple[int, int], ...]) -> Tensor | None:
    """The row-major (rows, width) tensor whose column blocks the gradients are, each at its own
    block with its view's strides; None if they are not."""
    base = grads[0]._base if grads[0] is not None else None
    if base is None or base.shape != shape or not base.is_contiguous():
        return None
    column = 0
    for grad, (n, dim) in zip(grads, heads):
        if (grad is None or grad._base is not base or grad.storage_offset() != base.storage_offset() + column
                or grad.shape != (shape[0], n, dim) or grad.stride() != (shape[1], dim, 1)):
            return None
        column += n * dim
    return base
