"""Training on a real local Ray: DDP over two workers, kill-and-resume, checkpoints, `ray job submit`."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from repo_paths import CONFIGS, REPO_ROOT
from mtfm.model import Collator, build_model, load_model_config, multitask_bce_loss, token_budget_batches
from mtfm.platform.checkpoint import CheckpointError, check_compatible, find_checkpoint, load_model, read_meta
from mtfm.platform.cluster import unused_port
from mtfm.platform.registry import RegistryError, dump_yaml, exposures_column, load_registry
from mtfm.platform.report import write_report
from mtfm.platform.samples import keep_users_of, local_samples_schema, split_by_window
from mtfm.platform.train import (DIVERGED_FILE, METRICS_FILE, RAY_TRAIN_SNAPSHOT, TrainConfig, main, read_metrics,
                                 train)
from mtfm.platform.train_worker import _truncate_metrics

TINY = REPO_ROOT / "configs" / "train" / "tiny.yaml"


def _config(**changes) -> TrainConfig:
    base = TrainConfig.load(TINY).to_dict() | {"model": str(REPO_ROOT / "configs/model/tiny.yaml")}
    return TrainConfig.from_dict(base | changes, "test")


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / METRICS_FILE).read_text().splitlines()]


def _test_loss(model, samples: Path) -> float:
    _, test_ds, _ = split_by_window(samples, 1)
    batches = token_budget_batches(test_ds.iter_batches(batch_size=64, batch_format="pyarrow"),
                                   Collator(model.registry), 4096)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss, _ = multitask_bce_loss(model.eval()(batch), batch)
            total, n = total + float(loss) * batch.num_targets, n + batch.num_targets
    return total / n


def _without_one_training_user(samples: Path, out: Path) -> Path:
    """A copy of aggregated samples less the first training-window row: an odd number of training users."""
    shutil.copytree(samples, out)
    parts = sorted((out / "samples").glob("*.parquet"))
    table = pq.read_table(parts[0])
    windows = pc.unique(pq.read_table(out / "samples", columns=["window"])["window"]).to_pylist()
    first = pc.index(pc.less(table["window"], max(windows)), True).as_py()
    pq.write_table(pa.concat_tables([table.slice(0, first), table.slice(first + 1)]), parts[0])
    return out


def test_fewer_training_samples_than_workers_are_refused_by_count(tiny_samples, tmp_path):
    """A worker given no sample would have no batch to stand in with while the others train."""
    out = tmp_path / "agg"
    shutil.copytree(tiny_samples, out)
    table = pq.read_table(out / "samples")
    last = pc.max(table["window"]).as_py()
    one = pa.concat_tables([table.filter(pc.less(table["window"], last)).slice(0, 1),
                            table.filter(pc.equal(table["window"], last))])
    for part in (out / "samples").glob("*.parquet"):
        part.unlink()
    pq.write_table(one, out / "samples" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"the training windows hold 1 sample\(s\) of the model's scenarios, fewer "
                                         r"than the 2 workers, each of which needs one: --num-workers 1 or fewer"):
        train(_config(num_workers=2), data=str(out), out=tmp_path / "run", config_dir=str(CONFIGS), log=lambda *a: None)


@pytest.mark.slow
def test_two_workers_lower_the_loss(tiny_samples, tmp_path):
    # An odd number of training users (319), which Ray Train's equal split would leave one of out of every epoch;
    # 7940 tokens a batch cuts the two shards into unequal numbers of batches, so every epoch ends with a step one
    # worker stands in for (asserted below).
    samples = _without_one_training_user(tiny_samples, tmp_path / "agg")
    config = _config(num_workers=2, cpus_per_worker=0.5, epochs=4, log_every=2, checkpoint_every=1000,
                     tokens_per_batch=7940)
    run = train(config, data=str(samples), out=tmp_path / "run", config_dir=str(CONFIGS), log=lambda *a: None)
    trained, meta = load_model(run)
    torch.manual_seed(config.seed)
    untrained = build_model(load_model_config(config.model), load_registry(CONFIGS))
    assert _test_loss(trained, samples) < 0.9 * _test_loss(untrained, samples)
    log = _log(run)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps)) and meta.step >= steps[-1]
    # Each epoch, every training sample is trained on once, also when the workers' shards cut into unequal
    # numbers of batches: one then stands in.
    windows = pq.read_table(samples / "samples", columns=["window"])["window"].to_numpy()
    train_rows = int((windows < np.unique(windows)[-config.test_windows]).sum())
    assert train_rows % 2 == 1
    coverage = [r for r in log if "users_trained" in r]
    assert [r["epoch"] for r in coverage] == [1, 2, 3, 4]  # from 1, as the log's "epoch 1/4"
    assert all(r["users_trained"] == train_rows and r["users_not_trained"] == 0 for r in coverage), \
        (coverage, train_rows)
    assert any(r["stand_in_steps"] > 0 for r in coverage), coverage  # the case above happened
    # ... and so is each scenario's every exposure.
    scenarios = list(load_registry(CONFIGS).scenarios)
    table = pq.read_table(samples / "samples", columns=[exposures_column(s) for s in scenarios])
    in_train = windows < np.unique(windows)[-config.test_windows]
    for s in scenarios:
        lengths = np.nan_to_num(pc.list_value_length(table[exposures_column(s)]).to_numpy(zero_copy_only=False))
        assert all(r["exposures_trained"][s] == int(lengths[in_train].sum()) for r in coverage), (s, coverage)
    run_trained = [r["run_exposures_trained"] for r in log if "run_exposures_trained" in r]
    assert run_trained == [{s: sum(r["exposures_trained"][s] for r in coverage) for s in scenarios}]
    evaluation = json.loads((run / "eval.json").read_text())["eval"]
    expected = {f"{s.name}/{t}" for s in load_registry(CONFIGS).scenarios.values() for t in s.task_names}
    assert set(evaluation) <= expected and {"hp/click", "phf/click", "sqs/click"} <= set(evaluation)
    assert all(0.0 <= r["auc"] <= 1.0 for r in evaluation.values())

    written = write_report(run)  # the run remembers its data folder for the attention figure
    assert sorted(p.name for p in written) == ["attention.png", "eval.png", "loss.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match=r"typo: no such folder of aggregated samples \(--data\)"):
        write_report(run, tmp_path / "typo")  # not a heatmap silently left out
    with pytest.raises(FileNotFoundError, match=r"not-a-run: not found \(expected a run folder of `mtfm train`"):
        write_report(tmp_path / "not-a-run")
    assert not (tmp_path / "not-a-run").exists()  # refused before a report/ folder was made
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no training log"):
        write_report(tmp_path / "empty")
    moved = Path(shutil.copytree(run, tmp_path / "moved"))  # a run whose training data is gone
    config = (moved / "train_config.yaml").read_text()
    (moved / "train_config.yaml").write_text(config.replace(str(samples.resolve()), str(tmp_path / "gone")))
    notes = []
    assert sorted(p.name for p in write_report(moved, log=notes.append)) == ["eval.png", "loss.png"]
    assert notes == [f"note: no attention heatmap: the run's training data ({tmp_path / 'gone'}) is not there; "
                     "pass --data AGG_DIR"]
    assert not (moved / "report" / "attention.png").exists()  # the copied run's earlier figure is not left there


def test_report_says_which_figure_a_short_run_lacks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "eval": {"hp/click": {"auc": 0.6, "gauc": 0.55}}}) + "\n")
    notes = []
    assert [p.name for p in write_report(run, log=notes.append)] == ["eval.png"]
    assert notes[0] == "note: no loss.png: no loss line in metrics.jsonl (a run shorter than log_every steps)"
    assert notes[1].startswith("note: no attention heatmap")
    (run / DIVERGED_FILE).write_text(json.dumps({"what": "loss", "value": "nan", "step": 4}))
    notes = []
    write_report(run, log=notes.append)
    assert notes[:2] == ["note: the run diverged (diverged.json: the loss stopped being finite at step 4); the figures "
                         "end before that step",
                         "note: no loss.png: no loss line in metrics.jsonl (the run diverged before its first log_every "
                         "steps)"]


def test_report_of_a_run_without_a_checkpoint_draws_the_curves_and_says_why_no_heatmap(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 0.6}) + "\n")
    notes = []
    assert [p.name for p in write_report(run, data=tmp_path, log=notes.append)] == ["loss.png"]
    assert notes[-1].startswith("note: no attention heatmap: ") and "checkpoint" in notes[-1], notes


def test_report_draws_the_curves_when_the_samples_do_not_fit_the_model(tiny_samples, config_dir, tmp_path):
    """Samples of another registry (no grocery exposures for a model that has grocery): a note on
    the heatmap, and the curves, which need no samples, are written."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "deployments"))
    from serve_test_utils import write_tiny_checkpoint

    (config_dir / "scenarios" / "grocery.yaml").write_text(
        "name: grocery\nitem_features:\n  - {name: sku_id, type: categorical, buckets: 100, dim: 4}\n"
        "tasks:\n  - {name: click, kind: ctr}\n")
    run = tmp_path / "run"
    write_tiny_checkpoint(load_registry(config_dir), run / "checkpoint_00000003", step=3)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 0.6}) + "\n" +
                                       json.dumps({"step": 3, "eval": {"hp/click": {"auc": 0.6, "gauc": 0.55}}}) + "\n")
    notes = []
    assert sorted(p.name for p in write_report(run, data=tiny_samples, log=notes.append)) == ["eval.png", "loss.png"]
    assert len(notes) == 1 and notes[0].startswith(
        "note: no attention heatmap: the aggregated samples have no column 'grocery__exposures': aggregated with "
        "another registry than the model's?")
    # Samples without the model's history column: the heatmap's choice of users reads it, the note says so.
    table = pq.read_table(sorted((tiny_samples / "samples").glob("*.parquet"))[-1])
    (tmp_path / "no_history" / "samples").mkdir(parents=True)
    pq.write_table(table.drop(["history__events"]), tmp_path / "no_history" / "samples" / "part.parquet")
    hp_only = tmp_path / "hp_only"
    write_tiny_checkpoint(load_registry(CONFIGS), hp_only / "checkpoint_00000003", step=3)
    shutil.copy(run / "metrics.jsonl", hp_only)
    notes = []
    write_report(hp_only, data=tmp_path / "no_history", log=notes.append)
    assert notes == ["note: no attention heatmap: the aggregated samples have no column 'history__events': aggregated "
                     "with another registry than the model's? (expected registry.aggregated_schema(); found columns "
                     f"{table.drop(['history__events']).column_names})"], notes
    baseline = tmp_path / "baseline"  # a baseline architecture: said, not silently left out
    write_tiny_checkpoint(load_registry(CONFIGS), baseline / "checkpoint_00000003", step=3,
                          model_config="configs/model/dlrm_mmoe_tiny.yaml")
    shutil.copy(run / "metrics.jsonl", baseline)
    notes = []
    assert sorted(p.name for p in write_report(baseline, data=tiny_samples, log=notes.append)) == ["eval.png",
                                                                                                   "loss.png"]
    assert notes == ["note: no attention heatmap: a dlrm_mmoe model (a baseline) has no attention layers to draw"]


