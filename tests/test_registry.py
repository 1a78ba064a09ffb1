"""The scenario registry: loading, the data contracts it states, and every validation error."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repo_paths import REPO_ROOT
from mtfm.platform.registry import (Registry, RegistryError, ServingConfig, load_registry, read_yaml_mapping,
                                    serving_conflict)


def _edit(path: Path, mutate) -> None:
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_seed_registry(config_dir):
    reg = load_registry(config_dir)
    assert list(reg.scenarios) == ["hp", "phf", "sqs"]
    assert [s.kind for s in reg.sequences.values()] == ["history", "realtime"]
    sqs = reg.scenario("sqs")
    assert sqs.task_names == ("click", "order", "redeem_1d", "redeem_7d")
    assert sqs.synthetic.exposures_per_user_day * 10 == reg.scenario("hp").synthetic.exposures_per_user_day
    # deliberately different item features per scenario
    item_sets = [frozenset(f.name for f in s.item_features) for s in reg.scenarios.values()]
    assert len(set(item_sets)) == 3
    # a name means one thing everywhere
    assert reg.features["poi_id"].buckets == 20000


def test_snapshot_round_trip(config_dir):
    reg = load_registry(config_dir)
    again = Registry.from_dict(reg.to_dict())
    assert again.scenarios.keys() == reg.scenarios.keys()
    for name, scn in reg.scenarios.items():
        assert again.scenarios[name].features == scn.features
        assert again.scenarios[name].tasks == scn.tasks
        assert again.scenarios[name].serving == scn.serving
    assert again.aggregated_schema() == reg.aggregated_schema()


def test_aggregated_schema_columns(config_dir):
    schema = load_registry(config_dir).aggregated_schema()
    assert schema.names == ["user_id", "window", "hp__user", "hp__exposures", "phf__user", "phf__exposures",
                            "sqs__user", "sqs__exposures", "history__events", "realtime__events"]
    exposure = schema.field("sqs__exposures").type.value_type
    assert [exposure.field(i).name for i in range(exposure.num_fields)][-4:] == ["click", "order", "redeem_1d", "redeem_7d"]


def test_config_dir_from_environment(config_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MTFM_CONFIG_DIR", str(config_dir))
    monkeypatch.chdir(tmp_path)
    assert list(load_registry().scenarios) == ["hp", "phf", "sqs"]


def test_new_scenario_by_yaml(config_dir):
    (config_dir / "scenarios" / "grocery.yaml").write_text(
        "name: grocery\nitem_features:\n  - {name: sku_id, type: categorical, buckets: 1000, dim: 8}\n"
        "tasks:\n  - {name: click, kind: ctr}\n")
    reg = load_registry(config_dir)
    assert list(reg.scenarios) == ["grocery", "hp", "phf", "sqs"]
    assert reg.scenario("grocery").serving.replicas == 1  # defaults filled in
    assert "grocery__exposures" in reg.aggregated_schema().names


BAD_SCENARIOS = [
    # (mutation of hp.yaml, expected field path in the message, expected words)
    (lambda d: d.update(colour="red"), "colour", "unknown key"),
    (lambda d: d["item_features"][1].update(buckets="many"), "item_features[1].buckets", "expected an integer"),
    (lambda d: d["item_features"][1].update(type="categorial"), "item_features[1].type", "expected one of categorical"),
    (lambda d: d["item_features"][0].update(dim=0), "item_features[0].dim", "expected an integer >= 1"),
    (lambda d: d["item_features"][0].update(buckets=2**31), "item_features[0].buckets",
     "expected an integer <= 2147483647 (2**31 - 1), found 2147483648: more rows than an embedding table can be "
     "indexed by (a typo?)"),
    (lambda d: d.update(tasks=[]), "tasks", "at least one task"),
    (lambda d: d.pop("tasks"), "tasks", "required field missing"),
    (lambda d: d["cross_features"].append(dict(d["item_features"][0])), "cross_features[2].name", "duplicate name 'poi_id'"),
    (lambda d: d["tasks"].append({"name": "click", "kind": "ctr"}), "tasks[2].name", "duplicate name 'click'"),
    (lambda d: d["tasks"][1].update(depends_on="purchase"), "tasks[1].depends_on", "earlier task"),
    (lambda d: d["tasks"][0].update(depends_on="click"), "tasks[0].depends_on", "earlier task, found 'click'"),
    (lambda d: d["tasks"][0].update(depends_on=d["tasks"][1]["name"]), "tasks[0].depends_on", "earlier task"),  # later
    (lambda d: d["tasks"][1].update(depends_on="poi_id"), "tasks[1].depends_on", "earlier task, found 'poi_id'"),
    (lambda d: d.update(name="homepage"), "name", "the file name"),
    (lambda d: d["serving"].update(replicas=0), "serving.replicas", ">= 1"),
    (lambda d: d["serving"].update(backend="tflite"), "serving.backend", "one of torch, onnx, tensorrt"),
    (lambda d: d["serving"].update(cuda_graphs="yes"), "serving.cuda_graphs", "true or false"),
    (lambda d: d["user_features"].append({"name": "ts", "type": "numeric"}), "user_features[2].name", "reserved column"),
    (lambda d: d["item_features"].append({"name": "reason", "type": "numeric"}), "item_features[4].name",
     "reserved column"),  # the quarantine's own column
    (lambda d: d["item_features"][2].update(buckets=10), "item_features[2].buckets",
     "not allowed for a numeric feature (only for categorical and categorical_list)"),
    (lambda d: d["item_features"][2].update(max_len=4), "item_features[2].max_len",
     "not allowed for a numeric feature (only for categorical_list)"),
    (lambda d: d["item_features"][1].update(max_len=4), "item_features[1].max_len",
     "not allowed for a categorical feature (only for categorical_list)"),
    (lambda d: d["item_features"][1].update(transform="log1p"), "item_features[1].transform",
     "not allowed for a categorical feature (only for numeric)"),
    (lambda d: d["user_features"].append({"name": "user_tags", "type": "categorical_list", "buckets": 64, "dim": 4}),
     "user_features[2].max_len", "required field missing for a categorical_list feature (expected an integer >= 1"),
    (lambda d: d["serving"].update(max_ongoing_requests=4, max_batch_requests=8), "serving.max_ongoing_requests",
     "max_ongoing_requests 4 is below max_batch_requests 8; expected at least 8"),
    (lambda d: d["serving"].update(max_ongoing_requests=8), "serving.max_ongoing_requests",
     "max_ongoing_requests 8 is below max_batch_requests 16; expected at least 16"),
    (lambda d: d["synthetic"]["label_rates"].update(click=1.5), "synthetic.label_rates.click", "probability"),
    (lambda d: d["synthetic"].update(exposures_per_user_day=float("inf")), "synthetic.exposures_per_user_day",
     "expected a number >= 0, finite, found inf"),
    (lambda d: d["synthetic"].update(active_user_fraction=0), "synthetic.active_user_fraction",
     "expected a fraction in (0, 1], found 0.0"),
    (lambda d: d["synthetic"].update(active_user_fraction=float("nan")), "synthetic.active_user_fraction",
     "expected a fraction in (0, 1], found nan"),
]


@pytest.mark.parametrize("mutate, field, words", BAD_SCENARIOS)
def test_bad_scenario_is_a_clear_error(config_dir, mutate, field, words):
    path = config_dir / "scenarios" / "hp.yaml"
    _edit(path, mutate)
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert err.value.file == str(path)
    assert err.value.field.startswith(field), str(err.value)
    assert words in str(err.value)


def test_a_scenario_file_named_otherwise_than_its_scenario_is_told_which_to_change(config_dir):
    """The scenario's name is what the message asks to change, unless the file's name could not be one."""
    hp = config_dir / "scenarios" / "hp.yaml"
    hp.rename(config_dir / "scenarios" / "Hp.yaml")
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert str(err.value) == (f"{config_dir / 'scenarios' / 'Hp.yaml'}: name: 'hp': a scenario's file is named as "
                              "the scenario, a lower-case identifier; rename the file to hp.yaml")


def test_feature_declared_differently_names_both_places(config_dir):
    """A new file that sorts first (flash < hp) must not make the untouched hp.yaml the culprit,
    and a categorical declaration is not compared on a numeric's transform."""
    flash = config_dir / "scenarios" / "flash.yaml"
    flash.write_text("name: flash\nitem_features:\n  - {name: sku_id, type: categorical, buckets: 1000, dim: 8}\n"
                     "cross_features:\n  - {name: distance_km, type: categorical, buckets: 64, dim: 4}\n"
                     "tasks:\n  - {name: click, kind: ctr}\n")
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    msg = str(err.value)
    assert err.value.file == str(config_dir) and err.value.field == ""
    assert msg == (f"{config_dir}: feature distance_km is declared differently in {flash} (cross_features[0]) and "
                   f"{config_dir / 'scenarios' / 'hp.yaml'} (cross_features[0]): type categorical vs numeric; expected "
                   "identical declarations (a feature name means one thing everywhere): rename one of them or make "
                   "them identical")
    assert "transform" not in msg and "buckets" not in msg


