"""Scenario lifecycle: warm-starting a trained model into a registry with a new or a retired scenario."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from repo_paths import CONFIGS, REPO_ROOT
from mtfm.model import Collator, build_model, load_model_config
from mtfm.model.sample_tables import random_aggregated_table
from mtfm.model.tokenizer import group_features
from mtfm.platform.checkpoint import CheckpointError, find_checkpoint, load_model, read_meta, warm_start
from mtfm.platform.registry import load_registry
from mtfm.platform.train import TrainConfig, train

TINY = load_model_config(REPO_ROOT / "configs/model/tiny.yaml")
GROCERY = (REPO_ROOT / "configs/examples/grocery.yaml").read_text()  # a scenario not among the seeds


def _trained_like(registry, folder, seed=0):
    """A checkpoint of the tiny model on `registry` (weights random but fixed by the seed)."""
    from mtfm.platform.checkpoint import CheckpointMeta, write_checkpoint

    torch.manual_seed(seed)
    model = build_model(TINY, registry)
    write_checkpoint(folder, model, {}, CheckpointMeta(9, 0, 0, registry.to_dict(), TINY.to_dict(), {}))
    return model


def _warm_start_tiny(checkpoint):
    return warm_start(build_model(TINY, load_registry(CONFIGS)), checkpoint)


def test_new_scenario_leaves_existing_scores_unchanged(config_dir, tmp_path):
    old_registry = load_registry(config_dir)
    old = _trained_like(old_registry, tmp_path / "ckpt").eval()
    (config_dir / "scenarios" / "grocery.yaml").write_text(GROCERY)
    new_registry = load_registry(config_dir)
    torch.manual_seed(123)
    new = build_model(TINY, new_registry).eval()
    report = warm_start(new, tmp_path / "ckpt")
    assert report.skipped == []
    assert report.initialised and all("grocery" in k or "sku_id" in k for k in report.initialised)
    assert set(report.loaded) == set(old.state_dict())
    table = random_aggregated_table(new_registry, 6, np.random.default_rng(5))  # grocery exposures included
    with torch.no_grad():
        before = old(Collator(old_registry)(table)).logits
        after = new(Collator(new_registry)(table)).logits
    assert set(after) == {"hp", "phf", "sqs", "grocery"}
    for scenario in ("hp", "phf", "sqs"):
        torch.testing.assert_close(after[scenario], before[scenario], rtol=0, atol=1e-6)
    text = report.describe(set(new_registry.scenarios) | set(new_registry.features))
    assert "initialised fresh" in text and "grocery" in text and "skipped (in the checkpoint, not in this model): 0" in text
    # The loaded tensors, most of the model, on one line: counted by top-level module.
    first, *rest = text.splitlines()
    tops = sorted({k.split(".")[0] for k in old.state_dict()})
    counts = ", ".join(f"{top} {sum(k.startswith(top + '.') for k in old.state_dict())}" for top in tops)
    assert first == f"loaded: {len(old.state_dict())} tensors ({counts}; each one named in the run's warm_start.json)"
    assert not any("loaded" in line for line in rest) and len(rest) < 20


def test_retired_scenario_is_reported_and_stays_in_the_checkpoint(config_dir, tmp_path):
    _trained_like(load_registry(config_dir), tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.pt").read_bytes()
    (config_dir / "scenarios" / "sqs.yaml").unlink()
    model = build_model(TINY, load_registry(config_dir))
    report = warm_start(model, tmp_path / "ckpt")
    assert report.initialised == []
    assert report.skipped and all("sqs" in k or "package_id" in k or "face_value" in k for k in report.skipped)
    assert (tmp_path / "ckpt" / "model.pt").read_bytes() == before


def _edit(config_dir, path, old, new):
    text = (config_dir / path).read_text()
    assert old in text, (path, old)
    (config_dir / path).write_text(text.replace(old, new))


RATING = "  - {name: poi_rating, type: numeric, description: average rating 0-5}\n"


def test_features_added_to_a_scenario_and_a_sequence_leave_every_score_unchanged(config_dir, tmp_path):
    """Two features added to hp between its item features (a categorical and a numeric), one to the history
    sequence, one of hp's reordered: each group tokenizer's first layer loads the kept features' columns
    and zeros for the new ones, so every score is the trained model's, whatever the new features hold."""
    old_registry = load_registry(config_dir)
    old = _trained_like(old_registry, tmp_path / "ckpt").eval()
    _edit(config_dir, "scenarios/hp.yaml", RATING, "  - {name: poi_brand, type: categorical, buckets: 100, dim: 8}\n"
          + RATING + "  - {name: poi_photos, type: numeric, transform: log1p}\n")
    city = "  - {name: user_city, type: categorical, buckets: 64, dim: 8, required: true}\n"
    level = "  - {name: user_level, type: categorical, buckets: 8, dim: 4}\n"
    _edit(config_dir, "scenarios/hp.yaml", city + level, level + city)
    sequences = (config_dir / "sequences.yaml").read_text()
    history_first = sequences.index("features:", sequences.index("history")) + len("features:\n")
    (config_dir / "sequences.yaml").write_text(sequences[:history_first] + "      - {name: dwell_s, type: numeric, "
                                               "transform: log1p}\n" + sequences[history_first:])
    new_registry = load_registry(config_dir)
    assert [f.name for f in new_registry.sequences["history"].features][0] == "dwell_s"
    torch.manual_seed(123)
    new = build_model(TINY, new_registry).eval()
    report = warm_start(new, tmp_path / "ckpt")
    assert report.feature_changes == {"hp": {"new": ["poi_brand", "poi_photos"]}, "history": {"new": ["dwell_s"]}}
    assert report.remapped == ["tokenizer.groups.history.mlp.0.weight", "tokenizer.groups.hp.mlp.0.weight"]
    assert report.initialised == ["tokenizer.tables.poi_brand.weight"] and report.skipped == []
    assert set(report.loaded) == set(old.state_dict()) - set(report.remapped)
    # The weight by hand: hp's inputs are user_level (4), user_city (8), poi_id (32), category (16), poi_brand
    # (8), poi_rating, poi_photos, avg_price, distance_km, user_poi_clicks_30d; trained: user_city first.
    key = "tokenizer.groups.hp.mlp.0.weight"
    trained, now = old.state_dict()[key], new.state_dict()[key]
    expected = torch.cat([trained[:, 8:12], trained[:, 0:8], trained[:, 12:60], torch.zeros(len(trained), 8),
                          trained[:, 60:61], torch.zeros(len(trained), 1), trained[:, 61:64]], dim=1)
    assert torch.equal(now, expected)
    table = random_aggregated_table(new_registry, 6, np.random.default_rng(5))  # the new features hold values
    with torch.no_grad():
        before = old(Collator(old_registry)(table)).logits
        after = new(Collator(new_registry)(table)).logits
    for scenario in ("hp", "phf", "sqs"):
        torch.testing.assert_close(after[scenario], before[scenario], rtol=0, atol=1e-6)
    text = report.describe(set(new_registry.scenarios) | set(new_registry.sequences) | set(new_registry.features))
    assert text.splitlines()[-2:] == ["    history: new dwell_s (its tokens as trained until the new weights train)",
                                      "    hp: new poi_brand, poi_photos (its tokens as trained until the new weights "
                                      "train)"]
    kept = report.kept_columns["tokenizer.groups.hp.mlp.0.weight"]
    assert kept == list(range(60)) + [68] + list(range(70, 73))  # all but poi_brand's 8 and poi_photos's 1


