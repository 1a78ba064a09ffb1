"""Training throughput on this machine's CPUs, through the real Ray Train path.

    python bench/train_cpu.py [--users 600] [--days 4] [--steps 40] [--workers 1 2] [--models FILE ...]
                              [--out FILE]

Synthesizes and aggregates a small world once, then trains `configs/train/tiny.yaml` with each
--models config (default `configs/model/tiny.yaml`) for a fixed number of steps with each worker count, and reports samples/s and
tokens/s from the run's log, leaving out the first logged window (start-up and first-batch
costs). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from checkout import default_out

from mtfm.platform.aggregate import aggregate
from mtfm.platform.registry import load_registry
from mtfm.platform.synth import synthesize
from mtfm.platform.train import METRICS_FILE, TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--users", type=int, default=600, help="synthetic users")
    parser.add_argument("--days", type=int, default=4, help="synthetic days (one window each)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to time")
    parser.add_argument("--models", nargs="+", default=["configs/model/tiny.yaml"], help="model configs to time")
    parser.add_argument("--out", default=default_out("train_cpu.json"), help="JSON results file")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mtfm-bench-train-"))
    registry = load_registry("configs")
    synthesize(registry, root / "raw", users=args.users, days=args.days, seed=0, log=lambda *a, **k: None)
    aggregate(registry, root / "raw", root / "agg", log=lambda *a, **k: None)
    base = TrainConfig.load("configs/train/tiny.yaml").to_dict()
    rows = []
    for model in args.models:
        for workers in args.workers:
            config = TrainConfig.from_dict(base | {
                "model": model, "num_workers": workers, "cpus_per_worker": 1.0 / workers, "epochs": 100,
                "max_steps": args.steps, "log_every": 5, "checkpoint_every": 10_000,
                "evaluate_at_checkpoints": False}, "bench")
            start = time.perf_counter()
            run = train(config, data=str(root / "agg"), out=root / f"run-{Path(model).stem}-{workers}",
                        log=lambda *a: None)
            wall = time.perf_counter() - start
            # eval lines have no rates
            lines = (run / METRICS_FILE).read_text().splitlines()
            rates = [r for r in map(json.loads, lines) if "samples_per_s" in r]
            log = rates[1:] or rates  # the first holds the compile and warm-up, unless it is the only one
            rows.append({"model": Path(model).stem, "workers": workers, "steps": args.steps,
                         "samples_per_s": sum(r["samples_per_s"] for r in log) / len(log),
                         "tokens_per_s": sum(r["tokens_per_s"] for r in log) / len(log),
                         "wall_s_including_startup": wall})
    print(f"{'model':<8} {'workers':>7} {'samples/s':>10} {'tokens/s':>10} {'wall s':>7}")
    for r in rows:
        print(f"{r['model']:<8} {r['workers']:>7} {r['samples_per_s']:>10.0f} {r['tokens_per_s']:>10.0f} "
              f"{r['wall_s_including_startup']:>7.1f}")
    result = {"command": "python bench/train_cpu.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "users": args.users, "days": args.days, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