def test_feature_declared_with_different_buckets(config_dir):
    _edit(config_dir / "scenarios" / "sqs.yaml", lambda d: d["item_features"][2].update(buckets=32))
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert (f"feature category is declared differently in {config_dir / 'sequences.yaml'} (sequences[0].features[1]) "
            f"and {config_dir / 'scenarios' / 'sqs.yaml'} (item_features[2]): buckets 64 vs 32; expected identical "
            "declarations") in str(err.value)


def test_feature_declared_with_a_different_transform(config_dir):
    _edit(config_dir / "scenarios" / "phf.yaml", lambda d: d["cross_features"][0].update(transform="symlog"))
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert (f"declared differently in {config_dir / 'scenarios' / 'hp.yaml'} (cross_features[0]) and "
            f"{config_dir / 'scenarios' / 'phf.yaml'} (cross_features[0]): transform log1p vs symlog;") in str(err.value)


def test_feature_declared_as_list_and_categorical(config_dir):
    """Types that share keys: the type differs, and so may the keys both have (buckets, dim)."""
    _edit(config_dir / "scenarios" / "sqs.yaml",
          lambda d: d["item_features"].__setitem__(2, {"name": "category", "type": "categorical_list", "buckets": 32,
                                                       "dim": 16, "max_len": 4}))
    with pytest.raises(RegistryError, match=r"\(item_features\[2\]\): type categorical vs categorical_list, "
                                            r"buckets 64 vs 32; expected identical"):
        load_registry(config_dir)


