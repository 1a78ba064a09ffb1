"""What each Ray Train worker of a run does (`train_loop_per_worker`, which `train.py`'s TorchTrainer runs).

A `TrainingWorker` is one worker's part of one attempt at a run. It builds the model and its
optimizers (Adam on the dense parameters, Adagrad on the embedding tables), loads a warm start
(--init-from) and then the run's own newest checkpoint, if there is one, and trains epoch by epoch
on its Ray Data shard cut into token-budget batches. Every `log_every` steps it writes a progress
line and a metrics record; every `checkpoint_every` steps and at the end it saves a checkpoint
(rank 0 writes it and, where due, evaluates it on the held-out windows).
Where the loss, the weights or the scores stop being finite, every worker stops there.

The workers keep in step through `StepAgreement`: each of its sums is a collective call, made by
every worker at the same step, in the same order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from mtfm.model import BatchPrefetcher, Collator, build_model, parse_model_config, token_budget_batches
from mtfm.model.padding import GrowingShape
from mtfm.platform.checkpoint import (CheckpointMeta, OPTIMIZER_FILE, load_weights, read_meta, warm_start,
                                      write_checkpoint)
from mtfm.platform.cluster import quiet_ray_data
from mtfm.platform.eval import NonFiniteScores, evaluate_batches, not_evaluated
from mtfm.platform.metrics import metrics_json
from mtfm.platform.registry import Registry
from mtfm.platform.train import (DIVERGED_FILE, EVAL_FILE, METRICS_FILE, WARM_START_FILE, TrainConfig,
                                 read_metrics)
from mtfm.platform.train_step import FrozenColumns, TrainStep


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs; `loop_config` is the one `train.py` gives the TorchTrainer."""
    quiet_ray_data()
    TrainingWorker(loop_config).run()


# ---------------------------------------------------------------- the optimizers

