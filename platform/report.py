"""`mtfm report RUN_DIR`: PNG plots of a training run.

- loss.png: the training loss by step (the log lines of metrics.jsonl).
- eval.png: AUC and GAUC by step, one panel per scenario, one line per task (the evaluations
  made at checkpoints).
- attention.png: for a few users, the last layer's attention weights silu(alpha q.k)/n,
  averaged over heads, of their T-tokens (columns, grouped by scenario) against their newest
  H-tokens (rows): the paper's interpretability figure.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtfm.platform.metrics import metric_value
from mtfm.platform.registry import events_column, read_yaml_mapping, scenario_of_column
from mtfm.platform.train import DIVERGED_FILE, METRICS_FILE, TRAIN_CONFIG_FILE, read_metrics


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: {'not a folder' if run_dir.exists() else 'not found'} (expected a run "
                                "folder of `mtfm train`, e.g. runs/tiny-<time>)")
    if not path.is_file():
        if (run_dir / DIVERGED_FILE).is_file():
            raise FileNotFoundError(f"{path}: no training log: the run diverged before logging anything "
                                    f"({_diverged(run_dir)})")
        raise FileNotFoundError(f"{path}: no training log (is {run_dir} a run folder of `mtfm train`?)")
    return read_metrics(path)


def _diverged(run_dir: Path) -> str:
    record = json.loads((run_dir / DIVERGED_FILE).read_text())
    return f"{DIVERGED_FILE}: the {record['what']} stopped being finite at step {record['step']}"


def plot_curves(run_dir: Path, out: Path, plt) -> list[Path]:
    records = _records(run_dir)
    written = []
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*losses), marker=".")
        ax.set(xlabel="step", ylabel="training loss (mean BCE)", title=f"{run_dir.name}: loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=110)
        plt.close(fig)
        written.append(out / "loss.png")
    evals = [r for r in records if "eval" in r]
    if evals:
        scenarios = sorted({key.split("/")[0] for r in evals for key in r["eval"]})
        fig, axes = plt.subplots(2, len(scenarios), figsize=(4 * len(scenarios), 6), squeeze=False)
        for col, scenario in enumerate(scenarios):
            tasks = sorted({k.split("/")[1] for r in evals for k in r["eval"] if k.startswith(scenario + "/")})
            for row, metric in enumerate(("auc", "gauc")):
                ax = axes[row][col]
                for task in tasks:
                    points = [(r["step"], metric_value(r["eval"][f"{scenario}/{task}"][metric])) for r in evals
                              if f"{scenario}/{task}" in r["eval"]]
                    ax.plot(*zip(*points), marker="o", label=task)
                ax.set(title=f"{scenario} {metric.upper()}", xlabel="step")
                ax.xaxis.get_major_locator().set_params(integer=True)  # one checkpoint: no 30.5-33.5 axis
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=110)
        plt.close(fig)
        written.append(out / "eval.png")
    return written


def attention_maps(model, batch, max_history: int) -> list[tuple[np.ndarray, list[str]]]:
    """Per user of `batch`: (weights (H rows, T columns), column scenario labels) of the top layer."""
    import torch

    from mtfm.kernels.mask import TokenKind
    from mtfm.model.layers import JaggedContext

    ctx = JaggedContext.from_batch(batch)
    with torch.no_grad():
        x = model.tokenizer(batch)
        for layer in model.stack.layers[:-1]:
            x = layer(x, ctx)
        top = model.stack.layers[-1]
        a = top.attn
        h = top.input_norm(x, ctx.group, ctx.group_names)
        q, _, k, _ = top.projections(h)
        k = k.repeat_interleave(a.num_heads // a.num_kv_heads, dim=1)
    group_of_token = [batch.group_names[g] for g in batch.group.tolist()]
    maps = []
    for b in range(batch.num_users):
        lo, hi = int(batch.offsets[b]), int(batch.offsets[b + 1])
        kind = batch.kind[lo:hi]
        history = (torch.nonzero(kind == TokenKind.H).flatten() + lo)[-max_history:]
        targets = torch.nonzero(kind == TokenKind.T).flatten() + lo
        if len(history) == 0 or len(targets) == 0:
            continue
        scores = torch.einsum("thd,nhd->tnh", q[targets], k[history])
        weights = (torch.nn.functional.silu(a.alpha * scores) / a.norm).mean(-1)
        maps.append((weights.T.numpy(), [group_of_token[i] for i in targets.tolist()]))
    return maps


class NoHeatmap(Exception):
    """The samples given cannot draw the model's attention: none there, or of another registry."""


