"""Padding a `TokenBatch` to a fixed shape, so that one CUDA graph serves every batch that fits it.

A CUDA graph replays fixed kernels on fixed buffers: every tensor of the batch must keep its
size between calls. Serving rounds each size up to a bucket (`batch_shape(batch)`); training
keeps one shape that grows to hold its batches (`GrowingShape`). `pad_batch(batch, shape)`
fills the batch up to a shape without changing a real token's output:

    users    real users 0..B-1 unchanged, then empty users (no tokens), then the padding users
             owning the padding rows: ONE, or (with max_user_tokens) as many as keep each one's
             sequence that short, so that attention over them costs what a real user's does
    tokens   per group, the shape's rows minus the batch's (at least one where the batch has
             any) of that group's kind (H and R sequences first, then each scenario's T-tokens,
             the order the kernels rely on), ts 0, every feature 0 (the "missing" row), labels
             masked out; split evenly between the padding users in that order
    lists    a categorical list's values are padded with row 0; the group's first padding row
             owns the extra values, its other padding rows get empty lists

Attention never crosses users and every other op is per token, so the real users' outputs are
those of the unpadded batch; rows of the padding users are discarded, and as their labels are
masked out they add nothing to a training loss or to the value of any gradient. One difference
remains: a scenario with no real target in the batch but padding rows in the shape runs its
towers, so its parameters get zero gradients where the unpadded batch gives them none, and Adam
still moves them by their momentum (as it does under DDP when another worker has that
scenario). The padded rows come after the real ones in every tensor, so output row r < NT is
the unpadded batch's row r. The padded batch records the real sizes (`TokenBatch.unpadded`) for
throughput counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.kernels.mask import TokenKind

from .batch import GroupFeatures, TokenBatch, UnpaddedSizes


def bucket(n: int) -> int:
    """The smallest size of the form 2^k or 3 * 2^(k-1) that is larger than n (0 stays 0): 1, 2, 3,
    4, 6, 8, 12, 16, 24, ... Strictly larger, so that a group with tokens always has a padding
    row to own its padded list values; at most 1.5x n + 1 (2x for n = 1)."""
    if n == 0:
        return 0
    power = 1 << (n.bit_length() - 1)  # power <= n < 2 * power
    return power * 3 // 2 if power >= 2 and n < power * 3 // 2 else 2 * power


def user_bucket(num_users: int) -> int:
    """Users including the padding user: the next power of two of num_users + 1."""
    size = 1
    while size < num_users + 1:
        size *= 2
    return size


@dataclass(frozen=True)
class BatchShape:
    """The sizes of a padded batch: the key of its CUDA graph.

    group_tokens: rows per group (the batch's `group_names` order); list_values: values per
    (group, categorical list feature), in the order of the batch's `list_values` dicts."""

    num_users: int
    group_tokens: tuple[int, ...]
    list_values: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.group_tokens)


def batch_shape(batch: TokenBatch) -> BatchShape:
    """The bucketed shape that `batch` pads to."""
    return BatchShape(
        num_users=user_bucket(batch.num_users),
        group_tokens=tuple(bucket(batch.features[g].num_tokens) for g in batch.group_names),
        list_values=tuple(bucket(v.shape[0]) for g in batch.group_names for v in batch.features[g].list_values.values()),
    )


def group_kinds(batch: TokenBatch) -> list[int | None]:
    """The TokenKind of each group's tokens (None for a group with no tokens in `batch`)."""
    return [int(batch.kind[batch.features[g].index[0]]) if batch.features[g].num_tokens else None
            for g in batch.group_names]