@pytest.mark.slow
def test_killed_worker_and_resumed_run_continue_the_same_loss_curve(tiny_samples, tmp_path, monkeypatch):
    common = dict(num_workers=1, epochs=2, max_steps=10, log_every=1, checkpoint_every=4,
                  evaluate_at_checkpoints=False, keep_checkpoints=5)
    clean = train(_config(**common), data=str(tiny_samples), out=tmp_path / "clean", config_dir=str(CONFIGS),
                  log=lambda *a: None)
    killed = train(_config(**common, inject_failure_at_step=6, max_failures=1), data=str(tiny_samples),
                   out=tmp_path / "killed", config_dir=str(CONFIGS), log=lambda *a: None)
    assert (killed / ".failure_injected").exists()  # it really died once, after the step-4 checkpoint
    a, b = ([r for r in _log(run) if "loss" in r] for run in (clean, killed))
    assert "eval" in _log(clean)[-1] and (clean / "eval.json").exists()  # the final checkpoint is always evaluated
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert read_meta(clean).step == read_meta(killed).step == 10
    wa, wb = torch.load(find_checkpoint(clean) / "model.pt"), torch.load(find_checkpoint(killed) / "model.pt")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)

    # A run stopped after step 6 (its driver gone), continued by `--resume` from a relative path: the same curve.
    stopped = train(_config(**common | {"max_steps": 6}), data=str(tiny_samples), out=tmp_path / "stopped",
                    config_dir=str(CONFIGS), log=lambda *a: None)
    with pytest.raises(FileExistsError, match=r"holds a run already \(checkpoint_00000006\)"):
        train(_config(**common), data=str(tiny_samples), out=stopped, config_dir=str(CONFIGS), log=lambda *a: None)
    # Without Ray's snapshot of the run (a copied folder, another Ray), the checkpoint comes from --resume itself.
    (stopped / RAY_TRAIN_SNAPSHOT).unlink()
    monkeypatch.chdir(tmp_path)
    resumed = train(_config(**common), data=str(tiny_samples), resume="stopped", config_dir=str(CONFIGS),
                    log=lambda *a: None)
    assert resumed == stopped and read_meta(resumed).step == 10
    c = [r for r in _log(resumed) if "loss" in r]
    assert [r["step"] for r in c] == list(range(1, 11))
    assert [r["loss"] for r in c] == pytest.approx([r["loss"] for r in a], rel=1e-4)


@pytest.mark.slow
def test_two_workers_resumed_where_one_stands_in_continue_the_same_loss_curve(tiny_samples, tmp_path):
    """Two workers, 7940 tokens a batch: each epoch is 3 steps, the third with one worker standing in
    (test_two_workers_lower_the_loss). A worker killed after step 3 resumes from step 2's checkpoint:
    the worker whose shard has 2 batches skips both and stands in with the last it skipped, the
    other trains its third; the curve and the weights are the uninterrupted run's."""
    common = dict(num_workers=2, cpus_per_worker=0.5, epochs=2, tokens_per_batch=7940, log_every=1,
                  checkpoint_every=2, evaluate_at_checkpoints=False, keep_checkpoints=5)
    clean = train(_config(**common), data=str(tiny_samples), out=tmp_path / "clean", config_dir=str(CONFIGS),
                  log=lambda *a: None)
    killed = train(_config(**common, inject_failure_at_step=3, max_failures=1), data=str(tiny_samples),
                   out=tmp_path / "killed", config_dir=str(CONFIGS), log=lambda *a: None)
    assert (killed / ".failure_injected").exists()
    a, b = ([r for r in _log(run) if "loss" in r] for run in (clean, killed))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    coverage = [r for r in _log(killed) if "users_trained" in r]
    assert [(r["epoch"], r.get("resumed_at_batch"), r["stand_in_steps"], r["users_not_trained"]) for r in coverage] \
        == [(1, 2, 1, 0), (2, None, 1, 0)], coverage
    wa, wb = torch.load(find_checkpoint(clean) / "model.pt"), torch.load(find_checkpoint(killed) / "model.pt")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)

@pytest.mark.slow
def test_a_run_ending_on_a_checkpoint_step_ends_with_its_final_checkpoint(tiny_samples, tmp_path):
    """Every step falls due for a checkpoint: the last one is still the final checkpoint, which is
    evaluated (evaluate_at_checkpoints off) and records the finished epoch, so a resume has nothing to train."""
    config = _config(num_workers=1, epochs=1, checkpoint_every=1, evaluate_at_checkpoints=False, keep_checkpoints=2,
                     log_every=1000, max_steps=1000)
    said = []
    run = train(config, data=str(tiny_samples), out=tmp_path / "run", config_dir=str(CONFIGS), log=said.append)
    meta = read_meta(run)
    assert meta.step > 1 and (meta.epoch, meta.batches_in_epoch) == (1, 0)
    assert said[-1] == (f"[mtfm] done: {meta.step} steps (its 1 epoch(s) ended before max_steps 1000); checkpoint "
                        f"{run}/checkpoint_{meta.step:08d}")
    assert [r["step"] for r in _log(run) if "eval" in r] == [meta.step]
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == f"checkpoint_{meta.step:08d}"
    kept = sorted(p.name for p in run.glob("checkpoint_0*"))
    assert kept == [f"checkpoint_{s:08d}" for s in (meta.step - 1, meta.step)]  # keep_checkpoints: 2
    with pytest.raises(ValueError, match=r"it has completed 1 epoch\(s\) and test trains 1: nothing to train"):
        train(config, data=str(tiny_samples), resume=str(run), config_dir=str(CONFIGS), log=lambda *a: None)
    # `--resume RUN --config OTHER` without --data keeps the run's samples, whatever OTHER's `data:` says.
    notes = []
    with pytest.raises(ValueError, match="nothing to train"):
        train(TrainConfig.from_dict(config.to_dict() | {"data": str(tmp_path / "elsewhere")}, "test"),
              resume=str(run), config_dir=str(CONFIGS), log=notes.append)
    assert not any(" -> " in note for note in notes), notes  # no "data: RUN'S -> OTHER" change
    assert any(f"keeps its samples, {tiny_samples.resolve()}" in note and "elsewhere is not used" in note
               for note in notes), notes
    # Stopped by max_steps with the epoch's last batch: the epoch is recorded as done.
    capped = train(_config(num_workers=1, epochs=2, max_steps=meta.step, checkpoint_every=1000, log_every=1000),
                   data=str(tiny_samples), out=tmp_path / "capped", config_dir=str(CONFIGS), log=lambda *a: None)
    assert (read_meta(capped).step, read_meta(capped).epoch, read_meta(capped).batches_in_epoch) == (meta.step, 1, 0)


