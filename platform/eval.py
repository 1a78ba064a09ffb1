"""Evaluation: AUC and GAUC for every (scenario, task) on held-out windows (`mtfm eval`).

GAUC is the impression-weighted mean of per-user AUC over users with both classes (see
`metrics.py`); users are keyed by `user_id`, so a user's exposures in all test windows count
together. The same `evaluate_batches` runs inside training (at checkpoints) and here.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtfm.platform.metrics import auc, gauc, metric_value, metrics_json


class NonFiniteScores(ValueError):
    """Scores that are NaN or inf: no AUC of them is a measurement."""


def evaluate_batches(model, batches: Iterable, device) -> dict[str, dict]:
    """Score every T-token of `batches` (TokenBatches) with `model`; metrics per "scenario/task"."""
    import torch

    scores: dict[str, list] = {}
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            with model.autocast(device.type):
                probs = model(batch).probabilities()
            user_of_token = batch.user_id[batch.token_user()]
            for scenario, p in probs.items():
                feats = batch.features[scenario]
                scores.setdefault(scenario, []).append((
                    p.cpu().numpy(), feats.labels.cpu().numpy(), feats.label_mask.cpu().numpy(),
                    user_of_token[feats.index].cpu().numpy()))
    results: dict[str, dict] = {}
    for scenario, parts in scores.items():
        p, y, m, u = (np.concatenate(x) for x in zip(*parts))
        for t, task in enumerate(batch.scenario_tasks[scenario]):
            keep = m[:, t]
            if not keep.any():
                continue
            not_finite = int((~np.isfinite(p[keep, t])).sum())
            if not_finite:  # NaN sorts anywhere: an AUC of such scores is noise, not a measurement
                raise NonFiniteScores(f"{scenario}/{task}: {not_finite} of {int(keep.sum())} scores are not finite "
                                      "(weights that hold NaN or inf, as a diverged run leaves them, or an overflow "
                                      "in the forward pass); no metrics")
            g = gauc(u[keep], y[keep, t], p[keep, t])
            results[f"{scenario}/{task}"] = {
                "auc": auc(y[keep, t], p[keep, t]), "gauc": g.gauc, "exposures": int(keep.sum()),
                "positives": int(y[keep, t].sum()), "users_scored": g.users_scored, "users_skipped": g.users_skipped,
            }
    return dict(sorted(results.items()))


# With fewer users with both classes than this, one user's AUC going from 0 to 1 moves the GAUC
# (users weighted by their exposures) by 1/30 = 0.033 on average; with fewer positives, one
# positive's rank can move the AUC by as much: more than the differences between models compared.
FEW = 30


def not_evaluated(results: dict[str, dict], registry) -> list[str]:
    """The model's "scenario/task" keys (`registry`: the model's) that `results` has no metrics for:
    no labelled exposure of them in the test windows."""
    return [f"{s}/{task.name}" for s, scenario in registry.scenarios.items() for task in scenario.tasks
            if f"{s}/{task.name}" not in results]


def format_table(results: dict[str, dict], missing: Iterable[str] = ()) -> str:
    """The metrics table, with a row for each key of `missing` (see `not_evaluated`), then a note for
    each row scored on too few users or positives to compare, or on none."""
    lines = [f"{'scenario/task':<20} {'AUC':>7} {'GAUC':>7} {'exposures':>10} {'positives':>10} {'users':>7}"]
    notes = []
    for key, r in results.items():
        lines.append(f"{key:<20} {metric_value(r['auc']):>7.4f} {metric_value(r['gauc']):>7.4f} {r['exposures']:>10} "
                     f"{r['positives']:>10} "
                     f"{r['users_scored']:>7}")
        if r["users_scored"] < FEW or r["positives"] < FEW:
            notes.append(f"note: {key}: {r['users_scored']} user(s) with both classes, {r['positives']} positive(s): "
                         "too few for a stable AUC/GAUC; hold out more windows (--test-windows) or more data")
    missing = list(missing)
    for key in missing:
        lines.append(f"{key:<20} {'-':>7} {'-':>7} {'-':>10} {'-':>10} {'-':>7}")
    if missing:
        notes.append(f"note: {', '.join(missing)}: no labelled exposure in the test windows, not evaluated (the "
                     "scenario's logs may end before them, or its table was missing when aggregating)")
    return "\n".join(lines + notes)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None = None, *,
                        test_windows: int | None = None) -> dict:
    """Load a checkpoint (or a run folder's newest) and evaluate it on the last windows of `data`
    (default: the samples it was trained on, as its train config names them)."""
    import torch

    from mtfm.model import Collator, token_budget_batches
    from mtfm.platform.checkpoint import find_checkpoint, load_model
    from mtfm.platform.cluster import init_ray, quiet_ray_data
    from mtfm.platform.samples import local_samples_schema, refuse_samples_that_do_not_fit, split_by_window
    from mtfm.platform.train import TrainConfig

    folder = find_checkpoint(checkpoint)
    model, meta = load_model(folder)
    # The run's settings, with TrainConfig's defaults for any it predates (not `data`: a default folder
    # would be the wrong samples).
    trained = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | meta.train_config
    if data is None:
        data = meta.train_config.get("data")
        if data is None:
            raise ValueError(f"{folder}: its train config names no data; pass --data AGG_DIR")
        if "://" not in data and not Path(data).exists():
            raise FileNotFoundError(f"{data}: the samples {folder} was trained on (its train config's data) are not "
                                    "there; pass --data AGG_DIR")
    registry = model.registry

    def refuse_other_samples(schema) -> None:
        refuse_samples_that_do_not_fit(
            schema, str(data), registry, list(registry.scenarios), whose=f"checkpoint {folder}",
            remedy=(f"pass --data samples aggregated with the registry it was trained with (a config dir declaring "
                    f"scenarios {list(registry.scenarios)} and sequences {list(registry.sequences)})"))

    schema = local_samples_schema(str(data))  # named before Ray starts
    if schema is not None:
        refuse_other_samples(schema)
    windows_held_out = trained["test_windows"] if test_windows is None else test_windows
    if windows_held_out < 1:
        raise ValueError(f"test_windows {windows_held_out}: expected at least 1 (the last N windows are the test set)")
    init_ray()
    quiet_ray_data()  # a table at the end is the output; Ray Data's per-dataset INFO lines are noise here
    _, test_ds, windows = split_by_window(data, windows_held_out, need_train=False)
    refuse_other_samples(test_ds.schema().base_schema)
    budget = trained["tokens_per_batch"]
    reads = test_ds.iter_batches(batch_size=trained["rows_per_read"], batch_format="pyarrow")
    results = evaluate_batches(model, token_budget_batches(reads, Collator(registry), budget), torch.device("cpu"))
    test = windows.test
    if meta.trained_windows is not None:
        trained_in_test = len(set(test) & set(meta.trained_windows))
    else:  # a checkpoint that does not record its windows: those its run held out fewer of, on the same samples
        same_data = _same_path(data, meta.train_config.get("data"))
        trained_in_test = max(windows_held_out - trained["test_windows"], 0) if same_data else 0
    return {"checkpoint": str(folder), "step": meta.step, "data": str(data), "test_windows": test, "eval": results,
            "not_evaluated": not_evaluated(results, registry), "trained_windows_in_test": trained_in_test}


def _same_path(a, b) -> bool:
    if a is None or b is None:
        return False
    if "://" in str(a) or "://" in str(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def run_from_args(args) -> int:
    from mtfm.platform.rawlog import refuse_a_file_for_a_folder

    if args.json:  # checked before the evaluation, not after it
        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json}: a folder; expected a file name, e.g. {Path(args.json) / 'eval.json'}")
        refuse_a_file_for_a_folder(Path(args.json).resolve().parent, f"--json {args.json}")
        if not Path(args.json).resolve().parent.is_dir():
            raise FileNotFoundError(f"--json {args.json}: no folder {Path(args.json).resolve().parent} to write it in")
    report = evaluate_checkpoint(args.checkpoint, args.data, test_windows=args.test_windows)
    starts = [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(w / 1000)) for w in report["test_windows"]]
    starts = ", ".join(starts) if len(starts) <= 3 else f"{starts[0]} ... {starts[-1]} ({len(starts)} windows)"
    print(f"checkpoint {report['checkpoint']} (step {report['step']}) on {report['data']}, test windows starting "
          f"{starts}")
    print(format_table(report["eval"], report["not_evaluated"]))
    if report["trained_windows_in_test"]:
        print(f"warning: {report['trained_windows_in_test']} of these {len(report['test_windows'])} test windows "
              "are windows this checkpoint trained on: their scores are not held-out scores")
    if args.json:
        Path(args.json).write_text(metrics_json(report, indent=1))
        print(f"wrote {args.json}")
    return 0
