"""Warm start vs from scratch for a scenario added to a trained model (issue 8).

    python bench/warm_start.py [--users 600] [--days 4] [--steps 60] [--seeds 0 1 2] [--out FILE]

One synthetic world of four scenarios: the seed three plus `grocery` (configs/examples/grocery.yaml).
A base model is trained on the seed three; then, per training seed, (a) a warm start from it on
all four scenarios' data and (b) the same model from scratch on grocery alone, both for the same
number of steps. Reports grocery's click and order AUC/GAUC on the held-out last day,
mean and std over seeds. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from checkout import default_out

from mtfm.platform.aggregate import aggregate
from mtfm.platform.metrics import metric_value
from mtfm.platform.registry import load_registry
from mtfm.platform.synth import synthesize
from mtfm.platform.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--users", type=int, default=600, help="synthetic users")
    parser.add_argument("--days", type=int, default=4, help="synthetic days (one window each)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each run (warm start and scratch)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one pair of runs each")
    parser.add_argument("--out", default=default_out("warm_start.json"), help="JSON results file")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mtfm-warm-"))
    try:
        run_study(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_study(args, root: Path) -> None:
    three, four = root / "configs3", root / "configs4"
    for folder in (three, four):
        shutil.copytree(REPO / "configs", folder, ignore=shutil.ignore_patterns("movielens"))
    shutil.copy(REPO / "configs/examples/grocery.yaml", four / "scenarios" / "grocery.yaml")
    quiet = dict(log=lambda *a, **k: None)
    synthesize(load_registry(four), root / "raw", users=args.users, days=args.days, seed=0, **quiet)
    aggregate(load_registry(four), root / "raw", root / "agg", **quiet)
    print(f"[warm_start] {args.users} users x {args.days} days synthesized and aggregated; training the base model "
          f"({args.steps} steps) on hp, phf and sqs", flush=True)

    base = TrainConfig.load(REPO / "configs/train/tiny.yaml").to_dict() | {
        "model": str(REPO / "configs/model/tiny.yaml"), "num_workers": 1, "cpus_per_worker": 1.0, "epochs": 100,
        "max_steps": args.steps, "log_every": 10, "checkpoint_every": 10_000}
    grocery_only = root / "grocery_only.yaml"
    grocery_only.write_text(yaml.safe_dump(yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text())
                                           | {"scenarios": ["grocery"]}))
    started = time.perf_counter()
    pretrained = train(TrainConfig.from_dict(base, "bench"), data=str(root / "agg"), out=root / "base",
                       config_dir=str(three), **quiet)
    rows = []
    for seed in args.seeds:
        for variant, changes, init in (("warm start, all scenarios", {}, pretrained),
                                       ("scratch, grocery only", {"model": str(grocery_only)}, None)):
            run = train(TrainConfig.from_dict(base | changes | {"seed": seed}, "bench"), data=str(root / "agg"),
                        out=root / f"{variant[:5]}-{seed}", init_from=init, config_dir=str(four), **quiet)
            result = json.loads((run / "eval.json").read_text())["eval"]
            print(f"[warm_start] {variant}, seed {seed}: grocery order GAUC "
                  f"{metric_value(result['grocery/order']['gauc']):.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            rows.append({"variant": variant, "seed": seed,
                         **{f"{task}_{m}": metric_value(result[f"grocery/{task}"][m]) for task in ("click", "order")
                            for m in ("auc", "gauc")}})
    table = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        spread = (lambda k: statistics.stdev(r[k] for r in mine)) if len(mine) > 1 else (lambda k: None)  # 1 seed
        stats = {k: (statistics.mean(r[k] for r in mine), spread(k))
                 for k in ("click_auc", "click_gauc", "order_auc", "order_gauc")}
        table.append({"variant": variant, **{k: {"mean": m, "std": s} for k, (m, s) in stats.items()}})
    print(f"{'grocery, after ' + str(args.steps) + ' steps':<28} {'click AUC':>15} {'click GAUC':>15} "
          f"{'order AUC':>15} {'order GAUC':>15}")
    for t in table:
        print(f"{t['variant']:<28} " + " ".join(
            f"{t[k]['mean']:>8.4f}" + (f"±{t[k]['std']:.4f}" if t[k]["std"] is not None else " (1 seed)")
            for k in ("click_auc", "click_gauc", "order_auc", "order_gauc")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "runs": rows,
                                          "table": table, "seconds": time.perf_counter() - started}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