def test_a_feature_removed_or_rehashed_drops_or_zeroes_its_weights(config_dir, tmp_path):
    """hp loses avg_price, category gets other buckets (a table every group shares by name), phf's dish_tags
    becomes a plain categorical (its table of the same shape): the other features' columns load, a changed
    one's are zero in each group that has it, and its table starts fresh."""
    old = _trained_like(load_registry(config_dir), tmp_path / "ckpt")
    _edit(config_dir, "scenarios/hp.yaml", "  - {name: avg_price, type: numeric, transform: log1p}\n", "")
    for path in ("sequences.yaml", "scenarios/hp.yaml", "scenarios/phf.yaml", "scenarios/sqs.yaml"):
        text = (config_dir / path).read_text()
        assert "{name: category, type: categorical, buckets: 64, dim: 16" in text, path
        (config_dir / path).write_text(text.replace("{name: category, type: categorical, buckets: 64, dim: 16",
                                                    "{name: category, type: categorical, buckets: 128, dim: 16"))
    _edit(config_dir, "scenarios/phf.yaml",
          "{name: dish_tags, type: categorical_list, buckets: 256, dim: 8, max_len: 4}",
          "{name: dish_tags, type: categorical, buckets: 256, dim: 8}")
    registry = load_registry(config_dir)
    new = build_model(TINY, registry)
    report = warm_start(new, tmp_path / "ckpt")
    assert report.feature_changes["hp"] == {"changed": ["category"], "removed": ["avg_price"]}
    assert report.feature_changes["phf"] == {"changed": ["category", "dish_tags"]}
    assert {"tokenizer.tables.category.weight", "tokenizer.tables.dish_tags.weight"} <= set(report.initialised)
    table = "tokenizer.tables.dish_tags.weight"
    assert new.state_dict()[table].shape == old.state_dict()[table].shape
    assert not torch.equal(new.state_dict()[table], old.state_dict()[table])
    assert report.describe(set()).splitlines()[-1].endswith("(its tokens change)")
    key = "tokenizer.groups.hp.mlp.0.weight"
    trained, now = old.state_dict()[key], new.state_dict()[key]
    # user_city 8, user_level 4, poi_id 32 | category 16 | poi_rating | (avg_price gone) | distance_km, clicks
    expected = torch.cat([trained[:, :44], torch.zeros(len(trained), 16), trained[:, 60:61], trained[:, 62:64]], dim=1)
    assert torch.equal(now, expected)
    having = [g for g, features in group_features(registry).items() if "category" in [f.name for f in features]]
    assert len(having) > 2 and all("category" in report.feature_changes[g]["changed"] for g in having)


