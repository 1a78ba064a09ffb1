"""Training on Ray Train: `python -m mtfm.platform.train --config configs/train/tiny.yaml`.

The driver reads the aggregated samples with Ray Data, holds out the last `test_windows`
windows (days) for evaluation, and runs a `TorchTrainer`: each worker (`train_worker.py`) takes its Ray Data shard,
regroups it into token-budget batches (MTGR's load balance: every step a worker sees about
`tokens_per_batch` tokens, however many users that is), and trains with DDP: Adam on dense
parameters, Adagrad on the embedding tables (only rows a batch touches get a gradient, and
Adagrad leaves untouched rows exactly as they are), bf16 autocast and the Triton kernels on GPU.
A background thread (`model/prefetch.py`) collates the next batches and copies them to the
device while the current step computes. The step itself is `train_step.py`'s; with
`cuda_graphs: true` (one GPU worker) the thread also pads each batch to the run's one shape and
the step is replayed from a CUDA graph.

Every `checkpoint_every` steps and at the end, rank 0 writes a checkpoint (model, optimizers,
step, position in the epoch, registry snapshot, configs; see `checkpoint.py`) and evaluates
AUC/GAUC on the held-out windows. A worker that dies is restarted by `FailureConfig` from the
latest checkpoint, skipping the batches that checkpoint had already consumed, so the resumed run
continues the same loss curve. `--resume RUN_DIR` does the same for a whole run whose driver died.

With no RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtfm.platform.cluster import quiet_ray_data
from mtfm.platform.files import recorded_path
from mtfm.platform.registry import (FieldReader, Registry, RegistryError, dump_yaml, exposures_column,
                                    load_registry, read_yaml_mapping, resolve_config_dir)
from mtfm.platform.run_lock import DriverLock, refuse_a_folder_a_live_driver_holds
from mtfm.platform.samples import (keep_users_of, local_samples_schema, refuse_samples_that_do_not_fit,
                                   Windows, samples_folder, scenarios_in, split_by_window)

if TYPE_CHECKING:
    from mtfm.model import ModelConfig

RUNS_DIR = "runs"
# What Ray Train v2 keeps in a run's storage folder to restore the run when it starts there again.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.yaml"  # the run's train config as it ran (overrides applied); --resume reads it
EVAL_FILE = "eval.json"
WARM_START_FILE = "warm_start.json"
DIVERGED_FILE = "diverged.json"  # where the loss, weights or scores stopped being finite (rank 0 writes it)


# ---------------------------------------------------------------- the train config

@dataclass(frozen=True)
class TrainConfig:
    """One training run (`configs/train/<name>.yaml`); every field has a default but `model`."""

    name: str
    model: str                         # path of the model config (configs/model/*.yaml)
    data: str = "data/quickstart/agg"  # aggregated samples (Parquet) from `mtfm data aggregate`; the quickstart's
    test_windows: int = 1              # the last N windows (days) are held out for evaluation
    epochs: int = 1
    max_steps: int | None = None       # stop early after this many steps in total
    tokens_per_batch: int = 8192       # per worker and step
    rows_per_read: int = 256           # users fetched from Ray Data at a time, before token batching
    lr: float = 1e-3                   # Adam, dense parameters
    embedding_lr: float = 0.05         # Adagrad, embedding tables
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    cuda_graphs: bool = False          # replay each step from a CUDA graph over padded batches (one GPU worker)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    evaluate_at_checkpoints: bool = True
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0       # with use_gpu; a fraction lets small runs share one GPU
    max_failures: int = 2              # worker failures survived by restarting from the latest checkpoint
    freeze_loaded_steps: int = 0       # with --init-from: keep what it loaded frozen for this many steps
    inject_failure_at_step: int | None = None  # fault injection: a worker dies once at this step
    source: str = "<dict>"

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        raw = read_yaml_mapping(path, "train config (expected e.g. configs/train/tiny.yaml)")
        path = Path(path)
        if raw.get("name") is None:  # left out or null: the file's name
            raw["name"] = path.stem
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> "TrainConfig":
        """Validate a plain mapping (a loaded YAML file, or `to_dict`'s with overrides); an error names
        `source` and the field. As in every config, a null key takes the default, but for grad_clip (null:
        no clipping) and data (null is refused: a default folder would train on the wrong samples unsaid)."""
        fields = tuple(f.name for f in dataclasses.fields(cls) if f.name != "source")
        raw = {k: v for k, v in raw.items() if k != "source"}  # `to_dict`'s: the config's source is `source`
        unknown = [k for k in raw if k not in fields]
        if unknown and ("hta_layout" in raw or "architecture" in raw):
            raise RegistryError(source, unknown[0], "unknown key: this looks like a model config (configs/model/); a "
                                "train config names one as `model:` (e.g. configs/train/tiny.yaml)")
        f, d = FieldReader(raw, source, "", fields), {x.name: x.default for x in dataclasses.fields(cls)}
        rate, share = "a finite number >= 0", "a finite number > 0"
        retries = "an integer >= 0, or -1 to retry without limit"
        clip = "a finite number >= 0 (the largest gradient norm; 0 or null: no clipping)"
        if "data" in raw and raw["data"] is None:
            raise RegistryError(source, "data", f"expected a samples folder, found null; name one, or leave the "
                                f"key out for the quickstart's ({d['data']}); --data overrides either")
        config = cls(
            name=f.get("name", str, what="a name for the run (its folder under runs/)"),
            model=f.get("model", str, what="the path of a model config, e.g. configs/model/tiny.yaml"),
            data=f.get("data", str, d["data"]),
            test_windows=f.positive("test_windows", int, d["test_windows"]),
            epochs=f.positive("epochs", int, d["epochs"]),
            max_steps=f.get("max_steps", int, None, what="an integer >= 1 or null"),
            tokens_per_batch=f.positive("tokens_per_batch", int, d["tokens_per_batch"]),
            rows_per_read=f.positive("rows_per_read", int, d["rows_per_read"]),
            lr=f.get("lr", (int, float), d["lr"], what=rate),
            embedding_lr=f.get("embedding_lr", (int, float), d["embedding_lr"], what=rate),
            weight_decay=f.get("weight_decay", (int, float), d["weight_decay"], what=rate),
            # A null grad_clip is None (no clipping), not the default: that is for a grad_clip left out.
            grad_clip=f.get("grad_clip", (int, float), None if "grad_clip" in raw else d["grad_clip"], what=clip),
            cuda_graphs=f.get("cuda_graphs", bool, d["cuda_graphs"]),
            seed=f.positive("seed", int, d["seed"], minimum=0),
            log_every=f.positive("log_every", int, d["log_every"]),
            checkpoint_every=f.positive("checkpoint_every", int, d["checkpoint_every"]),
            keep_checkpoints=f.positive("keep_checkpoints", int, d["keep_checkpoints"]),
            evaluate_at_checkpoints=f.get("evaluate_at_checkpoints", bool, d["evaluate_at_checkpoints"]),
            num_workers=f.positive("num_workers", int, d["num_workers"]),
            use_gpu=f.get("use_gpu", bool, d["use_gpu"]),
            cpus_per_worker=f.get("cpus_per_worker", (int, float), d["cpus_per_worker"], what=share),
            gpus_per_worker=f.get("gpus_per_worker", (int, float), d["gpus_per_worker"], what=share),
            max_failures=f.get("max_failures", int, d["max_failures"], what=retries),
            freeze_loaded_steps=f.positive("freeze_loaded_steps", int, d["freeze_loaded_steps"], minimum=0),
            inject_failure_at_step=f.get("inject_failure_at_step", int, None, what="an integer >= 1 or null"),
            source=source,
        )
        if config.max_steps is not None and config.max_steps < 1:
            raise RegistryError(source, "max_steps", f"expected an integer >= 1 or null, found {config.max_steps}")
        for key in ("cpus_per_worker", "gpus_per_worker"):
            if not 0 < getattr(config, key) < math.inf:
                raise RegistryError(source, key, f"expected {share}, found {getattr(config, key)}")
        for key in ("lr", "embedding_lr", "weight_decay"):
            if not 0 <= getattr(config, key) < math.inf:
                raise RegistryError(source, key, f"expected {rate}, found {getattr(config, key)}")
        if config.grad_clip is not None and not 0 <= config.grad_clip < math.inf:
            raise RegistryError(source, "grad_clip", f"expected {clip}, found {config.grad_clip}")
        if config.max_failures < -1:
            raise RegistryError(source, "max_failures", f"expected {retries}, found {config.max_failures}")
        if config.inject_failure_at_step is not None and config.inject_failure_at_step < 1:
            raise RegistryError(source, "inject_failure_at_step",
                                f"expected an integer >= 1 or null, found {config.inject_failure_at_step}")
        if not config.name or config.name in (".", "..") or any(c in config.name for c in "/\\"):
            raise RegistryError(source, "name", f"expected a folder name for the run (runs/<name>-<time>), found "
                                f"{config.name!r}")
        if config.cuda_graphs and (not config.use_gpu or config.num_workers != 1):
            several = ("; several GPU workers step eagerly: cuda_graphs: false, as configs/train/multi_gpu.yaml has"
                       if config.num_workers != 1 else "")
            raise RegistryError(source, "cuda_graphs", "needs use_gpu: true and num_workers: 1 (DDP all-reduces "
                                f"gradients inside backward), found use_gpu {config.use_gpu}, num_workers "
                                f"{config.num_workers}{several}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_flags(self, flags: dict[str, Any]) -> "TrainConfig":
        """This config with command-line values (field -> value; None: not given) in place of its own,
        checked as the file's are; its source names them ("tiny.yaml with --max-steps 40"), so that a
        refusal says where a value came from."""
        given = {key: value for key, value in flags.items() if value is not None}
        if not given:
            return self
        named = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in given.items())
        return TrainConfig.from_dict(self.to_dict() | given, f"{self.source} with {named}")


class TrainingDiverged(ValueError):
    """The loss, weights or scores stopped being finite; the run stopped there without saving the weights."""


# ---------------------------------------------------------------- the run folder's files

def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (none if there is no file). A last line cut short (a
    driver killed as it wrote, a full disk) is left out; a bad line before it is refused by file
    and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the write that was cut short: what it held was never saved
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({exc.msg}); remove that line") from exc
    return records


# ---------------------------------------------------------------- the driver

def default_run_dir(name: str) -> Path:
    return Path(RUNS_DIR) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def refuse_existing_run(run_dir: Path) -> None:
    """A new run is not started in a folder that holds one: Ray Train would restore that run from
    its snapshot there and the "new" run would silently be the old one, continued."""
    from mtfm.platform.checkpoint import CHECKPOINT_PREFIX, META_FILE

    held = sorted(p.name for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / META_FILE).is_file())
    if held or (run_dir / RAY_TRAIN_SNAPSHOT).exists():
        raise FileExistsError(f"{run_dir} holds a run already ({held[-1] if held else 'a Ray Train snapshot'}): "
                              f"--resume {run_dir} continues it; choose another run folder for a new run")


def train(config: TrainConfig, *, data: str | None = None, out: str | Path | None = None,
          resume: str | Path | None = None, init_from: str | Path | None = None, config_dir: str | None = None,
          log=print) -> Path:
    """Run one training job; returns the run folder (checkpoints, metrics.jsonl, eval.json).

    resume: continue that run folder from its newest checkpoint (same scenarios required).
    init_from: start a new run from a checkpoint's weights (warm start): what the registry adds
    is initialised fresh, what it retired is skipped (see `checkpoint.warm_start`).
    """
    from mtfm.platform.cluster import init_ray, say_when_ray_train_stops_for_ctrl_c

    plan = _plan_run(config, data=data, out=out, resume=resume, init_from=init_from, config_dir=config_dir, log=log)
    config, run_dir = plan.config, plan.run_dir
    with DriverLock(run_dir):  # refuses a folder a live driver trains; held until this driver ends
        if resume is None:
            refuse_existing_run(run_dir)
        schema = local_samples_schema(config.data)  # named before Ray starts (None for a URI)
        if schema is not None:
            refuse_samples_the_model_cannot_read(plan, schema)

        init_ray(log_to_driver=True)
        refuse_workers_the_cluster_cannot_hold(config, log)
        quiet_ray_data()
        train_ds, test_ds, windows = _samples_to_train_on(plan, log)
        if windows.train_rows < config.num_workers:  # a worker with no sample has no batch to stand in with
            raise ValueError(f"{config.data}: the training windows hold {windows.train_rows} sample(s) of the model's "
                             f"scenarios, fewer than the {config.num_workers} workers, each of which needs one: "
                             + ("aggregate more logs" if not windows.train_rows else
                                f"--num-workers {windows.train_rows} or fewer"))
        _start_run_folder(plan, windows, log)
        trainer = _trainer(plan, train_ds, test_ds, _windows_trained_on(plan, windows, log), windows.train_rows)
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # a resume tries again
        say_when_ray_train_stops_for_ctrl_c()
        result = _fit(trainer, run_dir, log)
        _report_result(result, plan, log)
        return run_dir


@dataclass(frozen=True)
class RunPlan:
    """A run as checked before Ray starts: its train config (with absolute paths), registry and model
    config, its folder, and the checkpoints it starts from."""

    config: TrainConfig
    registry: Registry
    model_config: "ModelConfig"
    run_dir: Path
    resume_from: Path | None  # the newest checkpoint of the run that --resume continues
    init_from: Path | None  # the checkpoint that --init-from warm starts from
    samples_fingerprint: str | None  # of local samples that can be listed

    @property
    def scenarios(self) -> list[str]:
        """The scenarios the model covers."""
        return list(self.model_config.scenarios or self.registry.scenarios)


def _plan_run(config: TrainConfig, *, data: str | None, out: str | Path | None, resume: str | Path | None,
              init_from: str | Path | None, config_dir: str | None, log) -> RunPlan:
    """The run `train`'s arguments describe, refused where it cannot start or go on, said where it
    differs from what they may lead one to expect."""
    from mtfm.model import load_model_config
    from mtfm.model.config import restrict_registry

    config = _with_samples(config, data, resume, log)
    if resume is not None and config_dir is None and not os.environ.get("MTFM_CONFIG_DIR"):
        config_dir = _resumed_runs_config_dir(resume, log)
    registry = load_registry(config_dir)
    if resume is not None:  # before the model config, which a resume may take from the run's checkpoint
        refuse_a_checkpoint_to_resume(resume)
        refuse_a_folder_a_live_driver_holds(Path(resume))
    if Path(config.model).is_file():
        config = TrainConfig.from_dict(config.to_dict() | {"model": _absolute(config.model)}, config.source)
        model_config = load_model_config(config.model)
    else:
        model_config = _resumed_runs_model_config(config, resume, log)
    restrict_registry(registry, model_config.scenarios, model_config.source)  # its scenarios are registered
    # Local samples only: a URI is not read before Ray starts (it may need the cluster's credentials).
    fingerprint = None if "://" in config.data else _fingerprint_or_none(config.data)
    resume_from = None
    if resume is not None:
        resume_from = _checkpoint_to_resume(resume, out, config, registry, model_config, fingerprint, log)
        out = Path(resume)
    if init_from is not None:
        init_from = _checkpoint_to_warm_start_from(init_from, registry, model_config, log)
    run_dir = Path(out or default_run_dir(config.name)).resolve()
    if config.freeze_loaded_steps and init_from is None and (resume is None or _warm_start_record(run_dir) is None):
        log(f"[mtfm] warning: freeze_loaded_steps {config.freeze_loaded_steps} ({config.source}) has no effect: "
            "nothing is warm-started (--init-from CHECKPOINT)")
    _warn_of_a_budget_below_one_user(config, registry, log)
    if "_ray_pkg_" in str(run_dir):  # `ray job submit --working-dir .` runs in Ray's copy of it
        raise ValueError(f"--out {run_dir}: inside the copy of the job's working directory that Ray made and deletes "
                         "with the job, so the run would be lost; pass --out on storage every node sees (an absolute "
                         "path, e.g. /shared/runs/NAME)")
    return RunPlan(config, registry, model_config, run_dir, resume_from, init_from, fingerprint)


def _warn_of_a_budget_below_one_user(config: TrainConfig, registry: Registry, log) -> None:
    """tokens_per_batch below the tokens of a user whose sequences are full: such a user is a batch of its own,
    over the budget, so a step's memory follows the longest user rather than the budget."""
    full = {name: s.max_len for name, s in registry.sequences.items()}
    if config.tokens_per_batch < sum(full.values()):
        log(f"[mtfm] warning: tokens_per_batch {config.tokens_per_batch} ({config.source}) is less than the "
            f"{sum(full.values())} tokens of a user whose sequences are full "
            f"({' + '.join(f'{name} {n}' for name, n in full.items())}, before its exposures): each such user is "
            "a batch of its own, over the budget, and a step's memory follows the longest user")


def _with_samples(config: TrainConfig, data: str | None, resume: str | Path | None, log) -> TrainConfig:
    """The config with the samples to train on (--data, else a resumed run's own, else the config's),
    as an absolute path: the run's train_config.yaml is read by `--resume` and `mtfm eval` from any folder."""
    if data is None and resume is not None and (Path(resume) / TRAIN_CONFIG_FILE).is_file():
        # A resume keeps its run's samples unless --data says otherwise: `--config NEW` changes rates
        # and limits, and its `data:` is whatever the file it was copied from said.
        data = read_yaml_mapping(Path(resume) / TRAIN_CONFIG_FILE).get("data")
        if data is not None and _absolute(config.data) != _absolute(data):
            log(f"[mtfm] note: --resume {resume} keeps its samples, {data} ({config.source}'s data: {config.data} "
                "is not used; --data names others)")
    data = config.data if data is None else data
    return TrainConfig.from_dict(config.to_dict() | {"data": _absolute(data)}, config.source)


def _checkpoint_to_resume(resume: str | Path, out: str | Path | None, config: TrainConfig, registry: Registry,
                          model_config: "ModelConfig", fingerprint: str | None, log) -> Path:
    """The newest checkpoint of the run folder `resume`, refused where the run cannot go on from it
    with this model config, registry, train config and samples."""
    from mtfm.platform.checkpoint import (check_compatible, check_optimizer_file, find_checkpoint, read_meta,
                                          registry_changes, trained_registry)

    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(f"--resume {resume} continues that run in its own folder: --out {out} does not apply")
    resume_from = check_optimizer_file(find_checkpoint(resume).resolve())
    meta = read_meta(resume_from)
    check_compatible(meta, registry, str(resume_from))
    trained = meta.model_config
    differ = model_config_changes(trained, model_config)
    if differ:
        raise ValueError(f"--resume {resume}: its checkpoint's model {trained.get('name')!r} differs from the "
                         f"model of {config.source} ({config.model}) in {', '.join(differ)}; resume with the "
                         "model config it was trained with (its checkpoint's meta.json holds a copy), or start "
                         "a new run from it with --init-from")
    model_changes, cuts = registry_changes(trained_registry(meta, f"--resume {resume} ({resume_from})"), registry,
                                           model_config.scenarios)
    if model_changes:
        raise ValueError(f"--resume {resume}: the registry ({registry.config_dir}) differs from the one its "
                         f"checkpoint was trained with, in {'; '.join(model_changes)}; resume with the run's "
                         f"registry (`mtfm scenarios export --checkpoint {resume} --out DIR` writes it; then "
                         "--config-dir DIR), or start a new run from it with --init-from")
    _refuse_an_epoch_cut_differently(resume, meta, config, cuts, fingerprint, log)
    _check_what_is_left_to_train(resume, meta, config, log)
    return resume_from


def _refuse_an_epoch_cut_differently(resume: str | Path, meta, config: TrainConfig, cuts: list[str],
                                     fingerprint: str | None, log) -> None:
    """`cuts` (the registry's changes that cut the batches differently), with the train config's and
    the samples' since the checkpoint: refused in the middle of an epoch, whose place would be lost;
    said at an epoch's start."""
    cuts = cuts + [f"{key}: {meta.train_config[key]} -> {getattr(config, key)}" for key in BATCHING
                   if key in meta.train_config and meta.train_config[key] != getattr(config, key)]
    if "data" in meta.train_config and _absolute(meta.train_config["data"]) != config.data:
        cuts.append(f"data: {meta.train_config['data']} -> {config.data}")
    elif meta.batches_in_epoch and meta.samples_fingerprint and fingerprint and meta.samples_fingerprint != fingerprint:
        cuts.append(f"the samples at {config.data}: written again (their parts' names or sizes differ)")
    if meta.batches_in_epoch and cuts:
        raise ValueError(f"--resume {resume}: it stopped after batch {meta.batches_in_epoch} of epoch "
                         f"{meta.epoch + 1}, and {'; '.join(cuts)} since: the epoch's batches would be cut "
                         "differently (or come from other data) and its place in the epoch lost; resume with "
                         "what it stopped with until the epoch ends (the train config: its train_config.yaml; "
                         "the registry: its checkpoint's meta.json)")
    if cuts:
        log(f"[mtfm] note: --resume {resume} at an epoch's start with {'; '.join(cuts)}")


def _check_what_is_left_to_train(resume: str | Path, meta, config: TrainConfig, log) -> None:
    """A resume whose epochs or max_steps are lowered is said; one with nothing left to train is refused."""
    shorter = []
    for key in ("epochs", "max_steps"):  # a limit lowered: said, where --epochs and --max-steps usually extend
        before, now = meta.train_config.get(key), getattr(config, key)
        if before is not None and now is not None and now < before:
            shorter.append(f"{key} {before} -> {now}")
    if shorter:
        log(f"[mtfm] note: --resume {resume} ends the run sooner than it was started to: {'; '.join(shorter)}")
    epochs_before, max_steps_before = meta.train_config.get("epochs"), meta.train_config.get("max_steps")
    if max_steps_before is not None and config.max_steps == max_steps_before and epochs_before is not None \
            and config.epochs > epochs_before:
        log(f"[mtfm] note: --resume {resume} with epochs {epochs_before} -> {config.epochs}: the run's max_steps "
            f"{config.max_steps} ({config.source}) still ends it at step {config.max_steps}, which may come first; "
            "pass --max-steps to raise it")
    if config.max_steps is not None and meta.step >= config.max_steps:
        raise ValueError(f"--resume {resume}: it is at step {meta.step} and max_steps is {config.max_steps} "
                         f"({config.source}): nothing to train; raise --max-steps to go on")
    if meta.epoch >= config.epochs:
        raise ValueError(f"--resume {resume}: it has completed {meta.epoch} epoch(s) and {config.source} trains "
                         f"{config.epochs}: nothing to train; raise its epochs (--epochs) to go on")


def _checkpoint_to_warm_start_from(init_from: str | Path, registry: Registry, model_config: "ModelConfig",
                                   log) -> Path:
    """The checkpoint --init-from names (or a run folder's newest), refused where warm start cannot load it."""
    from mtfm.platform.checkpoint import find_checkpoint, read_meta

    checkpoint = find_checkpoint(init_from).resolve()
    changes = check_warm_start(checkpoint, registry, model_config)
    if changes:
        kinds = [c.split(":")[0] for c in changes if re.fullmatch(r"sequences\.\w+\.kind: .*", c)]
        log(f"[mtfm] note: the registry ({registry.config_dir}) differs from the one {checkpoint} was trained with, "
            f"in {'; '.join(changes)}. The warm start loads each group's features by name: added ones start at "
            "zero weights (a group with features only added or reordered tokenizes as trained until they train), "
            "changed ones at zero weights with a fresh table, removed ones are dropped; new tasks get fresh heads"
            + (f"; {', '.join(kinds)} changed which tokens see its events, so every score changes" if kinds else ""))
    retired = sorted(set(read_meta(checkpoint).scenarios) - set(registry.scenarios))
    if retired:
        log(f"[mtfm] warning: {checkpoint} has scenarios the registry no longer declares: {retired}; their "
            "modules are not loaded (they stay in that checkpoint)")
    return checkpoint


def _samples_to_train_on(plan: RunPlan, log):
    """The train and test sets (Ray Data) of the model's scenarios' users, and the windows the samples hold;
    samples that lack what the model reads are refused."""
    config, registry, model_config = plan.config, plan.registry, plan.model_config
    train_ds, test_ds, windows = split_by_window(config.data, config.test_windows)
    schema = train_ds.schema().base_schema
    in_data = scenarios_in(schema.names)
    if in_data - set(registry.scenarios):
        log(f"[mtfm] warning: the samples hold exposures of scenarios not in the registry, ignored: "
            f"{sorted(in_data - set(registry.scenarios))} (retired, or a --config-dir mismatch?)")
    model_scenarios = plan.scenarios
    refuse_samples_the_model_cannot_read(plan, schema)
    if in_data - set(model_scenarios):
        # EveryRowSplit sizes its blocks for the rows trained on: sized for every row, a train set the filter
        # leaves under half of may come in fewer blocks than workers, and a worker with none ends every epoch
        # for all of them. Counted on the exposure columns alone.
        exposures = [exposures_column(s) for s in model_scenarios if exposures_column(s) in schema.names]
        windows = windows._replace(
            train_rows=keep_users_of(train_ds.select_columns(exposures), model_scenarios).count())
        train_ds, test_ds = keep_users_of(train_ds, model_scenarios), keep_users_of(test_ds, model_scenarios)
        log(f"[mtfm] model {model_config.name} covers {model_scenarios}: training and evaluating on their users "
            "only")
    return train_ds, test_ds, windows


def refuse_samples_the_model_cannot_read(plan: RunPlan, schema) -> None:
    """Samples (their Arrow schema) that lack what the run's model reads are refused, naming what: the workers'
    collator would fail on missing columns, each failure retried."""
    config, registry, model_config = plan.config, plan.registry, plan.model_config
    in_data = scenarios_in(schema.names)
    refuse_samples_that_do_not_fit(
        schema, config.data, registry, plan.scenarios,
        whose=f"model {model_config.name} (registered in {registry.config_dir})",
        remedy=("aggregate the raw logs again with this registry (`mtfm data aggregate --config-dir "
                f"{registry.config_dir} --raw RAW --out AGG`)"),
        remedy_for_scenarios=(f", or train a model of the scenarios the samples hold, "
                              f"{sorted(in_data & set(plan.scenarios))} (a model config's `scenarios:`)"),
        config_dir_flag=True)


def _start_run_folder(plan: RunPlan, windows: Windows, log) -> None:
    """The run folder with the train config as it runs; the run's line."""
    config, model_config, run_dir = plan.config, plan.model_config, plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRAIN_CONFIG_FILE).write_text(dump_yaml(config.to_dict(), sort_keys=False))
    layout = f", layout {model_config.hta_layout}" if model_config.architecture == "mtfm" else ""  # baselines: none
    gpu = " with GPU" if config.use_gpu else ""
    if config.use_gpu and config.num_workers > 1 and ddp_backend(config.use_gpu, config.gpus_per_worker) == "gloo":
        gpu += f" ({config.gpus_per_worker:g} each: DDP over gloo, as NCCL needs a GPU of its own per worker)"
    log(f"[mtfm] run {run_dir}\n[mtfm] scenarios {plan.scenarios}; windows {len(windows.train) + len(windows.test)} "
        f"({len(windows.train)} train, {len(windows.test)} test); model {model_config.name} "
        f"({model_config.architecture}{layout}); {config.num_workers} worker(s){gpu}")


