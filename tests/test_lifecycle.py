"""Scenario lifecycle: warm-starting a trained model into a registry with a new or a retired scenario."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from repo_paths import CONFIGS, REPO_ROOT
from mtfm.model import Collator, build_model, load_model_config
from mtfm.model.sample_tables import random_aggregated_table
from mtfm.platform.checkpoint import CheckpointError, find_checkpoint, load_model, read_meta, warm_start
from mtfm.platform.registry import load_registry
from mtfm.platform.train import TrainConfig, train

TINY = load_model_config(REPO_ROOT / "configs/model/tiny.yaml")
GROCERY = (REPO_ROOT / "configs/examples/grocery.yaml").read_text()  # a scenario not among the seeds


def _trained_like(registry, folder, seed=0):
    """A checkpoint of the tiny model on `registry` (weights random but fixed by the seed)."""
    import dataclasses

    from mtfm.platform.checkpoint import CheckpointMeta, write_checkpoint

    torch.manual_seed(seed)
    model = build_model(TINY, registry)
    raw = dataclasses.asdict(TINY)
    raw.pop("source")
    write_checkpoint(folder, model, {}, CheckpointMeta(9, 0, 0, registry.to_dict(), raw, {}))
    return model


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


def test_retired_scenario_is_reported_and_stays_in_the_checkpoint(config_dir, tmp_path):
    _trained_like(load_registry(config_dir), tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.pt").read_bytes()
    (config_dir / "scenarios" / "sqs.yaml").unlink()
    model = build_model(TINY, load_registry(config_dir))
    report = warm_start(model, tmp_path / "ckpt")
    assert report.initialised == []
    assert report.skipped and all("sqs" in k or "package_id" in k or "face_value" in k for k in report.skipped)
    assert (tmp_path / "ckpt" / "model.pt").read_bytes() == before


def test_warm_start_from_another_model_config_is_an_error(tmp_path):
    registry = load_registry(CONFIGS)
    _trained_like(registry, tmp_path / "ckpt")
    wider = build_model(TINY.replace(d_model=48, tokenizer_hidden_dim=48), registry)
    with pytest.raises(CheckpointError, match=r"tensors have other shapes than this model's, e\.g\. .*: \(32"):
        warm_start(wider, tmp_path / "ckpt")


@pytest.mark.slow
def test_train_with_init_from_a_run_of_fewer_scenarios(ray_cluster, config_dir, tmp_path):
    """End to end: train on 3 scenarios, add a fourth by YAML, warm-start a run on all four with the
    loaded modules frozen; they come out exactly as loaded and the new scenario's modules moved."""
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
    four = load_registry(config_dir)
    synthesize(four, tmp_path / "raw4", users=80, days=3, seed=2, **quiet)
    aggregate(four, tmp_path / "raw4", tmp_path / "agg4", **quiet)
    second = train(TrainConfig.from_dict(base | {"freeze_loaded_steps": 100}, "test"), data=str(tmp_path / "agg4"),
                   out=tmp_path / "run4", init_from=first, config_dir=str(config_dir), **quiet)

    report = json.loads((second / "warm_start.json").read_text())
    assert report["skipped"] == [] and any("grocery" in k for k in report["initialised"])
    old = torch.load(find_checkpoint(first) / "model.pt")
    new = torch.load(find_checkpoint(second) / "model.pt")
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