def test_snapshot_keeps_loading_with_contradicting_serving_knobs(config_dir):
    """A checkpoint's registry from before the serving check still loads (nothing serves from it)."""
    snapshot = load_registry(config_dir).to_dict()
    snapshot["scenarios"]["hp"]["serving"].update(max_ongoing_requests=4, max_batch_requests=8)
    assert Registry.from_dict(snapshot).scenario("hp").serving.max_ongoing_requests == 4


def test_serving_conflict_rule():
    assert serving_conflict(ServingConfig(max_ongoing_requests=16, max_batch_requests=16)) is None
    field, message = serving_conflict(ServingConfig(max_ongoing_requests=4, max_batch_requests=8))
    assert field == "max_ongoing_requests" and message.startswith("max_ongoing_requests 4 is below max_batch_requests 8")


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d["sequences"][0].update(kind="longterm"), "sequences[0].kind", "one of history, realtime"),
    (lambda d: d["sequences"][1].update(name="history"), "sequences[1].name", "duplicate sequence name"),
    (lambda d: d["sequences"][0].pop("max_len"), "sequences[0].max_len", "required field missing"),
    (lambda d: d["sequences"][0]["features"].append({"name": "price", "type": "numeric"}),
     "sequences[0].features[4].name", "duplicate name"),
])
def test_bad_sequences_file(config_dir, mutate, field, words):
    _edit(config_dir / "sequences.yaml", mutate)
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert err.value.field == field and words in str(err.value)


def test_a_scenario_in_two_files_is_refused_naming_both(config_dir):
    """grocery.yaml and grocery.yml: which one the registry took would depend on the glob order."""
    body = ("name: grocery\nitem_features:\n  - {name: sku_id, type: categorical, buckets: 1000, dim: 8}\n"
            "tasks:\n  - {name: click, kind: ctr}\n")
    (config_dir / "scenarios" / "grocery.yaml").write_text(body)
    (config_dir / "scenarios" / "grocery.yml").write_text(body.replace("1000", "64"))
    with pytest.raises(RegistryError, match=r"grocery.yml: name: scenario 'grocery' is also declared in "
                                            r".*grocery.yaml; keep one of the two files"):
        load_registry(config_dir)
    (config_dir / "scenarios" / "grocery.yml").unlink()
    (config_dir / "scenarios" / "grocery.yaml").rename(config_dir / "scenarios" / "grocery.YAML")  # never read
    with pytest.raises(RegistryError, match=r"grocery.YAML: a scenario file's name ends in .yaml or .yml, lower "
                                            r"case; rename it grocery.yaml"):
        load_registry(config_dir)