def _windows_trained_on(plan: RunPlan, windows: Windows, log) -> list[int] | None:
    """The windows the run's checkpoints record as trained on: its training windows and those of the checkpoints
    it continues (--resume) or starts from (--init-from); a test window among the latter is warned of. None where
    one of those does not record its windows (written before they were): `mtfm eval` then guesses, as for it."""
    from mtfm.platform.checkpoint import read_meta

    earlier: set[int] = set()
    for source in (plan.resume_from, plan.init_from):
        recorded = None if source is None else read_meta(source).trained_windows
        if source is not None and recorded is None:
            log(f"[mtfm] note: {source} does not record the windows it trained on, so this run's checkpoints do not "
                "either: `mtfm eval` cannot tell whether their test windows were trained on")
            return None
        earlier |= set(recorded or ())
    seen = sorted(earlier & set(windows.test))
    if seen:
        days = ", ".join(time.strftime("%Y-%m-%d", time.gmtime(w / 1000)) for w in seen)
        log(f"[mtfm] warning: test window(s) starting {days} were trained on by the checkpoint this run continues or "
            "starts from: their evaluation is not held out")
    return sorted(earlier | set(windows.train))


def ddp_backend(use_gpu: bool, gpus_per_worker: float) -> str:
    """torch.distributed's backend for the workers: NCCL for GPU workers, one GPU each; gloo on CPUs, and for GPU
    workers that share GPUs (`gpus_per_worker` below 1), which NCCL refuses ("invalid usage") when two ranks land
    on one GPU. gloo all-reduces CUDA tensors through the host: slower, but it runs."""
    return "nccl" if use_gpu and gpus_per_worker >= 1 else "gloo"


