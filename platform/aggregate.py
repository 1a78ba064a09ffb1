"""Ray Data aggregation of raw logs into user-level samples (`mtfm data aggregate`, paper 2.3.1).

One row per (user, window) with at least one exposure in any scenario, exactly
`Registry.aggregated_schema()`: per scenario the window's exposures (sorted by ts, then
request_id, then position in the raw log) and the user features of the earliest one (those of a later
exposure may already count an earlier exposure's click or order: its label would leak); per
sequence the user's events (history: ts < window start; realtime: window start <= ts < window
end), newest `max_len`, sorted by ts.

Two stages, both Ray Data `map_batches` over small work lists, with no Ray shuffle:
1. split: the raw Parquet files, packed into a few tasks of similar bytes, are read, validated
   (`rawlog.validate`; bad rows go to `OUT/quarantine/<kind>/<table>/`) and hash-partitioned by
   user into `OUT/_shuffle/` (Arrow IPC files, one per file and partition: the local disk is the
   shuffle, removed at the end).
2. aggregate: each partition's files are read and `aggregate_partition` (pure pyarrow/numpy)
   writes `OUT/samples/part-<p>.parquet`.
On a multi-node cluster (RAY_ADDRESS), RAW and OUT must be on a file system every node sees.
`aggregate_local` runs the same validation and kernel in one process, all users in one
partition; the benchmark (bench/aggregate.py) compares the two.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtfm.platform.rawlog import (REASON, Contract, cast_column, files_not_read, list_tables,
                                  refuse_a_file_for_a_folder, ts_in_ms, validate)
from mtfm.platform.run_lock import DriverLock
from mtfm.platform.registry import Registry, events_column, exposures_column, scenario_of_column, user_column

SAMPLES = "samples"
QUARANTINE = "quarantine"
SHUFFLE = "_shuffle"
SUMMARY = "_summary.json"
UNFINISHED = "_UNFINISHED"  # in samples/ while an aggregation writes it: training and eval refuse such samples
ROWS_PER_PARTITION = 4_000_000
CLOCK_SKEW_MS = 86_400_000
# A ts in seconds (of any date up to the year 2286) is below this as ms: 1970-04-26.
EARLY_TS_MS = 10**10
LATE_TS_MS = 10**14
PROGRESS_S = 10.0


# ---------------------------------------------------------------- the per-partition kernel

def aggregate_partition(registry: Registry, exposures: dict[str, pa.Table], behaviors: dict[str, pa.Table],
                        window_ms: int) -> pa.Table:
    """Aggregate valid raw rows (contract schemas) of a set of users into samples.

    `exposures[scenario]` / `behaviors[sequence]` may be missing (no rows). Vectorised: one sort
    per table, group boundaries from key changes, lists built from offsets.
    """
    schema = registry.aggregated_schema()
    grouped = {}
    for name in registry.scenarios:
        table = exposures[name] if name in exposures else registry.exposure_schema(name).empty_table()
        grouped[name] = _group_exposures(table, window_ms)
    keys_u = np.concatenate([g[0] for g in grouped.values()])
    keys_w = np.concatenate([g[1] for g in grouped.values()])
    order = np.lexsort((keys_w, keys_u))
    su, sw = keys_u[order], keys_w[order]
    new = np.ones(len(su), bool)
    new[1:] = (su[1:] != su[:-1]) | (sw[1:] != sw[:-1])
    row_of_group = np.empty(len(su), np.int64)
    row_of_group[order] = np.cumsum(new) - 1
    out_u, out_w = su[new], sw[new]
    n_out = len(out_u)

    arrays = [pa.array(out_u, pa.int64()), pa.array(out_w, pa.int64())]
    start = 0
    for name, (gu, _, starts, ends, table) in grouped.items():
        rows = row_of_group[start:start + len(gu)]
        start += len(gu)
        list_type = schema.field(exposures_column(name)).type
        if user_column(name) in schema.names:  # a scenario without user features has no such column
            earliest = np.zeros(n_out, np.int64)
            earliest[rows] = starts
            missing = np.ones(n_out, bool)
            missing[rows] = False
            user_type = schema.field(user_column(name)).type
            arrays.append(_struct(table, user_type, pa.array(earliest) if len(table) else None, missing))
        counts = np.zeros(n_out, np.int64)
        counts[rows] = ends - starts
        arrays.append(_list(_struct(table, list_type.value_type), counts, list_type))

    for name, seq in registry.sequences.items():
        table = behaviors[name] if name in behaviors else registry.behavior_schema(name).empty_table()
        arrays.append(_events(table, seq.kind, seq.max_len, out_u, out_w, window_ms,
                              schema.field(events_column(name)).type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _group_exposures(table: pa.Table, window_ms: int):
    """(group user ids, group windows, group starts, group ends, table sorted by user, ts, request_id)."""
    u = table["user_id"].to_numpy()
    ts = table["ts"].to_numpy()
    rid = table["request_id"].fill_null(np.iinfo(np.int64).max).to_numpy()
    order = _order(u, ts, rid)  # the window is monotone in ts, so this also sorts by window
    table = table.take(order).combine_chunks()
    u, w = u[order], ts[order] // window_ms * window_ms
    new = np.ones(len(u), bool)
    new[1:] = (u[1:] != u[:-1]) | (w[1:] != w[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(u))
    return u[starts], w[starts], starts, ends, table


def _order(u: np.ndarray, ts: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Stable order by (u, ts, tiebreak): ties keep their raw-log order.

    Fast path: one stable argsort of (u, ts) packed into an int64 when the ranges allow, then
    the tiebreak only if some equal (u, ts) pair is out of order (rare: same user, same ms).
    """
    if len(u) == 0:
        return np.zeros(0, np.int64)
    u0, t0 = int(u.min()), int(ts.min())
    if (int(u.max()) - u0 + 1) * (int(ts.max()) - t0 + 1) >= 2**62:
        return np.lexsort((ts, u)) if tiebreak is None else np.lexsort((tiebreak, ts, u))
    key = (u - u0) * (int(ts.max()) - t0 + 1) + (ts - t0)
    order = np.argsort(key, kind="stable")
    if tiebreak is not None:
        k, tb = key[order], tiebreak[order]
        if np.any((k[1:] == k[:-1]) & (tb[1:] < tb[:-1])):
            return np.lexsort((tiebreak, ts, u))
    return order


