"""`mtfm scenarios infer`: a draft scenario YAML inferred from an exposure log (platform/schema_inference.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtfm.platform.cli import main
from mtfm.platform.registry import RegistryError, load_registry, read_yaml_mapping
from mtfm.platform.schema_inference import (
    SchemaInferenceError, buckets_for, dim_for, infer_scenario, numeric_transform,
)
from mtfm.platform.synth import synthesize

from repo_paths import CONFIGS


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Synthetic raw logs of the seed configs: 40 users x 2 days."""
    root = tmp_path_factory.mktemp("infer-raw")
    synthesize(load_registry(CONFIGS), root, users=40, days=2, seed=3, log=lambda *a, **k: None)
    return root


def _sections(path: Path) -> dict[str, tuple[str, str]]:
    """feature name -> (section, type) of a scenario YAML."""
    raw = read_yaml_mapping(path)
    return {f["name"]: (section, f["type"]) for section in ("user_features", "item_features", "cross_features")
            for f in raw.get(section) or []}


def _tasks(path: Path) -> list[tuple[str, str, str | None]]:
    return [(t["name"], t.get("kind", "binary"), t.get("depends_on")) for t in read_yaml_mapping(path)["tasks"]]


def _table(**columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    base = {"user_id": list(range(n)), "request_id": list(range(n)), "ts": [1_767_225_600_000 + i for i in range(n)]}
    return pa.table(base | columns)


def test_round_trip_phf_matches_the_hand_written_yaml(raw, config_dir):
    hand = config_dir / "scenarios" / "phf.yaml"
    expected_sections, expected_tasks = _sections(hand), _tasks(hand)
    hand_raw = read_yaml_mapping(hand)
    hand.unlink()
    result = infer_scenario("phf", raw / "exposures" / "phf", config_dir=config_dir)
    assert result.out == hand and hand.is_file()
    text = hand.read_text()
    assert text.startswith("# DRAFT") and "user/item/cross" in text
    reg = load_registry(config_dir)  # the draft validates together with hp, sqs and the sequences
    assert _sections(hand) == expected_sections
    assert _tasks(hand) == expected_tasks
    # Reused names are copied exactly (sequences: poi_id, category; hp/sqs: user_city, distance_km).
    seqs = reg.sequence("history")
    inferred = {f.name: f for f in reg.scenario("phf").features}
    for f in seqs.features:
        if f.name in inferred:
            assert inferred[f.name].spec() == f.spec()
    assert inferred["user_city"].spec() == reg.scenario("hp").user_features[0].spec()
    # New names are sized from the data.
    hand_tags = next(f for f in hand_raw["item_features"] if f["name"] == "dish_tags")
    assert inferred["dish_tags"].max_len == hand_tags["max_len"]
    assert inferred["dish_id"].buckets >= 16 and inferred["dish_id"].dim % 4 == 0
    assert set(reg.scenario("phf").synthetic.label_rates) == {"click", "order"}


def test_csv_input_and_rules(tmp_path, config_dir):
    n = 400
    table = _table(
        user_age_band=[i % 7 for i in range(n)],
        shop_id=[i * 37 % 300 for i in range(n)],
        shop_rating=[(i % 50) / 10 for i in range(n)],
        category=[i % 12 for i in range(n)],
        distance_m=[1.5 + i % 3 if i % 40 else 5000.5 for i in range(n)],  # not integral: CSV has no float type
        shop_views_30d=[i % 90 for i in range(n)],
        is_liked=[i % 2 for i in range(n)],
        clicked=[i % 3 == 0 for i in range(n)],
        buy=[int(i % 9 == 0) for i in range(n)],
    )
    path = tmp_path / "log.csv"
    pacsv.write_csv(table, path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir)
    by_name = {c.column: c for c in result.columns}
    assert _sections(result.out) == {
        "user_age_band": ("user_features", "categorical"),
        "shop_id": ("item_features", "categorical"),
        "shop_rating": ("item_features", "numeric"),
        "category": ("item_features", "categorical"),
        "distance_m": ("cross_features", "numeric"),
        "shop_views_30d": ("cross_features", "numeric"),
    }
    assert by_name["distance_m"].spec["transform"] == "log1p"
    assert by_name["category"].why.startswith("reused from sequence")
    assert by_name["shop_id"].spec["buckets"] == 1024 and by_name["shop_id"].spec["required"] is True
    assert _tasks(result.out) == [("clicked", "ctr", None), ("buy", "ctcvr", "clicked"), ("is_liked", "binary", None)]
    assert {c.column for c in result.columns if c.role == "skipped"} == {"user_id", "request_id", "ts"}
    load_registry(config_dir)


def test_sizing_rules():
    assert buckets_for(0) == 16 and buckets_for(8) == 16 and buckets_for(9) == 32 and buckets_for(732) == 2048
    assert dim_for(1) == 8 and dim_for(16) == 12 and dim_for(10**9) == 64
    assert all(dim_for(c) % 4 == 0 and 4 <= dim_for(c) <= 64 for c in (1, 2, 5, 100, 10**4, 10**6))
    import numpy as np

    assert numeric_transform(np.array([0.0, 1.0, 1.0, 2.0, 500.0]))[0] == "log1p"
    assert numeric_transform(np.array([0.1, 0.5, 0.9]))[0] == "none"
    assert numeric_transform(np.array([0.0] * 9 + [1.0] * 2))[0] == "none"  # a sparse 0/1 flag
    assert numeric_transform(np.array([0.0] * 9 + [5.0, 8.0, 2000.0]))[0] == "log1p"  # a sparse amount
    assert numeric_transform(np.array([-1.0, 0.5, 1.0, 900.0]))[0] == "symlog"


@pytest.mark.parametrize("case, match", [
    ("string_id", r"log\.parquet: column 'shop_id' holds strings .*must be integers.*--skip shop_id"),
    ("no_labels", r"log\.parquet: no label columns found.*click, order"),
    ("bad_name", r"--name 'Shop-Feed': expected a lower-case identifier"),
    ("missing", r"nope\.parquet: exposure log not found"),
    ("exists", r"phf\.yaml: already exists; pass --force"),
    ("sequence_name", r"--name 'history': already the name of a sequence"),
    ("other_file_name", r"other\.yaml: a file in .*scenarios is the scenario named after it; write the draft for "
                        r"'shop_feed' as shop_feed\.yaml there, or --out a file outside it"),
    ("no_rows", r"log\.parquet: the exposure log has no rows \(columns user_id, request_id, ts, shop_id, click\)"),
    ("corrupt_file_in_folder", r"log/b\.parquet: cannot read as Parquet"),
    ("corrupt_file", r"log\.parquet: cannot read as Parquet: Parquet magic bytes not found"),
    ("repeated_column", r"log\.parquet: column\(s\) click appear more than once; a log's columns need distinct"),
    ("repeated_column_in_folder", r"log/a\.parquet: column\(s\) click appear more than once"),
    ("repeated_column_csv", r"log\.csv: column\(s\) click appear more than once"),
])
def test_error_paths_name_the_file_and_column(tmp_path, config_dir, case, match):
    good = _table(shop_id=[1, 2, 3], click=[0, 1, 0])
    tables = {"string_id": _table(shop_id=["a", "b", "c"], click=[0, 1, 0]),
              "no_labels": _table(shop_id=[1, 2, 3], score=[0.1, 0.2, 0.3], flag=[0, 1, 0])}
    path = tmp_path / "log.parquet"
    pq.write_table(good.slice(0, 0) if case == "no_rows" else tables.get(case, good), path)
    name = {"bad_name": "Shop-Feed", "exists": "phf", "sequence_name": "history"}.get(case, "shop_feed")
    if case == "missing":
        path = tmp_path / "nope.parquet"
    if case == "corrupt_file_in_folder":
        (tmp_path / "log").mkdir()
        pq.write_table(good, tmp_path / "log" / "a.parquet")
        (tmp_path / "log" / "b.parquet").write_bytes(path.read_bytes()[:100])
        path = tmp_path / "log"
    if case == "corrupt_file":
        path.write_bytes(path.read_bytes()[:100])
    if case.startswith("repeated_column"):  # pyarrow writes such a table; reading it back by name fails
        twice = pa.Table.from_arrays(good.columns + [good["click"]], names=good.column_names + ["click"])
        pq.write_table(twice, path)
    if case == "repeated_column_in_folder":
        (tmp_path / "log").mkdir()
        path = path.rename(tmp_path / "log" / "a.parquet").parent
    if case == "repeated_column_csv":
        path = tmp_path / "log.csv"
        path.write_text("user_id,request_id,ts,shop_id,click,click\n1,1,5,3,1,0\n")
    out = config_dir / "scenarios" / "other.yaml" if case == "other_file_name" else None
    with pytest.raises(SchemaInferenceError, match=match):
        infer_scenario(name, path, config_dir=config_dir, out=out)
    assert not (config_dir / "scenarios" / "shop_feed.yaml").exists()
    assert not (config_dir / "scenarios" / "other.yaml").exists()


def test_a_folder_whose_files_disagree_on_a_column_type_is_refused_by_name(tmp_path, config_dir):
    log = tmp_path / "log"
    (log / "day=2").mkdir(parents=True)
    pq.write_table(_table(shop_id=[1, 2], price=[3, 4], tags=[7, 8], click=[0, 1]), log / "a.parquet")
    other = _table(shop_id=pa.array([5, 2**40], pa.int64()), price=[4.5, 3.0], tags=[[1], [2]], click=[1, 0])
    pq.write_table(other, log / "day=2" / "b.parquet")  # int and double read as one; int and list do not
    with pytest.raises(SchemaInferenceError, match=r"column 'tags' is int64 in a\.parquet but list<element: "
                                                   r"int64> in day=2/b\.parquet: the files of one log need"):
        infer_scenario("shop_feed", log, config_dir=config_dir)
    pq.write_table(other.drop_columns(["tags"]), log / "day=2" / "b.parquet")
    pq.write_table(_table(shop_id=pa.array([1, 2], pa.int32()), price=[3, 4], click=[0, 1]), log / "a.parquet")
    draft = infer_scenario("shop_feed", log, config_dir=config_dir)  # int32 ids with int64 ones beyond 2**31
    assert "price" in (config_dir / "scenarios" / "shop_feed.yaml").read_text() and draft is not None


def test_a_folder_of_several_logs_is_refused_and_one_that_gained_a_column_is_read(raw, tmp_path, config_dir):
    """exposures/ (every scenario's log) or the raw root (exposures/ and behaviors/) read as one
    would make one scenario of all their columns; days of one log may add a column."""
    for folder, why in ((raw / "exposures", "hp/, phf/, sqs/: named like logs of the registry's layout"),
                        (raw, "behaviors/, exposures/: named like logs of the registry's layout")):
        with pytest.raises(SchemaInferenceError) as error:
            infer_scenario("shop_feed", folder, config_dir=config_dir, write=False)
        example = raw / "exposures" / "hp"
        assert str(error.value) == (f"{folder}: its subfolders look like several logs ({why}); a draft is inferred "
                                    f"from one exposure log: pass one scenario's folder, e.g. {example}")
    logs = tmp_path / "logs"  # two unregistered logs, each with a column the other lacks
    for name, columns in (("coupons", {"coupon_id": [1, 2]}), ("shops", {"shop_id": [1, 2]})):
        (logs / name).mkdir(parents=True)
        pq.write_table(_table(click=[0, 1], **columns), logs / name / "part.parquet")
    with pytest.raises(SchemaInferenceError, match=r"\(coupons/ has coupon_id and shops/ has shop_id, which the other "
                                                   r"lacks\); .* e\.g\. .*logs/coupons$"):
        infer_scenario("shop_feed", logs, config_dir=config_dir, write=False)
    log = tmp_path / "log"
    for day, columns in (("2026-01-01", {}), ("2026-01-02", {"price": [3.0, 4.5]})):
        (log / day).mkdir(parents=True)
        pq.write_table(_table(shop_id=[1, 2], click=[0, 1], **columns), log / day / "part.parquet")
    result = infer_scenario("shop_feed", log, config_dir=config_dir, write=False)
    assert {c.column for c in result.columns} >= {"shop_id", "price", "click"} and result.rows == 4


def test_a_reused_required_feature_with_nulls_in_the_log_says_so(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(poi_id=[1, None, 3, None], shop_id=[1, 2, 3, 4], click=[0, 1, 0, 1]), path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir)
    why = next(c.why for c in result.columns if c.column == "poi_id")
    assert why.endswith("required there, but 2 of the 4 rows read are null: aggregation would quarantine them")
    assert why in result.summary() and why in result.out.read_text()


def test_a_scenario_declared_as_yml_is_the_target(tmp_path, config_dir):
    """The registry takes NAME.yml as NAME.yaml, one file per name: infer writes to the file that
    declares the scenario, and never a second one beside it."""
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 1, 0]), path)
    declared = config_dir / "scenarios" / "shop_feed.yml"
    declared.write_text("placeholder")
    with pytest.raises(SchemaInferenceError, match=r"shop_feed\.yml: already exists; pass --force"):
        infer_scenario("shop_feed", path, config_dir=config_dir)
    with pytest.raises(SchemaInferenceError, match=r"shop_feed\.yaml: scenario 'shop_feed' is already declared in "
                                                   r".*shop_feed\.yml; write the draft there"):
        infer_scenario("shop_feed", path, config_dir=config_dir, out=config_dir / "scenarios" / "shop_feed.yaml")
    assert infer_scenario("shop_feed", path, config_dir=config_dir, force=True).out == declared
    assert "shop_feed" in load_registry(config_dir).scenarios
    notes = config_dir / "scenarios" / "notes.txt"  # a file the registry does not read may go anywhere
    assert infer_scenario("shop_feed", path, config_dir=config_dir, out=notes).out == notes
    for unread in (config_dir / "scenarios" / "shop_feed.YAML", config_dir / "scenarios" / "sub" / "shop_feed.yaml"):
        with pytest.raises(SchemaInferenceError, match=r"the registry reads scenarios/<name>.yaml \(or .yml\) only"):
            infer_scenario("shop_feed", path, config_dir=config_dir, out=unread)