def _trainer(plan: RunPlan, train_ds, test_ds, trained_windows: list[int] | None, train_rows: int):
    """The TorchTrainer of the run: `train_loop_per_worker` on `num_workers` workers, restarted from the
    newest checkpoint on a worker's failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtfm.platform.checkpoint import read_meta
    from mtfm.platform.train_worker import EveryRowSplit, train_loop_per_worker

    config, run_dir = plan.config, plan.run_dir
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=TorchConfig(backend=ddp_backend(config.use_gpu, config.gpus_per_worker)),
        train_loop_config={"train_config": config.to_dict(), "registry": plan.registry.to_dict(),
                           "model_config": plan.model_config.to_dict(), "run_dir": str(run_dir),
                           "init_from": str(plan.init_from) if plan.init_from else None,
                           "samples_fingerprint": plan.samples_fingerprint or _fingerprint_or_none(config.data),
                           "trained_windows": trained_windows,
                           "resume_from": str(plan.resume_from) if plan.resume_from else None,
                           "resume_step": read_meta(plan.resume_from).step if plan.resume_from else None,
                           "warm_start_record": _warm_start_record(run_dir) if plan.resume_from else None},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker} | (
                                         {"GPU": config.gpus_per_worker} if config.use_gpu else {})),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints)),
        datasets={"train": train_ds, "test": test_ds},
        dataset_config=EveryRowSplit.of_run(config.rows_per_read, config.num_workers, train_rows),
    )


def _fit(trainer, run_dir: Path, log):
    """The trainer's result; an interrupt says what the run left and how to go on from it."""
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C, or a SIGTERM (`ray job stop`, kill): Ray's handlers abort the run and exit through
        # SystemExit (code 1 either way in Ray 2.60); the run can go on from its newest whole checkpoint.
        log(_interrupted(run_dir))
        raise KeyboardInterrupt from None
    if result.error:
        raise result.error
    return result


