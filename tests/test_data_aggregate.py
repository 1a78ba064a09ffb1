"""Ray Data aggregation: equal to an independent pandas computation, quarantine of bad rows,
new scenarios picked up with no code change, the same result from the single-process path."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.platform.aggregate import _count_before, _order, _print_summary, aggregate, aggregate_local
from mtfm.platform.registry import Registry, events_column, exposures_column, load_registry, user_column
from mtfm.platform.synth import DAY_MS, EPOCH_MS, synthesize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(CONFIGS)


@pytest.fixture(scope="module")
def raw(tmp_path_factory, registry) -> Path:
    out = tmp_path_factory.mktemp("raw")
    synthesize(registry, out, users=40, days=3, seed=7, **QUIET)
    return out


def _read_folder(folder: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(f) for f in sorted(folder.glob("*.parquet"))]
    return pd.concat(frames, ignore_index=True)


def _plain(value):
    """A cell as plain Python (numpy arrays and scalars to lists and numbers)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _records(df: pd.DataFrame, columns: list[str]) -> list[dict]:
    return [{c: _plain(v) for c, v in row.items()} for row in df[columns].to_dict("records")]


def reference(registry: Registry, raw: Path, window_ms: int) -> dict[tuple[int, int], dict]:
    """The aggregation written row by row in pandas, straight from DESIGN.md."""
    exposures = {s: _read_folder(raw / "exposures" / s) for s in registry.scenarios}
    behaviors = {q: _read_folder(raw / "behaviors" / q) for q in registry.sequences}
    keys = set()
    for df in exposures.values():
        df["window"] = df["ts"] // window_ms * window_ms
        keys |= set(zip(df["user_id"], df["window"]))
    out = {}
    for user, window in sorted(keys):
        row = {"user_id": user, "window": window}
        for name, scn in registry.scenarios.items():
            df = exposures[name]
            mine = df[(df["user_id"] == user) & (df["window"] == window)].sort_values(["ts", "request_id"], kind="stable")
            fields = ["request_id", "ts"] + [f.name for f in scn.exposure_features] + list(scn.task_names)
            row[exposures_column(name)] = _records(mine, fields)
            users = [f.name for f in scn.user_features]
            row[user_column(name)] = _records(mine.head(1), users)[0] if len(mine) else None  # the earliest's
        for name, seq in registry.sequences.items():
            df = behaviors[name]
            mine = df[df["user_id"] == user]
            if seq.kind == "history":
                mine = mine[mine["ts"] < window]
            else:
                mine = mine[(mine["ts"] >= window) & (mine["ts"] < window + window_ms)]
            mine = mine.sort_values("ts", kind="stable").tail(seq.max_len)
            row[events_column(name)] = _records(mine, ["ts"] + [f.name for f in seq.features])
        out[(user, window)] = row
    return out


def _samples(out: Path) -> dict[tuple[int, int], dict]:
    table = pq.read_table(out / "samples")
    return {(r["user_id"], r["window"]): r for r in table.to_pylist()}


