"""Training quality study (issue 5): joint MTFM vs per scenario vs DLRM-MMoE, and HTA vs full attention.

    python bench/quality.py --dataset synthetic              # 2000 users x 7 days, the last day held out
    python bench/quality.py --dataset movielens --test-windows 30
    python bench/quality.py --device cuda --parallel 7 ...   # on one GPU: 7 runs at a time, 1/7 GPU each
    python bench/quality.py --combine a.json b.json --out all.json   # one table from separate sittings

Per training seed (the data is fixed: synthetic data seed 0, or MovieLens-100K) it trains, for the
same number of epochs: MTFM on all scenarios ("joint", the `--model` config), MTFM on each scenario's
data alone (`scenarios: [s]`), the DLRM-MMoE baseline on all scenarios (`--baseline`), and MTFM with
hybrid target attention `(3:1)*1` against full attention `(0:4)*1` (same widths, 4 layers; the top
layer is a target layer in both). `--variants table4` trains the paper's Table 4 layouts instead (16
layers, GQA with one KV head, and `(3:1)*4` without GQA), so their AUC/GAUC can be read after the same
number of tokens. Every run is a `python -m mtfm.platform.train` job (Ray Train) on the
Ray cluster this script starts; `--parallel` of them run at once. Each scenario's click and order
(CTCVR) AUC/GAUC on the held-out windows is collected; the script prints mean ± std over seeds and
the paired differences that the issue's claims are about, and writes JSON (rewritten after every run,
so a run cut short keeps what finished).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from checkout import default_out, ensure_mtfm_importable

ensure_mtfm_importable()  # before Ray and the training subprocesses start: they inherit PYTHONPATH
from mtfm.platform.aggregate import aggregate  # noqa: E402
from mtfm.platform.cluster import init_ray  # noqa: E402
from mtfm.platform.metrics import metric_value  # noqa: E402
from mtfm.platform.movielens import convert_movielens  # noqa: E402
from mtfm.platform.registry import load_registry  # noqa: E402
from mtfm.platform.synth import synthesize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("click", "order")
METRICS = tuple(f"{t}_{m}" for t in TASKS for m in ("auc", "gauc"))
HTA, FULL = "(3:1)*1", "(0:4)*1"
# MTFM Table 4 (layout, kv heads; None = as many as query heads), on the --model widths
TABLE4 = (("(0:16)*1", 1), ("(16:0)*1", 1), ("(1:1)*8", 1), ("(3:1)*4", 1), ("(5:1)*3", 1), ("(3:1)*4", None))


def table4_variant(layout: str, kv_heads: int | None) -> str:
    return f"T4 {layout}" + (" no GQA" if kv_heads is None else "")


@dataclass(frozen=True)
class Run:
    variant: str            # e.g. "MTFM joint", "MTFM alone", "DLRM-MMoE joint", "MTFM HTA (3:1)*1"
    seed: int
    model: Path             # model config written for this variant
    scenarios: tuple[str, ...]

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() else "_" for c in self.variant + "_" + "_".join(self.scenarios))
        return f"{slug}-seed{self.seed}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic",
                   help="synthetic (the generator's world) or movielens (ml-100k, three age scenarios)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (default: the generator's 2000)")
    p.add_argument("--days", type=int, default=7, help="synthetic days (default: the generator's 7)")
    p.add_argument("--movielens-path", default=None, metavar="DIR",
                   help="RecBole ml-100k atomic files (default: the copy inside the recbole package)")
    p.add_argument("--test-windows", type=int, default=1, help="last N days held out (default 1)")
    p.add_argument("--model", default="configs/model/small.yaml", help="MTFM model config (default small)")
    p.add_argument("--baseline", default="configs/model/dlrm_mmoe_small.yaml",
                   help="model config of the dlrm variant (default dlrm_mmoe_small)")
    p.add_argument("--variants", nargs="+", default=["joint", "alone", "dlrm", "hta"],
                   choices=("joint", "alone", "dlrm", "hta", "table4"),
                   help="what to train (default: joint alone dlrm hta; table4: the Table 4 layouts)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one run of each variant "
                   "each (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each run (default 3)")
    p.add_argument("--tokens-per-batch", type=int, default=16384, help="per step (default 16384)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--parallel", type=int, default=1, help="training jobs at once (default 1)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs of each run's Ray Train worker (default 1)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    p.add_argument("--work-dir", default=None,
                   help="data and run folders, kept (default: a new temp folder, removed at the end unless a run "
                        "failed; a folder of an earlier study fails its runs: a run is never started where one exists)")
    p.add_argument("--out", default=None, help="JSON (default $OUT or bench/out: quality_<dataset>.json)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="train nothing: merge the runs of earlier JSON outputs (e.g. seeds run on separate "
                        "machines) into one table, written to --out")
    return p.parse_args(argv)


def prepare_data(args, work: Path) -> tuple[Path, Path]:
    """(config dir, aggregated samples) for the dataset."""
    quiet = dict(log=lambda *a, **k: None)
    if args.dataset == "synthetic":
        config_dir = REPO / "configs"
        registry = load_registry(config_dir)
        synthesize(registry, work / "raw", users=args.users, days=args.days, seed=0, overwrite=True, **quiet)
    else:
        config_dir = REPO / "configs" / "movielens"
        registry = load_registry(config_dir)
        convert_movielens(registry, work / "raw", args.movielens_path, overwrite=True, **quiet)
    summary = aggregate(registry, work / "raw", work / "agg", overwrite=True, **quiet)
    print(f"[quality] {args.dataset}: {summary['samples_out']:,} user samples from {summary['exposures_in']:,} "
          f"exposures; scenarios {list(registry.scenarios)}", flush=True)
    return config_dir, work / "agg"


def plan_runs(args, scenarios: list[str], work: Path) -> list[Run]:
    base = yaml.safe_load((REPO / args.model).read_text())
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)

    def model_file(stem: str, raw: dict) -> Path:
        path = models / f"{stem}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    variants: list[tuple[str, Path, tuple[str, ...]]] = []
    if "joint" in args.variants:
        variants.append(("MTFM joint", model_file("joint", base), tuple(scenarios)))
    if "alone" in args.variants:
        variants += [("MTFM alone", model_file(f"alone_{s}", base | {"scenarios": [s]}), (s,)) for s in scenarios]
    if "dlrm" in args.variants:
        variants.append(("DLRM-MMoE joint", REPO / args.baseline, tuple(scenarios)))
    if "hta" in args.variants:
        for label, layout in (("HTA", HTA), ("full", FULL)):
            variants.append((f"MTFM {label} {layout}", model_file(f"layout_{label}", base | {"hta_layout": layout}),
                             tuple(scenarios)))
    if "table4" in args.variants:
        for layout, kv_heads in TABLE4:
            name = table4_variant(layout, kv_heads)
            raw = base | {"hta_layout": layout, "num_kv_heads": kv_heads or base["num_heads"]}
            stem = "".join(c if c.isalnum() else "_" for c in name)
            variants.append((name, model_file(stem, raw), tuple(scenarios)))
    return [Run(v, seed, m, s) for seed in args.seeds for v, m, s in variants]


def train_config(args, run: Run, data: Path) -> dict:
    return {"name": run.name, "model": str(run.model), "data": str(data), "test_windows": args.test_windows,
            "epochs": args.epochs, "tokens_per_batch": args.tokens_per_batch, "rows_per_read": 256,
            "lr": args.lr, "seed": run.seed, "log_every": 50, "checkpoint_every": 1_000_000, "keep_checkpoints": 1,
            "evaluate_at_checkpoints": False, "num_workers": 1, "use_gpu": args.device == "cuda",
            "cpus_per_worker": args.cpus_per_run, "gpus_per_worker": 1.0 / args.parallel, "max_failures": 0}


def run_all(args, runs: list[Run], config_dir: Path, data: Path, work: Path, record) -> None:
    """Start `--parallel` training jobs at a time on this script's Ray cluster; `record(run, result)` each."""
    ray = init_ray()
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    started = time.perf_counter()
    pending, active = list(runs), {}
    done = 0
    while pending or active:
        while pending and len(active) < args.parallel:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                print(f"[quality] budget of {args.budget_s:.0f} s spent: {len(pending)} run(s) not started", flush=True)
                pending = []
                break
            run = pending.pop(0)
            folder = work / "runs" / run.name
            folder.mkdir(parents=True, exist_ok=True)
            cfg = folder / "train.yaml"
            cfg.write_text(yaml.safe_dump(train_config(args, run, data), sort_keys=False))
            log = open(folder / "train.log", "w")
            cmd = [sys.executable, "-m", "mtfm.platform.train", "--config-dir", str(config_dir), "--config", str(cfg),
                   "--out", str(folder)]
            active[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)] = (run, folder, log,
                                                                                           time.perf_counter())
        time.sleep(0.5)
        for proc in [p for p in active if p.poll() is not None]:
            run, folder, log, t0 = active.pop(proc)
            log.close()
            done += 1
            eval_file = folder / "eval.json"
            if proc.returncode != 0 or not eval_file.exists():
                tail = (folder / "train.log").read_text().splitlines()[-15:]
                print(f"[quality] {run.name} FAILED (exit {proc.returncode}); log {folder / 'train.log'}:\n  "
                      + "\n  ".join(tail), flush=True)
                record(run, None, time.perf_counter() - t0)
                continue
            result = json.loads(eval_file.read_text())["eval"]
            record(run, result, time.perf_counter() - t0)
            shown = ", ".join(f"{s} {metric_value(result[f'{s}/order']['gauc']):.4f}" for s in run.scenarios
                              if f"{s}/order" in result)
            print(f"[quality] {done}/{len(runs)} {run.variant} seed {run.seed} ({time.perf_counter() - t0:.0f} s): "
                  f"order GAUC {shown}", flush=True)


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(table: mean/std per scenario and variant, comparisons: paired per-seed differences)."""
    def stats(values):
        values = list(values)
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)}

    table = []
    for key in sorted(dict.fromkeys((r["scenario"], r["variant"]) for r in rows)):
        mine = [r for r in rows if (r["scenario"], r["variant"]) == key]
        table.append({"scenario": key[0], "variant": key[1], **{m: stats(r[m] for r in mine) for m in METRICS}})
    by = {(r["scenario"], r["variant"], r["seed"]): r for r in rows}
    comparisons = []
    pairs = [("MTFM joint", "MTFM alone", "order_gauc"), ("MTFM joint", "DLRM-MMoE joint", "order_gauc"),
             ("MTFM joint", "MTFM alone", "click_gauc"), ("MTFM joint", "DLRM-MMoE joint", "click_gauc")]
    pairs += [(f"MTFM HTA {HTA}", f"MTFM full {FULL}", m) for m in ("click_auc", "order_auc")]
    pairs += [(table4_variant("(3:1)*4", 1), table4_variant(b, kv), m) for b, kv in (("(0:16)*1", 1), ("(3:1)*4", None))
              for m in ("click_auc", "order_auc")]
    for scenario in sorted({r["scenario"] for r in rows}):
        for a, b, metric in pairs:
            seeds = sorted(s for (sc, v, s) in by if sc == scenario and v == a and (sc, b, s) in by)
            if not seeds:
                continue
            deltas = [by[(scenario, a, s)][metric] - by[(scenario, b, s)][metric] for s in seeds]
            spread = max(stats(by[(scenario, v, s)][metric] for s in seeds)["std"] for v in (a, b))
            comparisons.append({"scenario": scenario, "a": a, "b": b, "metric": metric, "delta": stats(deltas),
                                "spread": spread, "seeds": seeds})
    return table, comparisons


def print_report(table: list[dict], comparisons: list[dict]) -> None:
    print(f"\n{'scenario':<9} {'variant':<20} " + " ".join(f"{m:>17}" for m in METRICS))
    for t in table:
        print(f"{t['scenario']:<9} {t['variant']:<20} "
              + " ".join(f"{t[m]['mean']:>8.4f} ± {t[m]['std']:.4f}" for m in METRICS))
    print(f"\n{'scenario':<9} {'comparison':<46} {'metric':<11} {'delta (a - b)':>18} {'spread':>7}  verdict")
    for c in comparisons:
        d = c["delta"]
        if c["a"].startswith(("MTFM HTA", "T4")):
            verdict = "within 0.1 pp" if abs(d["mean"]) <= 0.001 else f"{abs(d['mean']) * 100:.2f} pp apart"
        elif len(c["seeds"]) < 2:
            verdict = "n/a (one seed: no spread to compare with)"
        else:
            verdict = ("a wins beyond spread" if d["mean"] > c["spread"] else
                       "b wins beyond spread" if -d["mean"] > c["spread"] else "within spread")
        print(f"{c['scenario']:<9} {c['a'] + ' vs ' + c['b']:<46} {c['metric']:<11} "
              f"{d['mean']:>+9.4f} ± {d['std']:.4f} {c['spread']:>7.4f}  {verdict}")


def combine(files: list[str], out: Path) -> None:
    """Merge earlier outputs: their runs (each file's own args kept beside them), one table."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    for f, part in zip(files, parts):
        if part["failed"]:
            print(f"[quality] {f}: {len(part['failed'])} failed run(s) left out: {part['failed']}", flush=True)
    rows = [r for part in parts for r in part["runs"]]
    keys = [(r["variant"], r["scenario"], r["seed"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"[quality] --combine: the same (variant, scenario, seed) is in more than one of {files}")
    table, comparisons = summarise(rows)
    print_report(table, comparisons)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"combined_from": [{"file": f, "args": p["args"], "date": p["date"],
                                                  "seconds": p["seconds"], "run_seconds": p["run_seconds"]}
                                                 for f, p in zip(files, parts)],
                               "runs": rows, "table": table, "comparisons": comparisons}, indent=1))
    print(f"\n[quality] {len(rows)} (run, scenario) results from {len(files)} file(s); wrote {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not args.combine:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("quality.py: --device cuda: no CUDA device here (the default --device cpu runs on "
                             "the CPU)")
    out = Path(args.out or default_out(f"quality_{args.dataset}.json"))
    if args.combine:
        combine(args.combine, out)
        return
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mtfm-quality-"))
    started = time.perf_counter()
    ray = init_ray()
    # Each run holds --cpus-per-run for its Ray Train worker and needs about one more for its Ray Data
    # reads: more runs at once than that leaves the reads waiting for CPUs forever.
    fits = max(1, int(ray.cluster_resources().get("CPU", 1) // (args.cpus_per_run + 1)))
    if args.parallel > fits:
        print(f"[quality] --parallel {args.parallel} does not fit {ray.cluster_resources()['CPU']:.0f} CPUs "
              f"({args.cpus_per_run:g} per run + 1 for its reads): running {fits} at a time", flush=True)
        args.parallel = fits
    config_dir, data = prepare_data(args, work)
    runs = plan_runs(args, list(load_registry(config_dir).scenarios), work)
    print(f"[quality] {len(runs)} runs, {args.parallel} at a time on {args.device}; logs under {work / 'runs'}",
          flush=True)
    rows, failed, seconds = [], [], {}

    def record(run: Run, result: dict | None, elapsed: float) -> None:
        seconds[run.name] = elapsed
        if result is None:
            failed.append(run.name)
        else:
            for s in run.scenarios:
                if f"{s}/click" in result:
                    rows.append({"variant": run.variant, "scenario": s, "seed": run.seed,
                                 **{f"{t}_{m}": metric_value(result[f"{s}/{t}"][m]) for t in TASKS
                                    for m in ("auc", "gauc")},
                                 "test_users": result[f"{s}/click"]["users_scored"],
                                 "test_positives": {t: result[f"{s}/{t}"]["positives"] for t in TASKS}})
        table, comparisons = summarise(rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "runs": rows, "failed": failed, "run_seconds": seconds, "table": table,
                                   "comparisons": comparisons, "seconds": time.perf_counter() - started}, indent=1))

    run_all(args, runs, config_dir, data, work, record)
    table, comparisons = summarise(rows)
    print_report(table, comparisons)
    print(f"\n[quality] {len(runs) - len(failed)} of {len(runs)} runs in {time.perf_counter() - started:.0f} s; "
          f"wrote {out}")
    if failed:
        print(f"[quality] kept {work} for the failed runs' logs ({work / 'runs'})")
        sys.exit(1)
    if not args.work_dir:  # a temp folder of this study's data and runs (hundreds of MB): --work-dir keeps them
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