def _report_result(result, plan: RunPlan, log) -> None:
    """The final evaluation's table and the steps trained; a run that diverged is TrainingDiverged."""
    config, run_dir = plan.config, plan.run_dir
    if (run_dir / DIVERGED_FILE).is_file():
        diverged = json.loads((run_dir / DIVERGED_FILE).read_text())
        what = {"loss": f"the loss was {diverged['value']}", "weights": "the weights were not finite",
                "scores": "the model's scores were not finite (an overflow)"}[diverged["what"]]
        then = (f"its newest checkpoint, {result.checkpoint.path}, is from before: --resume {run_dir} with the new "
                "config goes on from there, or train anew" if result.checkpoint
                else "no checkpoint was saved before it: train anew")
        raise TrainingDiverged(
            f"training diverged: {what} at step {diverged['step']}, so the run stopped there, saving nothing more. "
            f"Lower lr ({config.lr}) or embedding_lr ({config.embedding_lr}), or clip the gradients (grad_clip, "
            f"now {config.grad_clip}); {then}")
    eval_path = run_dir / EVAL_FILE
    if eval_path.exists():
        from mtfm.platform.eval import format_table

        final = json.loads(eval_path.read_text())
        log(format_table(final["eval"], final.get("not_evaluated", ())))
    _warn_of_untrained_scenarios(run_dir, (result.metrics or {}).get("step"), log)  # after the table: seen
    saved = result.checkpoint.path if result.checkpoint else None
    steps = (result.metrics or {}).get("step")
    ended = ""
    if config.max_steps is not None and isinstance(steps, int) and steps < config.max_steps:
        ended = f" (its {config.epochs} epoch(s) ended before max_steps {config.max_steps})"
    elif config.max_steps is not None and saved is not None:
        from mtfm.platform.checkpoint import read_meta

        meta = read_meta(Path(saved))  # its epoch: the epochs completed
        if meta.epoch < config.epochs:
            where = (f"in epoch {meta.epoch + 1}" if meta.batches_in_epoch else f"after epoch {meta.epoch}")
            ended = (f" (max_steps {config.max_steps} stopped it {where} of {config.epochs}: --resume {run_dir} "
                     "--max-steps N goes on)")
    log(f"[mtfm] done: {steps} steps{ended}; checkpoint {saved}")