def _with_events_at_window_edges(raw: Path, out: Path, window_ms: int) -> tuple[int, int]:
    """A copy of `raw` where one user with an exposure in window W also has events of every sequence at
    W - 1, W, W + window_ms - 1 and W + window_ms, and hp's `user_level` changes from exposure to exposure
    (as a logged counter does); returns (user, W)."""
    shutil.copytree(raw, out)
    for path in sorted((out / "exposures" / "hp").glob("*.parquet")):
        table = pq.read_table(path)
        at = table.schema.get_field_index("user_level")
        levels = pa.array(np.arange(len(table)) % 8).cast(table.schema.field(at).type)
        pq.write_table(table.set_column(at, table.schema.field(at), levels), path)
    exposure = pq.read_table(next((raw / "exposures" / "hp").glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    user, window = exposure["user_id"], exposure["ts"] // window_ms * window_ms
    for folder in (out / "behaviors").iterdir():
        rows = pq.read_table(next(folder.glob("*.parquet"))).slice(0, 4)
        rows = rows.set_column(0, "user_id", pa.array([user] * 4, rows.schema.field("user_id").type))
        edges = [window - 1, window, window + window_ms - 1, window + window_ms]
        rows = rows.set_column(1, "ts", pa.array(edges, rows.schema.field("ts").type))
        pq.write_table(rows, folder / "edges.parquet")
    return user, window


@pytest.mark.parametrize("window", ["1d", "6h"])
def test_aggregation_equals_pandas_reference(ray_cluster, registry, raw, tmp_path, window):
    window_ms = {"1d": DAY_MS, "6h": DAY_MS // 4}[window]
    user, edge_window = _with_events_at_window_edges(raw, tmp_path / "raw", window_ms)
    raw = tmp_path / "raw"
    summary = aggregate(registry, raw, tmp_path / "agg", window_ms=window_ms, num_partitions=3, **QUIET)
    assert pq.read_schema(next((tmp_path / "agg" / "samples").glob("*.parquet"))).equals(registry.aggregated_schema())
    got, want = _samples(tmp_path / "agg"), reference(registry, raw, window_ms)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], key
    exposures_in = sum(pq.ParquetFile(f).metadata.num_rows for f in (raw / "exposures").rglob("*.parquet"))
    assert summary["exposures_in"] == summary["exposures_out"] == exposures_in
    assert summary["samples_out"] == len(want) and summary["quarantined_rows"] == 0
    assert summary["compression"] == pytest.approx(exposures_in / len(want))
    for row in got.values():  # no future events in history; realtime inside the window
        assert all(e["ts"] < row["window"] for e in row["history__events"])
        assert all(row["window"] <= e["ts"] < row["window"] + window_ms for e in row["realtime__events"])
    assert json.loads((tmp_path / "agg" / "_summary.json").read_text())["samples_out"] == len(want)
    # At the window's edges: history ends just before W, realtime is [W, W + window_ms).
    row, w = got[(user, edge_window)], edge_window
    history, realtime = ({e["ts"] for e in row[f"{q}__events"]} for q in ("history", "realtime"))
    assert w - 1 in history and not history & {w, w + window_ms - 1, w + window_ms}
    assert {w, w + window_ms - 1} <= realtime and not realtime & {w - 1, w + window_ms}


def test_single_process_path_gives_the_same_samples(ray_cluster, registry, raw, tmp_path):
    aggregate(registry, raw, tmp_path / "ray", num_partitions=2, **QUIET)
    aggregate_local(registry, raw, tmp_path / "local", **QUIET)
    sort = [("user_id", "ascending"), ("window", "ascending")]
    assert pq.read_table(tmp_path / "ray" / "samples").sort_by(sort).equals(pq.read_table(tmp_path / "local" / "samples"))


def _bad_copy(good: pa.Table, **changes) -> pa.Table:
    """One row of `good` with some columns replaced (types may change: the file's own schema)."""
    row = good.slice(0, 1)
    for name, array in changes.items():
        index = row.schema.get_field_index(name)
        row = row.set_column(index, pa.field(name, array.type), array)
    return row


def test_bad_rows_are_quarantined_with_their_reason(ray_cluster, registry, raw, tmp_path):
    dirty = tmp_path / "raw"
    shutil.copytree(raw, dirty)
    hp = pq.read_table(next((raw / "exposures" / "hp").glob("*.parquet")))
    far_future = EPOCH_MS + 3650 * DAY_MS
    cases = {
        "null user_id": _bad_copy(hp, user_id=pa.array([None], pa.int64())),
        "null ts": _bad_copy(hp, ts=pa.array([None], pa.int64())),
        "ts out of range": pa.concat_tables([_bad_copy(hp, ts=pa.array([-5], pa.int64())),
                                             _bad_copy(hp, ts=pa.array([far_future], pa.int64()))]),
        "null required feature poi_id": _bad_copy(hp, poi_id=pa.array([None], pa.int64())),
        "label click not 0/1, or null": pa.concat_tables([_bad_copy(hp, click=pa.array([2], pa.int8())),
                                                          _bad_copy(hp, click=pa.array([None], pa.int8()))]),
        "wrong type in user_id": _bad_copy(hp, user_id=pa.array([2**63 + 5], pa.uint64())),  # a uint64 id
        "required feature distance_km not a finite number": pa.concat_tables(
            [_bad_copy(hp, distance_km=pa.array([v], pa.float64())) for v in (float("nan"), float("inf"), 1e39)]),
    }
    for i, (reason, table) in enumerate(cases.items()):
        nullable = pa.schema([f.with_nullable(True) for f in table.schema])
        pq.write_table(table.cast(nullable), dirty / "exposures" / "hp" / f"bad-{i}.parquet")
    (dirty / "exposures" / "hp" / "dt=9").mkdir()  # a table's files in folders of their own
    pq.write_table(cases["null ts"].cast(pa.schema([f.with_nullable(True) for f in cases["null ts"].schema])),
                   dirty / "exposures" / "hp" / "dt=9" / "part-0.parquet")
    # A file whose distance_km column is text: "2.5" converts, "far" does not.
    text = pa.concat_tables([_bad_copy(hp.cast(hp.schema.set(hp.schema.get_field_index("distance_km"),
                                                             pa.field("distance_km", pa.string()))),
                                       distance_km=pa.array([v], pa.string())) for v in ("2.5", "far")])
    pq.write_table(text, dirty / "exposures" / "hp" / "text.parquet")
    pq.write_table(hp.drop_columns(["order"]).slice(0, 3), dirty / "exposures" / "hp" / "no-order.parquet")
    # Optional columns missing from a whole file: its rows are kept with nulls there, and a warning says so.
    pq.write_table(hp.drop_columns(["category", "avg_price"]).slice(0, 5), dirty / "exposures" / "hp" / "older.parquet")
    (dirty / "exposures" / "unknown_feed").mkdir()
    pq.write_table(hp.slice(0, 4), dirty / "exposures" / "unknown_feed" / "x.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), dirty / "exposures" / "unknown_feed" / "no-ts.parquet")

    summary = aggregate(registry, dirty, tmp_path / "agg", **QUIET)

    reasons = summary["quarantined"]["exposures/hp"]
    def count(prefix: str) -> int:
        return sum(n for r, n in reasons.items() if r.startswith(prefix))
    assert count("null user_id") == 1 and count("null ts") == 2 and count("ts out of range") == 2
    assert count("null required feature poi_id") == 1 and count("label click not 0/1") == 1
    assert count("null label click") == 1 and summary["max_ts"] > far_future - 3650 * DAY_MS
    assert count("wrong type in distance_km") == 1 and count("missing column order") == 3
    assert count("wrong type in user_id") == 1 and count("required feature distance_km not a finite number") == 3
    unknown = summary["quarantined"]["exposures/unknown_feed"]
    assert list(unknown.values()) == [6] and "unknown scenario 'unknown_feed'" in next(iter(unknown))
    assert any("unknown_feed" in w for w in summary["warnings"])
    quarantined = pa.concat_tables([pq.read_table(f).select(["reason"])
                                    for f in (tmp_path / "agg" / "quarantine").rglob("*.parquet")])
    assert quarantined.num_rows == summary["quarantined_rows"] == 22
    assert ("exposures/hp: 1 file(s) without column(s) category, avg_price (optional; older.parquet): their 5 valid "
            "rows get null there" in summary["warnings"]), summary["warnings"]
    assert not any("no-order.parquet)" in w for w in summary["warnings"])  # a label: quarantined instead
    # Each reason names the files its rows came from, in the summary and in the lines printed.
    files = summary["quarantined_files"]["exposures/hp"]
    assert [files[r] for r in reasons if r.startswith("null ts")] == [["bad-1.parquet", "dt=9/part-0.parquet"]]
    assert [files[r] for r in reasons if r.startswith("wrong type in distance_km")] == [["text.parquet"]]
    printed = []
    _print_summary(summary, printed.append)
    assert any(line.startswith("  exposures/hp: 3  missing column order") and line.endswith("(in no-order.parquet)")
               for line in printed), printed
    # Nothing lost: every exposure row is either aggregated or quarantined.
    assert summary["exposures_in"] == summary["exposures_out"] + summary["quarantined_rows"]
    # The convertible text value made it through, as a number.
    samples = pq.read_table(tmp_path / "agg" / "samples").to_pylist()
    text_row = text.slice(0, 1).to_pylist()[0]
    match = [e for s in samples if s["user_id"] == text_row["user_id"] for e in s["hp__exposures"]
             if e["ts"] == text_row["ts"] and e["distance_km"] == 2.5]
    assert len(match) == 1


def test_bad_behaviour_rows_are_quarantined_as_they_were_and_left_out_of_the_sequences(ray_cluster, registry, raw,
                                                                                      tmp_path):
    dirty = tmp_path / "raw"
    shutil.copytree(raw, dirty)
    history = pq.read_table(next((raw / "behaviors" / "history").glob("*.parquet")))
    marker = 10**12 + 7  # a poi_id no synthetic event has, to find the rows again
    nullable = pa.schema([f.with_nullable(True) for f in history.schema])
    bad = pa.concat_tables([t.cast(nullable) for t in (
        _bad_copy(history, ts=pa.array([None], pa.int64()), poi_id=pa.array([marker], pa.int64())),
        _bad_copy(history, poi_id=pa.array([None], pa.int64())),
        _bad_copy(history, user_id=pa.array([None], pa.int64()), poi_id=pa.array([marker], pa.int64())))])
    last = pq.read_table(raw / "exposures" / "hp").sort_by([("ts", "descending")]).slice(0, 1).to_pylist()[0]
    good = _bad_copy(history, user_id=pa.array([last["user_id"]], pa.int64()),  # the newest event before a window
                     poi_id=pa.array([marker + 1], pa.int64()),
                     ts=pa.array([last["ts"] // DAY_MS * DAY_MS - 1], pa.int64())).cast(nullable)
    pq.write_table(pa.concat_tables([bad, good]), dirty / "behaviors" / "history" / "dirty-day.parquet")
    (dirty / "behaviors" / "clickstream").mkdir()
    pq.write_table(history.slice(0, 2), dirty / "behaviors" / "clickstream" / "x.parquet")

    summary = aggregate(registry, dirty, tmp_path / "agg", num_partitions=2, **QUIET)

    assert summary["quarantined"]["behaviors/history"] == {
        "null ts": 1, "null required feature poi_id": 1, "null user_id": 1}, summary["quarantined"]
    assert list(summary["quarantined"]["behaviors/clickstream"].values()) == [2]
    assert summary["exposures_in"] == summary["exposures_out"]  # behaviour rows are not exposures
    files = sorted((tmp_path / "agg" / "quarantine" / "behaviors" / "history").glob("*.parquet"))
    assert [f.name.endswith("-dirty-day.parquet") for f in files] == [True]
    kept = pq.read_table(files[0])
    assert kept.drop_columns(["reason"]).to_pylist() == bad.to_pylist()  # the rows as they were in the file
    assert kept["reason"].to_pylist() == ["null ts", "null required feature poi_id", "null user_id"]
    events = [e["poi_id"] for s in pq.read_table(tmp_path / "agg" / "samples").to_pylist()
              for e in s["history__events"]]
    assert marker not in events and marker + 1 in events  # the valid row of the same file is aggregated


def test_unreadable_files_and_ts_in_seconds_are_named_and_the_rest_aggregated(ray_cluster, registry, raw, tmp_path):
    dirty = tmp_path / "raw"
    shutil.copytree(raw, dirty)
    hp = dirty / "exposures" / "hp"
    (hp / "empty.parquet").write_bytes(b"")
    (hp / "garbage.parquet").write_bytes(b"not parquet at all")
    (hp / "day.csv").write_text("user_id,ts\n1,2\n")
    (dirty / "exposures" / "loose.parquet").write_bytes((next(hp.glob("*.parquet"))).read_bytes())
    (hp / "_SUCCESS").write_text("")
    # A file whose footer reads but whose pages behind it do not decode.
    damaged = bytearray(next((raw / "exposures" / "hp").glob("*.parquet")).read_bytes())
    damaged[20:600] = bytes(580)
    (hp / "damaged.parquet").write_bytes(bytes(damaged))
    assert pq.ParquetFile(hp / "damaged.parquet").metadata.num_rows > 0
    pq.write_table(pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4]), pa.array([5, 6])],
                                        names=["user_id", "ts", "user_id"]), hp / "twice.parquet")
    seconds = pq.read_table(next((raw / "exposures" / "phf").glob("*.parquet"))).slice(0, 5)
    seconds = seconds.set_column(seconds.schema.get_field_index("ts"), "ts", pc.divide(seconds["ts"], 1000))
    pq.write_table(seconds, dirty / "exposures" / "phf" / "in-seconds.parquet")  # read, but warned of

    summary = aggregate(registry, dirty, tmp_path / "agg", **QUIET)

    named = {Path(w.split(": ")[0]).name: w for w in summary["warnings"] if w.split(": ")[0].endswith(
        (".parquet", ".csv"))}
    assert set(named) == {"empty.parquet", "garbage.parquet", "day.csv", "loose.parquet", "damaged.parquet",
                          "twice.parquet"}, summary["warnings"]
    assert named["twice.parquet"] == (f"{hp / 'twice.parquet'}: not read, it has more than one column named 'user_id' "
                                      "of its 3: ['user_id', 'ts', 'user_id'] (its footer counts 2 rows, not "
                                      "aggregated)")
    assert "not a readable Parquet file" in named["garbage.parquet"] and "expected exposures/" in named["day.csv"]
    rows = pq.ParquetFile(hp / "damaged.parquet").metadata.num_rows
    assert "does not decode" in named["damaged.parquet"] and "\n" not in named["damaged.parquet"]
    assert named["damaged.parquet"].endswith(f" (its footer counts {rows:,} rows, not aggregated)")
    early = [w for w in summary["warnings"] if w.startswith("exposures/phf: ")]
    assert len(early) == 1 and early[0].startswith("exposures/phf: 5 of ") and early[0].endswith("rather than ms?")
    clean = aggregate(registry, raw, tmp_path / "clean", **QUIET)
    assert summary["exposures_in"] == clean["exposures_in"] + 5
    only_bad = tmp_path / "only-bad"
    (only_bad / "exposures" / "hp").mkdir(parents=True)
    (only_bad / "exposures" / "hp" / "empty.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no readable exposure file; .*empty\.parquet: not read"):
        aggregate(registry, only_bad, tmp_path / "none", **QUIET)
    assert not (tmp_path / "none").exists()
    (only_bad / "exposures" / "hp" / "empty.parquet").unlink()  # a table folder with no file at all: named
    with pytest.raises(FileNotFoundError, match=rf"no readable exposure file; {re.escape(str(only_bad))}/exposures/hp: "
                                                r"no \*\.parquet file$"):
        aggregate(registry, only_bad, tmp_path / "none", **QUIET)


def test_new_scenario_yaml_is_picked_up_without_code_change(ray_cluster, config_dir, tmp_path):
    (config_dir / "scenarios" / "grocery.yaml").write_text("""
name: grocery
description: a scenario no code knows about
user_features:
  - {name: user_city, type: categorical, buckets: 64, dim: 8, required: true}
  - {name: basket_size, type: numeric, transform: log1p}
  - {name: favourite_aisles, type: categorical_list, buckets: 128, dim: 8, max_len: 3}
item_features:
  - {name: sku_id, type: categorical, buckets: 30000, dim: 16, required: true}
  - {name: category, type: categorical, buckets: 64, dim: 16}
  - {name: aisle_tags, type: categorical_list, buckets: 128, dim: 8, max_len: 3}
cross_features:
  - {name: distance_km, type: numeric, transform: log1p, required: true}
tasks:
  - {name: click, kind: ctr}
  - {name: add_to_cart, kind: ctcvr, depends_on: click}
synthetic:
  exposures_per_user_day: 3
  label_rates: {click: 0.2, add_to_cart: 0.4}
""")
    registry = load_registry(config_dir)
    counts = synthesize(registry, tmp_path / "raw", users=30, days=2, seed=1, **QUIET)
    assert counts["exposures/grocery"] > 0
    raw_grocery = pq.read_table(tmp_path / "raw" / "exposures" / "grocery")
    assert raw_grocery.schema.equals(registry.exposure_schema("grocery"))
    users = raw_grocery.select(["user_id", "user_city", "basket_size", "favourite_aisles"]).to_pandas()
    users["favourite_aisles"] = users["favourite_aisles"].map(tuple)
    assert (users.groupby("user_id").nunique() == 1).all().all()  # user features are static per user
    clicks = raw_grocery["click"].to_numpy()
    assert 0.1 < clicks.mean() < 0.3 and not (raw_grocery["add_to_cart"].to_numpy() > clicks).any()
    summary = aggregate(registry, tmp_path / "raw", tmp_path / "agg", **QUIET)
    samples = pq.read_table(tmp_path / "agg" / "samples")
    assert samples.schema.equals(registry.aggregated_schema())
    assert "grocery__exposures" in samples.column_names and "grocery" in summary["scenarios"]
    assert sum(len(x) for x in samples["grocery__exposures"].to_pylist()) == counts["exposures/grocery"]


def test_a_scenario_without_user_features_is_aggregated_collated_and_parsed(ray_cluster, config_dir, tmp_path):
    """`mtfm scenarios infer` drafts `user_features: []` for a log without user_* columns: such a
    scenario has no <scenario>__user column (Parquet writes no struct without fields), and its
    samples collate and its requests parse with the exposures' features alone."""
    from mtfm.deployments.rank_request import RankRequestParser, RequestError, example_request
    import torch

    from mtfm.model import Collator, build_model, parse_model_config
    from mtfm.model.config import restrict_registry

    (config_dir / "scenarios" / "kiosk.yaml").write_text("""
name: kiosk
user_features: []
item_features:
  - {name: sku_id, type: categorical, buckets: 1000, dim: 8, required: true}
cross_features:
  - {name: distance_km, type: numeric, transform: log1p}
tasks:
  - {name: click, kind: ctr}
""")
    registry = load_registry(config_dir)
    assert user_column("kiosk") not in registry.aggregated_schema().names
    counts = synthesize(registry, tmp_path / "raw", users=20, days=2, seed=3, **QUIET)
    aggregate(registry, tmp_path / "raw", tmp_path / "agg", **QUIET)
    samples = pq.read_table(tmp_path / "agg" / "samples")
    assert samples.schema.equals(registry.aggregated_schema())
    assert sum(len(x) for x in samples["kiosk__exposures"].to_pylist()) == counts["exposures/kiosk"] > 0
    batch = Collator(registry)(samples)
    kiosk = batch.features["kiosk"]
    assert kiosk.num_tokens == counts["exposures/kiosk"] and set(kiosk.categorical) == {"sku_id"}
    model = build_model(parse_model_config({"name": "t", "d_model": 16, "num_heads": 2}), registry)
    logits = model(batch).logits["kiosk"]
    assert logits.shape == (kiosk.num_tokens, 1) and torch.isfinite(logits).all()
    logits.sum().backward()  # the kiosk tokenizer's MLP takes the item and cross features only
    assert model.tokenizer.groups["kiosk"].mlp[0].weight.grad.shape[1] == 8 + 1
    body = example_request(registry, "kiosk", candidates=3, events=2)
    request = RankRequestParser(registry, "kiosk", max_candidates=10).parse(body, now_ms=body["ts"])
    assert user_column("kiosk") not in request.table.column_names
    with pytest.raises(RequestError, match="user.city: unknown feature; this scenario declares none here"):
        RankRequestParser(registry, "kiosk", max_candidates=10).parse(body | {"user": {"city": 3}}, now_ms=body["ts"])
    assert Collator(restrict_registry(registry, ["kiosk"]))(request.table).features["kiosk"].num_tokens == 3


def test_refuses_to_overwrite_without_flag(ray_cluster, registry, raw, tmp_path, monkeypatch):
    aggregate_local(registry, raw, tmp_path / "agg", **QUIET)
    with pytest.raises(FileExistsError, match="--overwrite"):
        aggregate_local(registry, raw, tmp_path / "agg", **QUIET)
    with monkeypatch.context() as patched:  # the Ray path refuses before Ray's start-up too
        patched.setattr("mtfm.platform.cluster.init_ray", lambda *a, **k: pytest.fail("Ray started before the refusal"))
        with pytest.raises(FileExistsError, match=r"agg already holds \d+ aggregated user samples of .*; choose "
                                                  r"another --out or pass --overwrite"):
            aggregate(registry, raw, tmp_path / "agg", **QUIET)
    with pytest.raises(FileNotFoundError, match="raw log folder not found"):
        aggregate_local(registry, tmp_path / "nowhere", tmp_path / "agg2", **QUIET)
    with pytest.raises(FileNotFoundError, match=r"no exposure tables found \(expected exposures/<scenario>/\*.parquet\); "
                                                r"--raw is the folder that holds exposures/ and behaviors/"):
        aggregate_local(registry, raw / "exposures", tmp_path / "agg2", **QUIET)
    # Logs of another registry (no exposure table of a registered scenario) are refused before any row is read.
    other = tmp_path / "other_raw" / "exposures" / "adult"
    other.mkdir(parents=True)
    shutil.copy(next((raw / "exposures" / "hp").glob("*.parquet")), other / "part.parquet")
    with pytest.raises(ValueError, match=r"other_raw/exposures: no table of a scenario .* registers \(found \['adult'\]; "
                                         r"registered \['hp', 'phf', 'sqs'\]\): logs of another registry\?"):
        aggregate_local(registry, tmp_path / "other_raw", tmp_path / "agg_other", **QUIET)
    assert not (tmp_path / "agg_other").exists()
    # Logs inside the folders an aggregation replaces (a fixed quarantine read again) are refused before anything
    # is deleted, as is an --out among the logs it reads.
    inside = tmp_path / "agg" / "quarantine" / "fixed"
    shutil.copytree(raw, inside)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "agg").rglob("*"))
    with pytest.raises(ValueError, match=r"--raw .*fixed is inside .*agg/quarantine, which this aggregation writes "
                                         r"anew \(and --overwrite deletes first\)"):
        aggregate_local(registry, inside, tmp_path / "agg", overwrite=True, **QUIET)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "agg").rglob("*")) == before
    with pytest.raises(ValueError, match=r"--out .*raw_copy/exposures/agg is inside .*raw_copy/exposures, the logs "
                                         r"this aggregation reads"):
        shutil.copytree(raw, tmp_path / "raw_copy")
        aggregate_local(registry, tmp_path / "raw_copy", tmp_path / "raw_copy" / "exposures" / "agg", **QUIET)
    with pytest.raises(ValueError, match=r"--out .*raw_copy is the --raw folder: the samples, quarantine and summary "
                                         r"would mix with the logs; choose another --out \(e.g. .*/agg\)"):
        aggregate_local(registry, tmp_path / "raw_copy", tmp_path / "raw_copy", **QUIET)
    assert sorted(p.name for p in (tmp_path / "raw_copy").iterdir()) == sorted(p.name for p in raw.iterdir())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 20)), max_size=30),
       st.lists(st.tuples(st.integers(-4, 4), st.integers(0, 20)), max_size=10))
