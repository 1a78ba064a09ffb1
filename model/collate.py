"""Jagged collate: aggregated samples (Arrow) -> `TokenBatch`, and the token-budget batcher.

Training feeds it the pyarrow tables of `Dataset.iter_batches(batch_format="pyarrow")`;
serving feeds it a one-row aggregated table built from a request. Everything is vectorised
with pyarrow.compute and NumPy (no Python loop over tokens): per group, the list column is
flattened once, truncated to its newest `max_len` entries per user, and all tokens are put in
order by one stable lexsort on (user, kind, scenario, ts).

    collator = Collator(model.registry)             # the registry the model was built with
    for batch in token_budget_batches(ds.iter_batches(batch_format="pyarrow"), collator, 65536):
        out = model(batch.to(device)); loss = multitask_bce_loss(out, batch) ...
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mtfm.kernels.mask import TokenKind
from mtfm.platform.registry import Feature, Registry, events_column, exposures_column, user_column

from .batch import GroupFeatures, TokenBatch
from .hashing import hash_to_buckets


@dataclass(frozen=True)
class _Group:
    """One token group: a sequence (H or R tokens) or a scenario's exposures (T tokens)."""

    name: str
    column: str
    kind: TokenKind
    features: tuple[Feature, ...]
    max_len: int | None
    tasks: tuple[str, ...] = ()
    user_features: tuple[Feature, ...] = ()


@dataclass
class _Tokens:
    """A group's kept list elements: parent user row, element structs (truncated)."""

    user: np.ndarray
    values: pa.StructArray