def test_warm_start_from_another_model_config_is_an_error(tmp_path):
    registry = load_registry(CONFIGS)
    _trained_like(registry, tmp_path / "ckpt")
    wider = build_model(TINY.replace(d_model=48, tokenizer_hidden_dim=48), registry)
    with pytest.raises(CheckpointError, match=r"tensors have other shapes than this model's, e\.g\. .*: \(32"):
        warm_start(wider, tmp_path / "ckpt")


@pytest.mark.slow
def test_train_with_init_from_a_run_of_fewer_scenarios(ray_cluster, config_dir, tmp_path):
    """End to end: train on 3 scenarios, add a fourth by YAML and a feature to hp, warm-start a run on all
    four with the loaded modules frozen; they come out exactly as loaded, the new scenario's modules moved,
    and so did hp's new feature's weights, which started at zero."""
    from mtfm.platform.aggregate import aggregate
    from mtfm.platform.synth import synthesize

    quiet = dict(log=lambda *a, **k: None)
    base = TrainConfig.load(REPO_ROOT / "configs/train/tiny.yaml").to_dict() | {
        "model": str(REPO_ROOT / "configs/model/tiny.yaml"), "num_workers": 1, "max_steps": 3, "log_every": 1,
        "evaluate_at_checkpoints": False}
    three = load_registry(config_dir)
    synthesize(three, tmp_path / "raw3", users=80, days=3, seed=1, **quiet)
    aggregate(three, tmp_path / "raw3", tmp_path / "agg3", **quiet)
    first = train(TrainConfig.from_dict(base, "test"), data=str(tmp_path / "agg3"), out=tmp_path / "run3",
                  config_dir=str(config_dir), **quiet)

    (config_dir / "scenarios" / "grocery.yaml").write_text(GROCERY)
    _edit(config_dir, "scenarios/hp.yaml", RATING, RATING + "  - {name: poi_photos, type: numeric, transform: log1p}\n")
    four = load_registry(config_dir)
    synthesize(four, tmp_path / "raw4", users=80, days=3, seed=2, **quiet)
    aggregate(four, tmp_path / "raw4", tmp_path / "agg4", **quiet)
    second = train(TrainConfig.from_dict(base | {"freeze_loaded_steps": 100}, "test"), data=str(tmp_path / "agg4"),
                   out=tmp_path / "run4", init_from=first, config_dir=str(config_dir), **quiet)

    report = json.loads((second / "warm_start.json").read_text())
    assert report["skipped"] == [] and any("grocery" in k for k in report["initialised"])
    hp_input = "tokenizer.groups.hp.mlp.0.weight"
    assert report["remapped"] == [hp_input] and report["feature_changes"] == {"hp": {"new": ["poi_photos"]}}
    old = torch.load(find_checkpoint(first) / "model.pt")
    new = torch.load(find_checkpoint(second) / "model.pt")
    photos = 8 + 4 + 32 + 16 + 1  # poi_photos's column: after user_city, user_level, poi_id, category, poi_rating
    assert new[hp_input].shape[1] == old[hp_input].shape[1] + 1 and new[hp_input][:, photos].abs().sum() > 0
    assert report["kept_columns"] == {hp_input: [c for c in range(old[hp_input].shape[1] + 1) if c != photos]}
    kept_as_trained = torch.cat([new[hp_input][:, :photos], new[hp_input][:, photos + 1:]], dim=1)
    torch.testing.assert_close(kept_as_trained, old.pop(hp_input), rtol=0, atol=0)  # the loaded columns: frozen
    for name, tensor in old.items():
        torch.testing.assert_close(new[name], tensor, rtol=0, atol=0)  # frozen: exactly as loaded
    initial_grocery = {k for k in report["initialised"] if k.endswith("weight") and "grocery" in k}
    torch.manual_seed(0)
    fresh = build_model(TINY, four).state_dict()
    assert any(not torch.equal(new[k], fresh[k]) for k in initial_grocery)  # the new scenario trained
    model, meta = load_model(second)
    assert "grocery" in meta.scenarios and "grocery" in model.registry.scenarios

    # Resumed (its driver gone after step 3), the run keeps what its warm start loaded frozen.
    resumed = train(TrainConfig.from_dict(base | {"freeze_loaded_steps": 100, "max_steps": 5}, "test"),
                    data=str(tmp_path / "agg4"), resume=str(second), config_dir=str(config_dir), **quiet)
    assert read_meta(resumed).step == 5
    later = torch.load(find_checkpoint(resumed) / "model.pt")
    for name, tensor in old.items():
        torch.testing.assert_close(later[name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(later[k], new[k]) for k in initial_grocery)  # the fresh modules went on training


def test_a_checkpoint_cut_short_is_refused_by_name_before_ray_starts(config_dir, tmp_path, monkeypatch, capsys):
    """A model.pt cut short (a copy that did not finish) is one line naming it, from every reader:
    training's --init-from and --resume check it before Ray starts (not in workers, once per retry)."""
    from mtfm.platform.cli import main

    run = tmp_path / "run"
    _trained_like(load_registry(config_dir), run / "checkpoint_00000009")
    model_file = run / "checkpoint_00000009" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:4096])
    refusal = f"{model_file}: not a readable checkpoint (File is not a zip file; cut short or damaged"
    for read in (find_checkpoint, read_meta, load_model, _warm_start_tiny):
        with pytest.raises(CheckpointError) as refused:
            read(run)
        assert str(refused.value).startswith(refusal)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    monkeypatch.chdir(REPO_ROOT)
    train = ["train", "--config-dir", str(config_dir), "--config", "configs/train/tiny.yaml", "--data", str(tmp_path)]
    for argv in (["eval", "--checkpoint", str(run), "--data", str(tmp_path)],
                 train + ["--init-from", str(run), "--out", str(tmp_path / "new")],
                 train + ["--resume", str(run)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {refusal}") and err.count("\n") == 1, argv

    model_file.unlink()
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(model_file))}: not found"):
        read_meta(run)