def _warn_of_untrained_scenarios(run_dir: Path, last_step: int | None, log) -> None:
    """A scenario of the model that no batch of the run held exposures of: its own modules got no
    gradient (as initialised, or as a warm start loaded them), and the evaluation has no row for it.
    From the count the run's workers recorded at `last_step`: only a run trained from its first step
    records one (a resumed attempt counts only its own batches)."""
    path = run_dir / METRICS_FILE
    records = [r for r in read_metrics(path) if "run_exposures_trained" in r and r["step"] == last_step]
    unseen = [s for s, n in records[-1]["run_exposures_trained"].items() if n == 0] if records else []
    if unseen:
        log(f"[mtfm] warning: no exposure of scenario(s) {unseen} in the {last_step} steps trained: their own "
            "modules (tokenizer, GLN group, gates, towers) got no gradient; their logs may not reach the training "
            "windows, or their table was missing when aggregating")


READ_CPUS = 1.0  # what one of Ray Data's read tasks asks for: training stalls without it


def refuse_workers_the_cluster_cannot_hold(config: TrainConfig, log,
                                           remedy: str = "--num-workers, or the train config's cpus_per_worker; on a "
                                                         "machine without a GPU, use_gpu: false") -> None:
    """Ray Train would wait for resources that never come, retrying every minute, and Ray Data's
    reads for a CPU the workers all took: refuse up front on the embedded Ray, warn on a cluster
    (an autoscaler may add nodes). On a cluster that could hold them but whose resources other work
    holds now (a Serve app), Ray Train waits as well, printing a traceback a minute: warned of."""
    from mtfm.platform.cluster import bundles_that_fit, is_embedded

    import ray

    bundle = {"CPU": config.cpus_per_worker} | ({"GPU": config.gpus_per_worker} if config.use_gpu else {})
    fit, cluster = bundles_that_fit(bundle)
    fields = "num_workers, cpus_per_worker" + (", use_gpu, gpus_per_worker" if config.use_gpu else "")
    taken = config.num_workers * config.cpus_per_worker
    left = ray.cluster_resources().get("CPU", 0.0) - taken
    if fit < config.num_workers:
        what = (f"{config.num_workers} worker(s) of {' + '.join(f'{v:g} {k}' for k, v in bundle.items())} each "
                f"({fields}), but the Ray cluster has {cluster}: room for {fit}")
    elif left < READ_CPUS - 1e-9:
        what = (f"{config.num_workers} worker(s) of {config.cpus_per_worker:g} CPU each ({fields}) take {taken:g} of "
                f"the Ray cluster's {cluster}, leaving {max(left, 0.0):g} CPU: Ray Data's reads, which feed the "
                f"workers, need {READ_CPUS:g} and would wait for ever")
    else:
        if not is_embedded():
            _warn_of_resources_held_by_other_work(config, taken, log)
        return
    if is_embedded():
        raise RegistryError(config.source, "num_workers", f"{what}; lower them ({remedy}), or run on a cluster that "
                            "has them (RAY_ADDRESS)")
    log(f"[mtfm] warning: {config.source}: {what}; Ray Train waits for nodes to join (an autoscaler) and retries "
        "every minute")


