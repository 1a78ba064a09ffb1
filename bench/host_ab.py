"""A serving request's host work, this checkout against a git revision, interleaved in one process.

    python bench/host_ab.py --base b4f728a [--out FILE] [--repeats N] [--rounds R]

Times what a replica does on the host for one request before the model runs: decoding and checking
the body (`orjson.loads` + `RankRequestParser.parse`, rows and columns), collating the whole request
and collating its candidates alone (a cached user: `deployments/backends.py`), at K = 50, 200, 1000
candidates with 1000 history events (bench/serve_gpu.py's request), and a small request (K=1, 5
events per sequence); and the collation of a training batch (40 users of the GPU benchmark's token
mix). The base's `deployments/rank_request.py` and `model/collate.py` are read from `git show
<base>:<path>` and loaded beside this checkout's, importing this checkout's other modules; then the
two run in alternating rounds (best median of the rounds), so a busy machine slows both alike.
Prints a table (ms, and this checkout over the base) and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from checkout import default_out, ensure_mtfm_importable
from collate import TRAIN_MIX, timed_ms

ROOT = Path(__file__).resolve().parents[1]


def module_at(revision: str, path: str, name: str, folder: Path) -> ModuleType:
    """`path` of the repository at `revision`, loaded as module `name` (a sibling of its current
    module, so its relative imports resolve to this checkout's package)."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = folder / f"{name.rpartition('.')[2]}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def best_median_ms(fns: dict[str, callable], repeats: int, rounds: int) -> dict[str, float]:
    """Each function's median over `repeats` calls, best of `rounds` rounds that alternate them."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed_ms(fn, repeats)["p50"])
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, metavar="REV", help="git revision to compare against")
    parser.add_argument("--out", default=default_out("host_ab.json"),
                        help="JSON results file (default $OUT, else bench/out: host_ab.json)")
    parser.add_argument("--repeats", type=int, default=200, help="calls per round and case (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        parser.error(f"--repeats and --rounds must be >= 1, found {args.repeats} and {args.rounds}")
    ensure_mtfm_importable()
    import orjson
    import torch

    import mtfm.deployments.rank_request as this_request
    import mtfm.model.collate as this_collate
    from mtfm.deployments.backends import without_events
    from mtfm.model.config import restrict_registry
    from mtfm.model.sample_tables import random_aggregated_table
    from mtfm.platform.registry import load_registry
    from serve_gpu import SCENARIO, RequestBodies, write_config_dir

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mtfm-host-ab-") as tmp:
        try:
            base_request = module_at(args.base, "deployments/rank_request.py", "mtfm.deployments._base_rank_request",
                                     Path(tmp))
            base_collate = module_at(args.base, "model/collate.py", "mtfm.model._base_collate", Path(tmp))
        except subprocess.CalledProcessError as exc:
            parser.error(f"--base {args.base}: git show failed: {exc.stderr.strip()}")
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()
        registry = load_registry(write_config_dir(Path(tmp) / "configs", 1000))
        versions = {"base": (base_request, base_collate), "this": (this_request, this_collate)}
        parsers = {v: request.RankRequestParser(registry, SCENARIO, max_candidates=1000)
                   for v, (request, _) in versions.items()}
        collators = {v: collate.Collator(restrict_registry(registry, [SCENARIO])) for v, (_, collate) in versions.items()}
        now = int(time.time() * 1000)
        rows = []

        def compare(case: str, fns: dict[str, callable], repeats: int = args.repeats) -> None:
            ms = best_median_ms(fns, repeats, args.rounds)
            rows.append({"case": case, "base_ms": round(ms["base"], 4), "this_ms": round(ms["this"], 4),
                         "ratio": round(ms["this"] / ms["base"], 3)})
            print(f"  {case:<34} {ms['base']:8.3f} {ms['this']:8.3f} {ms['this'] / ms['base']:7.2f}x", flush=True)

        print(f"host ms per call (best median of {args.rounds} alternating rounds of {args.repeats}), base {args.base} "
              f"vs this checkout ({revision})\n  {'case':<34} {'base':>8} {'this':>8} {'ratio':>8}")
        from mtfm.deployments.rank_request import example_request

        for form in ("rows", "columns"):
            columns = form == "columns"
            bodies = {"K=1, 5 events": orjson.dumps(example_request(registry, SCENARIO, candidates=1, events=5,
                                                                    ts=now - 1000, columns=columns))}
            bodies |= {f"K={k}": RequestBodies(registry, k, 1000, columns=columns).for_user(7) for k in (50, 200, 1000)}
            for size, raw in bodies.items():
                compare(f"decode+parse {form}, {size}", {
                    v: (lambda p=p, raw=raw: p.parse(orjson.loads(raw), now_ms=now)) for v, p in parsers.items()})
        for k in (50, 200, 1000):
            table = parsers["this"].parse(RequestBodies(registry, k, 1000).example, now_ms=now).table
            candidates = without_events(table, registry.sequences)
            compare(f"collate request, K={k}", {v: (lambda c=c: c(table)) for v, c in collators.items()})
            compare(f"collate candidates, K={k}", {v: (lambda c=c: c(candidates)) for v, c in collators.items()})
        full = load_registry(ROOT / "configs")
        train_table = random_aggregated_table(full, 40, np.random.default_rng(0), lengths=TRAIN_MIX)
        train_collators = {v: collate.Collator(full, max_len={"history": 1000, "realtime": 100})
                           for v, (_, collate) in versions.items()}
        compare("collate training batch, 40 users", {v: (lambda c=c: c(train_table)) for v, c in train_collators.items()},
                max(args.repeats // 10, 5))
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base": args.base, "this": revision,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "repeats": args.repeats,
              "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