class Collator:
    """Builds `TokenBatch`es from aggregated-sample tables with `registry.aggregated_schema()`.

    Every scenario of `registry` (in its order) gives T-tokens; columns of scenarios it does not
    register are ignored (a scenario subgraph's registry, `restrict_registry`, has only its own).
    max_len: per group name (sequence or scenario), keep at most this many newest entries per
        user. Sequences default to the registry's `max_len`; scenarios to no limit.
    Only the columns the groups need are read; extra columns are ignored. Categorical ids are
    hashed to table rows here (`hashing.py`; null -> row 0), categorical lists keep their first
    `max_len` ids, null numerics become 0, null labels are masked out.
    """

    def __init__(self, registry: Registry, *, max_len: Mapping[str, int] | None = None):
        self.registry = registry
        names = tuple(registry.scenarios)
        limits = dict(max_len or {})
        unknown = set(limits) - set(registry.sequences) - set(names)
        if unknown:
            raise KeyError(f"max_len names unknown groups {sorted(unknown)}; expected sequences "
                           f"{list(registry.sequences)} or scenarios {list(names)}")
        groups = [
            _Group(s.name, events_column(s.name), TokenKind.H if s.kind == "history" else TokenKind.R,
                   s.features, limits.get(s.name, s.max_len))
            for s in registry.sequences.values()
        ]
        groups += [
            _Group(n, exposures_column(n), TokenKind.T, registry.scenario(n).exposure_features, limits.get(n),
                   registry.scenario(n).task_names, registry.scenario(n).user_features)
            for n in names
        ]
        self.groups = tuple(groups)
        self.group_names = tuple(g.name for g in groups)
        self.scenario_tasks = {g.name: g.tasks for g in groups if g.kind == TokenKind.T}

    def token_counts(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """(B,) int64: the tokens each row (user) will have after truncation."""
        counts = np.zeros(table.num_rows, dtype=np.int64)
        for g in self.groups:
            lengths = _list_lengths(_column(table, g.column))
            counts += lengths if g.max_len is None else np.minimum(lengths, g.max_len)
        return counts

    def __call__(self, table: pa.Table | pa.RecordBatch) -> TokenBatch:
        num_users = table.num_rows
        kept = [_newest(_column(table, g.column), g.max_len) for g in self.groups]
        sizes = [len(t.user) for t in kept]
        user = np.concatenate([t.user for t in kept])
        kind = np.concatenate([np.full(n, g.kind, np.int8) for g, n in zip(self.groups, sizes)])
        group = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(sizes)])
        # H and R tokens of several sequences interleave by ts; T tokens stay grouped by scenario.
        scenario_rank = np.where(kind == TokenKind.T, group, 0)
        ts = np.concatenate([_int64(pc.struct_field(t.values, "ts")) for t in kept])
        order = np.lexsort((ts, scenario_rank, kind, user))
        position = np.empty_like(order)
        position[order] = np.arange(len(order))

        features: dict[str, GroupFeatures] = {}
        start = 0
        for g, tokens, n in zip(self.groups, kept, sizes):
            if not n and g.kind != TokenKind.T:
                # A serving request's candidates are collated without its events: skip the Arrow work.
                features[g.name] = _no_tokens(g.features)
                continue
            pos = position[start:start + n]
            start += n
            rows = np.argsort(pos, kind="stable")
            features[g.name] = self._group_features(g, tokens, pos[rows], rows, table)

        counts = np.bincount(user, minlength=num_users)
        target_counts = np.bincount(user[kind == TokenKind.T], minlength=num_users)
        kind_sorted = kind[order]
        return TokenBatch(
            group_names=self.group_names,
            scenario_tasks=dict(self.scenario_tasks),
            offsets=_tensor(_offsets(counts)),
            target_offsets=_tensor(_offsets(target_counts)),
            user_id=_tensor(_int64(_column(table, "user_id"))),
            kind=_tensor(kind_sorted),
            group=_tensor(group[order]),
            ts=_tensor(ts[order]),
            target_index=_tensor(np.flatnonzero(kind_sorted == TokenKind.T).astype(np.int64)),
            features=features,
        )

    def _group_features(self, g: _Group, tokens: _Tokens, index: np.ndarray, rows: np.ndarray,
                        table: pa.Table | pa.RecordBatch) -> GroupFeatures:
        # A request's candidates, and any group already in order, need no take.
        in_order = bool((rows == np.arange(len(rows))).all())
        values = tokens.values if in_order else tokens.values.take(pa.array(rows))
        out = GroupFeatures(index=_tensor(index))
        _add_features(out, g.features, values)
        if g.kind == TokenKind.T:
            if g.user_features:  # else the samples have no user column for the scenario
                users = _column(table, user_column(g.name)).take(pa.array(tokens.user[rows]))
                _add_features(out, g.user_features, users)
            labels = [pc.struct_field(values, task) for task in g.tasks]
            out.labels = _tensor(np.stack([_float32(a) for a in labels], axis=1).reshape(len(rows), len(g.tasks)))
            out.label_mask = _tensor(np.stack([_valid(a) for a in labels], axis=1).reshape(len(rows), len(g.tasks)))
            request = pc.struct_field(values, "request_id")
            out.request_id = _tensor(np.where(_valid(request), _int64(request), -1))
        return out