def test_hidden_files_are_skipped_and_a_folder_named_like_a_config_is_refused(config_dir):
    """Editors keep lock and swap files beside the one edited (`.#hp.yaml`, often a link to nowhere)."""
    scenarios = config_dir / "scenarios"
    (scenarios / ".#hp.yaml").symlink_to("user@host.1234")
    (scenarios / ".hp.yaml").write_text((scenarios / "hp.yaml").read_text())
    assert list(load_registry(config_dir).scenarios) == ["hp", "phf", "sqs"]
    (scenarios / "old.yaml").mkdir()
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert str(err.value) == (f"{scenarios / 'old.yaml'}: a directory, not a file: every scenarios/*.yaml (or .yml) is "
                              "read as a scenario; rename the folder or move it out of scenarios/")
    (scenarios / "old.yaml").rmdir()
    (scenarios / "gone.yml").symlink_to(config_dir / "nowhere.yaml")
    with pytest.raises(RegistryError, match=r"gone\.yml: a link to a file that does not exist \(expected a scenario "
                                            r"file\)"):
        load_registry(config_dir)
    (scenarios / "gone.yml").unlink()
    sequences = config_dir / "sequences.yaml"
    sequences.rename(config_dir / "moved.yaml")
    sequences.mkdir()
    with pytest.raises(RegistryError) as err:
        load_registry(config_dir)
    assert str(err.value) == (f"{sequences}: a directory, not a file: expected the YAML file declaring the config "
                              "directory's shared sequences")


def test_a_scenario_named_like_a_reserved_column_is_refused(config_dir):
    text = (config_dir / "scenarios" / "sqs.yaml").read_text()
    (config_dir / "scenarios" / "window.yaml").write_text(text.replace("name: sqs", "name: window"))
    with pytest.raises(RegistryError, match=r"window.yaml: name: 'window' is a reserved column \(user_id, request_id, "
                                            r"ts, window, reason\); name the scenario otherwise"):
        load_registry(config_dir)


