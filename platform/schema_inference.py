"""Schema inference (`mtfm scenarios infer`): a draft `configs/scenarios/<name>.yaml` from an exposure log.

Input: a Parquet file, a folder of Parquet files, or a CSV file with one row per exposure (the
raw-log contract of DESIGN.md). At most `MAX_ROWS` rows are read; cardinalities come from them.
The draft is validated by the registry (a temporary copy of the config dir with the draft in it)
before anything is written. The rules, column by column:

- Skipped: the reserved columns (user_id, request_id, ts, window, reason) and any `--skip` column.
- Reuse first: a name the registry already declares (in a sequence or another scenario) gets
  that declaration copied exactly (type, buckets, dim, transform, max_len; a name means one
  thing everywhere) and the same section (a sequence feature is an item feature).
- Labels (tasks): integer or boolean columns whose values are all 0/1 and whose name looks like
  a label (click, order, buy, purchase, convert, pay, redeem*, like, share, cart, label*, is_*,
  has_*). Kind `ctr` for click-like, `ctcvr` for order/purchase-like, `binary` otherwise.
  depends_on: a ctcvr task depends on the first ctr task; another binary task whose name is a
  post-purchase step (redeem*, refund*, return*) depends on the first ctcvr task. Tasks
  are ordered ctr, ctcvr, binary so a parent comes first.
- Types: a list of integers -> categorical_list (max_len = the longest list seen); an integer
  column -> categorical if its name ends in _id or it has <= 1000 distinct values and its name
  is not a counter (a window suffix such as _7d, or count/cnt/num/views/clicks/orders), else
  numeric; a float -> numeric. Strings, booleans that are not labels, lists of non-integers and
  other types are refused with a message naming the file and the column (categorical ids must
  be integers: map them, e.g. with a dictionary or a stable hash, or pass --skip COLUMN).
  CSV has no column types: a float column whose values are all integral reads as integers
  (check such columns in the draft).
- Sizes: buckets = the next power of two >= 2 x distinct values, at least 16 (room for hashing
  ids not seen yet); dim = min(64, max(4, round(6 * distinct ** 0.25))) rounded to a multiple
  of 4.
- Numeric transform: log1p when the values are non-negative and heavy-tailed (max > 100 x
  median, the median of the positive values when most are 0); symlog when they take both signs
  and max |x| > 100 x median |x|; else none.
- Sections: user_* -> user_features, unless the name also names an item entity (e.g.
  user_poi_clicks_30d, where poi_id is an id) -> cross_features; *_id columns -> item_features;
  windowed counters (*_7d, *_30d, ...) -> cross_features; a column whose first word is an item
  entity (dish_price next to dish_id) -> item_features; a list of ids otherwise unplaced ->
  item_features; everything else (distance, ratios) -> cross_features. Item entities are the
  prefixes of the *_id columns of the log and of the registry's item ids (poi_id -> poi).
- required: true for *_id item features without nulls (reused features keep theirs).

The draft starts with a comment header saying it must be confirmed (labels, the user/item/cross
split, sizes); each feature line carries the reason of its inference as a comment.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from mtfm.platform.registry import (
    NAME_PATTERN, RESERVED_COLUMNS, Feature, Registry, RegistryError, declared_feature, load_registry, parse_sequences,
    read_yaml_mapping, resolve_config_dir, scenario_files, sequences_file,
)

MAX_ROWS = 2_000_000
MAX_CATEGORICAL_INT_CARD = 1000
CTR_WORDS = ("click", "clicks", "clicked", "ctr")
CTCVR_WORDS = ("order", "orders", "ordered", "buy", "bought", "purchase", "purchased", "convert", "converted",
               "conversion", "cvr", "pay", "paid")
POST_PURCHASE_WORDS = ("redeem", "redeemed", "refund", "refunded", "return", "returned")
OTHER_LABEL_WORDS = ("like", "liked", "share", "shared", "cart", "add", "follow", "favorite", "finish", "label",
                     "is", "has") + POST_PURCHASE_WORDS
COUNTER_WORDS = ("count", "counts", "cnt", "num", "views", "clicks", "orders", "times")
WINDOW_SUFFIX = re.compile(r"_\d+[mhdw]$")
SECTIONS = ("user_features", "item_features", "cross_features")


class SchemaInferenceError(ValueError):
    """The log cannot be turned into a draft; the message names the file and the column."""


@dataclass
class Inferred:
    """One column's outcome: a feature (`spec` is its YAML mapping), a task, or skipped."""

    column: str
    role: str            # user_features | item_features | cross_features | task | skipped
    spec: dict[str, Any]
    why: str

    def shape(self) -> str:
        s = self.spec
        if self.role == "task":
            return f"kind {s['kind']}" + (f", depends_on {s['depends_on']}" if s.get("depends_on") else "")
        if self.role == "skipped":
            return "-"
        if s["type"] == "numeric":
            return f"transform {s.get('transform', 'none')}"
        out = f"buckets {s['buckets']}, dim {s['dim']}"
        return out + (f", max_len {s['max_len']}" if "max_len" in s else "")

    @property
    def type(self) -> str:
        return self.spec.get("type", self.role)