def token_budget_batches(tables: Iterable[pa.Table | pa.RecordBatch], collator: Collator,
                         max_tokens: int) -> Iterator[TokenBatch]:
    """MTGR's load balance: regroup a stream of aggregated tables into `TokenBatch`es of whole
    users whose token total stays <= max_tokens (greedy, in arrival order).

    Rows left over at the end of one input table wait for the next. A user with more than
    `max_tokens` tokens on its own (after the collator's truncation) gets a batch to itself
    rather than being dropped.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, found {max_tokens}")
    pending: list[pa.Table] = []
    pending_counts = np.zeros(0, dtype=np.int64)
    for table in tables:
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
        if table.num_rows == 0:
            continue
        pending.append(table)
        pending_counts = np.concatenate([pending_counts, collator.token_counts(table)])
        merged = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        cuts = split_by_token_budget(pending_counts, max_tokens)
        for lo, hi in zip(cuts[:-2], cuts[1:-1]):
            yield collator(merged.slice(lo, hi - lo))
        # The last group may still grow with the next table's rows.
        pending, pending_counts = [merged.slice(cuts[-2])], pending_counts[cuts[-2]:]
    if pending and pending[0].num_rows:
        yield collator(pending[0])


def split_by_token_budget(counts: np.ndarray, max_tokens: int) -> list[int]:
    """Greedy cut points [0, c1, ..., B]: consecutive rows whose counts sum to <= max_tokens
    (a single row above the budget forms its own group)."""
    cuts, total = [0], 0
    for i, c in enumerate(counts.tolist()):
        if i > cuts[-1] and total + c > max_tokens:
            cuts.append(i)
            total = 0
        total += c
    cuts.append(len(counts))
    return cuts


# ---------------------------------------------------------------- Arrow -> NumPy helpers

def _column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    if table.schema.get_field_index(name) < 0:  # -1 also for a name that appears twice
        if table.schema.names.count(name) > 1:
            raise ValueError(f"the aggregated samples have {table.schema.names.count(name)} columns named {name!r}")
        raise ValueError(f"the aggregated samples have no column {name!r}: aggregated with another registry "
                         f"than the model's? (expected registry.aggregated_schema(); found columns "
                         f"{table.schema.names})")
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _list_lengths(lists: pa.Array) -> np.ndarray:
    return _int64(pc.list_value_length(lists))


def _newest(lists: pa.Array, max_len: int | None) -> _Tokens:
    """The last `max_len` elements of every list (all when None), with each one's parent row."""
    values = pc.list_flatten(lists)
    parent = _int64(pc.list_parent_indices(lists))
    if max_len is not None and len(parent):
        lengths = _list_lengths(lists)
        starts = np.cumsum(lengths) - lengths
        position_from_end = lengths[parent] - (np.arange(len(parent)) - starts[parent])
        keep = np.flatnonzero(position_from_end <= max_len)
        if len(keep) < len(parent):
            values, parent = values.take(pa.array(keep)), parent[keep]
    return _Tokens(parent, values)


def _add_features(out: GroupFeatures, features: tuple[Feature, ...], structs: pa.Array) -> None:
    for f in features:
        column = pc.struct_field(structs, f.name)
        if f.type == "numeric":
            values = _float32(column)
            if not np.isfinite(values).all():  # np.nan_to_num alone costs more than the check
                values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            out.numeric[f.name] = _tensor(values)
        elif f.type == "categorical":
            out.categorical[f.name] = _tensor(hash_to_buckets(_int64(column), f.buckets, _valid(column)))
        else:
            lists = pc.list_slice(column, 0, f.max_len)
            flat = pc.list_flatten(lists)
            out.list_values[f.name] = _tensor(hash_to_buckets(_int64(flat), f.buckets, _valid(flat)))
            out.list_offsets[f.name] = _tensor(_offsets(_list_lengths(lists)))


def _no_tokens(features: tuple[Feature, ...]) -> GroupFeatures:
    """What `_add_features` gives a group of no tokens: the same names and dtypes, empty."""
    out = GroupFeatures(index=torch.zeros(0, dtype=torch.int64))
    for f in features:
        if f.type == "numeric":
            out.numeric[f.name] = torch.zeros(0, dtype=torch.float32)
        elif f.type == "categorical":
            out.categorical[f.name] = torch.zeros(0, dtype=torch.int64)
        else:
            out.list_values[f.name] = torch.zeros(0, dtype=torch.int64)
            out.list_offsets[f.name] = torch.zeros(1, dtype=torch.int64)
    return out


def _valid(array: pa.Array) -> np.ndarray:
    if not array.null_count:
        return np.ones(len(array), dtype=bool)
    return np.asarray(array.is_valid(), dtype=bool)


# Nulls become 0. Arrow calls are skipped where they would do nothing but copy: most columns
# have no nulls and already the right type, and one serving request converts ~60 columns.

def _int64(array: pa.Array) -> np.ndarray:
    if array.null_count:
        array = pc.fill_null(array, 0)
    if array.type != pa.int64():
        array = array.cast(pa.int64())
    return np.asarray(array, dtype=np.int64)


def _float32(array: pa.Array) -> np.ndarray:
    if array.type != pa.float32():
        array = array.cast(pa.float32())
    if array.null_count:
        array = pc.fill_null(array, 0.0)
    return np.asarray(array, dtype=np.float32)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True) if not array.flags.writeable else np.ascontiguousarray(array))
