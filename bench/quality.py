"""Training quality: MTFM trained jointly vs per scenario vs the DLRM-MMoE baseline (issue 5).

    python bench/quality.py [--users 600] [--days 4] [--steps 60] [--seeds 0 1 2] [--out FILE]

One synthetic world (data seed 0); per training seed, the same number of steps for: MTFM on all
scenarios (joint), MTFM on one scenario's data alone (one run per scenario: `scenarios: [s]`),
and the DLRM-style MMoE baseline on all scenarios. Reports each scenario's click and order
(CTCVR) AUC and GAUC on the held-out last day, mean and std over seeds. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from mtfm.platform.aggregate import aggregate
from mtfm.platform.registry import load_registry
from mtfm.platform.synth import synthesize
from mtfm.platform.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
METRICS = ("click_auc", "click_gauc", "order_auc", "order_gauc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="configs/model/tiny.yaml")
    parser.add_argument("--baseline", default="configs/model/dlrm_mmoe_tiny.yaml")
    parser.add_argument("--out", default="bench/results/quality.json")
    args = parser.parse_args()

    registry = load_registry(REPO / "configs")
    root = Path(tempfile.mkdtemp(prefix="mtfm-quality-"))
    quiet = dict(log=lambda *a, **k: None)
    synthesize(registry, root / "raw", users=args.users, days=args.days, seed=0, **quiet)
    aggregate(registry, root / "raw", root / "agg", **quiet)
    variants = {"MTFM joint": REPO / args.model, "DLRM-MMoE joint": REPO / args.baseline}
    for scenario in registry.scenarios:
        single = root / f"single_{scenario}.yaml"
        single.write_text(yaml.safe_dump(yaml.safe_load((REPO / args.model).read_text()) | {"scenarios": [scenario]}))
        variants[f"MTFM {scenario} alone"] = single
    base = TrainConfig.load(REPO / "configs/train/tiny.yaml").to_dict() | {
        "num_workers": 1, "cpus_per_worker": 1.0, "epochs": 100, "max_steps": args.steps, "log_every": 20,
        "checkpoint_every": 10_000}
    started, rows = time.perf_counter(), []
    for seed in args.seeds:
        for variant, model in variants.items():
            run = train(TrainConfig.from_dict(base | {"model": str(model), "seed": seed}, "bench"),
                        data=str(root / "agg"), out=root / f"{variant.replace(' ', '_')}-{seed}",
                        config_dir=str(REPO / "configs"), **quiet)
            result = json.loads((run / "eval.json").read_text())["eval"]
            for scenario in registry.scenarios:
                if f"{scenario}/click" in result:
                    rows.append({"variant": variant.replace(f" {scenario} alone", " alone"), "scenario": scenario,
                                 "seed": seed, **{f"{t}_{m}": result[f"{scenario}/{t}"][m]
                                                  for t in ("click", "order") for m in ("auc", "gauc")}})
    table = []
    for key in dict.fromkeys((r["scenario"], r["variant"]) for r in rows):
        mine = [r for r in rows if (r["scenario"], r["variant"]) == key]
        table.append({"scenario": key[0], "variant": key[1], **{
            m: {"mean": statistics.mean(r[m] for r in mine),
                "std": statistics.stdev(r[m] for r in mine) if len(mine) > 1 else 0.0} for m in METRICS}})
    table.sort(key=lambda t: (t["scenario"], t["variant"]))
    print(f"{'scenario':<9} {'variant':<16} " + " ".join(f"{m:>16}" for m in METRICS))
    for t in table:
        print(f"{t['scenario']:<9} {t['variant']:<16} " + " ".join(f"{t[m]['mean']:>8.4f}±{t[m]['std']:.4f}" for m in METRICS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "runs": rows,
                                          "table": table, "seconds": time.perf_counter() - started}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
