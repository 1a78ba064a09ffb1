"""Benchmark: Ray Data aggregation vs the same computation in one process (`aggregate_local`).

Both paths run the same per-file validation (`rawlog.validate`) and the same per-partition kernel
(`aggregate.aggregate_partition`); they differ only in orchestration: Ray Data splits the files
by user hash in parallel and aggregates the partitions in parallel, one process reads everything
and aggregates it as one partition. The results are checked equal. Ray runs with each CPU count
of --cpus (scaling); every timing is the best of --repeats runs after a warm-up (the machine may
be shared), and excludes starting Ray; the two paths alternate, so that both see the same load.

    python bench/aggregate.py --exposures 5000000 --out bench/results/aggregate.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from checkout import default_out

from mtfm.platform.aggregate import aggregate, aggregate_local
from mtfm.platform.cluster import init_ray
from mtfm.platform.registry import Registry, load_registry
from mtfm.platform.synth import synthesize

QUIET = dict(log=lambda *_: None)


def users_for(registry: Registry, exposures: int, days: int) -> int:
    per_user_day = sum(s.synthetic.exposures_per_user_day * s.synthetic.active_user_fraction
                       for s in registry.scenarios.values())
    return math.ceil(exposures / (per_user_day * days))


def timed(run) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = run()
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", default="configs",
                        help="the registry to synthesize and aggregate (default configs)")
    parser.add_argument("--exposures", type=int, default=5_000_000, help="about this many exposures (default 5M)")
    parser.add_argument("--days", type=int, default=7, help="synthetic days (default 7)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU counts to run (default 1 2)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed aggregations per CPU count, best kept (default 2)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--out", default=default_out("aggregate.json"), help="JSON results file")
    args = parser.parse_args()

    registry = load_registry(args.config_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mtfm-bench-aggregate-"))
    raw = work / "raw"
    users = users_for(registry, args.exposures, args.days)
    start = time.perf_counter()
    counts = synthesize(registry, raw, users=users, days=args.days, seed=0, overwrite=True, **QUIET)
    print(f"synthetic logs: {users:,} users x {args.days} days, "
          + ", ".join(f"{t} {n:,}" for t, n in counts.items()) + f" ({time.perf_counter() - start:.1f} s)")
    synthesize(registry, work / "warmup", users=20, days=1, seed=1, overwrite=True, **QUIET)

    load_before = os.getloadavg()
    local_times, results = [], {}
    exposures = ray_summary = None
    for cpus in args.cpus:
        ray = init_ray(num_cpus=cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        aggregate(registry, work / "warmup", work / "warmup-out", overwrite=True, **QUIET)
        # Alternate the two, so that both see the same load if the machine is shared.
        local_s = ray_s = math.inf
        for _ in range(args.repeats):
            seconds, summary = timed(lambda: aggregate_local(registry, raw, work / "local", overwrite=True, **QUIET))
            local_s = min(local_s, seconds)
            seconds, ray_summary = timed(lambda: aggregate(registry, raw, work / "ray", overwrite=True, **QUIET))
            ray_s = min(ray_s, seconds)
        ray.shutdown()
        exposures = summary["exposures_in"]
        local_times.append(local_s)
        results[cpus] = {"seconds": ray_s, "exposures_per_s": exposures / ray_s,
                         "single_process_seconds": local_s, "ratio_vs_single_process": local_s / ray_s}
        print(f"[aggregate] Ray Data on {cpus} CPU(s): {ray_s:.2f} s (single process alongside {local_s:.2f} s)",
              flush=True)
    local_s = min(local_times)
    print(f"\n{'aggregation':<28} {'seconds':>8} {'exposures/s':>12} {'single process / this':>22}")
    for cpus, r in results.items():
        print(f"{f'Ray Data, {cpus} CPU(s)':<28} {r['seconds']:>8.2f} {r['exposures_per_s']:>12,.0f} "
              f"{r['ratio_vs_single_process']:>21.2f}x")
    print(f"{'single process (best)':<28} {local_s:>8.2f} {exposures / local_s:>12,.0f} {'':>22}")

    key = [("user_id", "ascending"), ("window", "ascending")]
    equal = pq.read_table(work / "ray" / "samples").sort_by(key).equals(pq.read_table(work / "local" / "samples"))
    print(f"results equal: {equal}; exposures {exposures:,} -> user samples {ray_summary['samples_out']:,} "
          f"(compression {ray_summary['compression']:.1f}x)")
    report = {
        "benchmark": "aggregate", "date": time.strftime("%Y-%m-%d"), "machine": {
            "cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "exposures": exposures, "behavior_events": sum(n for t, n in counts.items() if t.startswith("behaviors/")),
        "samples": ray_summary["samples_out"], "compression": ray_summary["compression"],
        "repeats": args.repeats, "results_equal": equal,
        "single_process": {"seconds": local_s, "exposures_per_s": exposures / local_s},
        "ray": {str(c): r for c, r in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if not args.work_dir:
        shutil.rmtree(work)
    if not equal:
        raise SystemExit("Ray Data and single-process results differ")


if __name__ == "__main__":
    main()