def test_a_resume_whose_optimizer_file_is_cut_short_is_refused_by_name_before_ray_starts(
        config_dir, tmp_path, monkeypatch, capsys):
    """--resume needs the optimizer states too: an optimizer.pt cut short, or missing, is one line
    naming it before Ray starts (the weights alone, for eval or --init-from, do not need it)."""
    from mtfm.platform.cli import main

    run = tmp_path / "run"
    _trained_like(load_registry(config_dir), run / "checkpoint_00000009")
    optimizer_file = run / "checkpoint_00000009" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-30])

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    monkeypatch.chdir(REPO_ROOT)
    resume = ["train", "--config-dir", str(config_dir), "--config", "configs/train/tiny.yaml", "--data",
              str(tmp_path), "--resume", str(run)]
    assert main(resume) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {optimizer_file}: not a readable checkpoint (File is not a zip file; cut short "
                          "or damaged") and err.count("\n") == 1, err
    read_meta(run)  # the weights' readers are not concerned
    optimizer_file.unlink()
    assert main(resume) == 1
    assert capsys.readouterr().err.startswith(f"error: {optimizer_file}: not found (a checkpoint's optimizer states")


def test_an_interrupted_run_says_what_it_left_and_how_to_go_on(config_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during training (Ray Train aborts the run): the newest checkpoint and the --resume
    command, or that there is none; the command exits 130 with no traceback."""
    from mtfm.platform import train as train_module
    from mtfm.platform.cli import main

    run = tmp_path / "run"
    run.mkdir()
    assert train_module._interrupted(run) == (f"[mtfm] interrupted before a whole checkpoint was saved in {run}: "
                                              "nothing to resume; the same command starts the run again there")
    train_module.refuse_existing_run(run)  # as said: a new run may start there
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's, not a checkpoint
    assert train_module._interrupted(run) == (f"[mtfm] interrupted before a whole checkpoint was saved in {run}: "
                                              "nothing to resume; start again in another run folder, or after "
                                              "removing that one")
    with pytest.raises(FileExistsError, match="holds a run already"):
        train_module.refuse_existing_run(run)
    _trained_like(load_registry(config_dir), run / "checkpoint_00000009")
    assert train_module._interrupted(run) == (f"[mtfm] interrupted: the newest whole checkpoint is "
                                              f"{run / 'checkpoint_00000009'} (step 9); `mtfm train --resume {run}` "
                                              "continues from it")
    # Interrupted while Ray copied the next one in: its optimizer states cut short.
    _trained_like(load_registry(config_dir), run / "checkpoint_00000012")
    optimizer_file = run / "checkpoint_00000012" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-30])
    assert train_module._interrupted(run) == (f"[mtfm] interrupted: the newest whole checkpoint is "
                                              f"{run / 'checkpoint_00000009'} (step 9); remove checkpoint_00000012 "
                                              f"(cut short by the interrupt), then `mtfm train --resume {run}` "
                                              "continues from it")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "run_from_args", interrupted)
    for run_main, argv in ((train_module.main, []), (main, ["train"])):
        assert run_main([*argv, "--config", "configs/train/tiny.yaml"]) == 130
        assert capsys.readouterr().err == "interrupted\n"


def test_a_checkpoint_damaged_inside_its_archive_is_refused_by_name(tmp_path):
    """Damage the cheap check cannot see (it reads the archive's directory only) is named by the load."""
    import struct
    import zipfile

    folder = tmp_path / "checkpoint_00000009"
    _trained_like(load_registry(CONFIGS), folder)
    model_file = folder / "model.pt"
    data = bytearray(model_file.read_bytes())
    with zipfile.ZipFile(model_file) as archive:
        index = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    name_length, extra_length = struct.unpack("<HH", data[index.header_offset + 26:index.header_offset + 30])
    start = index.header_offset + 30 + name_length + extra_length  # past its local header
    data[start:start + 64] = b"\x99" * 64
    model_file.write_bytes(bytes(data))
    find_checkpoint(folder)  # the archive's directory is whole
    for load in (load_model, _warm_start_tiny):
        with pytest.raises(CheckpointError) as refused:
            load(folder)
        assert str(refused.value) == (f"{model_file}: not a readable checkpoint (torch.load: UnpicklingError; "
                                      "damaged, or not written by torch.save)")


def test_a_model_file_of_another_model_config_is_refused_by_name(tmp_path, config_dir, capsys):
    """Another run's model.pt copied into a checkpoint whose meta.json describes the tiny model:
    loading it (eval, report, serving, a resume) names the file, not a state_dict traceback."""
    import dataclasses

    from mtfm.deployments.scenario import load_scenario_ranker
    from mtfm.platform.checkpoint import CheckpointMeta, write_checkpoint
    from mtfm.platform.cli import main

    registry = load_registry(CONFIGS)
    folder = tmp_path / "run" / "checkpoint_00000009"
    _trained_like(registry, folder)
    other = dataclasses.replace(TINY, d_model=2 * TINY.d_model)
    write_checkpoint(tmp_path / "other", build_model(other, registry), {}, CheckpointMeta(9, 0, 0, registry.to_dict(),
                                                                                         other.to_dict(), {}))
    (tmp_path / "other" / "model.pt").replace(folder / "model.pt")
    expected = rf"{re.escape(str(folder / 'model.pt'))}: its tensors do not fit the model its meta.json " \
               r"describes \(0 missing, \d+ of another shape, 0 not in the model; e.g. .*\): the model file of " \
               r"another run\?"
    for load in (load_model, lambda f: load_scenario_ranker(f, "hp")):
        with pytest.raises(CheckpointError, match=expected):
            load(folder)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere")]) == 1
    assert re.search("^error: " + expected, capsys.readouterr().err, re.M)
    # A model.pt of a model with more: one trained with a fourth scenario (its tensors a superset).
    (config_dir / "scenarios" / "grocery.yaml").write_text((REPO_ROOT / "configs" / "examples" / "grocery.yaml")
                                                           .read_text())
    _trained_like(load_registry(config_dir), tmp_path / "more")
    (tmp_path / "more" / "model.pt").replace(folder / "model.pt")
    with pytest.raises(CheckpointError, match=r"its tensors do not fit the model its meta.json describes \(0 missing, "
                                              r"0 of another shape, \d+ not in the model; e.g. .*: not in the model\)"):
        load_model(folder)
    load_scenario_ranker(folder, "hp")  # a scenario's subgraph takes its own tensors of the whole model's file
    for path, what in ((tmp_path / "missing", "not found"), (folder / "model.pt", "not a folder")):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {what} \\(expected a run folder"):
            find_checkpoint(path)


def test_eval_names_a_missing_samples_folder_before_ray_starts(config_dir, tmp_path, monkeypatch, capsys):
    from mtfm.platform.cli import main

    run = tmp_path / "run"
    _trained_like(load_registry(config_dir), run / "checkpoint_00000009")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "typo")]) == 1
    assert f"{tmp_path / 'typo'}: no aggregated samples here" in capsys.readouterr().err