def _warn_of_resources_held_by_other_work(config: TrainConfig, cpus: float, log) -> None:
    import ray

    gpus = {"GPU": config.num_workers * config.gpus_per_worker} if config.use_gpu else {}
    needed = {"CPU": cpus + READ_CPUS} | gpus
    free = ray.available_resources()
    short = [f"{free.get(key, 0.0):g} {key} of the {need:g} needed" for key, need in needed.items()
             if free.get(key, 0.0) < need - 1e-9]
    if not short:
        return
    workers_fit = free.get("CPU", 0.0) >= cpus - 1e-9 and (
        not config.use_gpu or free.get("GPU", 0.0) >= needed["GPU"] - 1e-9)
    waits = ("the workers start, but Ray Data's reads, which feed them, wait for a CPU" if workers_fit else
             f"the {config.num_workers} worker(s) start once enough is free, Ray Train retrying every minute")
    log(f"[mtfm] warning: the Ray cluster has {', '.join(short)} free now (other work holds the rest, such as a "
        f"Serve app: `ray status`): {waits}")


# Train-config fields that decide how an epoch is cut into batches (rows_per_read through the blocks the
# train set is split into, `EveryRowSplit`): a resume mid-epoch keeps them.
BATCHING = ("num_workers", "tokens_per_batch", "test_windows", "rows_per_read")