def test_count_before_matches_brute_force(events, queries):
    events, queries = sorted(events), sorted(queries)
    eu, ets = (np.array([e[i] for e in events], np.int64) for i in (0, 1))
    qu, qts = (np.array([q[i] for q in queries], np.int64) for i in (0, 1))
    want = [sum(e < q for e in events) for q in queries]
    assert _count_before(eu, ets, qu, qts).tolist() == want
    # The general path (used when (user, ts) cannot be packed into an int64) agrees.
    assert _count_before(eu, ets * 2**58, qu, qts * 2**58).tolist() == want


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 5), st.integers(0, 3)), max_size=30),
       st.sampled_from([1, 2**58]))
def test_order_is_stable_by_user_ts_tiebreak(rows, scale):
    u, ts, tb = (np.array([r[i] for r in rows], np.int64) for i in (0, 1, 2))
    want = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1], rows[i][2], i))
    assert _order(u, ts * scale, tb).tolist() == want
    assert _order(u, ts * scale).tolist() == sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1], i))


def test_a_second_aggregation_into_one_out_is_refused_while_the_first_runs(registry, raw, tmp_path):
    from mtfm.platform.aggregate import _sole_aggregation
    from mtfm.platform.run_lock import DRIVER_FILE, DriverLock

    out = tmp_path / "agg"
    with _sole_aggregation(out):  # as an aggregation running in another process holds it
        with pytest.raises(ValueError, match=rf"{re.escape(str(out))}: an aggregation still runs it \(host .*; two "
                                             r"aggregations into one --out would mix their users' samples"):
            aggregate_local(registry, raw, out, **QUIET)
        assert {p.name for p in out.iterdir()} <= {DRIVER_FILE, ".driver.lock"}  # nothing of the refused run
    nested = tmp_path / "x" / "a" / "b"  # bad input is refused before --out is made
    with pytest.raises(FileNotFoundError, match="raw log folder not found"):
        aggregate_local(registry, tmp_path / "nowhere", nested, **QUIET)
    assert not (tmp_path / "x").exists()
    summary = aggregate_local(registry, raw, out, **QUIET)  # released: the next one runs, and releases it too
    assert summary["samples_out"] > 0 and not (out / DRIVER_FILE).exists()
    with DriverLock(out):  # a training driver holding the folder is named as what it is
        with pytest.raises(ValueError, match=r"a training driver still runs it .*; two drivers would prune each "
                                             r"other's checkpoints"):
            aggregate_local(registry, raw, out, overwrite=True, **QUIET)


