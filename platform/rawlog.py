"""Raw-log validation: makes one Parquet file of a raw table conform to its contract.

`validate(table, contract)` casts each column to the registry's type and splits the rows into
good ones (exactly the contract schema) and bad ones (the file's own columns plus `reason`).
A `ts` of Arrow timestamps or dates is read in ms since the epoch, whatever its unit.
A column whose type differs from the contract is cast as a whole when it can be; otherwise
value by value (vectorised, through text), and only the values that cannot be cast are bad.
A row has the first reason that applies, in this order: an unknown table, a missing column,
a value of the wrong type, a null user_id, a null ts, a ts out of range, a null required
feature (or a required number that is NaN or infinite), a null label, a label that is not 0/1.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtfm.platform.registry import Registry

REASON = "reason"  # the quarantine's column saying why a row is there
SYNTH_RECORD = "_synth.json"  # beside exposures/ and behaviors/: the seed, users and tables `mtfm data synth` wrote
INTEGER = r"^\s*[+-]?\d+\s*$"
FLOAT = r"^\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity|nan)\s*$"


@dataclass(frozen=True)
class Contract:
    """What one raw table must hold: `schema` is None for a table the registry does not know."""

    table: str                     # "exposures/hp" or "behaviors/history"
    schema: pa.Schema | None
    required: tuple[str, ...]      # columns that may not be null (besides user_id and ts)
    labels: tuple[str, ...]        # columns that must be 0 or 1
    unknown_reason: str = ""

    @classmethod
    def for_table(cls, registry: Registry, kind: str, name: str) -> "Contract":
        table = f"{kind}/{name}"
        if kind == "exposures" and name in registry.scenarios:
            scn = registry.scenarios[name]
            return cls(table, registry.exposure_schema(name), tuple(f.name for f in scn.features if f.required),
                       scn.task_names)
        if kind == "behaviors" and name in registry.sequences:
            seq = registry.sequences[name]
            return cls(table, registry.behavior_schema(name), tuple(f.name for f in seq.features if f.required), ())
        known = ", ".join(registry.scenarios if kind == "exposures" else registry.sequences)
        what = "scenario" if kind == "exposures" else "sequence"
        return cls(table, None, (), (), f"unknown {what} {name!r} (not in {registry.config_dir}; registered: {known})")


def validate(table: pa.Table, contract: Contract, max_ts: int) -> tuple[pa.Table, pa.Table]:
    """(good rows with exactly the contract schema, bad rows with the file's columns and `reason`)."""
    n = table.num_rows
    reasons: list[str] = []
    code = np.zeros(n, np.int32)  # 0 = good, k = reasons[k - 1]

    def flag(mask: np.ndarray, reason: str) -> None:
        new = mask & (code == 0)
        if new.any():
            reasons.append(reason)
            code[new] = len(reasons)

    if contract.schema is None:
        flag(np.ones(n, bool), contract.unknown_reason)
        return table.slice(0, 0), _with_reason(table, code, reasons)
    columns = []
    for field in contract.schema:
        must_exist = not field.nullable or field.name in contract.required or field.name in contract.labels
        if field.name not in table.column_names:
            if must_exist:
                flag(np.ones(n, bool), f"missing column {field.name} (expected {field.type})")
            columns.append(pa.nulls(n, field.type))
            continue
        source = table[field.name]
        if field.name == "ts":
            source = ts_in_ms(source)
        cast, bad = cast_column(source, field.type)
        flag(bad, f"wrong type in {field.name}: expected {field.type}, found a {source.type} value that does not convert")
        columns.append(cast)
    good = pa.Table.from_arrays(columns, schema=contract.schema)
    flag(_null(good["user_id"]), "null user_id")
    flag(_null(good["ts"]), "null ts")
    ts = good["ts"].to_numpy()  # float with NaN for nulls (already flagged), which compare False
    # The bound itself is in the summary (max_ts): a reason is the same text from run to run.
    flag((ts < 0) | (ts > max_ts), "ts out of range (expected 0 <= ts <= max_ts)")
    for name in contract.required:
        flag(_null(good[name]), f"null required feature {name}")
        if pa.types.is_floating(good[name].type):  # NaN or inf would enter the model as 0: missing too
            values = good[name].to_numpy(zero_copy_only=False)
            flag(~np.isfinite(values), f"required feature {name} not a finite number")
    for name in contract.labels:
        label = good[name]
        flag(_null(label), f"null label {name}")
        value = label.to_numpy()  # float with NaN for nulls (already flagged)
        flag((value != 0) & (value != 1), f"label {name} not 0/1")
    if not reasons:
        return good, _with_reason(table.slice(0, 0), code[:0], reasons)
    return good.filter(pa.array(code == 0)), _with_reason(table, code, reasons)


_MS_PER_UNIT = {"s": 1000, "ms": 1, "us": -1000, "ns": -1_000_000, "day": 86_400_000}  # negative: divide


def ts_in_ms(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A `ts` column of Arrow timestamps (as pandas writes datetimes) or dates as int64 ms since the
    epoch; a column of numbers as it is (read as ms). Arrow would cast a timestamp to its own unit's
    count. Finer units are floored to the ms; a coarser value beyond int64 in ms saturates there
    (and is quarantined as out of range) rather than wrapping."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        unit = kind.unit
    elif pa.types.is_date32(kind):
        unit = "day"
    elif pa.types.is_date64(kind):
        unit = "ms"
    else:
        return column
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    storage = pa.int32() if unit == "day" else pa.int64()  # Arrow casts a date32 to its own width only
    counts = pc.fill_null(column.view(storage), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    factor = _MS_PER_UNIT[unit]
    if factor < 0:
        ms = np.floor_divide(counts, -factor)
    else:
        limit = np.iinfo(np.int64).max // factor
        ms = np.where(np.abs(counts) > limit, np.sign(counts) * np.iinfo(np.int64).max,
                      np.clip(counts, -limit, limit) * factor)
    return pa.array(ms, pa.int64(), mask=~valid)


def cast_column(column: pa.ChunkedArray | pa.Array, target: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """(column cast to target with nulls where a value cannot be cast, mask of those values)."""
    n = len(column)
    if column.type == target:
        return column, np.zeros(n, bool)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    try:
        return pc.cast(column, target), np.zeros(n, bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    if pa.types.is_list(target):
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            return pa.nulls(n, target), ~_null(column)
        values, bad_values = cast_column(column.flatten(), target.value_type)
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        cast = pa.ListArray.from_arrays(offsets, values, type=target, mask=column.is_null())
        bad = np.zeros(n, bool)
        bad[pc.list_parent_indices(column).to_numpy()[bad_values]] = True
        return cast, bad
    try:
        text = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.nulls(n, target), ~_null(column)
    integer = pa.types.is_integer(target)
    ok = pc.fill_null(pc.match_substring_regex(text, INTEGER if integer else FLOAT, ignore_case=True), False)
    trimmed = pc.utf8_trim_whitespace(pc.if_else(ok, text, pa.scalar(None, pa.string())))
    try:
        parsed = pc.cast(trimmed, pa.int64() if integer else pa.float64())
    except pa.ArrowInvalid:  # an integer beyond int64 (a uint64 id) fails the whole cast: value by value
        if not integer:
            raise
        int64 = np.iinfo(np.int64)
        parsed = pa.array([None if v is None or not int64.min <= int(v) <= int64.max else int(v)
                           for v in trimmed.to_pylist()], pa.int64())
        ok = pc.and_(ok, pc.is_valid(parsed))
    if integer:
        info = np.iinfo(target.to_pandas_dtype())
        ok = pc.and_(ok, pc.fill_null(pc.and_(pc.greater_equal(parsed, info.min), pc.less_equal(parsed, info.max)), True))
        parsed = pc.if_else(ok, parsed, pa.scalar(None, pa.int64()))
    bad = ~ok.to_numpy(zero_copy_only=False) & ~_null(column)
    return pc.cast(parsed, target, safe=False), bad


def _null(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if column.null_count == 0:
        return np.zeros(len(column), bool)
    return pc.is_null(column).to_numpy(zero_copy_only=False)


def _with_reason(table: pa.Table, code: np.ndarray, reasons: list[str]) -> pa.Table:
    """The bad rows with their `reason` last; a `reason` column of the file's own (a quarantine read
    again after a fix: the registry reserves the name) gives way to this run's."""
    bad = code > 0
    labels = pa.array(np.array([""] + reasons, dtype=object)[code[bad]], pa.string())
    if REASON in table.column_names:
        table = table.drop_columns([REASON])
    return table.filter(pa.array(bad)).append_column(REASON, labels)


def prepare_raw_out(out: str | Path, overwrite: bool) -> Path:
    """The folder a raw-log writer (synthetic or adapter) writes exposures/ and behaviors/ into,
    emptied of earlier ones only when `overwrite` says so. The record of the synthetic world they
    were (SYNTH_RECORD) goes with them: `mtfm data synth` writes its own again and adds days to a folder
    only where it stands (platform/synth.py, `prepare_synth_out`)."""
    out = Path(out)
    refuse_a_file_for_a_folder(out, f"--out {out}")
    for sub in ("exposures", "behaviors"):
        if (out / sub).exists():
            if not overwrite:
                raise FileExistsError(f"{out / sub} already exists; choose an empty --out folder or pass --overwrite")
            shutil.rmtree(out / sub)
    if (out / SYNTH_RECORD).is_file():
        (out / SYNTH_RECORD).unlink()
    return out


def refuse_a_file_for_a_folder(folder: Path, given: str) -> None:
    """Refuse a folder to write in that is a file, or lies under one, by name; `given` is what the
    user passed (e.g. "--out PATH"). Else the first write deep inside fails with only the errno."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{given}: {path} is a file, not a folder")
            return


def list_tables(raw: Path) -> dict[tuple[str, str], list[Path]]:
    """{(kind, name): sorted Parquet files} for every folder under raw/exposures and raw/behaviors."""
    out = {}
    for kind in ("exposures", "behaviors"):
        root = raw / kind
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                out[(kind, folder.name)] = sorted(p for p in folder.rglob("*.parquet")
                                                  if p.is_file() and not _hidden(p.relative_to(folder)))
    return out


def _hidden(relative: Path) -> bool:
    """A path under a table's folder that writers keep for themselves (_SUCCESS, _temporary/, .crc)."""
    return any(part.startswith((".", "_")) for part in relative.parts)


def files_not_read(raw: Path) -> list[Path]:
    """The files under raw/exposures and raw/behaviors that `list_tables` leaves out: not named
    *.parquet, or not inside a table's folder. Hidden and _-prefixed ones (`_hidden`) excepted."""
    listed = {p for paths in list_tables(raw).values() for p in paths}
    return sorted(p for kind in ("exposures", "behaviors") if (raw / kind).is_dir() for p in (raw / kind).rglob("*")
                  if p.is_file() and p not in listed and not _hidden(p.relative_to(raw / kind)))