# Model-config fields a run from a checkpoint (--resume, --init-from) may change: none shapes a parameter
# or what the model computes in evaluation (dropout acts in training only).
FREE_MODEL_FIELDS = frozenset({"name", "attention_impl", "norm_impl", "compute_dtype", "dropout",
                               "recompute_target_context"})


def model_config_changes(trained: dict, given, also_free: frozenset = frozenset()) -> list[str]:
    """The fields in which model config `given` differs from a checkpoint's record of its own (`trained`,
    its meta.json's), leaving out FREE_MODEL_FIELDS and `also_free`."""
    now = given.to_dict()
    return sorted(k for k in now if k not in FREE_MODEL_FIELDS | also_free and k in trained and trained[k] != now[k])


def check_warm_start(checkpoint: Path, registry: Registry, model_config) -> list[str]:
    """Before Ray: warm start loads the modules of the sequences and scenarios both the checkpoint's
    registry and this one declare, so the model config must be the one the checkpoint was trained
    with (but for its scenarios and FREE_MODEL_FIELDS). Returns how the registries differ where both
    declare a group ("<where>: <trained> -> <current>"): features, a sequence's kind, the tasks, which
    `checkpoint.warm_start` takes in (new and changed features start at zero weights, new tasks fresh)."""
    from mtfm.platform.checkpoint import META_FILE, CheckpointError, read_meta, registry_changes, trained_registry

    meta = read_meta(checkpoint)
    given = model_config.to_dict()
    differ = model_config_changes(meta.model_config, model_config, frozenset({"scenarios"}))
    if differ:
        raise CheckpointError(f"--init-from {checkpoint}: its model {meta.model_config.get('name')!r} differs from "
                              f"{model_config.source} in " + ", ".join(f"{k} ({meta.model_config[k]} -> {given[k]})"
                                                                      for k in differ)
                              + f"; warm start needs the model config it was trained with (its {META_FILE} holds "
                              "it), with scenarios added")
    scenarios = model_config.scenarios or list(registry.scenarios)
    trained = trained_registry(meta, f"--init-from {checkpoint}")
    # Only the scenarios both models have modules of: the snapshot holds every registered one.
    trained_scenarios = meta.model_config.get("scenarios") or list(trained.scenarios)
    shared = [s for s in scenarios if s in trained_scenarios]
    return [c for c in registry_changes(trained, registry, shared)[0]
            if not re.fullmatch(r"sequences\.\w+: (added|removed)", c)]


def _interrupted(run_dir: Path) -> str:
    """What an interrupted run left, and how to go on from it."""
    from mtfm.platform.checkpoint import (CHECKPOINT_PREFIX, CheckpointError, check_model_file, check_optimizer_file,
                                          read_meta)

    cut_short = []  # an interrupt can land while Ray copies a checkpoint in
    for folder in sorted((p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), reverse=True):
        try:
            step = read_meta(check_optimizer_file(check_model_file(folder))).step
        except (CheckpointError, FileNotFoundError):
            cut_short.append(folder.name)
            continue
        remove = f"remove {', '.join(cut_short)} (cut short by the interrupt), then " if cut_short else ""
        return (f"[mtfm] interrupted: the newest whole checkpoint is {folder} (step {step}); {remove}"
                f"`mtfm train --resume {run_dir}` continues from it")
    if (run_dir / RAY_TRAIN_SNAPSHOT).exists():  # a new run there would be refused (`refuse_existing_run`)
        return (f"[mtfm] interrupted before a whole checkpoint was saved in {run_dir}: nothing to resume; start "
                "again in another run folder, or after removing that one")
    return (f"[mtfm] interrupted before a whole checkpoint was saved in {run_dir}: nothing to resume; the same "
            "command starts the run again there")