def test_a_draft_of_a_declared_scenario_written_elsewhere_says_it_would_replace_it(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 1, 0]), path)
    result = infer_scenario("hp", path, config_dir=config_dir, out=tmp_path / "hp.yaml")
    assert result.notes == [f"scenario 'hp' is already declared in {(config_dir / 'scenarios' / 'hp.yaml').resolve()}: "
                            "this draft was checked as its replacement (features reused from the other scenarios); "
                            "copying it there replaces it"]
    assert infer_scenario("shop_feed", path, config_dir=config_dir, out=tmp_path / "shop.yaml").notes == []


def test_a_label_of_one_value_gets_a_note(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 0, 0], order=[0, 1, 0]), path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir, write=False)
    assert result.notes == ["label 'click' is 0 in every row read: check the log, or drop the task"]


def test_a_log_without_user_ids_gets_a_note_saying_the_aggregation_quarantines_it(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 1, 0]).drop_columns(["user_id"]), path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir, write=False)
    assert result.notes == ["the log has no column 'user_id': `mtfm data aggregate` quarantines every row of it "
                            "(reason: missing column user_id); add it to the log"]


def test_a_label_with_nulls_gets_a_note_saying_the_aggregation_quarantines_them(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3, 4], click=pa.array([0, None, 1, None], pa.int8()), order=[0, 1, 0, 0]),
                   path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir, write=False)
    assert result.notes == ["label 'click' is null in 2 of the 4 rows read: `mtfm data aggregate` quarantines those "
                            "exposures (reason: null label click); fill them in the log (0 where the event did not "
                            "happen) to train on them"]