@dataclass
class InferenceResult:
    name: str
    source: Path
    rows: int
    columns: list[Inferred]
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = ("column", "section", "type", "buckets/dim/transform", "why")
        table = [head] + [(c.column, c.role.replace("_features", ""), c.type if c.role != "task" else "task",
                           c.shape(), c.why) for c in self.columns]
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        lines = [f"inferred scenario {self.name!r} from {self.source} ({self.rows:,} rows read)"]
        for r in table:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r[:4], widths)) + "  " + r[4])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------- reading

def read_exposures(path: str | Path, max_rows: int = MAX_ROWS,
                   log_names: frozenset[str] = frozenset()) -> pa.Table:
    """A Parquet file or folder, or a CSV file, as one Arrow table (at most `max_rows` rows).
    `log_names`: the registry's scenarios and sequences (a folder of their logs is refused)."""
    import pyarrow.dataset as ds

    path = Path(path)
    if not path.exists():
        raise SchemaInferenceError(f"{path}: exposure log not found (expected a Parquet file, a folder of "
                                   "Parquet files or a CSV file)")
    try:
        if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
            from pyarrow import csv

            parse = csv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            table = csv.read_csv(path, parse_options=parse).slice(0, max_rows)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix == ".parquet")
            if not files:
                raise SchemaInferenceError(f"{path}: no *.parquet files in this folder (expected the exposure log "
                                           "as Parquet files, or pass a CSV file)")
            _refuse_several_logs(path, files, set(log_names))
            dataset = ds.dataset([str(f) for f in files], format="parquet", schema=_one_schema(path, files))
            table = dataset.head(max_rows)
        else:
            _one_schema(path.parent, [path])  # names a file it cannot read, or its repeated columns
            table = ds.dataset(str(path), format="parquet").head(max_rows)
    except SchemaInferenceError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise SchemaInferenceError(f"{path}: cannot read as Parquet or CSV (.csv): {exc}") from exc
    if table.num_rows == 0:
        raise SchemaInferenceError(f"{path}: the exposure log has no rows (columns {', '.join(table.column_names)}); "
                                   "a draft needs rows to infer from")
    return table