def _resumed_runs_config_dir(resume: str | Path, log) -> str | None:
    """The config dir a resumed run was started with (its newest checkpoint records it), where no
    --config-dir or $MTFM_CONFIG_DIR names one and that folder is here; else None (the default)."""
    from mtfm.platform.checkpoint import CheckpointError, find_checkpoint, read_meta, trained_config_dir

    try:
        recorded = trained_config_dir(read_meta(find_checkpoint(resume)))
    except (CheckpointError, FileNotFoundError):  # no checkpoint yet: refused by name further on
        return None
    if recorded is None or Path(recorded).resolve() == resolve_config_dir(None).resolve():
        return None
    if not Path(recorded).is_dir():  # removed since, or relative to another folder (recorded so before 2026-12-06)
        where = "" if Path(recorded).is_absolute() else f" ({Path(recorded).resolve()})"
        log(f"[mtfm] note: --resume {resume}: the config dir the run was started with, {recorded}, is not here"
            f"{where}; the registry of {resolve_config_dir(None)} is used (pass --config-dir to use another)")
        return None
    log(f"[mtfm] note: --resume {resume}: the registry of {recorded}, the config dir the run was started with "
        "(pass --config-dir to use another)")
    return recorded


def _resumed_runs_model_config(config: TrainConfig, resume: str | Path | None, log) -> "ModelConfig":
    """The model config of a run resumed with its own train_config.yaml whose `model:` file is gone:
    a run submitted by `ray job submit --working-dir .` names the model config in Ray's copy of the
    working directory, deleted with the job. Its checkpoint's meta.json holds the model it trained."""
    from mtfm.platform.checkpoint import META_FILE, find_checkpoint, trained_model_config

    runs_own = Path(resume or "") / TRAIN_CONFIG_FILE
    if resume is None or not runs_own.is_file() or read_yaml_mapping(runs_own).get("model") != config.model:
        relative = "" if Path(config.model).is_absolute() else f" (a path from the current folder, {Path.cwd()})"
        raise RegistryError(config.source, "model", f"model config file {config.model} not found{relative}; expected "
                            "e.g. configs/model/tiny.yaml")
    checkpoint = find_checkpoint(resume)
    log(f"[mtfm] note: --resume {resume}: its model config {config.model} is gone (Ray's copy of a job's working "
        f"directory?); the run goes on with the model its checkpoint recorded ({checkpoint / META_FILE})")
    return trained_model_config(checkpoint)


def refuse_a_checkpoint_to_resume(resume: str | Path) -> None:
    from mtfm.platform.checkpoint import META_FILE

    if (Path(resume) / META_FILE).is_file():
        raise ValueError(f"--resume takes a run folder, not one of its checkpoints ({resume}); --init-from "
                         "starts a new run from one checkpoint")


def _fingerprint_or_none(data: str) -> str | None:
    """`samples_fingerprint` of the samples (their --out folder or samples/); None where they cannot be listed."""
    from mtfm.platform.samples import samples_fingerprint

    try:
        return samples_fingerprint(samples_folder(data))
    except (OSError, ValueError):  # FileNotFoundError included: refused, by name, where the samples are read
        return None


def _absolute(path: str) -> str:
    """A local path made absolute (but in a job's copy of its working directory: `recorded_path`); a URI as it is."""
    return path if "://" in path else recorded_path(Path(path).resolve())


def _warm_start_record(run_dir: Path) -> dict | None:
    """What a warm-started run loaded (its warm_start.json: the tensors, and the columns of the first
    layers loaded by feature), for a resume to keep them frozen."""
    path = run_dir / WARM_START_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {"loaded": record["loaded"], "kept_columns": record.get("kept_columns", {})}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="CFG",
                        help="train config, e.g. configs/train/tiny.yaml (with --resume, default: the run's own "
                             "train_config.yaml)")
    parser.add_argument("--data", default=None, metavar="AGG_DIR",
                        help="aggregated samples (the --out of `mtfm data aggregate`); default: the config's `data`")
    parser.add_argument("--out", "--run-dir", dest="out", default=None, metavar="RUN_DIR",
                        help="run folder (default: runs/<name>-<time>; --run-dir, as `mtfm quickstart` calls it, is "
                             "the same); under `ray job submit`, an absolute path on storage every node sees")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue a run from its newest checkpoint (same run folder); a finished run goes on "
                             "only with more --epochs or --max-steps")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="warm start a new run from a checkpoint or run folder: shared modules and known "
                             "scenarios load, scenarios new to the registry start fresh, retired ones are skipped")
    from mtfm.platform.cli import positive_int

    parser.add_argument("--num-workers", type=positive_int, default=None, help="override the config's num_workers")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="override the config's max_steps")
    parser.add_argument("--epochs", type=positive_int, default=None, help="override the config's epochs")
    parser.add_argument("--test-windows", type=positive_int, default=None, metavar="N",
                        help="override the config's test_windows (the last N windows held out for evaluation)")


def run_from_args(args: argparse.Namespace) -> int:
    from mtfm.platform.rawlog import refuse_a_file_for_a_folder

    if args.out is not None:  # before Ray starts (Ray Train's storage would fail on it after)
        refuse_a_file_for_a_folder(Path(args.out), f"--out {args.out}")
    if args.config is None:
        if args.resume is None:
            raise ValueError("--config CFG is needed to start a run (e.g. configs/train/tiny.yaml); only --resume "
                             "can take the run's own")
        refuse_a_checkpoint_to_resume(args.resume)
        if not Path(args.resume).is_dir():
            found = "a file" if Path(args.resume).exists() else "not found"
            raise FileNotFoundError(f"--resume {args.resume}: {found} (expected a run folder, e.g. runs/tiny-<time>)")
        args.config = Path(args.resume) / TRAIN_CONFIG_FILE
        if not args.config.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no train_config.yaml there (not a run folder?); "
                                    "pass --config")
    config = TrainConfig.load(args.config).with_flags({"num_workers": args.num_workers, "max_steps": args.max_steps,
                                                       "epochs": args.epochs, "test_windows": args.test_windows})
    if args.resume and args.init_from:
        raise ValueError("--resume continues a run, --init-from starts a new one from a checkpoint: pass one of them")
    train(config, data=args.data, out=args.out, resume=args.resume, init_from=args.init_from,
          config_dir=args.config_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mtfm.platform.train ARGS` (as `ray job submit` runs it) is `mtfm train ARGS`."""
    from mtfm.platform.cli import main as mtfm_main

    return mtfm_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