def test_label_like_columns_that_are_not_0_1_are_refused_and_empty_or_constant_columns_skipped(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    # pandas writes a label with nulls as float64: still a label; a windowed click counter stays a feature
    pq.write_table(_table(shop_id=[1, 2, 3, 4], click=[0.0, 1.0, None, 0.0], click_7d=[0, 5, 2, 9],
                          notes=pa.array([None] * 4, pa.int64()), source=[7, 7, 7, 7]), path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir, write=False)
    by_name = {c.column: c for c in result.columns}
    assert by_name["click"].role == "task" and by_name["click_7d"].role == "cross_features"
    assert (by_name["notes"].role, by_name["notes"].why) == ("skipped", "null in every row read: nothing to learn from")
    assert (by_name["source"].role, by_name["source"].why) == ("skipped", "7 in every row read: nothing to learn from")
    for column, values in (("click", [0, 1, 2, 1]), ("order", [0, 3, 1, None])):
        pq.write_table(_table(shop_id=[1, 2, 3, 4], **{column: values}), path)
        with pytest.raises(SchemaInferenceError, match=rf"log\.parquet: column '{column}' is named like a \w+ label but "
                                                       rf"holds small counts, not 0/1 \(int64: 0, 1, \d.*--skip {column}"):
            infer_scenario("shop_feed", path, config_dir=config_dir, write=False)
    # named like labels, but ids, amounts and rates: features, as before
    pq.write_table(_table(shop_id=[1, 2, 3, 4], click=[0, 1, 0, 1], order_id=[5, 6, 7, 8], pay_amount=[120, 3, 45, 9],
                          ctr_item=[0.1, 0.5, 0.25, 0.75]), path)
    roles = {c.column: c.role for c in infer_scenario("shop_feed", path, config_dir=config_dir, write=False).columns}
    assert [roles[c] for c in ("click", "order_id", "pay_amount", "ctr_item")] == [
        "task", "item_features", "cross_features", "cross_features"]


def test_force_overwrites_and_skip_leaves_columns_out(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], shop_name=["a", "b", "c"], order=[0, 1, 0]), path)
    result = infer_scenario("phf", path, config_dir=config_dir, force=True, skip=("shop_name",))
    assert _tasks(result.out) == [("order", "ctcvr", None)]
    assert "shop_name (--skip)" in result.out.read_text()
    load_registry(config_dir)