def _struct(table: pa.Table, struct_type: pa.StructType, take: pa.Array | None = None,
            missing: np.ndarray | None = None) -> pa.Array:
    """A struct array of `table`'s columns named by `struct_type` (rows `take`, null where `missing`)."""
    n = len(missing) if missing is not None else table.num_rows
    fields = list(struct_type)
    if take is None and missing is not None:  # no rows to take from: all null
        children = [pa.nulls(n, f.type) for f in fields]
    else:
        children = [_array(table[f.name]) if take is None else _array(table[f.name]).take(take) for f in fields]
    if not fields:  # a struct without fields (a scenario without user features) has only validity
        validity = pa.array(~missing).buffers()[1] if missing is not None else None
        return pa.StructArray.from_buffers(struct_type, n, [validity])
    return pa.StructArray.from_arrays(children, fields=fields, mask=pa.array(missing) if missing is not None else None)


def _array(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _list(values: pa.Array, counts: np.ndarray, list_type: pa.ListType) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=list_type)


def _count_before(eu: np.ndarray, ets: np.ndarray, qu: np.ndarray, qts: np.ndarray) -> np.ndarray:
    """For sorted events (eu, ets) and sorted queries (qu, qts): #events with (u, ts) < (qu, qts)."""
    if len(eu) == 0 or len(qu) == 0:
        return np.zeros(len(qu), np.int64)
    users = eu[np.append(True, eu[1:] != eu[:-1])]
    lo = min(ets.min(), qts.min())
    span = int(max(ets.max(), qts.max())) - int(lo) + 1
    if (2 * len(users) + 2) * span < 2**62:
        # One int64 key per row, (2 * user rank, ts) packed; a query's user missing from the events
        # gets an odd rank between its neighbours. Then a binary search does it.
        ekey = 2 * np.searchsorted(users, eu) * span + (ets - lo)
        rank = np.searchsorted(users, qu)
        present = users[np.minimum(rank, len(users) - 1)] == qu
        qkey = (2 * rank - ~present) * span + (qts - lo)
        return np.searchsorted(ekey, qkey, "left")
    u = np.concatenate([eu, qu])
    ts = np.concatenate([ets, qts])
    is_event = np.concatenate([np.ones(len(eu), np.int8), np.zeros(len(qu), np.int8)])
    order = np.lexsort((is_event, ts, u))  # a query sorts before an event at the same ts
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    return position[len(eu):] - np.arange(len(qu))