def test_training_and_eval_refuse_an_aggregation_that_did_not_finish(ray_cluster, registry, raw, tmp_path):
    import json
    import os
    import time

    from mtfm.platform.run_lock import DRIVER_FILE, DriverLock
    from mtfm.platform.samples import samples_folder, split_by_window

    out = tmp_path / "agg"
    aggregate_local(registry, raw, out, **QUIET)
    assert samples_folder(str(out)) == f"{out}/samples" and not (out / "samples" / "_UNFINISHED").exists()
    # As a killed run leaves it: its marker in samples/, no summary (written last).
    (out / "_summary.json").unlink()
    (out / "samples" / "_UNFINISHED").write_text("")
    part = next((out / "samples").glob("*.parquet"))
    for named in (out, out / "samples", part):
        with pytest.raises(ValueError, match=rf"{re.escape(str(named))}: the output of an aggregation that did not "
                                             r"finish \(.*_UNFINISHED: interrupted, or still running elsewhere\)"):
            split_by_window(named, test_windows=1)
    with DriverLock(out, "aggregation"):  # one still running
        with pytest.raises(ValueError, match=r"an aggregation is still writing these samples"):
            samples_folder(str(out / "samples"))
    dead = {"host": os.uname().nodename, "pid": 2**22 + 7, "started": "long ago", "driver": "aggregation"}
    (out / DRIVER_FILE).write_text(json.dumps(dead))  # left by a killed one: not waited for
    os.utime(out / DRIVER_FILE, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(ValueError, match=r"did not finish"):
        samples_folder(str(out))
    # Without the marker (a folder of the user's own, or one an older version aggregated): read.
    (out / "samples" / "_UNFINISHED").unlink()
    assert samples_folder(str(out)) == f"{out}/samples" and samples_folder(str(part)) == str(part)


def test_a_reason_column_in_the_logs_gives_way_to_the_quarantines(registry, raw, tmp_path):
    """A quarantine, fixed and read again, carries the earlier run's `reason`: it is ignored, and a
    row quarantined again gets this run's reason in the one `reason` column."""
    logs = tmp_path / "raw"
    shutil.copytree(raw, logs)
    hp = pq.read_table(next((raw / "exposures" / "hp").glob("*.parquet"))).slice(0, 2)
    click = hp.schema.get_field_index("click")
    hp = hp.set_column(click, "click", pa.array([1, 2], hp["click"].type))
    pq.write_table(hp.append_column("reason", pa.array(["label click not 0/1", "label click not 0/1"])),
                   logs / "exposures" / "hp" / "fixed.parquet")
    summary = aggregate_local(registry, logs, tmp_path / "agg", **QUIET)
    assert summary["quarantined"] == {"exposures/hp": {"label click not 0/1": 1}}
    assert "exposures/hp: column(s) reason not in the contract, ignored" in summary["warnings"]
    quarantined = pq.read_table(tmp_path / "agg" / "quarantine" / "exposures" / "hp")
    assert quarantined.column_names.count("reason") == 1 and quarantined["click"].to_pylist() == [2]
    again = aggregate_local(registry, tmp_path / "agg" / "quarantine", tmp_path / "again", **QUIET)
    assert again["quarantined"] == {"exposures/hp": {"label click not 0/1": 1}}


def test_timestamps_are_read_in_ms_and_a_ts_in_microseconds_is_named(registry, raw, tmp_path):
    as_timestamps, in_us = tmp_path / "raw_ts", tmp_path / "raw_us"
    for copy in (as_timestamps, in_us):
        shutil.copytree(raw, copy)
    for kind in ("exposures", "behaviors"):
        for path in sorted((raw / kind).rglob("*.parquet")):
            table = pq.read_table(path)
            at = table.schema.get_field_index("ts")
            ms = table["ts"].combine_chunks()
            pq.write_table(table.set_column(at, "ts", ms.cast(pa.timestamp("ms")).cast(pa.timestamp("us"))),
                           as_timestamps / path.relative_to(raw))  # as pandas writes datetimes
            if kind == "exposures" and path.parent.name == "sqs":
                pq.write_table(table.set_column(at, "ts", pc.multiply(ms, 1000)), in_us / path.relative_to(raw))
    expected = pq.read_table(aggregate_local(registry, raw, tmp_path / "agg", **QUIET)["samples_dir"])
    from_timestamps = aggregate_local(registry, as_timestamps, tmp_path / "agg_ts", **QUIET)
    assert pq.read_table(from_timestamps["samples_dir"]).equals(expected)
    assert not [w for w in from_timestamps["warnings"] if "ts" in w]
    summary = aggregate_local(registry, in_us, tmp_path / "agg_us", max_ts=2**62, **QUIET)
    rows = summary["tables"]["exposures/sqs"]["rows"]
    assert (f"exposures/sqs: {rows:,} of {rows:,} rows have a ts after the year 5138 (10^14 ms): ts in microseconds "
            "or nanoseconds rather than ms?") in " ".join(summary["warnings"])


def test_an_empty_table_folder_is_named_and_the_same_logs_by_another_path_replace_an_empty_output(registry, raw,
                                                                                                  tmp_path, monkeypatch):
    logs = tmp_path / "raw"
    shutil.copytree(raw, logs)
    for path in (logs / "exposures" / "sqs").glob("*.parquet"):
        path.unlink()
    summary = aggregate_local(registry, logs, tmp_path / "agg", max_ts=1, **QUIET)  # every row after max_ts
    assert ("exposures/sqs: no *.parquet file for this registered scenario (its lists will be empty)"
            in summary["warnings"]) and summary["samples_out"] == 0
    monkeypatch.chdir(tmp_path / "agg")
    said = []
    again = aggregate_local(registry, Path("..") / "raw", tmp_path / "agg", log=said.append)
    assert again["samples_out"] > 0 and said[0] == f"replacing {tmp_path / 'agg'}: its earlier aggregation of ../raw " \
                                                   "wrote no user samples"