def test_eval_refuses_samples_without_a_scenario_of_the_checkpoint_before_ray_starts(
        tiny_samples, config_dir, tmp_path, monkeypatch, capsys):
    from mtfm.platform.cli import main

    (config_dir / "scenarios" / "grocery.yaml").write_text(GROCERY)
    run = tmp_path / "run"
    _trained_like(load_registry(config_dir), run / "checkpoint_00000009")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    assert main(["eval", "--checkpoint", str(run), "--data", str(tiny_samples)]) == 1
    err = capsys.readouterr().err
    assert (f"{tiny_samples}: no columns of scenario(s) ['grocery'], which checkpoint {run / 'checkpoint_00000009'} "
            "covers: the samples were aggregated before they were registered, or with another registry; pass --data "
            "samples aggregated with the registry it was trained with") in err, err


@pytest.mark.slow
def test_a_scenario_without_exposures_is_warned_of_and_listed_as_not_evaluated(ray_cluster, config_dir, tmp_path,
                                                                              capsys):
    """A registered scenario whose logs were missing when aggregating: training warns that its modules
    are untrained, and the evaluation lists its tasks as not evaluated rather than leaving them out."""
    from mtfm.platform.aggregate import aggregate
    from mtfm.platform.cli import main
    from mtfm.platform.synth import synthesize

    quiet = dict(log=lambda *a, **k: None)
    synthesize(load_registry(config_dir), tmp_path / "raw", users=60, days=3, seed=1, **quiet)
    (config_dir / "scenarios" / "grocery.yaml").write_text(GROCERY)
    four = load_registry(config_dir)
    aggregate(four, tmp_path / "raw", tmp_path / "agg", **quiet)  # grocery: no raw data, empty lists
    base = TrainConfig.load(REPO_ROOT / "configs/train/tiny.yaml").to_dict() | {
        "model": str(REPO_ROOT / "configs/model/tiny.yaml"), "num_workers": 1, "max_steps": 2,
        "evaluate_at_checkpoints": False}
    lines = []
    run = train(TrainConfig.from_dict(base, "test"), data=str(tmp_path / "agg"), out=tmp_path / "run",
                config_dir=str(config_dir), log=lines.append)
    grocery_tasks = [f"grocery/{t}" for t in four.scenarios["grocery"].task_names]
    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r["run_exposures_trained"] for r in trained if "run_exposures_trained" in r]
    assert len(trained) == 1 and trained[0]["grocery"] == 0 and min(trained[0][s] for s in ("hp", "phf", "sqs")) > 0
    assert ("[mtfm] warning: no exposure of scenario(s) ['grocery'] in the 2 steps trained: their own modules "
            "(tokenizer, GLN group, gates, towers) got no gradient") in "\n".join(lines)
    final = json.loads((run / "eval.json").read_text())
    assert final["not_evaluated"] == grocery_tasks and not any(k.startswith("grocery/") for k in final["eval"])
    table = next(line for line in lines if line.startswith("scenario/task")).splitlines()
    assert [row.split()[0] for row in table if row.startswith("grocery/")] == grocery_tasks

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    assert [row.split()[:3] for row in out.splitlines() if row.startswith("grocery/")] == [
        [task, "-", "-"] for task in grocery_tasks]
    assert f"note: {', '.join(grocery_tasks)}: no labelled exposure in the test windows" in out
    assert "windows its run trained on" not in out  # the run's own held-out window
    # Evaluation needs no training window: every window of the data may be its test set, not one more.
    assert main(["eval", "--checkpoint", str(run), "--test-windows", "3"]) == 0
    out = capsys.readouterr().out
    assert "test windows starting 2026-01-01" in out
    assert ("warning: 2 of these 3 test windows are windows this checkpoint trained on: their scores are not "
            "held-out scores") in out
    # The checkpoint records the windows it trained on: the same days are found in other samples too.
    from mtfm.platform.samples import Windows
    from mtfm.platform.synth import EPOCH_MS
    from mtfm.platform.train import RunPlan, _windows_trained_on

    day, first = 86_400_000, EPOCH_MS  # synth's first day, 2026-01-01
    assert read_meta(run).trained_windows == [first, first + day]
    shutil.copytree(tmp_path / "agg", tmp_path / "agg-copy")
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "agg-copy"), "--test-windows", "2"]) == 0
    assert "warning: 1 of these 2 test windows are windows this checkpoint trained on" in capsys.readouterr().out
    # A run that continues from it with two test windows: the second day is warned of, and recorded once.
    continued = RunPlan(TrainConfig.from_dict(base | {"test_windows": 2}, "test"), four, None, tmp_path / "next",
                        find_checkpoint(run), None, None)
    said, windows = [], Windows([first], [first + day, first + 2 * day])
    assert _windows_trained_on(continued, windows, said.append) == [first, first + day]
    assert said == ["[mtfm] warning: test window(s) starting 2026-01-02 were trained on by the checkpoint this run "
                    "continues or starts from: their evaluation is not held out"]
    # From a checkpoint that does not record its windows (written before they were): not recorded either.
    meta_file = find_checkpoint(run) / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items()
                                     if k != "trained_windows"}))
    said.clear()
    assert _windows_trained_on(continued, windows, said.append) is None
    assert said == [f"[mtfm] note: {find_checkpoint(run)} does not record the windows it trained on, so this run's "
                    "checkpoints do not either: `mtfm eval` cannot tell whether their test windows were trained on"]
    assert main(["eval", "--checkpoint", str(run), "--test-windows", "4"]) == 1
    assert "3 window(s) of data, but test_windows=4" in capsys.readouterr().err