def _events(table: pa.Table, kind: str, max_len: int, out_u: np.ndarray, out_w: np.ndarray, window_ms: int,
            list_type: pa.ListType) -> pa.Array:
    eu = table["user_id"].to_numpy()
    ets = table["ts"].to_numpy()
    order = _order(eu, ets)
    eu, ets = eu[order], ets[order]
    if kind == "history":
        hi = _count_before(eu, ets, out_u, out_w)
        lo = np.searchsorted(eu, out_u, "left")
    else:
        lo = _count_before(eu, ets, out_u, out_w)
        hi = _count_before(eu, ets, out_u, out_w + window_ms)
    lo = np.maximum(lo, hi - max_len)
    counts = hi - lo
    # The rows of all [lo, hi) ranges, concatenated: one gather for the whole partition.
    idx = np.arange(counts.sum()) + np.repeat(lo - (np.cumsum(counts) - counts), counts)
    values = _struct(table, list_type.value_type, pa.array(order[idx]))
    return _list(values, counts, list_type)


# ---------------------------------------------------------------- stage 1: split (one raw file)

def partition_of(user_id: np.ndarray, num_partitions: int) -> np.ndarray:
    """A user's partition: a multiplicative hash of the id, so consecutive ids spread out."""
    with np.errstate(over="ignore"):
        h = user_id.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(33)) % np.uint64(num_partitions)).astype(np.int64)


def _in_table(path: str, kind: str, name: str) -> str:
    """`path` below its table's folder (RAW/<kind>/<name>/), as the summary names files: a table's files may
    sit in folders of their own (`dt=.../part-0.parquet`)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1:i + 1] == (kind, name):
            return "/".join(parts[i + 1:])
    return Path(path).name


def read_valid(registry: Registry, kind: str, name: str, path: str, index: int, out: str,
               max_ts: int) -> tuple[pa.Table, dict]:
    """Read and validate one raw file; its bad rows go to quarantine. Returns (good rows, counts)."""
    contract = Contract.for_table(registry, kind, name)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:  # a footer that reads, damaged pages behind it
        empty = contract.schema.empty_table() if contract.schema is not None else pa.table({})
        return empty, {"table": f"{kind}/{name}", "rows": 0, "good": 0, "early": 0, "reasons": {}, "ignored": [],
                       "missing": [], "file": _in_table(path, kind, name),
                       "unreadable": f"{path}: not read, {_why_not_read(path, exc)} ({_footer_rows(path)})"}
    good, bad = validate(table, contract, max_ts)
    if bad.num_rows:
        folder = Path(out) / QUARANTINE / kind / name
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(bad, folder / f"{index:06d}-{Path(path).stem}.parquet")
    ignored = [c for c in table.column_names if contract.schema is not None and c not in contract.schema.names]
    # A missing required or label column quarantines the rows (a reason); a missing optional one nulls
    # them, which the summary warns of.
    missing = [f.name for f in (contract.schema if contract.schema is not None else [])
               if f.name not in table.column_names and f.nullable and f.name not in contract.required + contract.labels]
    early = int((good["ts"].to_numpy() < EARLY_TS_MS).sum()) if contract.schema is not None else 0
    late = _count_late(table) if contract.schema is not None else 0
    return good, {"table": f"{kind}/{name}", "rows": table.num_rows, "good": good.num_rows, "early": early,
                  "late": late, "reasons": dict(Counter(bad[REASON].to_pylist())) if bad.num_rows else {},
                  "ignored": ignored,
                  "missing": missing, "file": _in_table(path, kind, name)}


def _count_late(table: pa.Table) -> int:
    """Rows whose ts reads as after LATE_TS_MS: microseconds or nanoseconds, taken for ms."""
    if "ts" not in table.column_names:
        return 0
    ts, _ = cast_column(ts_in_ms(table["ts"]), pa.int64())
    return int(pc.sum(pc.greater(ts, LATE_TS_MS)).as_py() or 0)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _why_not_read(path: str, exc: Exception) -> str:
    """Why a file whose footer reads but whose table does not was not read, for the summary."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        names = []
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # Arrow says "Multiple matches for FieldRef.Name(...)" and lists its internal columns
        return f"it has more than one column named {', '.join(map(repr, repeated))} of its {len(names)}: {names}"
    return f"its data does not decode: {_first_line(exc)}"


