"""Host time of collation (`mtfm.model.Collator`): one serving request, and one training batch.

    python bench/collate.py [--out FILE] [--repeats N]

Serving: one hp request of K = 50, 200, 1000 candidates and 1000 history events (the request of
bench/serve_gpu.py), parsed as the router does, collated as a replica does (the graphed GPU path collates every request on the
host before its single copy to the device), and its candidates alone, as a replica collates a
request whose user side is cached. Training: 40 synthetic users of the GPU benchmark's
token mix (about 27K tokens), collated with the full registry. Medians and p90 over --repeats
calls, in one process on one thread; prints a table and writes JSON (--out, default
$OUT/collate.json or bench/out/collate.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from checkout import default_out, ensure_mtfm_importable

ROOT = Path(__file__).resolve().parents[1]
TRAIN_MIX = {"history": (200, 1000), "realtime": (20, 100), "hp": (25, 150), "phf": (15, 100), "sqs": (10, 50)}


def timed_ms(fn, repeats: int) -> dict:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"p50": round(float(np.median(ms)), 3), "p90": round(float(np.percentile(ms, 90)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=default_out("collate.json"),
                        help="JSON results file ($OUT, else bench/out)")
    parser.add_argument("--repeats", type=int, default=300, help="collations timed per case")
    args = parser.parse_args()
    ensure_mtfm_importable()
    import torch

    from mtfm.deployments.backends import without_events
    from mtfm.deployments.rank_request import RankRequestParser
    from mtfm.model import Collator
    from mtfm.model.config import restrict_registry
    from mtfm.model.sample_tables import random_aggregated_table
    from mtfm.platform.registry import load_registry
    from serve_gpu import SCENARIO, RequestBodies, write_config_dir

    torch.set_num_threads(1)
    serving_registry = load_registry(write_config_dir(Path(tempfile.mkdtemp()) / "configs", 1000))
    request_parser = RankRequestParser(serving_registry, SCENARIO, max_candidates=1000)
    request_collator = Collator(restrict_registry(serving_registry, [SCENARIO]))
    rows = {}
    for k in (50, 200, 1000):
        body = RequestBodies(serving_registry, k, history_events=1000).example  # serve_gpu.py's request
        request = request_parser.parse(body, now_ms=body["ts"])
        rows[f"request K={k}"] = timed_ms(lambda: request_collator(request.table), args.repeats) | {
            "tokens": request.num_tokens}
    for k in (50, 200, 1000):  # a cached user: its candidates alone (deployments/backends.py)
        body = RequestBodies(serving_registry, k, history_events=1000).example
        candidates = without_events(request_parser.parse(body, now_ms=body["ts"]).table, serving_registry.sequences)
        rows[f"candidates K={k}"] = timed_ms(lambda: request_collator(candidates), args.repeats) | {"tokens": k}
    registry = load_registry(ROOT / "configs")
    train_collator = Collator(registry, max_len={"history": 1000, "realtime": 100})
    table = random_aggregated_table(registry, 40, np.random.default_rng(0), lengths=TRAIN_MIX)
    rows["training, 40 users"] = timed_ms(lambda: train_collator(table), max(args.repeats // 10, 10)) | {
        "tokens": train_collator(table).num_tokens}
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "repeats": args.repeats}
    print(f"{info}\n{'collate':<22} {'tokens':>7} {'p50 ms':>8} {'p90 ms':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['tokens']:>7} {r['p50']:>8.3f} {r['p90']:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "collate_ms": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
