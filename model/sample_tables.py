"""Random aggregated-sample tables with exactly `registry.aggregated_schema()`, for tests and
benchmarks (independent of the data pipeline).

Per user: each sequence and each scenario gets a random number of entries drawn uniformly from
`lengths[name]` (inclusive; defaults by kind below), sorted by ts. History events fall before
the window, realtime events and exposures inside it, so targets and realtime events
interleave in time. A user with no exposure in a scenario has a null `<s>__user` struct, as
the contract says. Lengths above a sequence's `max_len` are allowed (they exercise the
collate's truncation). Built column-wise from NumPy: fast enough for benchmark-sized tables.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from mtfm.platform.registry import Feature, Registry, events_column, exposures_column, feature_field, user_column

DEFAULT_LENGTHS = {"history": (0, 24), "realtime": (0, 8), "scenario": (0, 6)}
DAY_MS = 86_400_000


def random_aggregated_table(registry: Registry, num_users: int, rng: np.random.Generator, *,
                            lengths: Mapping[str, tuple[int, int]] | None = None,
                            window_start_ms: int = 1_700_000_000_000, window_ms: int = DAY_MS,
                            null_fraction: float = 0.0, label_null_fraction: float = 0.0,
                            first_user_id: int = 0) -> pa.Table:
    """`num_users` rows (one window each) conforming to `registry.aggregated_schema()`.

    lengths: per sequence or scenario name, (min, max) entries per user.
    null_fraction: share of nulls in features that are not `required`.
    label_null_fraction: share of null labels.
    """
    lengths = dict(lengths or {})
    schema = registry.aggregated_schema()
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(np.arange(first_user_id, first_user_id + num_users, dtype=np.int64)),
        "window": pa.array(np.full(num_users, window_start_ms // window_ms, dtype=np.int64)),
    }

    def draw_counts(name: str, kind: str) -> np.ndarray:
        lo, hi = lengths.get(name, DEFAULT_LENGTHS[kind])
        return rng.integers(lo, hi + 1, size=num_users)

    for scn in registry.scenarios.values():
        counts = draw_counts(scn.name, "scenario")
        ts = _sorted_ts(rng, counts, window_start_ms, window_start_ms + window_ms)
        m = len(ts)
        arrays = [pa.array(rng.integers(0, 2**40, size=m, dtype=np.int64)), pa.array(ts)]
        arrays += [_random_feature(f, m, rng, null_fraction) for f in scn.exposure_features]
        for task in scn.task_names:
            rate = scn.synthetic.label_rates.get(task, 0.2)
            labels = (rng.random(m) < rate).astype(np.int8)
            arrays.append(pa.array(labels, mask=rng.random(m) < label_null_fraction))
        exposure_type = schema.field(exposures_column(scn.name)).type.value_type
        columns[exposures_column(scn.name)] = _lists(counts, pa.StructArray.from_arrays(arrays, fields=list(exposure_type)))
        if scn.user_features:
            user_arrays = [_random_feature(f, num_users, rng, null_fraction) for f in scn.user_features]
            columns[user_column(scn.name)] = _structs(schema.field(user_column(scn.name)).type, user_arrays,
                                                      counts == 0)

    for seq in registry.sequences.values():
        counts = draw_counts(seq.name, seq.kind)
        if seq.kind == "history":
            ts = _sorted_ts(rng, counts, window_start_ms - 30 * DAY_MS, window_start_ms)
        else:
            ts = _sorted_ts(rng, counts, window_start_ms, window_start_ms + window_ms)
        arrays = [pa.array(ts)] + [_random_feature(f, len(ts), rng, null_fraction) for f in seq.features]
        event_type = schema.field(events_column(seq.name)).type.value_type
        columns[events_column(seq.name)] = _lists(counts, pa.StructArray.from_arrays(arrays, fields=list(event_type)))

    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def _sorted_ts(rng: np.random.Generator, counts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """sum(counts) timestamps in [lo, hi), sorted within each user's run."""
    parent = np.repeat(np.arange(len(counts)), counts)
    ts = rng.integers(lo, hi, size=len(parent), dtype=np.int64)
    return ts[np.lexsort((ts, parent))]


def _random_feature(f: Feature, n: int, rng: np.random.Generator, null_fraction: float) -> pa.Array:
    mask = None if f.required or null_fraction == 0 else rng.random(n) < null_fraction
    arrow_type = feature_field(f).type
    if f.type == "numeric":
        return pa.array(rng.gamma(2.0, 5.0, size=n).astype(np.float32), type=arrow_type, mask=mask)
    if f.type == "categorical":
        return pa.array(rng.integers(0, 3 * f.buckets, size=n, dtype=np.int64), type=arrow_type, mask=mask)
    counts = rng.integers(0, f.max_len + 2, size=n)
    values = pa.array(rng.integers(0, 3 * f.buckets, size=int(counts.sum()), dtype=np.int64))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=arrow_type, mask=None if mask is None else pa.array(mask))


def _structs(struct_type: pa.StructType, arrays: list[pa.Array], null: np.ndarray) -> pa.Array:
    """A struct array of the given child arrays, null where `null` says (also with no children)."""
    if not arrays:
        return pa.array([None if n else {} for n in null.tolist()], struct_type)
    return pa.StructArray.from_arrays(arrays, fields=list(struct_type), mask=pa.array(null))


def _lists(counts: np.ndarray, values: pa.Array) -> pa.Array:
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values)