def _footer_rows(path: str) -> str:
    """How many rows a file that does not decode held, as its footer says, for the summary."""
    try:
        return f"its footer counts {pq.ParquetFile(path).metadata.num_rows:,} rows, not aggregated"
    except (OSError, pa.ArrowException):
        return "its footer does not read either"


def split_file(registry: Registry, kind: str, name: str, path: str, index: int, out: str,
               num_partitions: int, max_ts: int) -> dict:
    """Validate one raw file and write its good rows per user partition under OUT/_shuffle."""
    good, counts = read_valid(registry, kind, name, path, index, out, max_ts)
    if good.num_rows:
        part = partition_of(good["user_id"].to_numpy(), num_partitions)
        order = np.argsort(part.astype(np.uint16) if num_partitions < 2**16 else part, kind="stable")  # radix sort
        good = good.take(order)
        bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            folder = Path(out) / SHUFFLE / f"{p:05d}" / kind / name
            folder.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(folder / f"{index:06d}.arrow"), "wb") as sink:
                with pa.ipc.new_file(sink, good.schema) as writer:
                    writer.write_table(good.slice(bounds[p], bounds[p + 1] - bounds[p]))
    return counts


# ---------------------------------------------------------------- stage 2: aggregate (one partition)

def _read_shuffled(folder: Path, schema: pa.Schema) -> pa.Table | None:
    files = sorted(folder.glob("*.arrow")) if folder.is_dir() else []
    if not files:
        return None
    tables = [pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in files]
    return pa.concat_tables(tables).cast(schema)


def aggregate_shuffled(registry: Registry, out: str, partition: int, window_ms: int) -> dict:
    """Aggregate one partition of `OUT/_shuffle` into `OUT/samples/part-<p>.parquet`."""
    root = Path(out) / SHUFFLE / f"{partition:05d}"
    exposures = {s: _read_shuffled(root / "exposures" / s, registry.exposure_schema(s)) for s in registry.scenarios}
    behaviors = {q: _read_shuffled(root / "behaviors" / q, registry.behavior_schema(q)) for q in registry.sequences}
    samples = aggregate_partition(registry, {k: v for k, v in exposures.items() if v is not None},
                                  {k: v for k, v in behaviors.items() if v is not None}, window_ms)
    return _write_samples(samples, Path(out), partition)


def _write_samples(samples: pa.Table, out: Path, partition: int) -> dict:
    (out / SAMPLES).mkdir(parents=True, exist_ok=True)
    # Without dictionary pages: about 2x faster to write here, and no larger (ids are mostly unique per page).
    pq.write_table(samples, out / SAMPLES / f"part-{partition:05d}.parquet", use_dictionary=False)
    exposures = sum(int(np.sum(samples[c].combine_chunks().value_lengths().to_numpy(zero_copy_only=False)))
                    for c in samples.column_names if scenario_of_column(c))
    return {"partition": partition, "samples": samples.num_rows, "exposures": exposures}


# ---------------------------------------------------------------- orchestration