def test_cli_prints_the_summary_and_writes_the_file(raw, config_dir, tmp_path, capsys):
    out = tmp_path / "draft" / "sqs_copy.yaml"
    argv = ["scenarios", "infer", "--name", "sqs_copy", "--exposures", str(raw / "exposures" / "sqs"),
            "--config-dir", str(config_dir), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "column" in printed and "why" in printed
    assert "redeem_7d" in printed and "depends_on order" in printed and "reused from scenario sqs" in printed
    assert f"wrote draft {out}" in printed  # outside the registry, which validate reads: copy it there first
    assert (f"then copy it to {config_dir / 'scenarios' / 'sqs_copy.yaml'}, and run `mtfm scenarios validate "
            f"--config-dir {config_dir}`") in printed
    assert main(["scenarios", "infer", "--name", "sqs_in", "--exposures", str(raw / "exposures" / "sqs"),
                 "--config-dir", str(config_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote draft {config_dir / 'scenarios' / 'sqs_in.yaml'}" in printed
    assert f"split, then run `mtfm scenarios validate --config-dir {config_dir}`" in printed
    (config_dir / "scenarios" / "sqs_in.yaml").unlink()
    assert _tasks(out)[:2] == [("click", "ctr", None), ("order", "ctcvr", "click")]
    assert main(argv) == 1  # exists, no --force
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("user_id,ts,shop_id,click\n1,5,abc,0\n2,6,def,1\n")
    assert main(["scenarios", "infer", "--name", "bad", "--exposures", str(csv_path),
                 "--config-dir", str(config_dir)]) == 1
    err = capsys.readouterr().err
    assert "bad.csv: column 'shop_id' holds strings" in err


def test_an_invalid_scenario_of_the_registry_is_named_by_its_own_path(tmp_path, config_dir, capsys):
    """The other scenarios are checked in a temporary copy of the config dir, deleted before anyone
    reads the error: it names the user's file."""
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 1, 0]), path)
    sqs = config_dir / "scenarios" / "sqs.yaml"
    sqs.write_text(sqs.read_text() + "descripton: x\n")
    with pytest.raises(RegistryError) as err:
        infer_scenario("shop_feed", path, config_dir=config_dir, write=False)
    assert err.value.file == str(sqs) and str(err.value).startswith(f"{sqs}: descripton: unknown key")
    assert main(["scenarios", "infer", "--name", "shop_feed", "--exposures", str(path), "--config-dir",
                 str(config_dir), "--out", str(tmp_path / "shop.yaml")]) == 1
    assert capsys.readouterr().err.startswith(f"config error: {sqs}: descripton: unknown key")
    assert not (tmp_path / "shop.yaml").exists()


def test_hidden_files_in_scenarios_are_neither_read_nor_copied(tmp_path, config_dir):
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 1, 0]), path)
    (config_dir / "scenarios" / ".#hp.yaml").symlink_to("user@host.1234")  # an editor's lock file
    (config_dir / "scenarios" / ".sqs.yaml").write_text("name: not_sqs\n")
    result = infer_scenario("shop_feed", path, config_dir=config_dir)
    assert "shop_feed" in load_registry(config_dir).scenarios and result.out.is_file()


