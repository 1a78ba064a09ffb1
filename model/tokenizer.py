"""Heterogeneous tokenizer: every group's raw features -> one d_model token per event/exposure.

For a token of group g with categorical features c_1.., categorical lists l_1.. and numerics
x_1..:
    token = MLP_g(concat(E[c_1](id), ..., mean_{id in l_1} E[l_1](id), ..., t(x_1), ...))
E[name] is ONE hashed table per feature name (shared wherever the name appears: a target's
poi_id meets the history's poi_id in the same table), t the feature's numeric transform
(none, log1p on max(x, 0), symlog = sign(x) log1p(|x|)), MLP_g = Linear -> SiLU -> Linear.
Groups are sequences (H/R tokens) and scenarios (T-token = user features of the scenario,
then its item and cross features, in registry order). Modules are keyed by name, so adding a
scenario adds entries and leaves every existing parameter name unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mtfm.platform.registry import Feature, Registry

from .batch import GroupFeatures, TokenBatch


def group_features(registry: Registry) -> dict[str, tuple[Feature, ...]]:
    """Input features per group name: sequences, then scenarios (user + item + cross)."""
    groups = {s.name: s.features for s in registry.sequences.values()}
    groups.update((s.name, s.user_features + s.exposure_features) for s in registry.scenarios.values())
    return groups


def transform_numeric(x: Tensor, transform: str) -> Tensor:
    if transform == "log1p":
        return torch.log1p(x.clamp_min(0))
    if transform == "symlog":
        return torch.sign(x) * torch.log1p(x.abs())
    return x


def embedding_lookups(tables: nn.ModuleDict, lookups: list[tuple[str, Tensor]]) -> list[Tensor]:
    """tables[name](ids) for each (name, ids) of `lookups`, in order (plain nn.Embedding tables). The
    lookups into tables of one width share one backward: their ids, offset to each table's first row
    in the tables' concatenation, go through one `embedding_dense_backward` (F.embedding's own
    backward op: a sort and segmented sums), where one F.embedding per lookup ran one each: about
    20 a training step, 1.7 ms of a 65 ms step on the H200, each bound by its launches, not its rows.
    A table whose lookups' outputs all go unused gets a zero gradient."""
    for name, _ in lookups:
        table = tables[name]
        if table.padding_idx is not None or table.max_norm is not None or table.scale_grad_by_freq or table.sparse:
            raise ValueError(f"embedding_lookups: table {name!r} sets padding_idx, max_norm, scale_grad_by_freq or "
                             "sparse, which the shared backward does not implement")
    if not torch.is_grad_enabled():  # serving: no backward to share
        return [F.embedding(ids, tables[name].weight) for name, ids in lookups]
    out: list[Tensor | None] = [None] * len(lookups)
    by_width: dict[int, list[int]] = {}
    for i, (name, _) in enumerate(lookups):
        by_width.setdefault(tables[name].embedding_dim, []).append(i)
    for members in by_width.values():
        names = list(dict.fromkeys(lookups[i][0] for i in members))
        table_of = tuple(names.index(lookups[i][0]) for i in members)
        looked_up = _LookupsSharingBackward.apply(table_of, *(lookups[i][1] for i in members),
                                                  *(tables[name].weight for name in names))
        for i, rows in zip(members, looked_up):
            out[i] = rows
    return out


class _LookupsSharingBackward(torch.autograd.Function):
    """forward(table_of, *ids, *weights): weights[table_of[j]][ids[j]] for each j; weights share a width."""

    @staticmethod
    def forward(ctx, table_of: tuple[int, ...], *tensors: Tensor) -> tuple[Tensor, ...]:
        ids, weights = tensors[:len(table_of)], tensors[len(table_of):]
        ctx.save_for_backward(*ids)
        ctx.table_of, ctx.rows = table_of, [w.shape[0] for w in weights]
        return tuple(F.embedding(i, weights[t]) for i, t in zip(ids, table_of))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        ids = ctx.saved_tensors
        first_row = [0]
        for rows in ctx.rows[:-1]:
            first_row.append(first_row[-1] + rows)
        rows_ids = torch.cat([i + first_row[t] for i, t in zip(ids, ctx.table_of)])
        rows_grad = torch.cat(grads)  # an unused output's gradient comes as zeros (materialize_grads)
        table_grad = torch.ops.aten.embedding_dense_backward(rows_grad, rows_ids, sum(ctx.rows), -1, False)
        return (None, *(None for _ in ids), *table_grad.split(ctx.rows))