def _previous_run(out: Path) -> dict | None:
    """The summary a finished earlier run wrote into `out`; None if there is none or it is unreadable."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
        int(summary["samples_out"])
        return summary
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_inputs(registry: Registry, raw: Path, out: Path) -> tuple[list[tuple[str, str, str]], int, list[str]]:
    """The raw files to read as (kind, name, path), their rows and the warnings, after every check
    that only reads: bad input is named before anything is written or Ray starts."""
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: raw log folder not found (expected exposures/<scenario>/ and behaviors/<sequence>/)")
    tables = list_tables(raw)
    if not any(kind == "exposures" for kind, _ in tables):
        inside = raw.name in ("exposures", "behaviors") or raw.parent.name in ("exposures", "behaviors")
        hint = "; --raw is the folder that holds exposures/ and behaviors/, not one of them" if inside else ""
        raise FileNotFoundError(f"{raw}/exposures: no exposure tables found (expected exposures/<scenario>/*.parquet)"
                                + hint)
    files, rows, warnings = [], 0, []
    for (kind, name), paths in tables.items():
        for path in paths:
            try:
                rows += pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowException) as exc:  # empty, cut short, not Parquet at all
                warnings.append(f"{path}: not read, not a readable Parquet file ({exc})")
                continue
            files.append((kind, name, str(path)))
    warnings += [f"{path}: not read (expected exposures/<scenario>/*.parquet or behaviors/<sequence>/*.parquet)"
                 for path in files_not_read(raw)]
    if not any(kind == "exposures" for kind, _, _ in files):
        empty = [f"{raw}/{kind}/{name}: no *.parquet file" for (kind, name), paths in tables.items()
                 if kind == "exposures" and not paths]
        raise FileNotFoundError(f"{raw}/exposures: no readable exposure file; " + "; ".join(warnings + empty))
    known = [name for kind, name, _ in files if kind == "exposures" and name in registry.scenarios]
    if not known:  # else every row would be copied to the quarantine before the run says so
        found = sorted({name for kind, name, _ in files if kind == "exposures"})
        raise ValueError(f"{raw}/exposures: no table of a scenario {registry.config_dir} registers (found {found}; "
                         f"registered {list(registry.scenarios)}): logs of another registry? pass its --config-dir "
                         "(MovieLens logs: --config-dir configs/movielens)")
    refuse_a_file_for_a_folder(out, f"--out {out}")
    for p in _owned(out):  # e.g. re-reading a fixed quarantine: --overwrite would delete the input first
        if raw.resolve().is_relative_to(p.resolve()):
            raise ValueError(f"--raw {raw} is inside {p}, which this aggregation writes anew (and --overwrite "
                             "deletes first); copy those logs elsewhere, or choose another --out")
    if out.resolve() == raw.resolve():
        raise ValueError(f"--out {out} is the --raw folder: the samples, quarantine and summary would mix with the "
                         f"logs; choose another --out (e.g. {raw.parent / 'agg'})")
    for kind in ("exposures", "behaviors"):
        if out.resolve().is_relative_to((raw / kind).resolve()):
            raise ValueError(f"--out {out} is inside {raw / kind}, the logs this aggregation reads (its output "
                             "would be read as a table next time); choose an --out outside it")
    warnings += [f"{kind}/{name}: unknown {'scenario' if kind == 'exposures' else 'sequence'}, "
                 f"its rows are quarantined under {out / QUARANTINE / kind / name}"
                 for kind, name in tables if Contract.for_table(registry, kind, name).schema is None]
    for kind, names, what in (("exposures", registry.scenarios, "scenario"), ("behaviors", registry.sequences,
                                                                             "sequence")):
        warnings += [f"{kind}/{name}: {'no *.parquet file' if (kind, name) in tables else 'no raw data'} for this "
                     f"registered {what} (its lists will be empty)" for name in names if not tables.get((kind, name))]
    return files, rows, warnings


def _owned(out: Path) -> list[Path]:
    """What an aggregation writes in `out`, and so replaces."""
    return [out / SAMPLES, out / QUARANTINE, out / SHUFFLE, out / SUMMARY]


def _refuse_to_replace(raw: Path, out: Path, overwrite: bool) -> str | None:
    """Raises FileExistsError where `out` holds an earlier output that this aggregation may not replace (checked
    before Ray starts, and again under the lock); the note for one it replaces without --overwrite, else None."""
    if not any(p.exists() for p in _owned(out)):
        return None
    previous = _previous_run(out)
    if previous is not None and previous["samples_out"] == 0 and Path(previous["raw"]).resolve() == raw.resolve():
        # The same logs, again, after a run that produced nothing: replacing it loses no sample
        # (its quarantine, of these logs, is written anew).
        return f"replacing {out}: its earlier aggregation of {raw} wrote no user samples"
    if overwrite:
        return None
    if previous is not None:
        held = f"already holds {previous['samples_out']:,} aggregated user samples of {previous['raw']}"
    elif (out / SUMMARY).exists():
        held = f"holds aggregation output whose {SUMMARY} cannot be read"
    else:
        held = f"holds the output of an aggregation that did not finish (no {SUMMARY})"
    raise FileExistsError(f"{out} {held}; choose another --out or pass --overwrite")


def _clear_output(raw: Path, out: Path, overwrite: bool, log) -> None:
    """Under this aggregation's lock of `out`: an earlier output removed where that is allowed, the
    samples/ folder marked unfinished."""
    note = _refuse_to_replace(raw, out, overwrite)
    if note:
        log(note)
    for p in _owned(out):
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (out / SAMPLES).mkdir(parents=True, exist_ok=True)
    (out / SAMPLES / UNFINISHED).write_text(f"an aggregation of {raw} writes these samples; {SUMMARY} is written and "
                                            "this file removed when it finishes\n")


def _summary(registry: Registry, raw: Path, out: Path, window_ms: int, max_ts: int, split: list[dict],
             parts: list[dict], warnings: list[str], seconds: float, engine: str) -> dict:
    per_table: dict[str, dict] = {}
    for s in split:
        t = per_table.setdefault(s["table"], {"rows": 0, "valid": 0, "early": 0, "late": 0, "quarantined": Counter(),
                                              "ignored": set(), "missing": {}, "files": {}})
        t["rows"] += s["rows"]
        t["valid"] += s["good"]
        t["early"] += s["early"]
        t["late"] += s.get("late", 0)
        t["quarantined"].update(s["reasons"])
        for reason in s["reasons"]:
            t["files"].setdefault(reason, []).append(s["file"])
        t["ignored"].update(s["ignored"])
        if s["missing"] and s["good"]:
            missing = t["missing"].setdefault(tuple(s["missing"]), {"files": [], "rows": 0})
            missing["files"].append(s["file"])
            missing["rows"] += s["good"]
    warnings = warnings + [s["unreadable"] for s in split if s.get("unreadable")]
    warnings += [f"{name}: column(s) {', '.join(sorted(t['ignored']))} not in the contract, ignored"
                 for name, t in per_table.items() if t["ignored"]]
    warnings += [f"{name}: {len(m['files'])} file(s) without column(s) {', '.join(columns)} (optional; "
                 f"{', '.join(sorted(m['files'])[:3])}{', ...' if len(m['files']) > 3 else ''}): their {m['rows']:,} "
                 "valid rows get null there" for name, t in per_table.items() for columns, m in t["missing"].items()]
    warnings += [f"{name}: {t['early']:,} of {t['valid']:,} rows have a ts before 1970-04-26 (10^10 ms): ts in "
                 "seconds rather than ms?" for name, t in per_table.items() if t["early"]]
    warnings += [f"{name}: {t['late']:,} of {t['rows']:,} rows have a ts after the year 5138 (10^14 ms): ts in "
                 "microseconds or nanoseconds rather than ms? (write ms since the epoch, or Arrow timestamps, whose "
                 "unit is read)" for name, t in per_table.items() if t["late"]]
    exposures_in = sum(t["rows"] for name, t in per_table.items() if name.startswith("exposures/"))
    samples = sum(p["samples"] for p in parts)
    exposures_out = sum(p["exposures"] for p in parts)
    summary = {
        "raw": str(raw.resolve()), "out": str(out), "samples_dir": str(out / SAMPLES), "engine": engine,
        "window_ms": window_ms, "max_ts": max_ts, "scenarios": list(registry.scenarios),
        "sequences": list(registry.sequences),
        "exposures_in": exposures_in, "exposures_out": exposures_out, "samples_out": samples,
        "compression": exposures_in / samples if samples else None,
        "quarantined": {k: dict(t["quarantined"]) for k, t in per_table.items() if t["quarantined"]},
        "quarantined_rows": sum(sum(t["quarantined"].values()) for t in per_table.values()),
        "quarantined_files": {k: {reason: sorted(files) for reason, files in t["files"].items()}
                              for k, t in per_table.items() if t["files"]},
        "tables": {k: {"rows": t["rows"], "valid": t["valid"]} for k, t in per_table.items()},
        "warnings": warnings, "seconds": round(seconds, 3),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    (out / SAMPLES / UNFINISHED).unlink(missing_ok=True)
    return summary


def _sole_aggregation(out: Path) -> DriverLock:
    """Holds `out` for this aggregation while it runs: another one into it is refused."""
    return DriverLock(out, "aggregation", "two aggregations into one --out would mix their users' samples")


def _default_max_ts() -> int:
    return int(time.time() * 1000) + CLOCK_SKEW_MS


def _num_partitions(rows: int, workers: int) -> int:
    """A multiple of the workers (no straggler round), each with at most ~ROWS_PER_PARTITION raw rows."""
    return workers * max(1, -(-rows // (workers * ROWS_PER_PARTITION)))


def aggregate(registry: Registry, raw: str | Path, out: str | Path, window_ms: int = 86_400_000,
              max_ts: int | None = None, num_partitions: int | None = None, overwrite: bool = False,
              log=print) -> dict:
    """Aggregate `raw` into `out` on Ray Data (connects or starts Ray); returns the summary."""
    from mtfm.platform.cluster import init_ray

    raw, out = Path(raw), Path(out)
    prepare_start = time.perf_counter()
    files, rows, warnings = _check_inputs(registry, raw, out)
    _refuse_to_replace(raw, out, overwrite)  # before Ray's start-up, which takes seconds
    prepare_s = time.perf_counter() - prepare_start
    ray = init_ray()  # before anything is written: a cluster that cannot be reached leaves no output
    import ray.data

    with _sole_aggregation(out):
        start = time.perf_counter() - prepare_s  # Ray's start-up is not the aggregation's time
        _clear_output(raw, out, overwrite, log)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        parts = num_partitions or _num_partitions(rows, cpus)
        max_ts = _default_max_ts() if max_ts is None else max_ts
        # The index keeps the raw-log order (ties in ts keep it).
        items = [{"kind": k, "name": n, "path": p, "index": i} for i, (k, n, p) in enumerate(files)]
        log(f"aggregating {len(files)} files ({rows:,} rows) into {parts} user partitions on {cpus} CPUs")
        split = [r for rs in _run(ray, _file_bins(items, 2 * cpus), _split_batch,
                                  dict(registry=registry, out=str(out), num_partitions=parts, max_ts=max_ts),
                                  "split the files by user", log) for r in rs]
        split_s = time.perf_counter() - start
        results = _run(ray, [{"partition": p} for p in range(parts)], _aggregate_batch,
                       dict(registry=registry, out=str(out), window_ms=window_ms), "aggregate the partitions", log)
        shutil.rmtree(out / SHUFFLE, ignore_errors=True)
        log(f"split {split_s:.1f} s, aggregate {time.perf_counter() - start - split_s:.1f} s "
            f"({len(files)} files, {parts} user partitions)")
        summary = _summary(registry, raw, out, window_ms, max_ts, split, results, warnings,
                           time.perf_counter() - start, "ray")
        _print_summary(summary, log)
        return summary


def aggregate_local(registry: Registry, raw: str | Path, out: str | Path, window_ms: int = 86_400_000,
                    max_ts: int | None = None, overwrite: bool = False, log=print) -> dict:
    """The same result in one process (no shuffle folder: one partition holding every user)."""
    raw, out = Path(raw), Path(out)
    start = time.perf_counter()
    files, _, warnings = _check_inputs(registry, raw, out)
    with _sole_aggregation(out):
        _clear_output(raw, out, overwrite, log)
        max_ts = _default_max_ts() if max_ts is None else max_ts
        split, valid = [], {}
        for i, (kind, name, path) in enumerate(files):
            good, counts = read_valid(registry, kind, name, path, i, str(out), max_ts)
            valid.setdefault((kind, name), []).append(good)
            split.append(counts)
        tables = {k: pa.concat_tables(v) for k, v in valid.items() if Contract.for_table(registry, *k).schema is not None}
        samples = aggregate_partition(registry, {n: t for (k, n), t in tables.items() if k == "exposures"},
                                      {n: t for (k, n), t in tables.items() if k == "behaviors"}, window_ms)
        results = [_write_samples(samples, out, 0)]
        summary = _summary(registry, raw, out, window_ms, max_ts, split, results, warnings,
                           time.perf_counter() - start, "local")
        _print_summary(summary, log)
        return summary


def _file_bins(items: list[dict], bins: int) -> list[dict]:
    """Files packed into about `bins` tasks of similar bytes (largest first, each to the lightest
    bin): few Ray Data tasks, and none much longer than the others."""
    loads = [[0, []] for _ in range(min(bins, len(items)))]
    for item in sorted(items, key=lambda i: -Path(i["path"]).stat().st_size):
        lightest = min(loads, key=lambda b: b[0])
        lightest[0] += Path(item["path"]).stat().st_size
        lightest[1].append(item)
    return [{"files": json.dumps(b[1])} for b in loads if b[1]]


def _split_batch(batch: dict, **kwargs) -> dict:
    results = [[split_file(**f, **kwargs) for f in json.loads(files)] for files in batch["files"]]
    return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


def _aggregate_batch(batch: dict, **kwargs) -> dict:
    results = [aggregate_shuffled(partition=int(p), **kwargs) for p in batch["partition"]]
    return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


def _run(ray, items: list[dict], fn, kwargs: dict, stage: str, log) -> list[dict]:
    """One Ray Data pass over a work list: one task per item, each on one CPU. Progress is logged
    as `stage: done/all tasks` every PROGRESS_S and at the end (Ray Data's own lines are quieted)."""
    from mtfm.platform.cluster import quiet_ray_data

    quiet_ray_data()
    context = ray.data.DataContext.get_current()
    reservation = context.op_resource_reservation_enabled
    # Per-operator reservations hold part of the CPUs back while the first tasks run; these
    # pipelines have one operator of a few long tasks, so all of them should start at once.
    context.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=1, num_cpus=1)
        results, shown = [], time.monotonic()
        for row in out.iter_rows():
            results.append(json.loads(row["result"]))
            if len(results) == len(items) or time.monotonic() - shown >= PROGRESS_S:
                log(f"{stage}: {len(results)}/{len(items)} tasks done")
                shown = time.monotonic()
        return results
    finally:
        context.op_resource_reservation_enabled = reservation


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def _print_summary(s: dict, log) -> None:
    for w in s["warnings"]:
        log(f"warning: {w}")
    log(f"exposures in: {s['exposures_in']:,}  exposures aggregated: {s['exposures_out']:,}  "
        f"user samples out: {s['samples_out']:,}  compression: "
        + (f"{s['compression']:.1f}x" if s["compression"] else "n/a"))
    if s["quarantined"]:
        log(f"quarantined rows: {s['quarantined_rows']:,} (under {Path(s['out']) / QUARANTINE})")
        for table, reasons in s["quarantined"].items():
            for reason, n in reasons.items():
                bound = f"; max_ts = {s['max_ts']} ms, {_utc(s['max_ts'])}" if reason.endswith("max_ts)") else ""
                files = s["quarantined_files"][table][reason]
                where = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
                log(f"  {table}: {n:,}  {reason}{bound} (in {where})")
    log(f"samples: {s['samples_dir']}  summary: {Path(s['out']) / SUMMARY}  ({s['seconds']:.1f} s)")