def test_skip_names_that_are_not_columns_are_refused(tmp_path, config_dir):
    """A typo in --skip would leave the column (perhaps a label under another name) in the draft unseen."""
    path = tmp_path / "log.parquet"
    pq.write_table(_table(sku_id=[1, 2, 3], click=[0, 1, 0]), path)
    with pytest.raises(SchemaInferenceError) as err:
        infer_scenario("shop_feed", path, config_dir=config_dir, skip=("nosuchcol", "sku_idd", "click", "nosuchcol"))
    assert str(err.value) == (f"{path}: --skip nosuchcol, sku_idd: not a column of the log; expected some of its "
                              "columns: user_id, request_id, ts, sku_id, click")
    assert not (config_dir / "scenarios" / "shop_feed.yaml").exists()


def test_an_out_that_cannot_be_written_is_refused_before_the_log_is_read(tmp_path, config_dir):
    """The log named does not exist: each refusal comes first. Missing folders on the way are made."""
    missing = tmp_path / "nope.parquet"
    folder = tmp_path / "drafts"
    folder.mkdir()
    with pytest.raises(SchemaInferenceError) as err:
        infer_scenario("shop_feed", missing, config_dir=config_dir, out=folder, force=True)
    assert str(err.value) == (f"{folder}: a folder, not a file: --out names the file to write the draft to, e.g. "
                              f"{folder / 'shop_feed.yaml'}")
    notes = tmp_path / "notes.txt"
    notes.write_text("")
    with pytest.raises(SchemaInferenceError, match=rf"shop\.yaml: cannot be written: {re.escape(str(notes))} is a "
                                                   r"file, not a folder"):
        infer_scenario("shop_feed", missing, config_dir=config_dir, out=notes / "shop.yaml")
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[1, 2, 3], click=[0, 1, 0]), path)
    out = tmp_path / "new" / "deeper" / "shop.yaml"
    assert infer_scenario("shop_feed", path, config_dir=config_dir, out=out).out == out and out.is_file()


def test_a_dependent_task_label_rate_is_given_its_parent(tmp_path, config_dir):
    """100 exposures, 20 clicked, 5 ordered (all clicked): order depends_on click, so its rate for
    `mtfm data synth` is P(order | click) = 5 / 20 = 0.25, not the 0.05 of all rows; click's is 0.2."""
    click = [1] * 20 + [0] * 80
    order = [1] * 5 + [0] * 95
    path = tmp_path / "log.parquet"
    pq.write_table(_table(shop_id=[i % 7 for i in range(100)], click=click, order=order), path)
    result = infer_scenario("shop_feed", path, config_dir=config_dir, out=tmp_path / "shop_feed.yaml")
    assert _tasks(result.out) == [("click", "ctr", None), ("order", "ctcvr", "click")]
    assert read_yaml_mapping(result.out)["synthetic"]["label_rates"] == {"click": 0.2, "order": 0.25}
