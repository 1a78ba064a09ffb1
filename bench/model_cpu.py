"""CPU benchmark of one MTFM training step (forward + backward): the shape of MTFM's Table 4
before any GPU work. Full attention `(0:L)*1` vs hybrid `(3:1)*1`, with and without GQA, at a
few tokens per batch, on a realistic token mix (history up to 1000, realtime up to 100,
50-300 targets over the scenarios), with the forward FLOPs of DESIGN.md's convention
(mtfm.model.summary) and the achieved GFLOP/s of forward + backward (backward = 2x forward for
the matmuls, 2.5x for attention).

    python bench/model_cpu.py --config configs/model/small.yaml --out bench/results/model_cpu.json

Each case runs in a fresh subprocess so its peak memory (ru_maxrss, the whole process: model,
optimizer-free step, activations) is its own; `step_mem_mib` is the peak minus the RSS after
the model and batch were built, i.e. what the step itself added. Times are the minimum over
the repeats (wall clock; process CPU time of all threads beside it). The numbers are only
meaningful on an otherwise idle machine. `--device cuda` runs the same cases on a GPU (the
config's kernels and compute dtype; memory = torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from checkout import default_out

CASES = [  # name, hta_layout, num_kv_heads (None = num_heads)
    ("full", "(0:4)*1", None),
    ("full+gqa", "(0:4)*1", 1),
    ("hta(3:1)", "(3:1)*1", None),
    ("hta(3:1)+gqa", "(3:1)*1", 1),
]
TOKEN_BUDGETS = (2500, 5000, 10000)
MIX = {"history": (200, 1000), "realtime": (20, 100), "hp": (25, 150), "phf": (15, 100), "sqs": (10, 50)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(config_path: str, layout: str, kv_heads: int | None, budget: int, repeats: int, seed: int,
             device_name: str, threads: int) -> dict:
    import numpy as np
    import torch

    from mtfm.model import Collator, build_model, load_model_config, multitask_bce_loss, split_by_token_budget
    from mtfm.model.sample_tables import random_aggregated_table
    from mtfm.model.summary import TokenMix, forward_flops, training_flops
    from mtfm.platform.registry import load_registry

    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    registry = load_registry("configs")
    config = load_model_config(config_path).replace(hta_layout=layout, num_kv_heads=kv_heads)
    model = build_model(config, registry).to(device).train()
    collator = Collator(model.registry, max_len={"history": 1000, "realtime": 100})
    table = random_aggregated_table(registry, 64, np.random.default_rng(seed), lengths=MIX)
    cuts = split_by_token_budget(collator.token_counts(table), budget)
    batch = collator(table.slice(0, cuts[1]))
    mix = TokenMix.from_batch(batch)
    batch = batch.to(device)
    flops = forward_flops(config, model.registry, mix)
    base_mib = _rss_mib()

    def step() -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        with model.autocast(device.type):
            output = model(batch)
        loss, _ = multitask_bce_loss(output, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    step()  # warm-up (and Triton compilation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mib = torch.cuda.memory_allocated() / 2**20
    times, cpu_times = zip(*[step() for _ in range(repeats)])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tokens": batch.num_tokens, "users": batch.num_users, "targets": batch.num_targets,
        "fwd_bwd_s": min(times), "fwd_bwd_s_all": times, "cpu_s": min(cpu_times), "cpu_s_all": cpu_times,
        "peak_rss_mib": peak, "step_mem_mib": peak - base_mib,
        "fwd_gflop": flops["total"] * batch.num_users / 1e9,
        "fwd_attention_gflop": flops["attention"] * batch.num_users / 1e9,
        "fwd_bwd_gflop": training_flops(flops) * batch.num_users / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/model/small.yaml", help="the model config timed")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(TOKEN_BUDGETS), help="tokens per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=default_out("model_cpu.json"), help="JSON results file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single case, in a child process
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (the default --device cpu runs on the CPU)")
    if args.one:
        case = json.loads(args.one)
        print(json.dumps(run_case(args.config, case["layout"], case["kv_heads"], case["budget"], args.repeats, args.seed,
                                  args.device, args.threads)))
        return 0

    results = []
    header = (f"{'case':<14} {'layout':<9} {'kv':>3} {'tokens':>6} {'users':>5} {'targets':>7} {'fwd+bwd ms':>10} "
              f"{'cpu ms':>8} {'fwd GFLOP':>9} {'attn GFLOP':>10} {'GFLOP/s':>9} {'peak MiB':>8} {'step MiB':>8}")
    print(header)
    for budget in args.budgets:
        for name, layout, kv in CASES:
            case = {"layout": layout, "kv_heads": kv, "budget": budget}
            child = subprocess.run([sys.executable, __file__, "--config", args.config, "--repeats", str(args.repeats),
                                    "--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads),
                                    "--one", json.dumps(case)],
                                   capture_output=True, text=True, check=True)
            r = json.loads(child.stdout.strip().splitlines()[-1]) | {"case": name} | case
            results.append(r)
            print(f"{name:<14} {layout:<9} {kv or '-':>3} {r['tokens']:>6} {r['users']:>5} {r['targets']:>7} "
                  f"{r['fwd_bwd_s'] * 1e3:>10.1f} {r['cpu_s'] * 1e3:>8.0f} {r['fwd_gflop']:>9.1f} "
                  f"{r['fwd_attention_gflop']:>10.1f} {r['fwd_bwd_gflop'] / r['fwd_bwd_s']:>9.1f} "
                  f"{r['peak_rss_mib']:>8.0f} {r['step_mem_mib']:>8.0f}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "device": args.device, "threads": args.threads,
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