def test_missing_and_malformed_files(config_dir, tmp_path):
    with pytest.raises(RegistryError, match="config directory not found"):
        load_registry(tmp_path / "nowhere")
    with pytest.raises(RegistryError, match="sequences.yaml: a file, not a config directory"):
        load_registry(config_dir / "sequences.yaml")
    (config_dir / "scenarios" / "broken.yaml").write_text("name: broken\ntasks: [unclosed\n")
    with pytest.raises(RegistryError, match=r"broken.yaml: not valid YAML"):
        load_registry(config_dir)
    (config_dir / "scenarios" / "broken.yaml").write_text("name: broken\ntasks: [unclosed\nx: 1\n")
    with pytest.raises(RegistryError, match=r"broken.yaml: not valid YAML: line 3, column 2: while parsing a flow "
                                            r"sequence \(line 2\); expected ',' or ']', but got ':'"):
        load_registry(config_dir)
    (config_dir / "scenarios" / "broken.yaml").unlink()
    hp = config_dir / "scenarios" / "hp.yaml"
    text = hp.read_text()
    tasks_line = text.splitlines().index("tasks:") + 1
    hp.write_text(text + "tasks:\n  - {name: click, kind: ctr}\n")  # PyYAML alone keeps this last list
    with pytest.raises(RegistryError, match=rf"hp.yaml: not valid YAML: line {len(text.splitlines()) + 1}, column 1: "
                                            rf"key 'tasks' is given twice \(first on line {tasks_line}\)"):
        load_registry(config_dir)
    # YAML merge keys are not duplicates, also where a merged mapping is merged again
    (config_dir / "merge.yaml").write_text("b: &B {x: 1, y: 2}\ndefs:\n  - &A\n    <<: *B\n    x: 3\nc:\n  <<: *A\n")
    assert read_yaml_mapping(config_dir / "merge.yaml") == yaml.safe_load((config_dir / "merge.yaml").read_text())
    hp.write_text(text.replace("buckets: ", "buckets: 7, buckets: ", 1))
    with pytest.raises(RegistryError, match=r"hp.yaml: not valid YAML: line \d+, column \d+: key 'buckets' is given "
                                            r"twice"):
        load_registry(config_dir)
    hp.write_text(text)
    # An empty path is not the current folder; a folder is not a file
    with pytest.raises(RegistryError, match=r"^'': an empty path where a train config was expected$"):
        read_yaml_mapping("", "train config")
    with pytest.raises(RegistryError, match=rf"^{re.escape(str(config_dir))}: a folder where a config was expected$"):
        read_yaml_mapping(config_dir)
    (config_dir / "scenarios" / "broken.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RegistryError, match=r"broken.yaml: not UTF-8 text \(invalid continuation byte at byte 9\)"):
        load_registry(config_dir)


def _cli(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "mtfm.platform.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_list_and_validate(config_dir):
    out = _cli("scenarios", "list", "--config-dir", str(config_dir))
    assert out.returncode == 0 and "sqs" in out.stdout and "redeem_7d" in out.stdout
    assert "cross: distance_km, user_package_views_7d" in out.stdout  # each scenario's features by group
    out = _cli("scenarios", "validate", "--config-dir", str(config_dir))
    assert out.returncode == 0 and "3 scenarios" in out.stdout and "note" not in out.stdout
    (config_dir / "scenarios" / "new").mkdir()
    shutil.copy(REPO_ROOT / "configs" / "examples" / "grocery.yaml", config_dir / "scenarios" / "new")
    out = _cli("scenarios", "validate", "--config-dir", str(config_dir))
    assert out.returncode == 0 and "3 scenarios" in out.stdout
    assert f"note: not read, in subfolders of {config_dir / 'scenarios'}" in out.stdout
    assert out.stdout.rstrip().endswith(": new/grocery.yaml")
    _edit(config_dir / "scenarios" / "sqs.yaml", lambda d: d.update(tasks=[]))
    out = _cli("scenarios", "validate", "--config-dir", str(config_dir))
    assert out.returncode == 1 and "sqs.yaml: tasks: expected at least one task" in out.stderr


def test_a_registry_written_as_a_config_dir_reads_back_as_itself(config_dir, tmp_path):
    """`mtfm scenarios export` writes a checkpoint's registry snapshot as a config dir: every field of
    every sequence and scenario (serving and synthetic knobs, descriptions) reads back the same."""
    (config_dir / "scenarios" / "grocery.yaml").write_text((REPO_ROOT / "configs" / "examples" / "grocery.yaml")
                                                           .read_text())
    registry = load_registry(config_dir)
    snapshot = Registry.from_dict(registry.to_dict())
    written = snapshot.write_config_dir(tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "scenarios/grocery.yaml", "scenarios/hp.yaml", "scenarios/phf.yaml", "scenarios/sqs.yaml", "sequences.yaml"]
    again = load_registry(tmp_path / "out").to_dict()
    assert {k: v for k, v in again.items() if k != "config_dir"} == \
        {k: v for k, v in registry.to_dict().items() if k != "config_dir"}
    with pytest.raises(RegistryError, match="expected a new or empty folder"):
        snapshot.write_config_dir(tmp_path / "out")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RegistryError, match=r"a_file/sub: cannot be made \(Not a directory"):
        snapshot.write_config_dir(tmp_path / "a_file" / "sub")


def test_a_snapshot_records_its_config_dir_absolute(config_dir, monkeypatch):
    """A resume started from another folder than the run finds the registry by the snapshot's path."""
    monkeypatch.chdir(config_dir.parent)
    assert load_registry(config_dir.name).to_dict()["config_dir"] == str(config_dir)


def test_cli_validate_refuses_contradicting_serving_knobs(config_dir):
    """What building the Serve app would refuse, `validate` reports first (README: exit 1, file: field: expected)."""
    _edit(config_dir / "scenarios" / "hp.yaml", lambda d: d["serving"].update(max_ongoing_requests=4, max_batch_requests=8))
    out = _cli("scenarios", "validate", "--config-dir", str(config_dir))
    assert out.returncode == 1, out.stdout
    assert (f"{config_dir / 'scenarios' / 'hp.yaml'}: serving.max_ongoing_requests: max_ongoing_requests 4 is below "
            "max_batch_requests 8; expected at least 8") in out.stderr


def test_a_checkpoints_registry_with_a_feature_named_like_a_newly_reserved_column_still_loads():
    """`reason` (the quarantine's column) was reserved after checkpoints could hold it as a feature:
    a config declaring it is refused, a checkpoint's snapshot of one still loads."""
    snapshot = load_registry(REPO_ROOT / "configs").to_dict()
    snapshot["scenarios"]["hp"]["item_features"][0]["name"] = "reason"
    restored = Registry.from_dict(snapshot)
    assert "reason" in [f.name for f in restored.scenarios["hp"].item_features]
    sequence = snapshot["sequences"]["history"]["features"][-1]
    sequence["name"] = "reason"
    with pytest.raises(RegistryError, match="feature reason is declared differently"):  # read: compared, not refused
        Registry.from_dict(snapshot)
    snapshot["scenarios"]["hp"]["item_features"][0]["name"] = "ts"  # reserved from the start: refused as before
    with pytest.raises(RegistryError, match="'ts' is a reserved column"):
        Registry.from_dict(snapshot)