def _split_parameters(model):
    """(dense, embedding) parameter lists: embedding tables get the sparse-style optimizer."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                     for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in embedding_ids]
    embedding = [p for p in model.parameters() if id(p) in embedding_ids]
    return dense, embedding


def make_optimizers(model, config: TrainConfig) -> dict[str, Any]:
    dense, embedding = _split_parameters(model)
    # On CUDA the fused Adam updates every tensor in a few launches; the dense parameters are many
    # small ones (per-group GLN weights, per-task towers), where the default foreach path is launch-bound.
    fused = bool(dense) and all(p.is_cuda for p in dense)
    # capturable: a CUDA graph replays the step (its step counts live on the device).
    optimizers = {"dense": torch.optim.Adam(dense, lr=config.lr, weight_decay=config.weight_decay, fused=fused,
                                            capturable=fused and config.cuda_graphs)}
    if embedding:
        optimizers["embedding"] = torch.optim.Adagrad(embedding, lr=config.embedding_lr)
    return optimizers


def set_rates(optimizers: dict[str, Any], config: TrainConfig) -> None:
    """The train config's rates in every parameter group: restoring a checkpoint's optimizer state
    restores the rates it was saved with too, and a resume with a new config must use the new ones."""
    for group in optimizers["dense"].param_groups:
        group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    for group in optimizers["embedding"].param_groups if "embedding" in optimizers else ():
        group["lr"] = config.embedding_lr


def checkpoint_to_restore(reported, resume_from: str | None, resume_step: int | None):
    """What a worker restores: Ray's newest reported checkpoint `reported` (after a worker restart, or on
    `--resume` of a folder holding Ray's snapshot), unless `resume_from`, the checkpoint `--resume` checked
    and named (at step `resume_step`), is newer. Ray's snapshot lists only the checkpoints its driver
    registered: one the workers finished as the driver was killed is on disk, whole, and newer. Compared
    by step, not by reading `resume_from` again: Ray may have pruned it since. None: a new run."""
    if resume_from is None:
        return reported
    if reported is not None:
        with reported.as_directory() as folder:
            if read_meta(folder).step >= resume_step:
                return reported
    return ray.train.Checkpoint(resume_from)


# ---------------------------------------------------------------- the train set's shards

class EveryRowSplit(ray.train.DataConfig):
    """The train set split across the workers with no sample left out, the same way in every attempt.

    Ray Train's own DataConfig splits with `streaming_split(equal=True)`, which drops the rows left over
    from an equal split (up to one fewer than the workers, and the same ones every epoch, as the order is
    fixed). Here the train set is cut into blocks of exactly `rows_per_block` samples but the last (a
    strict streaming repartition: the blocks' bounds depend on the rows' order alone, not on how the read
    cut the files into blocks, which follows the cluster's CPUs) and each block goes, in order, to the
    worker with the fewest samples so far: shards differ by at most one block, which the workers' stand-in
    steps absorb (`StepAgreement`), and a restarted attempt meets the shards its checkpoint's batch counts
    were taken on. The test set is every worker's whole (rank 0 evaluates it).
    """

    def __init__(self, rows_per_block: int):
        options = self.default_ingest_options()
        options.preserve_order = True  # the fixed order a restarted attempt relies on
        options.verbose_progress = False
        super().__init__(datasets_to_split=["train"], execution_options={"train": options, "test": options})
        self.rows_per_block = rows_per_block

    @classmethod
    def of_run(cls, rows_per_read: int, num_workers: int, train_rows: int) -> "EveryRowSplit":
        """Blocks of at most `rows_per_read` samples and at least two per worker, so that shards differ by
        a few batches at most."""
        return cls(max(1, min(rows_per_read, math.ceil(train_rows / (2 * num_workers)))))

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name == "train" and world_size > 1:
                split = ds.repartition(target_num_rows_per_block=self.rows_per_block, strict=True).streaming_split(
                    world_size, equal=False)
                for rank, shard in enumerate(split):
                    shards[rank][name] = shard
            else:
                for rank in range(world_size):
                    shards[rank][name] = ds.iterator()
        return shards


# ---------------------------------------------------------------- steps the workers agree on

class StepAgreement:
    """What the workers hold at a step, and sums over them: DDP needs the same number of steps
    everywhere, and token-budget batching gives workers with equal users unequal step counts.

    The counts are all-reduced through a gloo group of their own, on CPU tensors: on the GPU's
    NCCL group the `.item()` would wait for every kernel queued before it (the whole previous
    step), a host sync per step; a gloo all-reduce only meets the other workers' host loops.
    """

    def __init__(self):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # new_group is collective: every worker constructs its StepAgreement at the same point.
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.world_size = dist.get_world_size() if distributed else 1

    def batches_held(self, have: bool, can_stand_in: bool) -> tuple[int, bool]:
        """How many workers hold a batch for this step, and whether every other one can stand in."""
        held, ready = self.sums(float(have), float(have or can_stand_in))
        return int(held), ready == self.world_size

    def sums(self, *values: float) -> list[float]:
        """Each value summed over the workers, called at the same step on all of them (NaN and inf carry through)."""
        if self.group is None:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.tolist()

    def sum(self, value: float) -> float:
        return self.sums(value)[0]


@dataclass(frozen=True)
class AgreedStep:
    """One step of a worker: its batch, or `stand_in` when it has none left (its last batch again,
    whose gradients count 0), and the loss scale that makes DDP's average the mean gradient of the
    workers that hold a batch (world size / their number; 0 for a stand-in)."""

    batch: Any
    loss_scale: float
    stand_in: bool


def _agreed_batches(batches, agreement: StepAgreement, untrained: list[int], last=None):
    """Steps for as long as any worker holds a batch: a worker that has run out stands in with its
    last batch (`last`: the one it held before these, after a resume) at loss scale 0, so the
    others' batches are all trained on. Only when such a worker has no batch at all to stand in
    with does the epoch end early for every worker; then the users of the batches this one still
    holds are appended to `untrained`."""
    while True:
        batch = next(batches, None)
        held, all_can_step = agreement.batches_held(batch is not None, last is not None)
        if held == 0:
            return
        if not all_can_step:
            if batch is not None:
                untrained.append(sum((b.unpadded or b).num_users for b in itertools.chain([batch], batches)))
            return
        if batch is None:
            yield AgreedStep(last, 0.0, stand_in=True)
        else:
            last = batch
            yield AgreedStep(batch, agreement.world_size / held, stand_in=False)


# ---------------------------------------------------------------- one worker's training

@dataclass
class ProgressWindow:
    """This worker's steps since the last progress line, whose rates that line gives."""

    began: float = field(default_factory=time.perf_counter)
    samples: int = 0
    tokens: int = 0
    loss: Any = 0.0  # a sum of loss tensors: no host sync until the progress line
    steps: int = 0
    paused: float = 0.0  # seconds of saving, evaluating and starting epochs: the rates are of training steps

    def add(self, batch, loss) -> None:
        """A step trained on `batch` (unpadded: its real users and tokens)."""
        self.samples += batch.num_users
        self.tokens += batch.num_tokens
        self.loss += loss.detach()
        self.steps += 1

    @contextlib.contextmanager
    def pause(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - began

    def seconds_training(self) -> float:
        return max(time.perf_counter() - self.began - self.paused, 1e-9)


@dataclass
class EpochCounts:
    """What this worker trained on in an epoch: users and each scenario's exposures; the users of the
    batches it held when the epoch ended early for every worker; the steps it stood in for."""

    exposures: dict[str, int]
    users: int = 0
    untrained: list[int] = field(default_factory=list)  # appended to by `_agreed_batches`
    stand_in_steps: int = 0


class TrainingWorker:
    """One worker's part of one attempt at a run: its model and optimizers, where training is
    (step, epoch, batches of the epoch consumed), the checkpoint due, and the progress window.

    Every method that sums over the workers (`_agreed_batches` each step, `_log_progress`,
    `_stop_if_diverged`, `_save`, the epoch and run records) is called by every worker at the same step."""

    def __init__(self, loop_config: dict):
        self.config = config = TrainConfig.from_dict(loop_config["train_config"])
        self.registry = Registry.from_dict(loop_config["registry"])
        self.model_config_dict = loop_config["model_config"]  # as checkpoints record it
        self.samples_fingerprint = loop_config["samples_fingerprint"]
        self.trained_windows = loop_config["trained_windows"]
        model_config = parse_model_config(dict(self.model_config_dict), snapshot=True)  # checked by the driver
        self.run_dir = Path(loop_config["run_dir"])
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        torch.manual_seed(config.seed)
        self.device = ray.train.torch.get_device()
        # On the device before the optimizers exist: Adagrad allocates its state at construction, beside the parameters.
        self.model = build_model(model_config, self.registry).to(self.device)
        self.optimizers = make_optimizers(self.model, config)
        checkpoint = checkpoint_to_restore(ray.train.get_checkpoint(), loop_config.get("resume_from"),
                                           loop_config.get("resume_step"))
        # A warm start comes first: when this attempt resumes its own run, the checkpoint overwrites it.
        frozen, kept_columns = self._warm_start(loop_config, resuming=checkpoint is not None)
        self.step, self.epoch, self.skip = self._restore(checkpoint)

        ddp_model = ray.train.torch.prepare_model(self.model, parallel_strategy_kwargs={"find_unused_parameters": True})
        self.collator = Collator(self.model.registry)
        self.train_step = TrainStep(self.model, self.optimizers.values(), module=ddp_model, grad_clip=config.grad_clip,
                                    cuda_graphs=config.cuda_graphs)
        # With CUDA graphs every batch is padded to the run's one shape, in the prefetch thread.
        self.shapes = GrowingShape() if config.cuda_graphs else None
        parameters = dict(self.model.named_parameters())
        self.frozen_params = [p for name, p in parameters.items() if name in frozen]
        self.frozen_columns = [FrozenColumns.of(parameters[name], columns) for name, columns in kept_columns.items()]
        self.train_shard = ray.train.get_dataset_shard("train")
        self.agreement = StepAgreement()

        self.position = self.skip  # batches of the epoch consumed (a checkpoint records where it is)
        self.last_saved = self.step
        # A checkpoint falls due after a step but is saved once the next batch is known to exist:
        # after an epoch's or the run's last step it is the end-of-epoch or final checkpoint instead
        # (so a finished run's newest checkpoint says so, and is evaluated). max_steps is checked the
        # same way, so a run that stops with its data's last batch records the epoch as done.
        self.due: dict | None = None  # the metrics the due checkpoint reports
        self.diverged: dict | None = None
        self.run_exposures: dict[str, int] | None = None  # of each scenario, over this attempt's epochs
        self.window = ProgressWindow()

    def _warm_start(self, loop_config: dict, resuming: bool) -> tuple[set[str], dict[str, list[int]]]:
        """Loads --init-from's checkpoint where the run starts from one. Returns what stays frozen for
        the first `freeze_loaded_steps` steps, as this warm start or, in a resumed warm-started run,
        the run's first attempt's loaded it: the tensors' names (the caller keeps its parameters
        among them), and the columns of the first layers it loaded by feature."""
        config = self.config
        if loop_config.get("init_from"):
            report = warm_start(self.model, loop_config["init_from"])
            if self.rank == 0 and not resuming:
                names = set(self.registry.scenarios) | set(self.registry.sequences) | set(self.registry.features)
                (self.run_dir / WARM_START_FILE).write_text(json.dumps(dataclasses.asdict(report), indent=1))
                frozen_for = (f"\n[mtfm] the loaded tensors stay frozen for the first {config.freeze_loaded_steps} "
                              "steps (freeze_loaded_steps)" if config.freeze_loaded_steps else "")
                _progress(f"[mtfm] warm start from {loop_config['init_from']}:\n{report.describe(names)}{frozen_for}")
            record = {"loaded": report.loaded, "kept_columns": report.kept_columns}
        else:
            record = loop_config.get("warm_start_record") or {"loaded": [], "kept_columns": {}}
        if not config.freeze_loaded_steps:
            return set(), {}
        return set(record["loaded"]), record["kept_columns"]

    def _restore(self, checkpoint) -> tuple[int, int, int]:
        """Model and optimizers as `checkpoint` saved them, and its step, epoch and batches consumed in
        that epoch (zeros without one); metrics.jsonl is cut back to that step."""
        if checkpoint is None:
            if self.rank == 0:  # a restart before the first checkpoint starts the log anew
                _truncate_metrics(self.run_dir / METRICS_FILE, 0)
            return 0, 0, 0
        with checkpoint.as_directory() as folder:
            meta = read_meta(folder)
            load_weights(self.model, Path(folder))
            states = torch.load(Path(folder) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
            for name, opt in self.optimizers.items():
                opt.load_state_dict(states[name])
            set_rates(self.optimizers, self.config)
        if self.rank == 0:
            _truncate_metrics(self.run_dir / METRICS_FILE, meta.step)
            _progress(f"[mtfm] resumed from {checkpoint.path} at step {meta.step} (epoch {meta.epoch + 1}/"
                      f"{self.config.epochs}, after batch {meta.batches_in_epoch})")
        return meta.step, meta.epoch, meta.batches_in_epoch

    # ---------------------------------------------------------------- training

    def run(self) -> None:
        """Epochs until the train config's epochs or max_steps, or a divergence; then the final checkpoint."""
        config = self.config
        done = config.max_steps is not None and self.step >= config.max_steps
        self.model.train()
        started_at, waiting_since = self.step, time.perf_counter()  # the first batch's wait left out
        while self.epoch < config.epochs and not done:
            done = self._train_epoch(waiting_since)
            waiting_since = time.perf_counter()
        if self.run_exposures is not None and started_at == 0:  # every worker ends its loop at the same step
            self._record_run_exposures()
        if self.diverged is None and (self.last_saved != self.step or self.step == 0):
            self._save(self.position, self.due or {"step": self.step}, final=True)
        if self.rank == 0 and self.diverged is None:
            self._write_eval_file()

    def _train_epoch(self, waiting_since: float | None) -> bool:
        """The epoch's steps from the batch this attempt resumes at; whether the run is done.
        `waiting_since`: when the previous epoch ended (the rates leave out Ray Data's first reads)."""
        config = self.config
        batches, last_skipped = self._epoch_batches()
        counts = EpochCounts(dict.fromkeys(self.model.registry.scenarios, 0))
        self.run_exposures = self.run_exposures or dict.fromkeys(self.model.registry.scenarios, 0)
        self.position = self.skip
        with BatchPrefetcher(batches, self.device) as prefetched:
            for agreed in _agreed_batches(prefetched, self.agreement, counts.untrained, last_skipped):
                if config.max_steps is not None and self.step >= config.max_steps:
                    return True  # checked with a next batch in hand: a run whose data ends with it ends the epoch
                if self.due is not None and not self._save_due(self.position):
                    return True
                if waiting_since is not None:  # the rates leave out the epoch's start (Ray Data's first reads)
                    self.window.paused += time.perf_counter() - waiting_since
                    waiting_since = None
                self.position += 1  # the epoch's steps: every worker's batches consumed, or all it had
                loss = self._train_on(agreed, counts)
                if self.step % config.log_every == 0 and not self._log_progress():
                    return True
                if self.step % config.checkpoint_every == 0:  # a stand-in's loss is not this step's
                    self.due = {"step": self.step} | ({} if agreed.stand_in else {"loss": float(loss.detach())})
        return self._end_epoch(counts)

    def _epoch_batches(self):
        """The epoch's batches after those this attempt resumes past, and the last of those: batches
        consumed before the checkpoint are collated (their token counts place the later cuts) but
        never trained on, and the last is this worker's stand-in should its shard end before the others'."""
        config = self.config
        reads = self.train_shard.iter_batches(batch_size=config.rows_per_read, batch_format="pyarrow",
                                              prefetch_batches=2)
        batches = token_budget_batches(reads, self.collator, config.tokens_per_batch)
        last_skipped = None
        for _ in range(self.skip):
            last_skipped = next(batches, last_skipped)
        if self.shapes is not None:
            batches = map(self.shapes.pad, batches)
        return batches, last_skipped

    def _train_on(self, agreed: AgreedStep, counts: EpochCounts):
        """One training step; its loss (a tensor)."""
        batch = agreed.batch.to(self.device)  # a stand-in skipped at a resume is still on the host
        # Frozen: the optimizers skip them, so warm-started modules stay as loaded.
        freezing = self.step < self.config.freeze_loaded_steps
        loss = self.train_step(batch, self.frozen_params if freezing else (), loss_scale=agreed.loss_scale,
                               frozen_columns=self.frozen_columns if freezing else ())
        self.step += 1
        if agreed.stand_in:
            counts.stand_in_steps += 1
        else:
            real = batch.unpadded or batch  # padded batches count their real users and tokens
            counts.users += real.num_users
            for scenario, n in batch.targets_per_scenario().items():
                counts.exposures[scenario] += n
                self.run_exposures[scenario] += n
            self.window.add(real, loss)
        failure_injected = self.run_dir / ".failure_injected"
        if self.config.inject_failure_at_step == self.step and self.rank == 0 and not failure_injected.exists():
            failure_injected.touch()
            raise RuntimeError(f"injected failure at step {self.step} (train config inject_failure_at_step)")
        return loss

    def _log_progress(self) -> bool:
        """The progress line and metrics record of the window; False where the loss diverged."""
        config, window = self.config, self.window
        elapsed = window.seconds_training()
        # Over every worker's batches of the window (a worker that stood in has fewer).
        loss_sum, batches_sum, samples, tokens = self.agreement.sums(float(window.loss), window.steps,
                                                                     window.samples, window.tokens)
        mean_loss = loss_sum / batches_sum
        if self._stop_if_diverged(mean_loss, "loss", summed=True):
            return False
        record = {"step": self.step, "epoch": self.epoch + 1, "loss": mean_loss,  # from 1, as the log says it
                  "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed}
        if self.shapes is not None:
            record["graph_captures"] = self.train_step.captures
        if self.rank == 0:
            _append_jsonl(self.run_dir / METRICS_FILE, record)
            of_steps = f"/{config.max_steps}" if config.max_steps is not None else ""
            _progress(f"[mtfm] step {self.step:>6}{of_steps}  epoch {self.epoch + 1}/{config.epochs}  loss "
                      f"{record['loss']:.4f}  {record['samples_per_s']:.0f} samples/s  "
                      f"{record['tokens_per_s']:.0f} tokens/s")
        self.window = ProgressWindow()
        return True

    def _end_epoch(self, counts: EpochCounts) -> bool:
        """Records the epoch's coverage and saves the checkpoint due, if training goes on; whether the run is done."""
        self._record_epoch_coverage(counts)
        self.epoch, self.skip, self.position = self.epoch + 1, 0, 0
        done = self.config.max_steps is not None and self.step >= self.config.max_steps
        if self.due is not None and self.epoch < self.config.epochs and not done:
            done = not self._save_due(0)
        return done

    # ---------------------------------------------------------------- checkpoints

    def _save_due(self, batches_in_epoch: int) -> bool:
        metrics, self.due = self.due, None
        return self._save(batches_in_epoch, metrics)

    def _save(self, batches_in_epoch: int, metrics: dict, final: bool = False) -> bool:
        """Saves a checkpoint, evaluated where due, unless training diverged: weights that are not
        finite on some worker, or scores that are not (an overflow in the forward pass). Then it
        saves nothing and returns False: every worker stops."""
        with self.window.pause():
            weights_finite = bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())
            if self._stop_if_diverged(0.0 if weights_finite else math.nan, "weights"):
                return False
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint, scores_finite = None, True
                if self.rank == 0:
                    meta = CheckpointMeta(self.step, self.epoch, batches_in_epoch, self.registry.to_dict(),
                                          self.model_config_dict, self.config.to_dict(), self.samples_fingerprint,
                                          self.trained_windows)
                    write_checkpoint(Path(tmp), self.model, self.optimizers, meta)
                    if self.config.evaluate_at_checkpoints or final:  # the final checkpoint always gets eval.json
                        result = self._evaluate()
                        scores_finite = result is not None
                        if scores_finite:
                            metrics = metrics | {"eval": result}
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if self._stop_if_diverged(0.0 if scores_finite else math.nan, "scores"):
                    return False
                self.last_saved = self.step
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.step:08d}")
        return True

    def _evaluate(self) -> dict | None:
        """AUC/GAUC on the held-out windows, recorded in metrics.jsonl; None where the scores were not finite."""
        self.model.eval()
        try:
            with torch.no_grad():
                result = evaluate_batches(self.model, _eval_batches(self.collator, self.config), self.device)
            _append_jsonl(self.run_dir / METRICS_FILE, {"step": self.step, "eval": result})
        except NonFiniteScores:
            result = None
        self.model.train()
        return result

    def _stop_if_diverged(self, value: float, what: str, summed: bool = False) -> bool:
        """Whether `value` (NaN for weights or scores that are not finite on this worker; with
        `summed`, the workers' mean loss, already agreed) averaged over the workers is not finite:
        then every worker stops here, having called this at the same step."""
        mean = value if summed else self.agreement.sum(value) / self.world_size
        if math.isfinite(mean):
            return False
        self.diverged = {"step": self.step, "what": what, "value": str(mean)}  # "nan", "inf": strict JSON has no NaN
        if self.rank == 0:
            (self.run_dir / DIVERGED_FILE).write_text(json.dumps(self.diverged))
            _progress(f"[mtfm] step {self.step:>6}  {what} {mean}: training diverged, stopping")
        return True

    # ---------------------------------------------------------------- records of what was trained on

    def _record_epoch_coverage(self, counts: EpochCounts) -> None:
        """Every worker's users of the epoch, trained and not (the batches the others held when a
        worker had none to stand in with), the steps a worker stood in for, and the exposures of
        each scenario trained on."""
        trained, untrained, stand_in_steps, *exposures = self.agreement.sums(
            counts.users, sum(counts.untrained), counts.stand_in_steps, *counts.exposures.values())
        if self.rank != 0:
            return
        exposures_trained = dict(zip(self.model.registry.scenarios, map(int, exposures)))
        record = {"step": self.step, "epoch": self.epoch + 1, "users_trained": int(trained),
                  "users_not_trained": int(untrained), "stand_in_steps": int(stand_in_steps),
                  "exposures_trained": exposures_trained}
        if self.skip:
            record["resumed_at_batch"] = self.skip  # the users before it were trained by the attempt that saved it
        _append_jsonl(self.run_dir / METRICS_FILE, record)
        if untrained:
            _progress(f"[mtfm] epoch {self.epoch + 1}/{self.config.epochs}: {int(untrained)} of "
                      f"{int(trained + untrained)} users not trained on: a worker's shard held no batch to stand in "
                      "with, so every worker ended the epoch")

    def _record_run_exposures(self) -> None:
        """Every worker's exposures of each scenario over the run (one trained from its first step)."""
        trained = dict(zip(self.run_exposures, map(int, self.agreement.sums(*self.run_exposures.values()))))
        if self.rank == 0:  # the driver warns of a scenario trained on none (`_warn_of_untrained_scenarios`)
            _append_jsonl(self.run_dir / METRICS_FILE, {"step": self.step, "run_exposures_trained": trained})

    def _write_eval_file(self) -> None:
        """eval.json: the newest evaluation in metrics.jsonl, with the final checkpoint's name."""
        if not (self.run_dir / METRICS_FILE).exists():
            return
        last = [r for r in read_metrics(self.run_dir / METRICS_FILE) if "eval" in r]
        if last:
            (self.run_dir / EVAL_FILE).write_text(metrics_json(last[-1] | {
                "checkpoint": f"checkpoint_{self.step:08d}",
                "not_evaluated": not_evaluated(last[-1]["eval"], self.model.registry)},
                indent=1))


def _eval_batches(collator, config: TrainConfig):
    reads = ray.train.get_dataset_shard("test").iter_batches(batch_size=config.rows_per_read, batch_format="pyarrow")
    return token_budget_batches(reads, collator, config.tokens_per_batch)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a restart, drop log lines the failed attempt wrote past the checkpoint it resumes (and
    a last line cut short)."""
    if path.exists():
        kept = [record for record in read_metrics(path) if record["step"] <= last_step]
        path.write_text("".join(metrics_json(record) + "\n" for record in kept))


def _progress(message: str) -> None:
    # Not print(): Ray Train patches print on workers and the line would reach the driver twice.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(metrics_json(record) + "\n")