def pad_batch(batch: TokenBatch, shape: BatchShape, *, kinds: list[int | None] | None = None,
              max_user_tokens: int | None = None) -> TokenBatch:
    """`batch` (on the CPU) padded to `shape` (which must hold it: see `batch_shape`). `kinds`: each
    group's TokenKind (`group_kinds` of an earlier batch), needed when a group absent from `batch`
    gets padding rows; `max_user_tokens`: the most padding rows per padding user."""
    groups = batch.group_names
    counts = [batch.features[g].num_tokens for g in groups]
    pads = [size - n for size, n in zip(shape.group_tokens, counts)]
    list_counts = [v.shape[0] for g in groups for v in batch.features[g].list_values.values()]
    list_pads = [pads[i] for i, g in enumerate(groups) for _ in batch.features[g].list_values]
    if len(shape.group_tokens) != len(groups) or len(shape.list_values) != len(list_counts):
        raise ValueError(f"pad_batch: {shape} has {len(shape.group_tokens)} groups and {len(shape.list_values)} "
                         f"list features, the batch {len(groups)} and {len(list_counts)}")
    if max_user_tokens is not None and max_user_tokens < 1:
        raise ValueError(f"pad_batch: max_user_tokens must be >= 1, found {max_user_tokens}")
    # One padding user, or with max_user_tokens enough that none has more rows.
    pad_rows_total = shape.num_tokens - batch.num_tokens
    pad_users = 1 if max_user_tokens is None else max(1, math.ceil(pad_rows_total / max_user_tokens))
    if (shape.num_users < batch.num_users + pad_users or any(p < 0 or (p == 0 and n) for p, n in zip(pads, counts))
            or any(size < n or (size > n and not pad) for size, n, pad in zip(shape.list_values, list_counts, list_pads))):
        raise ValueError(f"pad_batch: {shape} does not hold a batch of {batch.num_users} users, group sizes "
                         f"{dict(zip(groups, counts))} and list sizes {list_counts}")
    # Rows of the padding users, per group: H and R sequences (by their tokens' kind), then T.
    found = group_kinds(batch)
    kinds = [k if k is not None else (kinds[i] if kinds is not None else None) for i, k in enumerate(found)]
    unknown = [g for g, k, p in zip(groups, kinds, pads) if p and k is None]
    if unknown:
        raise ValueError(f"pad_batch: groups {unknown} have no tokens in the batch to take their kind from; pass kinds")
    order = sorted((i for i in range(len(groups)) if pads[i]), key=lambda i: (kinds[i], i))
    start, first_row = batch.num_tokens, {}
    for i in order:
        first_row[i] = start
        start += pads[i]
    total_pad = start - batch.num_tokens

    def pad_rows(t: Tensor, n: int, value=0) -> Tensor:
        return torch.cat([t, t.new_full((n,) + t.shape[1:], value)])

    kind = torch.cat([batch.kind] + [batch.kind.new_full((pads[i],), kinds[i]) for i in order])
    group = torch.cat([batch.group] + [batch.group.new_full((pads[i],), i) for i in order])
    new_index = {i: torch.arange(first_row[i], first_row[i] + pads[i]) for i in order}
    targets = [i for i in order if kinds[i] == TokenKind.T]
    target_index = torch.cat([batch.target_index] + [new_index[i] for i in targets])
    target_pad = sum(pads[i] for i in targets)
    empty_users = shape.num_users - batch.num_users - pad_users
    # The padding rows split evenly between the padding users: ends[u] rows after the real ones.
    ends = torch.tensor([round(u * total_pad / pad_users) for u in range(1, pad_users + 1)], dtype=torch.int64)
    offsets = torch.cat([batch.offsets, batch.offsets.new_full((empty_users,), batch.num_tokens),
                         batch.num_tokens + ends])
    target_ends = (ends - (total_pad - target_pad)).clamp_min(0)  # the T rows are the last target_pad
    target_offsets = torch.cat([batch.target_offsets, batch.target_offsets[-1:].expand(empty_users),
                                batch.target_offsets[-1:] + target_ends])

    list_sizes = iter(shape.list_values)
    features = {}
    for i, g in enumerate(groups):
        feats, pad = batch.features[g], pads[i]
        lists, list_offsets = {}, {}
        for name, values in feats.list_values.items():
            size = next(list_sizes)
            lists[name] = pad_rows(values, size - values.shape[0])
            list_offsets[name] = pad_rows(feats.list_offsets[name], pad, size)
        features[g] = GroupFeatures(
            index=torch.cat([feats.index, new_index[i]]) if pad else feats.index,
            categorical={k: pad_rows(v, pad) for k, v in feats.categorical.items()},
            numeric={k: pad_rows(v, pad) for k, v in feats.numeric.items()},
            list_values=lists, list_offsets=list_offsets,
            labels=None if feats.labels is None else pad_rows(feats.labels, pad),
            label_mask=None if feats.label_mask is None else pad_rows(feats.label_mask, pad, False),
            request_id=None if feats.request_id is None else pad_rows(feats.request_id, pad, -1),
        )
    return TokenBatch(
        group_names=groups, scenario_tasks=batch.scenario_tasks, offsets=offsets, target_offsets=target_offsets,
        user_id=pad_rows(batch.user_id, shape.num_users - batch.num_users, -1), kind=kind, group=group,
        ts=pad_rows(batch.ts, total_pad), target_index=target_index, features=features,
        unpadded=batch.unpadded or UnpaddedSizes(batch.num_users, batch.num_tokens, batch.num_targets,
                                                  batch.targets_per_scenario()))