def plot_attention(run_dir: Path, data: Path, out: Path, plt, users: int = 3, max_history: int = 48) -> Path:
    from mtfm.model import Collator
    from mtfm.platform.checkpoint import CheckpointError, load_model

    try:
        model, _ = load_model(run_dir)
    except CheckpointError as exc:  # a run stopped (or diverged) before its first checkpoint
        raise NoHeatmap(str(exc)) from exc
    if not hasattr(model, "stack"):
        raise NoHeatmap(f"a {model.config.architecture} model (a baseline) has no attention layers to draw")
    import pyarrow.parquet as pq

    samples = data / "samples" if (data / "samples").is_dir() else data
    files = sorted(samples.glob("*.parquet"))
    if not files:
        raise NoHeatmap(f"{samples}: no aggregated samples to draw the attention of")
    table = pq.read_table(files[-1])
    collator = Collator(model.registry)
    # Users with history tokens (drawn against) and the most scenarios present make the most telling figure.
    def lengths(column: str) -> np.ndarray:
        return np.asarray(table[column].combine_chunks().value_lengths().fill_null(0))

    present = sum((lengths(c) > 0).astype(int) for c in table.column_names if scenario_of_column(c))
    history = sum(lengths(events_column(s.name)) for s in model.registry.sequences.values()
                  if s.kind == "history" and events_column(s.name) in table.column_names)  # else the collator refuses
    rows = np.argsort(-(present * (history > 0)), kind="stable")[:users]
    try:
        batch = collator(table.take(rows))
    except ValueError as exc:  # samples aggregated with another registry than the model's
        raise NoHeatmap(str(exc)) from exc
    maps = attention_maps(model, batch, max_history)
    if not maps:
        raise NoHeatmap(f"no user of {files[-1]} has both history and target tokens")
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 5), squeeze=False)
    for ax, (weights, labels) in zip(axes[0], maps):
        image = ax.imshow(weights, aspect="auto", cmap="viridis")
        bounds = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
        for x in bounds:
            ax.axvline(x - 0.5, color="white", lw=1)
        starts = [0] + bounds
        ax.set_xticks(starts, [labels[s] for s in starts], rotation=45, ha="left", fontsize=8)
        ax.set(xlabel="T-tokens (by scenario)", ylabel="H-tokens (newest last)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("Top-layer attention of target tokens\nto history tokens (mean over heads)")
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)
    plt.close(fig)
    return out / "attention.png"


def write_report(run_dir: str | Path, data: str | Path | None = None, log=print) -> list[Path]:
    """The PNGs into run_dir/report/; the heatmap from `data`, else from the run's training data
    if that is still there (a note says why not otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    _records(run_dir)  # not a run folder: refused before anything is written into it
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"{data}: no such folder of aggregated samples (--data)")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.png").unlink(missing_ok=True)  # an earlier report's: not left beside this one's figures
    written = plot_curves(run_dir, out, plt)
    diverged = (run_dir / DIVERGED_FILE).is_file()
    if diverged:
        log(f"note: the run diverged ({_diverged(run_dir)}); the figures end before that step")
    short = "the run diverged before its first" if diverged else "a run shorter than"
    for name, what in (("loss.png", f"no loss line in metrics.jsonl ({short} log_every steps)"),
                       ("eval.png", "no evaluation in metrics.jsonl (none at a checkpoint yet)")):
        if out / name not in written:
            log(f"note: no {name}: {what}")
    if data is None:
        config = run_dir / TRAIN_CONFIG_FILE
        data = read_yaml_mapping(config, "train config").get("data") if config.is_file() else None
        if data is None or not Path(data).exists():
            what = f"the run's training data ({data}) is not there" if data else "the run names no training data"
            log(f"note: no attention heatmap: {what}; pass --data AGG_DIR")
            return written
    try:
        written.append(plot_attention(run_dir, Path(data), out, plt))
    except NoHeatmap as exc:  # the curves still stand
        log(f"note: no attention heatmap: {exc}")
    return written


def run_from_args(args) -> int:
    written = write_report(args.run_dir, args.data)
    for path in written:
        print(f"wrote {path}")
    return 0