def test_a_resume_whose_model_config_file_is_gone_takes_the_checkpoints(tiny_samples, tmp_path, capsys, config_dir):
    """A run submitted by `ray job submit --working-dir .` names its model config in Ray's copy of the
    working directory, which Ray deletes with the job: `--resume RUN` goes on with the model its
    checkpoint recorded. A config of one's own that names a missing model file is still an error.
    A run started with a --config-dir resumes with that registry unless told otherwise (the
    `--resume RUN` the run prints when interrupted has no --config-dir)."""
    copy = tmp_path / "_ray_pkg_0123abcd"
    shutil.copytree(REPO_ROOT / "configs" / "model", copy / "configs" / "model")
    config = _config(model=str(copy / "configs" / "model" / "tiny.yaml"), num_workers=1, max_steps=2,
                     checkpoint_every=1000, log_every=1000)
    run = train(config, data=str(tiny_samples), out=tmp_path / "run", config_dir=str(CONFIGS), log=lambda *a: None)
    shutil.rmtree(copy)
    assert main(["--resume", str(run), "--max-steps", "3", "--config-dir", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert (f"[mtfm] note: --resume {run}: its model config {copy}/configs/model/tiny.yaml is gone (Ray's copy of a "
            f"job's working directory?); the run goes on with the model its checkpoint recorded "
            f"({run}/checkpoint_00000002/meta.json)") in out
    assert read_meta(run).step == 3 and read_meta(run).model_config == read_meta(run / "checkpoint_00000002").model_config
    other_run = train(_config(num_workers=1, max_steps=2, checkpoint_every=1000, log_every=1000),
                      data=str(tiny_samples), out=tmp_path / "other_registry", config_dir=str(config_dir),
                      log=lambda *a: None)
    assert main(["--resume", str(other_run), "--max-steps", "3"]) == 0
    assert (f"[mtfm] note: --resume {other_run}: the registry of {config_dir}, the config dir the run was started "
            "with (pass --config-dir to use another)") in capsys.readouterr().out
    assert read_meta(other_run).step == 3
    with pytest.raises(RegistryError, match=r"model: model config file .*tiny.yaml not found"):
        train(config, data=str(tiny_samples), out=tmp_path / "other", config_dir=str(CONFIGS), log=lambda *a: None)


@pytest.mark.slow
def test_ctrl_c_is_acknowledged_at_once_and_leaves_a_run_to_resume(ray_cluster, tiny_samples, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the command's process group) while workers train: Ray Train
    stops them before `train` returns, which takes a while, so the command says at once that it is
    stopping; then it names the checkpoint to resume from, and exits 130."""
    config = tmp_path / "train.yaml"
    config.write_text(dump_yaml(TrainConfig.load(TINY).to_dict() | {
        "model": str(REPO_ROOT / "configs/model/tiny.yaml"), "epochs": 500, "num_workers": 1, "log_every": 1,
        "checkpoint_every": 2, "evaluate_at_checkpoints": False}))
    run = tmp_path / "run"
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "mtfm.platform.cli", "train", "--config", str(config), "--data", str(tiny_samples),
         "--out", str(run)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in driver.stdout),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("[mtfm] step      4" in line for _, line in lines) and time.monotonic() < deadline:
            assert driver.poll() is None, "".join(line for _, line in lines)[-3000:]
            time.sleep(0.2)
        assert any("[mtfm] step" in line for _, line in lines), "".join(line for _, line in lines)[-3000:]
        pressed = time.monotonic()
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=180) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    reader.join(timeout=10)
    said = [(at - pressed, line.strip()) for at, line in lines if at >= pressed]
    acknowledged = [at for at, line in said if line.startswith("[mtfm] Ctrl-C: stopping the run once Ray Train has "
                                                                "stopped its workers")]
    assert acknowledged and acknowledged[0] < 10, said
    newest = find_checkpoint(run)
    assert any(line == f"[mtfm] interrupted: the newest whole checkpoint is {newest} (step {read_meta(newest).step}); "
               f"`mtfm train --resume {run}` continues from it" for _, line in said), said


def test_a_resume_mid_epoch_refuses_samples_written_again_at_the_same_path(tiny_samples, tmp_path):
    """The epoch's place is a count of batches: over other samples at the same path it would skip
    the wrong users. The checkpoints record the samples' parts (names and sizes)."""
    data = tmp_path / "agg"
    shutil.copytree(tiny_samples, data)
    config = _config(num_workers=1, epochs=1, max_steps=2, checkpoint_every=1000, log_every=1000,
                     evaluate_at_checkpoints=False)
    said = []
    run = train(config, data=str(data), out=tmp_path / "run", config_dir=str(CONFIGS), log=said.append)
    assert read_meta(run).batches_in_epoch == 2
    assert said[-1] == (f"[mtfm] done: 2 steps (max_steps 2 stopped it in epoch 1 of 1: --resume {tmp_path / 'run'} "
                        f"--max-steps N goes on); checkpoint {find_checkpoint(run)}")
    notes = []  # more epochs, but the run's max_steps still applies: said
    with pytest.raises(ValueError, match=r"it is at step 2 and max_steps is 2 \(test\): nothing to train"):
        train(TrainConfig.from_dict(config.to_dict() | {"epochs": 3}, "test"), resume=str(run),
              config_dir=str(CONFIGS), log=notes.append)
    assert (f"[mtfm] note: --resume {run} with epochs 1 -> 3: the run's max_steps 2 (test) still ends it at step 2, "
            "which may come first; pass --max-steps to raise it") in notes, notes
    notes = []  # a lower limit than the run was started with is said (--max-steps usually extends a run)
    with pytest.raises(ValueError, match=r"it is at step 2 and max_steps is 1 \(test\): nothing to train"):
        train(TrainConfig.from_dict(config.to_dict() | {"max_steps": 1}, "test"), resume=str(run),
              config_dir=str(CONFIGS), log=notes.append)
    assert f"[mtfm] note: --resume {run} ends the run sooner than it was started to: max_steps 2 -> 1" in notes, notes
    part = sorted((data / "samples").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(part).slice(1), part)  # aggregated again: one user fewer
    more = TrainConfig.from_dict(config.to_dict() | {"max_steps": 3}, "test")
    with pytest.raises(ValueError, match=rf"it stopped after batch 2 of epoch 1, and the samples at {data.resolve()}: "
                                         r"written again \(their parts' names or sizes differ\) since"):
        train(more, resume=str(run), config_dir=str(CONFIGS), log=lambda *a: None)


def test_each_ctrl_c_ray_train_takes_is_said_in_our_words(capsys):
    """Ray Train logs its first line at every press and its second at the third, when it exits."""
    import logging

    from mtfm.platform.cluster import _RAY_TRAIN_CTRL_C_LOGGER, say_when_ray_train_stops_for_ctrl_c

    say_when_ray_train_stops_for_ctrl_c()
    logger = logging.getLogger(_RAY_TRAIN_CTRL_C_LOGGER)
    try:
        for line in ["Received SIGINT. Gracefully aborting the training run"] * 3 + [
                "Received SIGINT at least 3 times. Forcefully aborting the training run."]:
            logger.info(line)
        said = capsys.readouterr().err.splitlines()
        assert said == ["[mtfm] Ctrl-C: stopping the run once Ray Train has stopped its workers (up to a minute); "
                        "Ctrl-C twice more stops at once",
                        "[mtfm] Ctrl-C again: once more stops at once, without waiting for the workers",
                        "[mtfm] Ctrl-C a third time: stopping now, without waiting for the workers"]
        say_when_ray_train_stops_for_ctrl_c()  # the next run counts from its first press again
        logger.info("Received SIGINT. Gracefully aborting the training run")
        assert capsys.readouterr().err.startswith("[mtfm] Ctrl-C: stopping the run")
    finally:
        logger.setLevel(logging.NOTSET)


def test_raw_logs_given_as_samples_are_refused_by_name(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "raw").mkdir()
    pq.write_table(pa.table({"user_id": [1], "ts": [5], "poi_id": [3]}), tmp_path / "raw" / "part.parquet")
    for read in (lambda: split_by_window(tmp_path / "raw", 1), lambda: local_samples_schema(str(tmp_path / "raw"))):
        with pytest.raises(ValueError, match=r"not aggregated samples \(its columns: user_id, ts, poi_id\); aggregate "
                                             r"the raw logs first: mtfm data aggregate"):
            read()  # the second before Ray starts (train, eval)


def test_a_samples_file_that_is_not_parquet_is_named(ray_cluster, tiny_samples, tmp_path):
    folder = tiny_samples / "samples" if (tiny_samples / "samples").is_dir() else tiny_samples
    good = sorted(folder.rglob("*.parquet"))[0]
    (tmp_path / "samples").mkdir()
    shutil.copy(good, tmp_path / "samples" / good.name)
    (tmp_path / "samples" / "part-cut.parquet").write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"part-cut.parquet: not readable as Parquet"):
        split_by_window(tmp_path, 1)


def test_the_window_split_leaves_training_a_window(ray_cluster, tiny_samples):
    """Holding out every window is refused for training; evaluation alone may take them all."""
    import pyarrow.parquet as pq

    windows = sorted(set(pq.read_table(tiny_samples / "samples", columns=["window"])["window"].to_pylist()))
    with pytest.raises(ValueError, match=rf"{len(windows)} window\(s\) of data, but test_windows={len(windows)} "):
        split_by_window(tiny_samples, len(windows))
    train_ds, test_ds, found = split_by_window(tiny_samples, len(windows), need_train=False)
    assert found == ([], windows, 0) and train_ds.count() == 0 and test_ds.count() > 0
    train_ds, _, found = split_by_window(tiny_samples, len(windows) - 1)
    assert set(train_ds.unique("window")) == {windows[0]} and found.train_rows == train_ds.count()


def test_files_ray_data_does_not_read_do_not_stop_the_window_split(ray_cluster, tiny_samples, tmp_path):
    """The windows are found from the same files Ray Data reads: *.parquet, none hidden."""
    import pyarrow.parquet as pq

    folder = tmp_path / "samples"
    shutil.copytree(tiny_samples / "samples", folder)
    (folder / "README.txt").write_text("samples of the tiny world\n")
    (folder / "part-9.parquet.tmp").write_bytes(b"")
    (folder / "_summary.json").write_text("{}")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "old.parquet").write_bytes(b"not read")
    windows = sorted(set(pq.read_table(tiny_samples / "samples", columns=["window"])["window"].to_pylist()))
    train_ds, test_ds, found = split_by_window(folder, 1)
    assert (found.train, found.test) == (windows[:-1], windows[-1:])
    rows = sum(pq.read_metadata(f).num_rows for f in folder.glob("*.parquet"))
    assert train_ds.count() + test_ds.count() == rows


def test_resume_refuses_a_checkpoint_with_other_scenarios(config_dir, tmp_path):
    registry = load_registry(CONFIGS)
    meta_registry = registry.to_dict()
    (config_dir / "scenarios" / "grocery.yaml").write_text(
        "name: grocery\nitem_features:\n  - {name: sku_id, type: categorical, buckets: 100, dim: 4}\n"
        "tasks:\n  - {name: click, kind: ctr}\n")
    from mtfm.platform.checkpoint import CheckpointMeta

    meta = CheckpointMeta(5, 0, 5, meta_registry, {}, {})
    with pytest.raises(CheckpointError, match=r"the registry has scenarios the checkpoint lacks: \['grocery'\]. "
                                              r".*resume with that registry \(`mtfm scenarios export --checkpoint "
                                              r"runs/x/checkpoint_00000005 --out DIR` writes it; then --config-dir "
                                              r"DIR\), or start a new run from it with --init-from"):
        check_compatible(meta, load_registry(config_dir), "runs/x/checkpoint_00000005")
    (config_dir / "scenarios" / "grocery.yaml").unlink()
    (config_dir / "scenarios" / "sqs.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"the checkpoint has scenarios the registry lacks: \['sqs'\]"):
        check_compatible(meta, load_registry(config_dir), "runs/x/checkpoint_00000005")
    with pytest.raises(CheckpointError, match="no checkpoint_"):
        find_checkpoint(tmp_path)


def test_checkpoints_of_earlier_and_later_versions_read(tmp_path):
    """A meta.json without samples_fingerprint (before 2026-12-06) or with a key a later version adds."""
    from mtfm.platform.checkpoint import CheckpointMeta, write_checkpoint

    registry = load_registry(CONFIGS)
    model = build_model(load_model_config(REPO_ROOT / "configs/model/tiny.yaml"), registry)
    folder = write_checkpoint(tmp_path / "checkpoint_00000005", model, {},
                              CheckpointMeta(5, 0, 5, registry.to_dict(), {}, {}, "0123abcd"))
    written = json.loads((folder / "meta.json").read_text())
    for raw, fingerprint in (({k: v for k, v in written.items() if k != "samples_fingerprint"}, None),
                             (written | {"a_later_key": [1, 2]}, "0123abcd")):
        (folder / "meta.json").write_text(json.dumps(raw))
        assert (read_meta(folder).step, read_meta(folder).samples_fingerprint) == (5, fingerprint)


def test_single_scenario_model_trains_on_its_users_only(tiny_samples):
    """A `scenarios: [sqs]` run keeps exactly the (user, window) rows with sqs exposures: counted
    here straight from the Parquet files with pyarrow, without Ray."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    train_ds, _, windows = split_by_window(tiny_samples, 1)
    test_windows = windows.test
    table = pq.read_table(tiny_samples / "samples" if (tiny_samples / "samples").is_dir() else tiny_samples)
    train_rows = table.filter(pc.less(table["window"], test_windows[0]))
    with_sqs = pc.greater(pc.fill_null(pc.list_value_length(train_rows["sqs__exposures"]), 0), 0)
    expected = sorted(zip(train_rows.filter(with_sqs)["user_id"].to_pylist(),
                          train_rows.filter(with_sqs)["window"].to_pylist()))
    kept = keep_users_of(train_ds, ["sqs"]).select_columns(["user_id", "window"]).to_pandas()
    assert 0 < len(expected) < train_rows.num_rows  # the filter has something to drop
    assert sorted(zip(kept["user_id"], kept["window"])) == expected
    # Two scenarios: the rows with exposures of either
    lengths = {s: pc.fill_null(pc.list_value_length(train_rows[f"{s}__exposures"]), 0) for s in ("phf", "sqs")}
    either = pc.or_(pc.greater(lengths["phf"], 0), pc.greater(lengths["sqs"], 0))
    both = pc.and_(pc.greater(lengths["phf"], 0), pc.greater(lengths["sqs"], 0))
    assert pc.sum(both).as_py() < pc.sum(either).as_py()  # the rows tell "or" from "and"
    kept = keep_users_of(train_ds, ["phf", "sqs"]).select_columns(["user_id", "window"]).to_pandas()
    assert sorted(zip(kept["user_id"], kept["window"])) == sorted(zip(
        train_rows.filter(either)["user_id"].to_pylist(), train_rows.filter(either)["window"].to_pylist()))
    with pytest.raises(ValueError, match="no exposures of"):
        keep_users_of(train_ds, ["grocery"])


@pytest.mark.slow
def test_a_restricted_model_on_two_workers_trains_every_user_it_keeps(tiny_samples, tmp_path):
    """The train split's blocks are sized for the users a `scenarios: [sqs]` model keeps, not for every
    row: each epoch trains each of them once, on both workers."""
    model = tmp_path / "sqs.yaml"
    model.write_text((CONFIGS / "model" / "tiny.yaml").read_text() + "scenarios: [sqs]\n")
    config = _config(model=str(model), num_workers=2, cpus_per_worker=0.5, epochs=1, checkpoint_every=1000)
    run = train(config, data=str(tiny_samples), out=tmp_path / "run", config_dir=str(CONFIGS), log=lambda *a: None)
    table = pq.read_table(tiny_samples / "samples", columns=["window", "sqs__exposures"])
    in_train = pc.less(table["window"], pc.max(table["window"]))
    with_sqs = pc.greater(pc.fill_null(pc.list_value_length(table["sqs__exposures"]), 0), 0)
    [epoch] = [r for r in _log(run) if "users_trained" in r]
    assert (epoch["users_trained"], epoch["users_not_trained"]) == (pc.sum(pc.and_(in_train, with_sqs)).as_py(), 0)


def test_samples_read_from_a_uri_as_from_a_path(tiny_samples):
    """Data on an object store (s3://...) reaches Ray Data as a URI; file:// stands in for it here."""
    local = split_by_window(tiny_samples, 1)
    uri = split_by_window(tiny_samples.resolve().as_uri(), 1)
    assert (uri[0].count(), uri[1].count(), uri[2]) == (local[0].count(), local[1].count(), local[2])
    with pytest.raises(FileNotFoundError, match="no aggregated samples here"):
        split_by_window((tiny_samples.parent / "nope").resolve().as_uri(), 1)


def test_samples_aggregated_before_a_scenario_was_registered_are_refused_before_training(
        ray_cluster, tiny_samples, config_dir, tmp_path, monkeypatch):
    """A scenario YAML added after aggregating: the workers' collator would fail on its missing
    columns (each failure retried); the driver names it first, before Ray starts for local samples, and no
    run folder is made."""
    (config_dir / "scenarios" / "grocery.yaml").write_text(
        "name: grocery\nitem_features:\n  - {name: sku_id, type: categorical, buckets: 100, dim: 4}\n"
        "tasks:\n  - {name: click, kind: ctr}\n")
    with monkeypatch.context() as patched:
        patched.setattr("mtfm.platform.cluster.init_ray", lambda *a, **k: pytest.fail("Ray started before the refusal"))
        with pytest.raises(ValueError, match=r"no columns of scenario\(s\) \['grocery'\], which model tiny "
                                             r"\(registered in .*\) covers: the samples were aggregated before "
                                             r"they were registered, or with another registry; aggregate"):
            train(_config(), data=str(tiny_samples), out=tmp_path / "run", config_dir=str(config_dir),
                  log=lambda *a: None)
    (config_dir / "scenarios" / "grocery.yaml").unlink()
    with open(config_dir / "sequences.yaml", "a") as sequences:  # a sequence registered later, likewise
        sequences.write("  - name: searches\n    kind: realtime\n    max_len: 8\n    features:\n"
                        "      - {name: poi_id, type: categorical, buckets: 20000, dim: 32, required: true}\n")
    with pytest.raises(ValueError, match=r"no column of sequence\(s\) \['searches'\], which model tiny \(registered "
                                         r"in .*\) reads: the samples were aggregated before they were registered"):
        train(_config(), data=str(tiny_samples), out=tmp_path / "run", config_dir=str(config_dir),
              log=lambda *a: None)
    shutil.copy(CONFIGS / "sequences.yaml", config_dir / "sequences.yaml")
    # A feature added to a scenario, and one whose type changed: the collator would fail on each in every worker.
    hp = config_dir / "scenarios" / "hp.yaml"
    hp.write_text(hp.read_text().replace(
        "cross_features:\n", "cross_features:\n  - {name: new_feat, type: numeric}\n").replace(
        "{name: poi_rating, type: numeric,", "{name: poi_rating, type: categorical, buckets: 8, dim: 4,").replace(
        "user_features:\n", "user_features:\n  - {name: user_age, type: numeric}\n"))
    with pytest.raises(ValueError) as refused:
        train(_config(), data=str(tiny_samples), out=tmp_path / "run", config_dir=str(config_dir),
              log=lambda *a: None)
    assert str(refused.value) == (
        f"{tiny_samples}: column hp__user has no feature user_age; column hp__exposures: feature poi_rating is float, "
        "the registry declares int64; column hp__exposures has no feature new_feat (model tiny (registered in "
        f"{config_dir}) reads them): the samples were aggregated before these features were declared as they are "
        f"now, or with another registry; aggregate the raw logs again with this registry (`mtfm data aggregate "
        f"--config-dir {config_dir} --raw RAW --out AGG`)")
    assert not (tmp_path / "run").exists()


def test_a_samples_part_with_other_columns_is_named(ray_cluster, tiny_samples, tmp_path):
    """One part without a column would be read with it null: its users silently trained without it."""
    import pyarrow.parquet as pq

    folder = tmp_path / "samples"
    shutil.copytree(tiny_samples / "samples", folder)
    parts = sorted(folder.glob("*.parquet"))
    assert len(parts) >= 2
    original = pq.read_table(parts[-1])
    pq.write_table(original.drop_columns(["history__events"]), parts[-1])
    with pytest.raises(ValueError, match=rf"{re.escape(str(parts[-1]))}: its columns differ from those of "
                                         rf"{re.escape(str(parts[0]))} \(lacks \['history__events'\]\)"):
        split_by_window(folder, 1)
    # The same names, but the events' structs without a field (a feature added to a sequence later).
    events = original.schema.field("history__events").type
    fewer = pa.list_(pa.struct([field for field in events.value_type][:-1]))
    pq.write_table(original.set_column(original.schema.get_field_index("history__events"), "history__events",
                                       pa.array(original["history__events"].to_pylist(), fewer)), parts[-1])
    with pytest.raises(ValueError, match=r"\(has another type in \['history__events'\]\)"):
        split_by_window(folder, 1)


def test_a_run_that_cannot_start_leaves_no_folder(tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run whose samples folder does not exist")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    with pytest.raises(FileNotFoundError, match="no aggregated samples here"):
        train(_config(), data=str(tmp_path / "missing"), out=tmp_path / "run", config_dir=str(CONFIGS),
              log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_inside_a_jobs_working_dir_copy_is_refused(tiny_samples, tmp_path):
    """Under `ray job submit --working-dir .` a relative --out lands in Ray's copy, deleted with the job."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    with pytest.raises(ValueError, match=r"inside the copy of the job's working directory that Ray made and deletes"):
        train(_config(), data=str(tiny_samples), out=copy / "runs" / "tiny", config_dir=str(CONFIGS),
              log=lambda *a: None)
    assert not copy.exists()
    copy.mkdir(parents=True)  # a relative --data there: data/ is git-ignored, so Ray never shipped it
    with pytest.raises(FileNotFoundError, match=r"agg: not in the copy of the job's working directory that Ray made "
                                                r".*leaves out what .gitignore names"):
        train(_config(), data=str(copy / "data" / "agg"), out=tmp_path / "run", config_dir=str(CONFIGS),
              log=lambda *a: None)


def test_workers_the_embedded_ray_cannot_hold_are_refused_before_training(ray_cluster, tiny_samples, tmp_path):
    """Ray Train would wait for them forever (retrying every minute); the session's Ray has 2 CPUs, no GPU."""
    for changes, expected in (
            ({"num_workers": 5, "cpus_per_worker": 0.5}, r"5 worker\(s\) of 0.5 CPU each \(num_workers, "
                                                          r"cpus_per_worker\), but the Ray cluster has 2 CPU on 1 "
                                                          r"node\(s\): room for 4"),
            ({"use_gpu": True}, r"2 worker\(s\) of 0.5 CPU \+ 1 GPU each \(num_workers, cpus_per_worker, use_gpu, "
                                r"gpus_per_worker\), but the Ray cluster has 2 CPU, 0 GPU on 1 node\(s\): room for 0"),
            ({"num_workers": 4, "cpus_per_worker": 0.5},  # they fit, but leave Ray Data's reads no CPU: a hang
             r"4 worker\(s\) of 0.5 CPU each \(num_workers, cpus_per_worker\) take 2 of the Ray cluster's 2 CPU on 1 "
             r"node\(s\), leaving 0 CPU: Ray Data's reads, which feed the workers, need 1 and would wait for ever")):
        with pytest.raises(RegistryError, match="test: num_workers: " + expected):
            train(_config(**changes), data=str(tiny_samples), out=tmp_path / "run", config_dir=str(CONFIGS),
                  log=lambda *a: None)
        assert not (tmp_path / "run").exists()


def test_workers_a_clusters_other_work_holds_the_resources_of_are_warned_of(ray_cluster, tiny_samples, tmp_path,
                                                                            monkeypatch, capsys):
    """On a cluster (RAY_ADDRESS) that could hold the workers but whose CPUs other work holds now (a
    Serve app), Ray Train waits, printing a traceback a minute: said up front. A command-line override
    is named as such in the refusals (here on the embedded Ray)."""
    from mtfm.platform.train import refuse_workers_the_cluster_cannot_hold

    config = _config(num_workers=1, cpus_per_worker=0.5)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # only asked of is_embedded(): Ray is up already
    notes = []
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": ray_cluster.available_resources()["CPU"]}])  # as a Serve app's replicas would
    try:
        ray_cluster.get(held.ready(), timeout=60)
        refuse_workers_the_cluster_cannot_hold(config, notes.append)
    finally:
        remove_placement_group(held)
    assert notes == ["[mtfm] warning: the Ray cluster has 0 CPU of the 1.5 needed free now (other work holds the "
                     "rest, such as a Serve app: `ray status`): the 1 worker(s) start once enough is free, Ray Train "
                     "retrying every minute"]
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(["--config", str(TINY), "--data", str(tiny_samples), "--out", str(tmp_path / "run"), "--num-workers",
                 "64", "--max-steps", "5"]) == 1
    assert capsys.readouterr().err.startswith(
        f"config error: {TINY} with --num-workers 64, --max-steps 5: num_workers: 64 worker(s) of 0.5 CPU each")



def test_a_broken_meta_json_is_named_with_what_it_lacks(tmp_path):
    folder = tmp_path / "checkpoint_00000003"
    folder.mkdir()
    torch.save({}, folder / "model.pt")
    meta = folder / "meta.json"
    required = "step, epoch, batches_in_epoch, registry, model_config, train_config"
    for text, why in (("{}", f"expected a JSON object with {required}; missing {required}"),
                      ("[3]", f"expected a JSON object with {required}; missing {required}"),
                      ('{"step": 3, "epoch": 1}', f"expected a JSON object with {required}; missing batches_in_epoch, "
                                                  "registry, model_config, train_config"),
                      ("{", "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")):
        meta.write_text(text)
        with pytest.raises(CheckpointError) as refused:
            read_meta(folder)
        assert str(refused.value) == f"{meta}: not a valid checkpoint description ({why})"
    # An earlier version's meta.json, without the samples' fingerprint, and a later one's extra key: read.
    meta.write_text(json.dumps({"step": 3, "epoch": 1, "batches_in_epoch": 0, "registry": {}, "model_config": {},
                                "train_config": {}, "added_later": 1}))
    assert (read_meta(folder).step, read_meta(folder).samples_fingerprint) == (3, None)


def test_command_line_refuses_a_run_folder_that_holds_a_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "checkpoint_00000003").mkdir(parents=True)
    (run / "checkpoint_00000003" / "meta.json").write_text("{}")
    monkeypatch.chdir(REPO_ROOT)
    for flag in ("--out", "--run-dir"):  # --run-dir, as quickstart names the run folder
        assert main(["--config", str(TINY), flag, str(run)]) == 1
        assert f"error: {run} holds a run already (checkpoint_00000003): --resume {run} continues it" in \
            capsys.readouterr().err
    assert main(["--config", str(TINY), "--resume", str(run / "checkpoint_00000003")]) == 1
    assert "--resume takes a run folder, not one of its checkpoints" in capsys.readouterr().err
    for flag in ("--test-windows", "--max-steps", "--num-workers"):  # the overrides are checked, by their flags
        with pytest.raises(SystemExit) as exc:
            main(["--config", str(TINY), flag, "0", "--out", str(tmp_path / "new")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"argument {flag}: expected a positive integer, found '0'" in err


def test_command_line_refuses_a_model_the_registry_or_the_resumed_run_does_not_match(tmp_path, monkeypatch, capsys):
    """Both before Ray starts: an unknown scenario in the model config's `scenarios`, and --resume
    with a train config whose model differs from the checkpoint's."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tests" / "deployments"))
    from serve_test_utils import write_tiny_checkpoint

    monkeypatch.chdir(REPO_ROOT)
    model = tmp_path / "model.yaml"
    model.write_text((CONFIGS / "model" / "tiny.yaml").read_text() + "scenarios: [hp, nope]\n")
    config = tmp_path / "train.yaml"
    config.write_text(TINY.read_text().replace("configs/model/tiny.yaml", str(model)))
    assert main(["--config", str(config), "--out", str(tmp_path / "a")]) == 1
    assert f"{model}: scenarios[1]: unknown scenario 'nope'; registered in" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    run = tmp_path / "run"
    meta_file = write_tiny_checkpoint(load_registry(CONFIGS), run / "checkpoint_00000007") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["model_config"]["d_model"] *= 2  # trained with another model than --config's
    meta_file.write_text(json.dumps(meta))
    assert main(["--config", str(TINY), "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"--resume {run}: its checkpoint's model 'tiny' differs from the model of" in err and " in d_model;" in err
    assert not (run / "train_config.yaml").exists()  # the run's record is left as it was
    # What neither the weights nor the model's function depend on may change on a resume.
    meta["model_config"] |= {"d_model": meta["model_config"]["d_model"] // 2, "name": "renamed",
                             "attention_impl": "reference", "compute_dtype": "bfloat16"}
    for changes, says in (({"epoch": 3}, "it has completed 3 epoch(s) and"), ({"step": 40}, "it is at step 40")):
        meta_file.write_text(json.dumps(meta | changes))
        assert main(["--config", str(TINY), "--resume", str(run), "--max-steps", "40"]) == 1
        assert says in capsys.readouterr().err  # a resume with nothing to train says so
    # A registry whose features shape the model otherwise is refused, naming the feature and field.
    trained = json.loads(json.dumps(meta))
    owners = [*trained["registry"]["sequences"].values(), *trained["registry"]["scenarios"].values()]
    for feature in (f for owner in owners for key in ("features", "user_features", "item_features", "cross_features")
                    for f in owner.get(key, ()) if f["name"] == "poi_id"):  # one feature, declared alike everywhere
        feature["buckets"] *= 2
    meta_file.write_text(json.dumps(trained))
    assert main(["--config", str(TINY), "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    buckets = load_registry(CONFIGS).features["poi_id"].buckets
    assert "differs from the one its checkpoint was trained with, in sequences.history.features.poi_id.buckets: " in err
    assert f"; scenarios.hp.item_features.poi_id.buckets: {buckets * 2} -> {buckets};" in err
    # In the middle of an epoch, how the epoch is cut into batches must not change.
    tiny = TrainConfig.load(TINY)
    for changes, says in (({"tokens_per_batch": 2 * tiny.tokens_per_batch}, "tokens_per_batch"),
                          ({"num_workers": tiny.num_workers + 1}, "num_workers")):
        meta_file.write_text(json.dumps(meta | {"batches_in_epoch": 5, "train_config": tiny.to_dict() | changes}))
        assert main(["--config", str(TINY), "--resume", str(run)]) == 1
        err = capsys.readouterr().err
        assert f"it stopped after batch 5 of epoch 1, and {says}: " in err and "would be cut differently" in err
    # --init-from takes a registry whose features changed (the warm start loads them by feature, checkpoint.py)
    # and names the changes; a sequence or scenario only one of them has is no change.
    from mtfm.platform.train import check_warm_start

    tiny = load_model_config(REPO_ROOT / "configs/model/tiny.yaml")
    meta_file.write_text(json.dumps(trained))
    changes = check_warm_start(run / "checkpoint_00000007", load_registry(CONFIGS), tiny)
    assert {"sequences.history.features", "scenarios.hp.item_features"} <= {c.split(".poi_id")[0] for c in changes}
    assert all(c.endswith(f".poi_id.buckets: {buckets * 2} -> {buckets}") for c in changes), changes
    retired = json.loads(json.dumps(meta))
    retired["registry"]["scenarios"]["gone"] = retired["registry"]["scenarios"]["hp"] | {"name": "gone"}
    retired["registry"]["sequences"]["old"] = retired["registry"]["sequences"]["realtime"] | {"name": "old"}
    meta_file.write_text(json.dumps(retired))
    assert check_warm_start(run / "checkpoint_00000007", load_registry(CONFIGS), tiny) == []
    # Only the scenarios both models have modules of: phf's own feature changed, and phf not in the checkpoint's model.
    other = json.loads(json.dumps(meta))
    other["registry"]["scenarios"]["phf"]["user_features"][1]["buckets"] *= 2  # user_diet_pref: phf's own
    meta_file.write_text(json.dumps(other))
    assert [c.split(":")[0] for c in check_warm_start(run / "checkpoint_00000007", load_registry(CONFIGS), tiny)] == [
        "scenarios.phf.user_features.user_diet_pref.buckets"]
    other["model_config"]["scenarios"] = ["hp", "sqs"]
    meta_file.write_text(json.dumps(other))
    assert check_warm_start(run / "checkpoint_00000007", load_registry(CONFIGS), tiny) == []
    # A model of another shape fails in every worker: refused before Ray, naming the field.
    meta_file.write_text(json.dumps(other | {"model_config": other["model_config"] | {"d_model": 2 * tiny.d_model}}))
    with pytest.raises(CheckpointError, match=rf"differs from .*tiny.yaml in d_model \({2 * tiny.d_model} -> "
                                              rf"{tiny.d_model}\); warm start needs the model config"):
        check_warm_start(run / "checkpoint_00000007", load_registry(CONFIGS), tiny)
    # --resume alone takes the run's own train config.
    assert main(["--resume", str(run)]) == 1
    assert "no train_config.yaml there (not a run folder?); pass --config" in capsys.readouterr().err
    assert main(["--resume", str(run) + "-typo"]) == 1
    assert capsys.readouterr().err == (f"error: --resume {run}-typo: not found (expected a run folder, e.g. "
                                       "runs/tiny-<time>)\n")
    assert main(["--resume", str(meta_file)]) == 1  # a file
    assert capsys.readouterr().err.startswith(f"error: --resume {meta_file}: a file (expected a run folder")
    (run / "train_config.yaml").write_text(TINY.read_text())
    meta_file.write_text(json.dumps(meta | {"epoch": 2}))
    assert main(["--resume", str(run)]) == 1
    assert "train_config.yaml trains 2: nothing to train; raise its epochs (--epochs)" in capsys.readouterr().err
    assert main([]) == 1
    assert "--config CFG is needed to start a run" in capsys.readouterr().err


def test_a_resume_takes_the_rates_of_its_train_config():
    """Restoring a checkpoint's optimizer state restores its rates too: a resume with a new config
    (after a divergence, say) must train at the new ones."""
    from mtfm.platform.train_worker import make_optimizers, set_rates

    model = build_model(load_model_config(REPO_ROOT / "configs/model/tiny.yaml"), load_registry(CONFIGS))
    saved = {name: opt.state_dict() for name, opt in make_optimizers(model, _config(lr=5.0, embedding_lr=7.0,
                                                                                    weight_decay=0.1)).items()}
    config = _config(lr=1e-4, embedding_lr=2e-4, weight_decay=0.0)
    optimizers = make_optimizers(model, config)
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])
    assert optimizers["dense"].param_groups[0]["lr"] == 5.0  # what load_state_dict alone leaves
    set_rates(optimizers, config)
    assert [(g["lr"], g["weight_decay"]) for g in optimizers["dense"].param_groups] == [(1e-4, 0.0)]
    assert [g["lr"] for g in optimizers["embedding"].param_groups] == [2e-4]


def test_shipped_train_configs_load_and_name_shipped_models():
    for path in sorted((REPO_ROOT / "configs" / "train").glob("*.yaml")):
        config = TrainConfig.load(path)
        assert (REPO_ROOT / config.model).is_file(), path
    several = TrainConfig.load(REPO_ROOT / "configs" / "train" / "multi_gpu.yaml")
    assert (several.num_workers, several.use_gpu, several.cuda_graphs) == (2, True, False)
    # NCCL for a GPU per worker; gloo on CPUs and for workers sharing GPUs (NCCL refuses two ranks on one GPU).
    from mtfm.platform.train import ddp_backend

    assert ddp_backend(several.use_gpu, several.gpus_per_worker) == "nccl"
    assert [ddp_backend(True, 0.5), ddp_backend(True, 2), ddp_backend(False, 1)] == ["gloo", "nccl", "gloo"]
    with pytest.raises(RegistryError, match=r"gpu.yaml with --num-workers 2: cuda_graphs: needs use_gpu: true and "
                                            r"num_workers: 1 .* as configs/train/multi_gpu.yaml has"):
        TrainConfig.load(REPO_ROOT / "configs" / "train" / "gpu.yaml").with_flags({"num_workers": 2})


def test_train_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    for line, expected in (("tokens_per_batch: lots",
                            "tokens_per_batch: expected an integer >= 1, found a string 'lots'"),
                           ("max_steps: many", "max_steps: expected an integer >= 1 or null, found a string 'many'"),
                           ("lr: fast", "lr: expected a finite number >= 0, found a string 'fast'"),
                           ("use_gpu: 1", "use_gpu: expected true or false, found an integer 1"),
                           ("epochs: true", "epochs: expected an integer >= 1, found a boolean True"),
                           ("epocs: 3", "epocs: unknown key")):
        bad.write_text(f"model: configs/model/tiny.yaml\n{line}\n")
        with pytest.raises(RegistryError, match=f"bad.yaml: {expected}"):
            TrainConfig.load(bad)
    from mtfm.platform.cli import QUICKSTART_OUT

    # A config without `data:` trains on what `mtfm quickstart` aggregated.
    assert TrainConfig.from_dict({"name": "t", "model": "configs/model/tiny.yaml"}).data == f"{QUICKSTART_OUT}/agg"
    bad.write_text("epochs: 3\n")
    with pytest.raises(RegistryError, match=r"bad.yaml: model: required field missing"):
        TrainConfig.load(bad)
    with pytest.raises(RegistryError, match=r"tiny.yaml: architecture: unknown key: this looks like a model config"):
        TrainConfig.load(REPO_ROOT / "configs" / "model" / "tiny.yaml")
    bad.write_text("model: configs/model/tiny.yaml\nuse_gpu: true\ngpus_per_worker: 0\n")
    with pytest.raises(RegistryError, match=r"bad.yaml: gpus_per_worker: expected a finite number > 0, found 0"):
        TrainConfig.load(bad)
    bad.write_text("model: configs/model/tiny.yaml\nuse_gpu: true\nnum_workers: 2\ncuda_graphs: true\n")
    with pytest.raises(RegistryError, match=r"bad.yaml: cuda_graphs: needs use_gpu: true and num_workers: 1"):
        TrainConfig.load(bad)
    bad.write_text("model: configs/model/tinyy.yaml\n")
    with pytest.raises(RegistryError, match=r"bad.yaml: model: model config file configs/model/tinyy.yaml not found"):
        train(TrainConfig.load(bad), config_dir=str(CONFIGS), log=lambda *a: None)
    # A null key takes the default, as in every config; but a null grad_clip is no clipping.
    bad.write_text("model: configs/model/tiny.yaml\nepochs: null\ngrad_clip: null\n")
    loaded = TrainConfig.load(bad)
    assert (loaded.epochs, loaded.grad_clip, TrainConfig.from_dict(loaded.to_dict()).grad_clip) == (1, None, None)
    bad.write_text("name:\nmodel: configs/model/tiny.yaml\n")  # a null name: the file's, as when left out
    assert TrainConfig.load(bad).name == "bad"
    bad.write_text("model: configs/model/tiny.yaml\ndata:\n")  # a null data folder is not taken for the quickstart's
    with pytest.raises(RegistryError, match=rf"bad.yaml: data: expected a samples folder, found null; name one, or "
                                            rf"leave the key out for the quickstart's \({QUICKSTART_OUT}/agg\)"):
        TrainConfig.load(bad)
    bad.write_text("model: configs/model/tiny.yaml\nmax_steps: 0\n")
    with pytest.raises(RegistryError, match=r"bad.yaml: max_steps: expected an integer >= 1 or null, found 0"):
        TrainConfig.load(bad)
    # Command-line values are checked as the file's, and a refusal names them (train and quickstart alike).
    bad.write_text("model: configs/model/tiny.yaml\n")
    assert TrainConfig.load(bad).with_flags({"max_steps": None}) == TrainConfig.load(bad)
    assert TrainConfig.load(bad).with_flags({"max_steps": 7, "epochs": None}).max_steps == 7
    with pytest.raises(RegistryError, match=r"bad.yaml with --max-steps 0, --epochs 2: max_steps: expected an integer "
                                            r">= 1 or null, found 0"):
        TrainConfig.load(bad).with_flags({"max_steps": 0, "epochs": 2, "num_workers": None})
    # Numbers that would train backwards, fail inside the optimizer after Ray started, or retry forever.
    for line, message in (("grad_clip: -1", r"grad_clip: expected a finite number >= 0 \(the largest gradient norm; "
                                            r"0 or null: no clipping\), found -1"),
                          ("lr: -0.1", r"lr: expected a finite number >= 0, found -0.1"),
                          ("embedding_lr: .inf", r"embedding_lr: expected a finite number >= 0, found inf"),
                          ("weight_decay: .nan", r"weight_decay: expected a finite number >= 0, found nan"),
                          ("cpus_per_worker: .nan", r"cpus_per_worker: expected a finite number > 0, found nan"),
                          ("max_failures: -2", r"max_failures: expected an integer >= 0, or -1 to retry without limit"),
                          ("seed: -1", r"seed: expected an integer >= 0, found -1"),
                          ("name: ../../elsewhere", r"name: expected a folder name for the run \(runs/<name>-<time>\), "
                                                    r"found '../../elsewhere'")):
        bad.write_text(f"model: configs/model/tiny.yaml\n{line}\n")
        with pytest.raises(RegistryError, match="bad.yaml: " + message):
            TrainConfig.load(bad)
    # YAML 1.1 reads 3e-3 as a string; a config means the number. A string that looks like one is
    # written back quoted (a run's train_config.yaml is read again by --resume).
    bad.write_text("model: configs/model/tiny.yaml\nlr: 3e-3\nembedding_lr: 1E-1\nmax_failures: -1\nname: 1e3x\n")
    loaded = TrainConfig.load(bad)
    assert (loaded.lr, loaded.embedding_lr, loaded.max_failures) == (0.003, 0.1, -1)
    bad.write_text(dump_yaml(loaded.to_dict() | {"name": "1e3"}))
    assert TrainConfig.load(bad).name == "1e3"


@pytest.mark.slow
def test_a_run_that_diverges_stops_on_every_worker_and_saves_nothing_past_it(tiny_samples, tmp_path):
    """Learning rates of 1e4 make the weights overflow within a few steps. Two workers, losses
    checked every 3 steps, weights and scores at each checkpoint (every step): both workers stop at
    the same step (or the run would hang in DDP), every checkpoint kept holds finite weights and
    comes before that step, eval.json names none past it, and the driver names the step and what to do."""
    from mtfm.platform.eval import evaluate_batches
    from mtfm.platform.checkpoint import MODEL_FILE
    from mtfm.platform.train import DIVERGED_FILE, EVAL_FILE, TrainingDiverged

    run = tmp_path / "run"
    config = _config(num_workers=2, epochs=1, lr=1e4, embedding_lr=1e4, log_every=3, checkpoint_every=1)
    with pytest.raises(TrainingDiverged) as raised:
        train(config, data=str(tiny_samples), out=run, config_dir=str(CONFIGS), log=lambda *a: None)
    diverged = json.loads((run / DIVERGED_FILE).read_text())
    what = {"loss": f"the loss was {diverged['value']}", "weights": "the weights were not finite",
            "scores": "the model's scores were not finite (an overflow)"}[diverged["what"]]
    assert str(raised.value).startswith(f"training diverged: {what} at step {diverged['step']}, so the run stopped")
    kept = sorted(run.glob("checkpoint_0*"))
    assert ("--resume" in str(raised.value)) == bool(kept)
    for folder in kept:
        assert read_meta(folder).step < diverged["step"]
        state = torch.load(folder / MODEL_FILE, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    if (run / EVAL_FILE).exists():
        assert (run / json.loads((run / EVAL_FILE).read_text())["checkpoint"]) in kept
    logged = _log(run) if (run / METRICS_FILE).exists() else []
    # A loss is logged only where finite; at the step that diverged only when its weights or scores did (checked
    # at the checkpoint, after the step's loss is logged).
    assert all(math.isfinite(r["loss"]) and (r["step"] < diverged["step"] or r["step"] == diverged["step"]
                                             and diverged["what"] != "loss") for r in logged if "loss" in r)
    model = build_model(load_model_config(REPO_ROOT / "configs/model/tiny.yaml"), load_registry(CONFIGS))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    _, test_ds, _ = split_by_window(tiny_samples, 1)
    batches = token_budget_batches(test_ds.iter_batches(batch_size=64, batch_format="pyarrow"),
                                   Collator(model.registry), 4096)
    with pytest.raises(ValueError, match=r"scores are not finite \(weights that hold NaN or inf"):
        evaluate_batches(model, batches, torch.device("cpu"))


def _stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster started here (`ray stop` would also stop every other Ray on the machine)."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in part for part in (p.info["cmdline"] or []))]
    for proc in mine:
        proc.kill()
    psutil.wait_procs(mine, timeout=30)


@pytest.mark.slow
def test_ray_job_submit(tiny_samples, tmp_path):
    """`ray job submit --working-dir .` against a separately started `ray start --head` cluster."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    # As a user's shell: no RAY_ADDRESS, and no RAY_AUTH_MODE (this session's ray.init set it to "token").
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    # As in an activated environment: the job's `python` is this interpreter, also when pytest was
    # started as .venv/bin/python without activating it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    temp_dir = tempfile.mkdtemp(prefix="mtfm-job-", dir="/tmp")  # short: Ray's socket paths live under it
    dash = unused_port()
    start = [ray_bin, "start", "--head", f"--port={unused_port()}", "--num-cpus=3", "--include-dashboard=true",
             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={unused_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    started = subprocess.run(start, capture_output=True, text=True, env=env, timeout=120)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        out = tmp_path / "run"
        submit = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                  "--", "python", "-m", "mtfm.platform.train", "--config", "configs/train/tiny.yaml",
                  "--data", str(tiny_samples), "--out", str(out), "--num-workers", "1", "--max-steps", "3"]
        for _ in range(30):  # the job agent comes up some seconds after `ray start` returns
            done = subprocess.run(submit, cwd=REPO_ROOT, capture_output=True, text=True,
                                  env=env | {"RAY_AUTH_MODE": "token"}, timeout=400)  # as the README says
            if "No available agent" not in done.stderr + done.stdout:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        assert read_meta(out).step == 3
        # Paths in the job's copy of its working dir (deleted with the job) are recorded relative to it, for the
        # next job's copy (a resume) to resolve.
        assert yaml.safe_load((out / "train_config.yaml").read_text())["model"] == "configs/model/tiny.yaml"
        assert read_meta(out).registry["config_dir"] == "configs"
        assert "hp/click" in done.stdout  # the evaluation table reached the job's log
        # The job's log is the run's own: Ray Train's INFO lines, Ray Data's from the actors that feed
        # training and each report's metrics dict stay in the cluster's log files.
        for noise in ("Wrapping provided model", "Execution plan of Dataset", "Progress bars disabled",
                      "Reporting training result", "Checkpoint successfully"):
            assert noise not in done.stdout + done.stderr, noise
        # A command pointed at the cluster by RAY_ADDRESS without RAY_AUTH_MODE: it sends the token that
        # exists here (the cluster takes tokens since one exists), where Ray alone retried for 20 s and failed.
        gcs = start[3].split("=")[1]
        assert Path("~/.ray/auth_token").expanduser().exists()
        done = subprocess.run([sys.executable, "-m", "mtfm.platform.cli", "data", "aggregate", "--raw",
                               str(tiny_samples.parent / "raw"), "--out", str(tmp_path / "agg")], cwd=REPO_ROOT,
                              capture_output=True, text=True, env=env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"},
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Unauthenticated" not in done.stderr and list((tmp_path / "agg").rglob("*.parquet")), done.stderr[-3000:]
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_paths_a_run_records_are_relative_in_a_jobs_copy_of_its_working_dir(tmp_path, monkeypatch):
    from mtfm.platform.train import _absolute

    copy = tmp_path / "_ray_pkg_0123abcd"  # as Ray names it
    shutil.copytree(CONFIGS, copy / "configs", ignore=shutil.ignore_patterns("movielens"))
    monkeypatch.chdir(copy)
    assert load_registry("configs").to_dict()["config_dir"] == "configs"
    assert _absolute("configs/model/tiny.yaml") == "configs/model/tiny.yaml"
    assert _absolute(str(CONFIGS / "model" / "tiny.yaml")) == str((CONFIGS / "model" / "tiny.yaml").resolve())
    monkeypatch.chdir(tmp_path)  # anywhere else: absolute, for a resume from another folder
    assert load_registry(copy / "configs").to_dict()["config_dir"] == str(copy / "configs")
    assert _absolute("_ray_pkg_0123abcd/configs/model/tiny.yaml") == str(copy / "configs" / "model" / "tiny.yaml")


def test_registry_changes_tell_the_model_from_the_data():
    from mtfm.platform.checkpoint import registry_changes
    from mtfm.platform.registry import Registry

    current = load_registry(CONFIGS)
    snapshot = current.to_dict()
    snapshot["sequences"]["history"]["max_len"] //= 2
    snapshot["scenarios"]["hp"]["cross_features"] = snapshot["scenarios"]["hp"]["cross_features"][:-1]
    snapshot["scenarios"]["hp"]["item_features"] = snapshot["scenarios"]["hp"]["item_features"][:-1]  # avg_price
    snapshot["scenarios"]["hp"]["item_features"][-1]["transform"] = "log1p"  # poi_rating: named beside the list's
    snapshot["scenarios"]["sqs"]["tasks"] = snapshot["scenarios"]["sqs"]["tasks"][:1]
    first = snapshot["scenarios"]["sqs"]["tasks"][0]["name"]
    rates = snapshot["scenarios"]["sqs"]["synthetic"]["label_rates"]
    snapshot["scenarios"]["sqs"]["synthetic"]["label_rates"] = {first: rates[first]}
    snapshot["scenarios"]["phf"]["item_features"].reverse()  # a group's features feed one layer in order
    for task in snapshot["scenarios"]["hp"]["tasks"]:
        task["description"] = "what the model never reads"
    model, cuts = registry_changes(Registry.from_dict(snapshot), current)
    history = current.sequences["history"].max_len
    hp, phf, sqs = (current.scenarios[n] for n in ("hp", "phf", "sqs"))
    assert cuts == [f"sequences.history.max_len: {history // 2} -> {history}"]
    assert model == [
        f"scenarios.hp.item_features: {[f.name for f in hp.item_features[:-1]]} -> {[f.name for f in hp.item_features]}",
        "scenarios.hp.item_features.poi_rating.transform: log1p -> none",
        f"scenarios.hp.cross_features: {[f.name for f in hp.cross_features[:-1]]} -> {[f.name for f in hp.cross_features]}",
        f"scenarios.phf.item_features: {[f.name for f in phf.item_features][::-1]} -> {[f.name for f in phf.item_features]}",
        f"scenarios.sqs.tasks: {list(sqs.task_names[:1])} -> {list(sqs.task_names)}"]
    assert registry_changes(Registry.from_dict(snapshot), current, ["hp"])[0] == model[:3]  # the model's scenarios
    assert registry_changes(current, current) == ([], [])


class _OtherWorker:
    """`StepAgreement` of two workers as this one sees it: the other holds `batches` batches this
    epoch (and then stands in if `can_stand_in`)."""

    world_size = 2

    def __init__(self, batches: int, can_stand_in: bool = True):
        self.left, self.can_stand_in = batches, can_stand_in

    def batches_held(self, have: bool, can_stand_in: bool) -> tuple[int, bool]:
        other = self.left > 0
        self.left -= 1
        return int(have) + int(other), (have or can_stand_in) and (other or self.can_stand_in)


def test_workers_step_until_every_batch_is_trained_the_one_out_of_batches_standing_in():
    """DDP steps every worker together: when one runs out, it stands in with its last batch at loss
    scale 0 while the others train theirs at world size / workers holding a batch."""
    from mtfm.model.sample_tables import random_aggregated_table
    from mtfm.platform.train_worker import _agreed_batches

    registry = load_registry(CONFIGS)
    table = random_aggregated_table(registry, 10, np.random.default_rng(0))
    collator = Collator(registry)
    batches = [collator(table.slice(lo, n)) for lo, n in ((0, 3), (3, 2), (5, 4), (9, 1))]
    untrained: list[int] = []
    steps = list(_agreed_batches(iter(batches), _OtherWorker(2), untrained))
    assert [(s.batch, s.loss_scale, s.stand_in) for s in steps] == [
        (batches[0], 1.0, False), (batches[1], 1.0, False), (batches[2], 2.0, False), (batches[3], 2.0, False)]
    steps = list(_agreed_batches(iter(batches[:1]), _OtherWorker(3), untrained))  # this one runs out first
    assert [(s.batch, s.loss_scale, s.stand_in) for s in steps] == [
        (batches[0], 1.0, False), (batches[0], 0.0, True), (batches[0], 0.0, True)]
    assert untrained == []
    # After a resume past its shard's end, the last batch it skipped is its stand-in.
    steps = list(_agreed_batches(iter([]), _OtherWorker(2), untrained, last=batches[3]))
    assert [(s.batch, s.loss_scale, s.stand_in) for s in steps] == [(batches[3], 0.0, True)] * 2
    # A worker with no batch at all cannot stand in: every worker ends the epoch, and counts what it held.
    assert list(_agreed_batches(iter([]), _OtherWorker(2), untrained)) == []
    assert list(_agreed_batches(iter(batches[1:]), _OtherWorker(0, can_stand_in=False), untrained)) == []
    assert untrained == [2 + 4 + 1]


def test_a_resume_restores_the_newer_of_rays_checkpoint_and_the_one_it_checked(tmp_path):
    """A driver killed as its workers saved checkpoint 20 leaves it whole on disk but not in Ray's snapshot,
    whose newest is 15: `--resume` checks 20 (the newest on disk) and the workers restore 20, not 15. After a
    worker restart later in the resumed run, Ray's newer checkpoint wins."""
    import ray.train

    sys.path.insert(0, str(REPO_ROOT / "tests" / "deployments"))
    from serve_test_utils import write_tiny_checkpoint
    from mtfm.platform.train_worker import checkpoint_to_restore

    registry = load_registry(CONFIGS)
    run = tmp_path / "run"
    registered = ray.train.Checkpoint(str(write_tiny_checkpoint(registry, run / "checkpoint_00000015", step=15)))
    on_disk = str(write_tiny_checkpoint(registry, run / "checkpoint_00000020", step=20))
    assert checkpoint_to_restore(registered, on_disk, 20).path == on_disk
    assert checkpoint_to_restore(None, on_disk, 20).path == on_disk  # a folder without Ray's snapshot
    later = ray.train.Checkpoint(str(write_tiny_checkpoint(registry, run / "checkpoint_00000025", step=25)))
    assert checkpoint_to_restore(later, on_disk, 20) is later
    shutil.rmtree(on_disk)  # pruned by Ray (keep_checkpoints) as the resumed run went on: not read again
    assert checkpoint_to_restore(later, on_disk, 20) is later
    assert checkpoint_to_restore(registered, None, None) is registered  # no --resume: Ray's, or none
    assert checkpoint_to_restore(None, None, None) is None


def test_freeze_loaded_steps_without_a_warm_start_is_warned_of(tmp_path):
    lines = []
    with pytest.raises(FileNotFoundError, match="no aggregated samples here"):  # stops before Ray starts
        train(_config(freeze_loaded_steps=5), data=str(tmp_path / "none"), out=tmp_path / "run",
              config_dir=str(CONFIGS), log=lines.append)
    assert lines == ["[mtfm] warning: freeze_loaded_steps 5 (test) has no effect: nothing is warm-started "
                     "(--init-from CHECKPOINT)"]


def test_a_token_budget_below_one_full_user_is_warned_of(tmp_path):
    lines = []
    for budget in (287, 288):  # the registry's sequences keep up to 256 history and 32 realtime events
        with pytest.raises(FileNotFoundError, match="no aggregated samples here"):
            train(_config(tokens_per_batch=budget), data=str(tmp_path / "none"), out=tmp_path / "run",
                  config_dir=str(CONFIGS), log=lines.append)
    assert lines == ["[mtfm] warning: tokens_per_batch 287 (test) is less than the 288 tokens of a user whose "
                     "sequences are full (history 256 + realtime 32, before its exposures): each such user is a batch "
                     "of its own, over the budget, and a step's memory follows the longest user"]


def test_a_run_folder_a_live_driver_trains_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """A second driver on one run folder (a --resume of a run still training under `ray job submit`)
    would prune the other's checkpoints; a driver file left by one that died is ignored."""
    from mtfm.platform.run_lock import DRIVER_FILE, HEARTBEAT_S, STALE_S, DriverLock

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    run = tmp_path / "run"
    run.mkdir()
    with DriverLock(run):
        holder = json.loads((run / DRIVER_FILE).read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(ValueError, match=rf"run: a training driver still runs it \(host {socket.gethostname()}, "
                                             rf"pid {os.getpid()}, started .*; last heartbeat \d+ s ago\): stop it "
                                             rf"first"):
            train(_config(), data=str(tmp_path / "none"), out=run, config_dir=str(CONFIGS), log=lambda *a: None)
        # A resume before the running driver's first checkpoint: refused for the driver, not the checkpoint.
        with pytest.raises(ValueError, match=r"run: a training driver still runs it .*two drivers would prune each "
                                             r"other's checkpoints"):
            train(_config(), resume=str(run), config_dir=str(CONFIGS), log=lambda *a: None)
    assert not (run / DRIVER_FILE).exists()

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = {"host": socket.gethostname(), "pid": gone.pid, "started": "then", "token": "theirs"}
    other_host = {"host": "elsewhere", "pid": os.getpid(), "started": "then", "token": "theirs"}
    # A pid gone from this host is trusted only once the file has missed two heartbeats (containers
    # may share the host name, not the pids); another host's file only once it is stale.
    refusals = {"dead": rf"exited without releasing {DRIVER_FILE} \(killed\?\); it is released 20 s after that "
                        r"driver's last heartbeat: retry in 1\d s",
                "other_host": r"a training driver still runs it \(host elsewhere, .*\(in [56]\d s\)"}
    for name, holder, age, refused in (("dead", dead, 5, True), ("dead", dead, 2 * HEARTBEAT_S + 5, False),
                                       ("other_host", other_host, 0, True),
                                       ("other_host", other_host, STALE_S + 5, False)):
        (run / DRIVER_FILE).write_text(json.dumps(holder))
        os.utime(run / DRIVER_FILE, (time.time() - age, time.time() - age))
        with pytest.raises(ValueError if refused else FileNotFoundError,
                           match=refusals[name] if refused else "no aggregated samples here"):
            train(_config(), data=str(tmp_path / "none"), out=run, config_dir=str(CONFIGS), log=lambda *a: None)
        # a refused driver leaves the holder's file; one that went on removed the stale file and then its own
        assert (run / DRIVER_FILE).exists() == refused
    # A folder the driver made is removed again when it ends before writing into it; a driver's exit
    # removes only its own file.
    with pytest.raises(FileNotFoundError, match="no aggregated samples here"):
        train(_config(), data=str(tmp_path / "none"), out=tmp_path / "new", config_dir=str(CONFIGS),
              log=lambda *a: None)
    assert not (tmp_path / "new").exists()
    with DriverLock(run):
        (run / DRIVER_FILE).write_text(json.dumps(other_host))  # replaced under it
    assert json.loads((run / DRIVER_FILE).read_text()) == other_host

    # Of two drivers finding the same stale file at once, exactly one takes the run.
    import threading

    for _ in range(20):
        (run / DRIVER_FILE).write_text(json.dumps(other_host))
        os.utime(run / DRIVER_FILE, (time.time() - STALE_S - 5, time.time() - STALE_S - 5))
        start, held, locks = threading.Barrier(2), [], [DriverLock(run), DriverLock(run)]

        def enter(lock):
            start.wait()
            try:
                lock.__enter__()
                held.append(lock)
            except ValueError:
                pass

        racers = [threading.Thread(target=enter, args=(lock,)) for lock in locks]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
        assert len(held) == 1 and json.loads((run / DRIVER_FILE).read_text())["token"] == held[0].token
        held[0].__exit__(None, None, None)


def test_a_driver_lock_it_cannot_write_is_one_line_and_leaves_no_folders(tmp_path, monkeypatch):
    from mtfm.platform.run_lock import DriverLock

    def refused(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(DriverLock, "_create", refused)  # as on a read-only file system
    with pytest.raises(ValueError, match=r"x/a/b: cannot write \.driver\.json there \(Permission denied\)"):
        with DriverLock(tmp_path / "x" / "a" / "b"):
            pass
    assert not (tmp_path / "x").exists()  # every folder it made is removed again


def test_a_metrics_log_whose_last_line_was_cut_short_reads_without_it(tmp_path):
    """A driver killed as it wrote (or a full disk) leaves half a line: a resume drops it with the lines
    past its checkpoint, and `mtfm report` reads the rest; a bad line before the last is refused by
    file and line."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "loss": 0.5}\n{"step": 4, "ep')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    _truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: not a JSON record \(Unterminated string"):
        read_metrics(path)
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_the_train_split_has_blocks_of_at_most_rows_per_read_and_two_per_worker():
    from mtfm.platform.train_worker import EveryRowSplit

    assert EveryRowSplit.of_run(256, 2, 10**6).rows_per_block == 256  # big: rows_per_read
    assert EveryRowSplit.of_run(256, 2, 321).rows_per_block == 81  # small: 4 blocks (81, 81, 81, 78)
    assert EveryRowSplit.of_run(256, 4, 3).rows_per_block == 1  # fewer rows than workers: a worker has none