def _refuse_several_logs(folder: Path, files: list[Path], log_names: set[str]) -> None:
    """One log per draft. Read together, several logs' columns would make one scenario of all of
    them, so a folder is refused when its subfolders are named like logs (exposures/, behaviors/,
    or a scenario or sequence of `log_names`) or when two of them each have columns the other
    lacks. Subfolders of one log (days, Hive partitions) share their columns, or later ones add some."""
    import pyarrow.parquet as pq

    columns: dict[str, set[str]] = {}
    for file in files:
        parts = file.relative_to(folder).parts
        where = parts[0] if len(parts) > 1 else "."
        try:
            columns.setdefault(where, set()).update(pq.read_schema(file).names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaInferenceError(f"{file}: cannot read as Parquet: {exc}") from exc
    if len(columns) < 2:
        return
    named = sorted(set(columns) & (log_names | {"exposures", "behaviors"}))
    groups = list(columns.items())
    apart = next(((a, b) for i, a in enumerate(groups) for b in groups[i + 1:]
                  if not (a[1] <= b[1] or b[1] <= a[1])), None)
    if named:
        why = f"{', '.join(f'{n}/' for n in named)}: named like logs of the registry's layout"
    elif apart is not None:  # neither has all the other's columns: not one log that gained a column
        (first, first_names), (second, second_names) = apart
        why = (f"{first}/ has {', '.join(sorted(first_names - second_names))} and {second}/ has "
               f"{', '.join(sorted(second_names - first_names))}, which the other lacks")
    else:
        return
    exposures = [f.parent for f in files if "exposures" in f.relative_to(folder).parts[:-1]]
    example = (exposures or [files[0].parent])[0]
    raise SchemaInferenceError(f"{folder}: its subfolders look like several logs ({why}); a draft is inferred from "
                               f"one exposure log: pass one scenario's folder, e.g. {example}")


def _one_schema(folder: Path, files: list[Path]) -> pa.Schema:
    """The schema a folder's files are read with together: theirs, unified (int32 with int64, int
    with double, string with large_string); where two files' types of a column cannot be, an error
    naming the column and the files (read with the first file's schema, the rest failed without a name)."""
    import pyarrow.parquet as pq

    schemas = []
    for file in files:
        try:
            schemas.append((file, pq.read_schema(file)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaInferenceError(f"{file}: cannot read as Parquet: {exc}") from exc
        _refuse_repeated_columns(schemas[-1][1].names, file)
    try:
        return pa.unify_schemas([schema for _, schema in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    seen: dict[str, tuple[pa.Field, Path]] = {}
    for file, schema in schemas:
        for column in schema:
            first, first_file = seen.setdefault(column.name, (column, file))
            try:
                pa.unify_schemas([pa.schema([first]), pa.schema([column])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                raise SchemaInferenceError(
                    f"{folder}: column {column.name!r} is {first.type} in {first_file.relative_to(folder)} but "
                    f"{column.type} in {file.relative_to(folder)}: the files of one log need types that read as one "
                    "(rewrite them, or infer from one file)") from None
    raise SchemaInferenceError(f"{folder}: the files' schemas do not read as one")


def _refuse_repeated_columns(names: list[str], source) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SchemaInferenceError(f"{source}: column(s) {', '.join(repeated)} appear more than once; a log's "
                                   "columns need distinct names")


# ---------------------------------------------------------------- rules

def buckets_for(card: int) -> int:
    """The next power of two >= 2 x cardinality, at least 16."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, 2 * card)))))


def dim_for(card: int) -> int:
    """min(64, max(4, round(6 * card ** 0.25))), rounded to a multiple of 4."""
    raw = min(64, max(4, round(6 * max(1, card) ** 0.25)))
    return int(min(64, max(4, 4 * round(raw / 4))))


def numeric_transform(values: np.ndarray) -> tuple[str, str]:
    values = values[np.isfinite(values)]
    if not len(values):
        return "none", "no finite values"
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0:
        med = float(np.median(values))
        if med == 0 and hi > 0:  # mostly zeros (a sparse amount, a 0/1 flag): the positive values' median
            med = float(np.median(values[values > 0]))
        if med > 0 and hi > 100 * med:
            return "log1p", f"non-negative, heavy-tailed (max {hi:.4g} vs median {med:.4g})"
        return "none", f"range [{lo:.4g}, {hi:.4g}], not heavy-tailed"
    mag = np.abs(values)
    med = float(np.median(mag))
    if med > 0 and float(mag.max()) > 100 * med:
        return "symlog", f"both signs, heavy-tailed (max |x| {mag.max():.4g} vs median |x| {med:.4g})"
    return "none", f"range [{lo:.4g}, {hi:.4g}]"


def _words(name: str) -> list[str]:
    return name.split("_")


def label_kind(name: str) -> str | None:
    """ctr | ctcvr | binary when the name looks like a label, else None."""
    first = _words(name)[0]
    if first in CTR_WORDS:
        return "ctr"
    if first in CTCVR_WORDS:
        return "ctcvr"
    if first in OTHER_LABEL_WORDS or name.startswith("label"):
        return "binary"
    return None


def _is_counter(name: str) -> bool:
    return bool(WINDOW_SUFFIX.search(name)) or any(w in COUNTER_WORDS for w in _words(name))


def _known_features(config_dir: Path, exclude: str) -> tuple[dict[str, tuple[Feature, str, str]], set[str]]:
    """Features the registry declares (minus scenario `exclude`): name -> (feature, section, where);
    and the sequence names. Validates the rest of the config dir."""
    seq_file = sequences_file(config_dir)
    others = [p for p in scenario_files(config_dir / "scenarios") if p.stem != exclude]
    known: dict[str, tuple[Feature, str, str]] = {}
    if others:
        with tempfile.TemporaryDirectory() as tmp:
            reg = _load_copy(_copy_config_dir(config_dir, Path(tmp), exclude), config_dir)
        for seq in reg.sequences.values():
            for f in seq.features:
                known.setdefault(f.name, (f, "item_features", f"sequence {seq.name}"))
        for scn in reg.scenarios.values():
            for section in SECTIONS:
                for f in getattr(scn, section):
                    known.setdefault(f.name, (f, section, f"scenario {scn.name}"))
        return known, set(reg.sequences)
    sequences = parse_sequences(read_yaml_mapping(seq_file), str(seq_file))
    for seq in sequences.values():
        for f in seq.features:
            known.setdefault(f.name, (f, "item_features", f"sequence {seq.name}"))
    return known, set(sequences)


def _copy_config_dir(src: Path, dst: Path, exclude: str) -> Path:
    """sequences.yaml and scenarios/*.yaml of `src` (without scenario `exclude`) under `dst/configs`."""
    root = dst / "configs"
    (root / "scenarios").mkdir(parents=True)
    shutil.copy(sequences_file(src), root / "sequences.yaml")
    for p in scenario_files(src / "scenarios"):
        if p.stem != exclude:
            shutil.copy(p, root / "scenarios" / p.name)
    return root


def _load_copy(copy: Path, root: Path) -> Registry:
    """The registry of `copy`, a copy of config dir `root`. Its errors name `root`'s files: the copy
    is deleted by the time anyone reads them."""
    try:
        return load_registry(copy)
    except RegistryError as exc:
        def back(text: str) -> str:
            return text.replace(str(copy), str(root))

        raise RegistryError(back(exc.file), exc.field, back(exc.message)) from None


def _label_values_ok(col: pa.ChunkedArray) -> bool:
    """Booleans, or numbers all 0 or 1 (floats too: a label with nulls written by pandas is float64;
    aggregation reads 0.0/1.0 as the label's 0/1)."""
    if pa.types.is_boolean(col.type):
        return True
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        return False
    values = pc.unique(col.drop_null()).to_pylist()
    return bool(values) and set(values) <= {0, 1}


def _looks_like_a_dirty_label(name: str, col: pa.ChunkedArray) -> bool:
    """An integer column named like a label whose values are a few small counts (click in 0, 1, 2):
    the label with repeats counted, not a feature. Ids, counters, amounts and rates are features."""
    if name.endswith("_id") or _is_counter(name) or not pa.types.is_integer(col.type) or col.null_count == len(col):
        return False
    values = pc.unique(col.drop_null()).to_pylist()
    return len(values) <= 10 and min(values) >= 0 and max(values) <= 10


def _some_values(col: pa.ChunkedArray, most: int = 5) -> str:
    values = pc.unique(col.drop_null()).to_pylist()
    return ", ".join(map(str, sorted(values)[:most])) + (f", ... ({len(values)} distinct)" if len(values) > most else "")


def infer_columns(table: pa.Table, source: Path, known: dict[str, tuple[Feature, str, str]],
                  skip: tuple[str, ...] = ()) -> list[Inferred]:
    names = table.column_names
    _refuse_repeated_columns(names, source)
    unknown = [s for s in dict.fromkeys(skip) if s not in names]
    if unknown:  # a typo would leave the column meant to be skipped (say, a leaking label) in the draft
        raise SchemaInferenceError(f"{source}: --skip {', '.join(unknown)}: not a column of the log; expected some "
                                   f"of its columns: {', '.join(names)}")
    entities = {n[:-3] for n in names if n.endswith("_id") and n not in RESERVED_COLUMNS}
    entities |= {n[:-3] for n, (_, section, _) in known.items() if n.endswith("_id") and section == "item_features"}
    out: list[Inferred] = []
    for name in names:
        col = table.column(name)
        if name in RESERVED_COLUMNS:
            out.append(Inferred(name, "skipped", {}, "reserved column"))
            continue
        if name in skip:
            out.append(Inferred(name, "skipped", {}, "--skip"))
            continue
        if not NAME_PATTERN.match(name):
            raise SchemaInferenceError(f"{source}: column {name!r}: not a valid feature name (lower-case letters, "
                                       "digits and single underscores, starting with a letter); rename it in the "
                                       "log or pass --skip " + name)
        kind = label_kind(name)
        if kind and name not in known and _label_values_ok(col):
            out.append(Inferred(name, "task", {"name": name, "kind": kind},
                                f"0/1 values, name looks like a {kind} label"))
            continue
        if kind and name not in known and _looks_like_a_dirty_label(name, col):
            # As a feature, a label the model is trained to predict would be one of its inputs.
            raise SchemaInferenceError(
                f"{source}: column {name!r} is named like a {kind} label but holds small counts, not 0/1 "
                f"({col.type}: {_some_values(col)}): a label holds 0/1 or booleans (a row whose label is null is "
                f"quarantined); clean it in the log, or pass --skip {name} (rename it if it is a feature)")
        if name not in known and col.null_count == len(col):
            out.append(Inferred(name, "skipped", {}, "null in every row read: nothing to learn from"))
            continue
        if (name not in known and len(col) > 1 and not col.null_count and not pa.types.is_nested(col.type)
                and len(pc.unique(col)) == 1):
            out.append(Inferred(name, "skipped", {}, f"{col[0].as_py()!r} in every row read: nothing to learn from"))
            continue
        if name in known:
            f, section, where = known[name]
            why = f"reused from {where}"
            warn = _type_conflict(f, col.type)
            if warn:
                raise SchemaInferenceError(f"{source}: column {name!r}: {warn}, but {where} declares {name!r} as "
                                           f"{f.type} (a name means one thing everywhere): fix the column's type "
                                           "or rename it")
            if f.required and col.null_count:
                why += (f"; required there, but {col.null_count:,} of the {len(col):,} rows read are null: "
                        "aggregation would quarantine them")
            out.append(Inferred(name, section, declared_feature(f), why))
            continue
        out.append(_infer_feature(name, col, source, entities))
    return out


def _type_conflict(f: Feature, t: pa.DataType) -> str | None:
    if f.type == "categorical" and not pa.types.is_integer(t):
        return f"the data is {t}"
    if f.type == "numeric" and not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return f"the data is {t}"
    if f.type == "categorical_list" and not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return f"the data is {t}"
    return None


def _section(name: str, entities: set[str]) -> tuple[str, str]:
    words = _words(name)
    if name.startswith("user_"):
        hit = [w for w in words[1:] if w in entities]
        if hit:
            return "cross_features", f"user_* and names the item entity {hit[0]!r} -> cross"
        return "user_features", "user_* -> user"
    if name.endswith("_id"):
        return "item_features", "*_id -> item"
    if WINDOW_SUFFIX.search(name):
        return "cross_features", "a windowed counter (*_7d, *_30d, ...) -> cross"
    if words[0] in entities:
        return "item_features", f"about the item entity {words[0]!r} ({words[0]}_id) -> item"
    return "cross_features", "not user_*, not an item id or item attribute -> cross"


def _infer_feature(name: str, col: pa.ChunkedArray, source: Path, entities: set[str]) -> Inferred:
    t = col.type
    section, where_why = _section(name, entities)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        raise SchemaInferenceError(
            f"{source}: column {name!r} holds strings ({t}): categorical ids must be integers. Map them to "
            "integers before inference (e.g. a dictionary of the distinct values, or a stable 63-bit hash such "
            f"as xxhash64), or pass --skip {name} to leave the column out")
    if pa.types.is_boolean(t):
        raise SchemaInferenceError(
            f"{source}: column {name!r} is boolean but its name does not look like a label (click, order, "
            f"is_*, ...): store it as an integer 0/1 to use it as a categorical feature, rename it if it is a "
            f"label, or pass --skip {name}")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if not pa.types.is_integer(t.value_type):
            raise SchemaInferenceError(f"{source}: column {name!r} is a list of {t.value_type}: only lists of "
                                       f"integer ids are supported (categorical_list); pass --skip {name}")
        flat = pc.list_flatten(col)
        card = len(pc.unique(flat.drop_null())) if len(flat) else 0
        lengths = pc.list_value_length(col).drop_null()
        max_len = max(1, int(pc.max(lengths).as_py() or 0)) if len(lengths) else 1
        spec = {"name": name, "type": "categorical_list", "buckets": buckets_for(card), "dim": dim_for(card),
                "max_len": max_len}
        sec, sec_why = (section, where_why)
        if section == "cross_features":
            sec, sec_why = "item_features", "a list of ids -> item"
        return Inferred(name, sec, spec, f"list of integers, {card} distinct ids, lists up to {max_len}; {sec_why}")
    if pa.types.is_integer(t):
        card = len(pc.unique(col.drop_null()))
        if name.endswith("_id") or (card <= MAX_CATEGORICAL_INT_CARD and not _is_counter(name)):
            spec = {"name": name, "type": "categorical", "buckets": buckets_for(card), "dim": dim_for(card)}
            if name.endswith("_id") and section == "item_features" and col.null_count == 0:
                spec["required"] = True
            reason = ("an id" if name.endswith("_id")
                      else f"integer with few distinct values (<= {MAX_CATEGORICAL_INT_CARD})")
            return Inferred(name, section, spec, f"{reason}, {card} distinct; {where_why}")
        transform, why = numeric_transform(col.to_numpy(zero_copy_only=False).astype(np.float64))
        spec = {"name": name, "type": "numeric"} | ({"transform": transform} if transform != "none" else {})
        reason = ("integer counter" if _is_counter(name)
                  else f"integer with {card} distinct values (> {MAX_CATEGORICAL_INT_CARD})")
        return Inferred(name, section, spec, f"{reason}, {why}; {where_why}")
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False) if len(col) else np.zeros(0)
        values = values[~np.isnan(values)] if len(values) else values
        transform, why = numeric_transform(values)
        spec = {"name": name, "type": "numeric"} | ({"transform": transform} if transform != "none" else {})
        return Inferred(name, section, spec, f"float, {why}; {where_why}")
    raise SchemaInferenceError(f"{source}: column {name!r} has type {t}, which no feature type holds (integers, "
                               f"floats, lists of integers); convert it or pass --skip {name}")


def order_tasks(tasks: list[Inferred]) -> list[Inferred]:
    """ctr first, then ctcvr, then binary; ctcvr depends on the first ctr, post-purchase on the first ctcvr."""
    rank = {"ctr": 0, "ctcvr": 1, "binary": 2}
    tasks = sorted(tasks, key=lambda t: rank[t.spec["kind"]])
    first = {k: next((t.column for t in tasks if t.spec["kind"] == k), None) for k in rank}
    for t in tasks:
        parent = None
        if t.spec["kind"] == "ctcvr":
            parent = first["ctr"]
        elif t.spec["kind"] == "binary" and _words(t.column)[0] in POST_PURCHASE_WORDS:
            parent = first["ctcvr"] or first["ctr"]
        if parent and parent != t.column:
            t.spec["depends_on"] = parent
            t.why += f"; depends_on {parent} (guessed)"
    return tasks


def _label_rates(table: pa.Table, tasks: list[Inferred]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for t in tasks:
        y = table.column(t.column).to_numpy(zero_copy_only=False).astype(np.float64)
        mask = ~np.isnan(y)
        parent = t.spec.get("depends_on")
        if parent:
            mask &= table.column(parent).to_numpy(zero_copy_only=False).astype(np.float64) == 1
        if mask.any():
            rate = round(float(y[mask].mean()), 4)
            if 0 < rate < 1:
                rates[t.column] = rate
    return rates


# ---------------------------------------------------------------- the draft

def _flow(mapping: dict[str, Any]) -> str:
    return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=10_000).strip()


def render_yaml(name: str, source: Path, rows: int, columns: list[Inferred], label_rates: dict[str, float]) -> str:
    lines = [
        f"# DRAFT inferred by `mtfm scenarios infer` from {source} ({rows:,} rows).",
        "# Confirm before use, especially: which columns are labels (tasks, kind, depends_on), the",
        "# user/item/cross split, and buckets/dim (sized from the distinct values seen). Features",
        "# already declared elsewhere in the registry are copied exactly (a name means one thing",
        "# everywhere). Each line ends with the reason of its inference.",
    ]
    skipped = [c for c in columns if c.role == "skipped"]
    if skipped:
        lines.append("# Skipped columns: " + ", ".join(f"{c.column} ({c.why})" for c in skipped))
    description = json.dumps(f"Draft inferred from {source.name}; confirm and describe.")
    lines += [f"name: {name}", f"description: {description}"]
    for section in SECTIONS:
        feats = [c for c in columns if c.role == section]
        lines.append(f"{section}:" + ("" if feats else " []"))
        lines += [f"  - {_flow(c.spec)}  # {c.why}" for c in feats]
    tasks = [c for c in columns if c.role == "task"]
    lines.append("tasks:" + ("" if tasks else " []"))
    lines += [f"  - {_flow(c.spec)}  # {c.why}" for c in tasks]
    if label_rates:
        lines += ["synthetic:  # rates seen in the log (a dependent task's given its parent), for `mtfm data synth`",
                  f"  label_rates: {_flow(label_rates)}"]
    return "\n".join(lines) + "\n"


def _refuse_unwritable(target: Path, name: str) -> None:
    """Refuse, before the log is read, a target the draft could not be written to: a folder, or a
    path under a file. Missing folders on the way are made when the draft is written."""
    if target.is_dir():
        raise SchemaInferenceError(f"{target}: a folder, not a file: --out names the file to write the draft to, "
                                   f"e.g. {target / f'{name}.yaml'}")
    nearest = next(parent for parent in target.parents if parent.exists())
    if not nearest.is_dir():
        raise SchemaInferenceError(f"{target}: cannot be written: {nearest} is a file, not a folder (expected --out "
                                   "to name a file in a folder)")


def infer_scenario(name: str, exposures: str | Path, config_dir: str | Path | None = None,
                   out: str | Path | None = None, force: bool = False, skip: tuple[str, ...] = (),
                   write: bool = True) -> InferenceResult:
    """Infer a draft scenario from an exposure log, validate it with the registry, and write it."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED_COLUMNS:
        raise SchemaInferenceError(f"--name {name!r}: expected a lower-case identifier (letters, digits, single "
                                   "underscores, starting with a letter; not a reserved column), e.g. coupon_feed")
    root = resolve_config_dir(config_dir)
    if not (root / "sequences.yaml").exists():
        raise SchemaInferenceError(f"{root}: not a config directory (expected sequences.yaml and scenarios/ in it; "
                                   "set --config-dir or MTFM_CONFIG_DIR)")
    scenarios = (root / "scenarios").resolve()
    declared = [path for path in (scenarios / f"{name}.yaml", scenarios / f"{name}.yml") if path.exists()]
    target = Path(out) if out else (declared[0] if declared else root / "scenarios" / f"{name}.yaml")
    if scenarios in target.resolve().parents and (target.resolve().parent != scenarios
                                                  or target.suffix.lower() in (".yaml", ".yml")):
        # Only scenarios/NAME.yaml and NAME.yml are read; a subfolder or NAME.YAML never would be.
        if target.resolve().parent != scenarios or target.suffix not in (".yaml", ".yml"):
            raise SchemaInferenceError(f"{target}: the registry reads scenarios/<name>.yaml (or .yml) only; write "
                                       f"the draft for {name!r} as {root / 'scenarios' / name}.yaml, or --out a file "
                                       "outside scenarios/")
        # The registry reads each such file as the scenario its file name says, one file per name.
        if target.stem != name:
            raise SchemaInferenceError(f"{target}: a file in {root / 'scenarios'} is the scenario named after it; "
                                       f"write the draft for {name!r} as {name}.yaml there, or --out a file outside it")
        if any(path != target.resolve() for path in declared):
            raise SchemaInferenceError(f"{target}: scenario {name!r} is already declared in {declared[0]}; write the "
                                       "draft there (with --force) or remove that file first")
    if write:
        _refuse_unwritable(target, name)
    if write and target.exists() and not force:
        raise SchemaInferenceError(f"{target}: already exists; pass --force to overwrite it, or --out FILE")
    source = Path(exposures)
    known, sequence_names = _known_features(root, exclude=name)
    scenario_names = {p.stem for p in scenario_files(root / "scenarios")}
    table = read_exposures(source, log_names=frozenset(sequence_names | scenario_names))
    if name in sequence_names:
        raise SchemaInferenceError(f"--name {name!r}: already the name of a sequence in {root / 'sequences.yaml'}; "
                                   "pick another scenario name")
    columns = infer_columns(table, source, known, tuple(skip))
    tasks = order_tasks([c for c in columns if c.role == "task"])
    columns = [c for c in columns if c.role != "task"] + tasks
    if not tasks:
        raise SchemaInferenceError(
            f"{source}: no label columns found: expected at least one integer or boolean column with only 0/1 "
            "values named like a label (click, order, buy, purchase, convert, redeem*, like, label*, is_*); "
            f"columns seen: {', '.join(table.column_names)}. Rename the label column(s) in the log, or write the "
            "tasks by hand")
    if not any(c.role == "item_features" for c in columns):
        raise SchemaInferenceError(
            f"{source}: no item features found (expected an item id column named *_id, e.g. poi_id, or a feature "
            "the registry's sequences declare); a T-token is built from item features")
    text = render_yaml(name, source, table.num_rows, columns, _label_rates(table, tasks))
    with tempfile.TemporaryDirectory() as tmp:
        copy = _copy_config_dir(root, Path(tmp), exclude=name)
        (copy / "scenarios" / f"{name}.yaml").write_text(text)
        try:
            _load_copy(copy, root)
        except RegistryError as exc:
            raise SchemaInferenceError(f"the draft for {name!r} does not validate: {exc}") from exc
    result = InferenceResult(name, source, table.num_rows, columns)
    if declared and target.resolve() not in declared:
        result.notes.append(f"scenario {name!r} is already declared in {declared[0]}: this draft was checked as its "
                            "replacement (features reused from the other scenarios); copying it there replaces it")
    if table.num_rows >= MAX_ROWS:
        result.notes.append(f"only the first {MAX_ROWS:,} rows were read; cardinalities may be larger")
    for column in ("user_id", "ts"):  # every exposure needs them (the exposure log's contract, DESIGN.md)
        if column not in table.column_names:
            result.notes.append(f"the log has no column {column!r}: `mtfm data aggregate` quarantines every row "
                                f"of it (reason: missing column {column}); add it to the log")
    for task in tasks:
        values = pc.unique(table.column(task.column).drop_null()).to_pylist()
        if len(values) == 1:  # a head trained on one class learns nothing but that rate
            result.notes.append(f"label {task.column!r} is {int(values[0])} in every row read: check the log, or "
                                "drop the task")
        nulls = table.column(task.column).null_count
        if nulls:  # the aggregation quarantines such rows, every label of the exposure with them
            result.notes.append(f"label {task.column!r} is null in {nulls:,} of the {table.num_rows:,} rows read: "
                                f"`mtfm data aggregate` quarantines those exposures (reason: null label {task.column}); "
                                "fill them in the log (0 where the event did not happen) to train on them")
    if write:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        result.out = target
    return result