class GrowingShape:
    """The one shape of a training run's padded batches: each size the largest seen so far plus
    `headroom`, rounded up to `granule`. A run's batches (token-budget batches of similar
    totals) soon all fit it, so one CUDA graph serves the run after its first few batches; the
    shape grows, and a new graph is captured, only when a batch does not fit. Padding users hold
    at most `max_user_tokens` rows each (about a real user's length: the attention over a padding
    user costs what a real user's does). Not thread-safe: one producer pads a run's batches."""

    def __init__(self, headroom: float = 0.02, granule: int = 64, max_user_tokens: int = 1024):
        if headroom < 0 or granule < 1 or max_user_tokens < 1:
            raise ValueError(f"GrowingShape: headroom >= 0, granule >= 1 and max_user_tokens >= 1, found {headroom}, "
                             f"{granule}, {max_user_tokens}")
        self.headroom, self.granule, self.max_user_tokens = headroom, granule, max_user_tokens
        self.shape: BatchShape | None = None
        self.kinds: list[int | None] | None = None
        self.grown = 0  # times the shape changed (the first shape counts)

    def _room(self, n: int, current: int, extra: int = 0) -> int:
        """current if it holds n + extra, else n grown by the headroom, plus extra, rounded up."""
        if current >= n + extra:
            return current
        return max(current, math.ceil((math.ceil(n * (1 + self.headroom)) + extra) / self.granule) * self.granule)

    def fit(self, batch: TokenBatch) -> BatchShape:
        """The run's shape, grown first if `batch` does not fit it."""
        found = group_kinds(batch)
        self.kinds = found if self.kinds is None else [k if k is not None else old for k, old in zip(found, self.kinds)]
        old = self.shape
        counts = [batch.features[g].num_tokens for g in batch.group_names]
        lists = [v.shape[0] for g in batch.group_names for v in batch.features[g].list_values.values()]
        old_tokens = old.group_tokens if old else (0,) * len(counts)
        old_lists = old.list_values if old else (0,) * len(lists)
        group_tokens = tuple(self._room(n, size, extra=1 if n else 0) for n, size in zip(counts, old_tokens))
        list_values = tuple(self._room(n, size) for n, size in zip(lists, old_lists))
        # Room for the most padding users any batch can need (one with no tokens), so that a batch
        # with fewer tokens than the last does not grow the shape.
        users = batch.num_users + max(1, math.ceil(sum(group_tokens) / self.max_user_tokens))
        self.shape = BatchShape(self._room(users, old.num_users if old else 0), group_tokens, list_values)
        self.grown += self.shape != old
        return self.shape

    def pad(self, batch: TokenBatch) -> TokenBatch:
        """`batch` (on the CPU) padded to the run's shape, grown first if it does not fit."""
        return pad_batch(batch, self.fit(batch), kinds=self.kinds, max_user_tokens=self.max_user_tokens)