def input_columns(features: Iterable[Feature]) -> dict[str, tuple[int, int]]:
    """Each feature's (first column, width) in its group's MLP input, the concatenation `GroupTokenizer`
    builds: an embedding's `dim` columns for a categorical feature or list, one for a numeric."""
    columns, start = {}, 0
    for f in features:
        width = f.dim if f.is_categorical else 1
        columns[f.name] = (start, width)
        start += width
    return columns


class GroupTokenizer(nn.Module):
    """MLP over the concatenated embeddings and transformed numerics of one group's features."""

    def __init__(self, features: tuple[Feature, ...], d_model: int, hidden_dim: int):
        super().__init__()
        self.features = features
        in_dim = sum(width for _, width in input_columns(features).values())
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, d_model))

    def lookups(self, feats: GroupFeatures) -> list[tuple[str, Tensor]]:
        """(table name, ids) of the group's categorical features, in feature order."""
        return [(f.name, feats.categorical[f.name]) for f in self.features if f.type == "categorical"]

    def forward(self, feats: GroupFeatures, tables: nn.ModuleDict, embedded: list[Tensor] | None = None) -> Tensor:
        """(n, d_model) for the group's n tokens. embedded: the rows of `lookups(feats)`, if looked up
        already (with other groups' lookups, `embedding_lookups`)."""
        embedded = iter(embedding_lookups(tables, self.lookups(feats)) if embedded is None else embedded)
        parts = []
        for f in self.features:
            if f.type == "categorical":
                parts.append(next(embedded))
            elif f.type == "categorical_list":
                parts.append(F.embedding_bag(feats.list_values[f.name], tables[f.name].weight,
                                             feats.list_offsets[f.name], mode="mean", include_last_offset=True))
            else:
                parts.append(transform_numeric(feats.numeric[f.name], f.transform)[:, None])
        return self.mlp(torch.cat(parts, dim=1))


class HeterogeneousTokenizer(nn.Module):
    """All groups of a registry -> the packed (N, d_model) token matrix of a `TokenBatch`."""

    def __init__(self, registry: Registry, d_model: int, hidden_dim: int):
        super().__init__()
        groups = group_features(registry)
        used = {f.name: f for feats in groups.values() for f in feats if f.is_categorical}
        self.d_model = d_model
        self.tables = nn.ModuleDict({name: nn.Embedding(f.buckets, f.dim) for name, f in sorted(used.items())})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
        self.groups = nn.ModuleDict({name: GroupTokenizer(feats, d_model, hidden_dim) for name, feats in groups.items()})

    def forward(self, batch: TokenBatch, groups: Iterable[str] | None = None) -> Tensor:
        """(N, d_model): every token of the batch, or only those of `groups` (other rows zero).
        Groups with no tokens in the batch are not run (their parameters get no gradient)."""
        wanted = batch.group_names if groups is None else tuple(groups)
        present = [name for name in wanted if batch.features[name].num_tokens]
        if not present:
            return next(self.parameters()).new_zeros(batch.num_tokens, self.d_model)
        index = torch.cat([batch.features[name].index for name in present])
        for name in present:
            self._check_group(name)
        # Every group's lookups at once, so that those into tables of one width share a backward.
        lookups = [self.groups[name].lookups(batch.features[name]) for name in present]
        embedded = iter(embedding_lookups(self.tables, [lookup for group in lookups for lookup in group]))
        tokens = torch.cat([self.groups[name](batch.features[name], self.tables, [next(embedded) for _ in group])
                            for name, group in zip(present, lookups)])
        return tokens.new_zeros(batch.num_tokens, self.d_model).index_copy(0, index, tokens)

    def group_tokens(self, batch: TokenBatch, group: str) -> Tensor:
        """(n_g, d_model): the tokens of one group, in the order of batch.features[group]."""
        self._check_group(group)
        return self.groups[group](batch.features[group], self.tables)

    def _check_group(self, group: str) -> None:
        if group not in self.groups:
            raise KeyError(f"batch has tokens of group {group!r} that this model has no tokenizer for "
                           f"(model groups: {list(self.groups)}); collate with the model's registry")
