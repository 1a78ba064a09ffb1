"""The packed token axis in two halves: its H and R rows, and its T rows.

A run of target layers leaves the H and R rows unchanged, so the HTA stack splits the token axis
once per run (`TokenSplit.split`), carries only the T rows through the run and merges the two
halves again (`TokenSplit.merge`, the kernel op `merge_rows`) before a full layer.
Inside the run nothing is merged: a target layer's keys and values stay in the two halves, as
split target attention takes them (the H and R rows' kind and ts, and the T rows' ts, are here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtfm.kernels.merge_rows import merge_rows

if TYPE_CHECKING:
    from .layers import JaggedContext


@dataclass(frozen=True)
class SplitKeys:
    """Where split target attention finds each user's keys: user b's H and R rows are rows
    context_offsets[b]:context_offsets[b+1] of the context half (context_kind, context_ts theirs),
    its T rows are rows target_offsets[b]:target_offsets[b+1] of the T half (target_ts theirs)."""

    context_offsets: Tensor
    context_kind: Tensor
    context_ts: Tensor
    target_offsets: Tensor
    target_ts: Tensor


@dataclass(frozen=True)
class TokenSplit:
    """The packed token axis as two halves: its H and R rows (context_index, increasing) and its
    T rows (target_index), with each row's input-GLN group (indices into ctx.group_names), and
    the halves' layout for split target attention. merge_source (N,): where each row of the axis
    is in the halves concatenated (H and R rows, then T rows), the inverse of the split. impl: the
    `merge_rows` implementation (the model's norm_impl, which picks its row-wise kernels)."""

    context_index: Tensor
    target_index: Tensor
    merge_source: Tensor
    context_group: Tensor
    target_group: Tensor
    keys: SplitKeys
    impl: str = "auto"

    @classmethod
    def of(cls, ctx: "JaggedContext", impl: str = "auto") -> "TokenSplit":
        """Built on the device without a host sync (the row counts come from the shapes)."""
        num_rows = ctx.group.shape[0]
        context_index = context_rows(num_rows, ctx.target_index)
        positions = torch.arange(num_rows, device=context_index.device)
        merge_source = torch.empty_like(positions).scatter_(0, torch.cat([context_index, ctx.target_index]), positions)
        keys = SplitKeys(ctx.offsets - ctx.target_offsets, ctx.kind[context_index], ctx.ts[context_index],
                         ctx.target_offsets, ctx.ts[ctx.target_index])
        return cls(context_index, ctx.target_index, merge_source, ctx.group[context_index],
                   ctx.group[ctx.target_index], keys, impl)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, ...) -> (its H and R rows, its T rows)."""
        return _SplitRows.apply(x, self.context_index, self.target_index, self.merge_source, self.impl)

    def merge(self, context_rows: Tensor, target_rows: Tensor) -> Tensor:
        """The two halves back on the packed token axis (N, ...)."""
        return _MergeRows.apply(context_rows, target_rows, self.context_index, self.target_index, self.merge_source,
                                self.impl)


# Splitting the token axis and merging it back are each other's gradient. Written out, neither
# backward accumulates: autograd's own backward of a row gather is an atomic index_add, which
# took 0.6-0.9 ms per call for bfloat16 rows at 131K tokens on the H200.

class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, context_index: Tensor, target_index: Tensor, merge_source: Tensor,
                impl: str) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(merge_source)
        ctx.impl = impl
        return x.index_select(0, context_index), x.index_select(0, target_index)

    @staticmethod
    def backward(ctx, grad_context: Tensor, grad_target: Tensor):
        merge_source, = ctx.saved_tensors
        return merge_rows(grad_context, grad_target, merge_source, impl=ctx.impl), None, None, None, None


class _MergeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context_rows: Tensor, target_rows: Tensor, context_index: Tensor, target_index: Tensor,
                merge_source: Tensor, impl: str) -> Tensor:
        ctx.save_for_backward(context_index, target_index)
        return merge_rows(context_rows, target_rows, merge_source, impl=impl)

    @staticmethod
    def backward(ctx, grad: Tensor):
        context_index, target_index = ctx.saved_tensors
        return grad.index_select(0, context_index), grad.index_select(0, target_index), None, None, None, None


def context_rows(num_rows: int, target_index: Tensor) -> Tensor:
    """The rows of a packed axis of `num_rows` that are not in target_index, increasing: on the
    device, without the host sync of `nonzero` (the count comes from the shapes)."""
    num_context = num_rows - target_index.shape[0]
    is_target = torch.zeros(num_rows, dtype=torch.int64, device=target_index.device).index_fill_(0, target_index, 1)
    # Context row i goes to slot (its rank among context rows); T rows all go to a spare slot.
    slot = torch.where(is_target.bool(), num_context, torch.cumsum(1 - is_target, 0) - 1)
    positions = torch.arange(num_rows, device=target_index.device)
    return positions.new_empty(num_context + 1).scatter_(0, slot, positions)[:num_context]
