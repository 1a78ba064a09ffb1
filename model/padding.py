"""Padding a `TokenBatch` to a bucketed shape, so that one CUDA graph serves every batch that fits it.

A CUDA graph replays fixed kernels on fixed buffers: every tensor of the batch must keep its
size between calls. `batch_shape(batch)` rounds each size up to a bucket, and
`pad_batch(batch, shape)` fills the batch up to it without changing a real token's output:

    users    real users 0..B-1 unchanged, then empty users (no tokens), then ONE padding user
             owning every padding row
    tokens   per group, the padding user gets bucket(n_g) - n_g rows of that group's kind
             (H and R sequences first, then each scenario's T-tokens, the order the kernels
             rely on), ts 0, every feature 0 (the "missing" row), labels masked out
    lists    a categorical list's values are padded with row 0; the padding user's first row of
             the group owns the extra values, its other rows get empty lists

Attention never crosses users and every other op is per token, so the real users' outputs are
those of the unpadded batch; rows of the padding user are discarded. The padded rows come after
the real ones in every tensor, so output row r < NT is the unpadded batch's row r.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.kernels.mask import TokenKind

from .batch import GroupFeatures, TokenBatch


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


def pad_batch(batch: TokenBatch, shape: BatchShape) -> TokenBatch:
    """`batch` (on the CPU) padded to `shape` (which must hold it: see `batch_shape`)."""
    groups = batch.group_names
    counts = [batch.features[g].num_tokens for g in groups]
    pads = [size - n for size, n in zip(shape.group_tokens, counts)]
    list_counts = [v.shape[0] for g in groups for v in batch.features[g].list_values.values()]
    if (shape.num_users <= batch.num_users or any(p < 0 or (p == 0 and n) for p, n in zip(pads, counts))
            or any(size < n for size, n in zip(shape.list_values, list_counts))):
        raise ValueError(f"pad_batch: {shape} does not hold a batch of {batch.num_users} users, group sizes "
                         f"{dict(zip(groups, counts))} and list sizes {list_counts}")
    # Rows of the padding user, per group: H and R sequences (by their tokens' kind), then T.
    kinds = [int(batch.kind[batch.features[g].index[0]]) if n else 0 for g, n in zip(groups, counts)]
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
    empty_users = shape.num_users - batch.num_users - 1
    offsets = torch.cat([batch.offsets, batch.offsets.new_full((empty_users,), batch.num_tokens),
                         batch.offsets.new_tensor([batch.num_tokens + total_pad])])
    target_offsets = torch.cat([batch.target_offsets, batch.target_offsets[-1:].expand(empty_users),
                                batch.target_offsets[-1:] + target_pad])

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
        ts=pad_rows(batch.ts, total_pad), target_index=target_index, features=features)
