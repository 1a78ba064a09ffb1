"""GPU training benchmark (issue 7, parts 1 and 2): MTFM training steps through Ray Train.

    python bench/train_gpu.py [--out FILE] [--no-ray] [--device cuda|cpu] [--tiny] [--only NAME ...]
                              [--cuda-graphs off|on|both] [--workers N [--gpus-per-worker F]] [--pipeline]
                              [--compile-shapes N]

One Ray Train `TorchTrainer` with one GPU worker (use_gpu=True) runs every case in turn in the
same worker process (one trainer start instead of one per case); `--no-ray` runs the same worker
function in-process (debugging; `--device cpu --tiny` for this CPU box at tiny shapes).
`--workers N` runs N workers (one GPU each) under DDP, as `num_workers: N` trains: each worker
steps its own batches (the same mix, another draw). samples/s, tokens/s, TFLOP/s and MFU (over N
times the matmul rate) count every worker; the per-step figures (users, tokens, TFLOP, step ms and
its split, host ms) and peak memory are one worker's (the first's). Eager steps only, as training's
DDP is; a case that fails on any worker ends the run (the others would wait in DDP's all-reduce).
`--gpus-per-worker F` below 1 lets workers share GPUs (DDP over gloo then, as training picks it:
`ddp_backend`), MFU over N x F matmul rates: a check that the path runs, not a scaling figure.

Per case: the model is built from its config (plus overrides), Adam + Adagrad from
`mtfm.platform.train_worker.make_optimizers`, and trained on pre-collated token-budget batches of
synthetic users (`mtfm.model.sample_tables`, the realistic mix: history 200-1000, realtime 20-100,
targets 25-150 hp + 15-100 phf + 10-50 sqs, i.e. 50-300 over 3 scenarios), rotating over 4
distinct batches. The step is training's (`mtfm.platform.train_step.TrainStep`): batch.to(device)
(one H2D copy), autocast forward, multitask BCE, zero_grad, backward, grad clip 1.0, optimizer steps.
`--cuda-graphs on` runs every case with forward, backward, clipping and Adam replayed from a CUDA graph (the 4
batches padded to one `GrowingShape`; samples, tokens and FLOPs count the real rows only, so the
padding is a cost), `both` runs each case eagerly and then graphed (" graphed" rows). The "kern" cases (the
kernels against the PyTorch references) always step eagerly: a reference step waits for the GPU, so it cannot be
captured, and its Triton counterpart is timed the same way.

- Throughput pass: W warm-up steps, then S steps with no host sync inside; samples/s, tokens/s.
- Split pass: K more steps with torch.cuda.synchronize() around data (H2D), forward (+ loss),
  backward and optimizer (zero_grad + clip + steps); medians. Graphed, forward, backward, clipping and
  Adam are one replay: the "fwd" column holds it, "bwd" is empty and "opt" is Adagrad's eager step.
- Peak memory: torch.cuda.max_memory_allocated from right after the model was moved to the GPU
  (parameters, gradients, optimizer state, activations).
- FLOPs: `mtfm.model.summary.forward_flops` on each batch's exact token mix and visible (query, key)
  pairs; training FLOPs by DESIGN.md's convention (`training_flops`: backward 2x forward for the
  linear layers, 2.5x for attention). MFU = achieved training FLOP/s over the dense bf16 8192^3 matmul
  rate measured at the start of the same run. `mfu_backward_2x` counts attention's backward as 2x
  too, as runs before 2026-12-06 did.
- Profile (`--profile` cases): one step under torch.profiler, its top kernels into profiles.txt; with
  `--profile-ops` (and `--cuda-graphs off`) also each kernel's time by the autograd node or the code
  that launched it (`kernel_time_by_op`).
- Host syncs: one extra step under torch.cuda.set_sync_debug_mode("warn"); each synchronising
  call is recorded with its innermost frame in this repository's code.
- Collate: the host time to collate one batch.
- Host probe (`host_probe`): the process's host speed at the start and after each case, to read
  host-bound cases against (a Python loop; host time per tiny CUDA launch).
OOM is caught per case and recorded. Prints a table last and writes JSON (--out).

Optional sections (issue 7, part 1), run before the cases, in the JSON's "sections":
- `--pipeline` (a): the small model's step fed pre-collated batches, then raw Arrow tables
  collated inline in the loop (train.py before), then the same through `BatchPrefetcher`
  (train.py now: collation and the H2D copy in a thread, overlapping the step); ms per step each.
- `--compile-shapes N` (b): one synchronised step on each of N batches of new shapes, with fresh
  Triton kernels as shipped (`do_not_specialize` on per-batch arguments) and specialised as
  before; step times (compiles included) and variants compiled per kernel.

On the GPU machine (no install; `bench/checkout.py` maps the package): build Ray with
/work/shared/device/make-ray-bundle.sh, add the googleapis-common-protos wheel under .devbundle/whl
(Ray's dashboard agent imports google.rpc; without it the node start timed out there), carry .devbundle,
and see bench/RESULTS.md "GPU training (issue 7)" for the exact command.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from checkout import default_out, ensure_mtfm_importable

ROOT = Path(__file__).resolve().parents[1]

MIX = {"history": (200, 1000), "realtime": (20, 100), "hp": (25, 150), "phf": (15, 100), "sqs": (10, 50)}
MAX_LEN = {"history": 1000, "realtime": 100}
TINY_MIX = {"history": (10, 50), "realtime": (2, 10), "hp": (3, 10), "phf": (2, 6), "sqs": (1, 4)}

# name, part, model config, overrides, token budget key ("main" or "kernels")
SMALL = "configs/model/small.yaml"
CASES = [
    ("small", "sizes", SMALL, {}, "main"),
    ("medium", "sizes", "configs/model/medium.yaml", {}, "main"),
    ("large", "sizes", "configs/model/large.yaml", {}, "main"),
    # large.yaml keeps its target layers' K/V activations (GPU-bound); this case recomputes them.
    ("large recompute", "sizes", "configs/model/large.yaml", {"recompute_target_context": True}, "main"),
    # Table 4: the small model's widths (d_model 512, 2 query heads of dim 256), 16 layers; GQA = 1 kv head.
    ("t4 (0:16)*1", "table4", SMALL, {"hta_layout": "(0:16)*1", "num_kv_heads": 1}, "main"),
    ("t4 (16:0)*1", "table4", SMALL, {"hta_layout": "(16:0)*1", "num_kv_heads": 1}, "main"),
    ("t4 (1:1)*8", "table4", SMALL, {"hta_layout": "(1:1)*8", "num_kv_heads": 1}, "main"),
    ("t4 (3:1)*4", "table4", SMALL, {"hta_layout": "(3:1)*4", "num_kv_heads": 1}, "main"),
    ("t4 (5:1)*3", "table4", SMALL, {"hta_layout": "(5:1)*3", "num_kv_heads": 1}, "main"),
    ("t4 (3:1)*4 no GQA", "table4", SMALL, {"hta_layout": "(3:1)*4", "num_kv_heads": 2}, "main"),
    # Target layers keep their H/R rows' K/V activations for backward instead of recomputing them.
    ("t4 (3:1)*4 keep context", "table4", SMALL,
     {"hta_layout": "(3:1)*4", "num_kv_heads": 1, "recompute_target_context": False}, "main"),
    # Kernels vs the PyTorch references, at a smaller batch (the references are O(L^2) per user).
    ("kern small triton", "kernels", SMALL, {"attention_impl": "triton", "norm_impl": "triton"}, "kernels"),
    ("kern small reference", "kernels", SMALL, {"attention_impl": "reference", "norm_impl": "reference"}, "kernels"),
    ("kern t4 (3:1)*4 triton", "kernels", SMALL,
     {"hta_layout": "(3:1)*4", "num_kv_heads": 1, "attention_impl": "triton", "norm_impl": "triton"}, "kernels"),
    ("kern t4 (3:1)*4 reference", "kernels", SMALL,
     {"hta_layout": "(3:1)*4", "num_kv_heads": 1, "attention_impl": "reference", "norm_impl": "reference"}, "kernels"),
]

CASE_NAMES = {c[0] for c in CASES}


# ---------------------------------------------------------------- helpers (run in the worker)

_agreement = []  # the process's one StepAgreement (not functools.cache: Ray pickles this module's functions by value)


def agreement():
    """The workers' `StepAgreement` (sums over the workers; world_size 1 without DDP), made once per
    process: it is collective, so every worker makes it at the same point."""
    from mtfm.platform.train_worker import StepAgreement

    if not _agreement:
        _agreement.append(StepAgreement())
    return _agreement[0]


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def exact_mix(batch):
    """TokenMix of a collated batch: tokens per group and visible (query, key) pairs per user,
    exact by the mask rule, O(N log N) on the host (TokenMix.from_batch builds dense masks)."""
    import numpy as np

    from mtfm.kernels.mask import TokenKind
    from mtfm.model.summary import TokenMix

    offsets, kind, ts = batch.offsets.numpy(), batch.kind.numpy(), batch.ts.numpy()
    full = target = 0
    for b in range(batch.num_users):
        k, t = kind[offsets[b]:offsets[b + 1]], ts[offsets[b]:offsets[b + 1]]
        n_h = int((k == TokenKind.H).sum())
        r_ts = np.sort(t[k == TokenKind.R])
        per_query = n_h + np.searchsorted(r_ts, t, side="left") + (k != TokenKind.H)
        full += int(per_query.sum())
        target += int(per_query[k == TokenKind.T].sum())
    users = max(batch.num_users, 1)
    counts = np.bincount(batch.group.numpy(), minlength=len(batch.group_names))
    return TokenMix({n: c / users for n, c in zip(batch.group_names, counts.tolist())}, full / users, target / users,
                    batch.scenarios)


def tiny_overrides(config) -> dict:
    heads = config.num_heads
    return {"d_model": 16 * heads, "tokenizer_hidden_dim": 32, "max_seq_len": 256,
            "mmoe": {"num_experts": 2, "expert_dim": 16, "tower_dim": 8}}


def matmul_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(times) / 1e12


class SyncRecorder:
    """Records the synchronising calls torch.cuda's sync debug mode warns about, with the
    innermost frame of this repository's code that led to each."""

    def __init__(self):
        self.events: dict[str, int] = {}

    def __enter__(self):
        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._old = warnings.showwarning
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._old
        self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if str(ROOT) in f.filename and "train_gpu.py" not in f.filename]
        where = (f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno} {frames[-1].line}"
                 if frames else f"{filename}:{lineno}")
        key = f"{where} | {str(message).splitlines()[0][:80]}"
        self.events[key] = self.events.get(key, 0) + 1


class Trainer:
    """One case's model, optimizers and training step (the step training runs, platform/train_step.py)."""

    def __init__(self, config_path, overrides, device, args, ray_mode, cuda_graphs=False):
        import torch

        from mtfm.model import build_model, load_model_config
        from mtfm.platform.registry import load_registry
        from mtfm.platform.train import TrainConfig
        from mtfm.platform.train_step import TrainStep
        from mtfm.platform.train_worker import make_optimizers

        self.device, self.cuda = device, device.type == "cuda"
        config = load_model_config(ROOT / config_path)
        if args.tiny:
            config = config.replace(**tiny_overrides(config))
        self.config = config.replace(**overrides)
        torch.manual_seed(0)
        self.model = build_model(self.config, load_registry(ROOT / "configs"))
        if ray_mode:
            import ray.train.torch

            self.ddp_model = ray.train.torch.prepare_model(self.model,
                                                           parallel_strategy_kwargs={"find_unused_parameters": True})
        else:
            self.ddp_model = self.model.to(device)
        self.model.train()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.optimizers = make_optimizers(self.model, TrainConfig(name="bench", model=config_path,
                                                                  cuda_graphs=cuda_graphs))
        self.train_step = TrainStep(self.model, self.optimizers.values(), module=self.ddp_model, grad_clip=1.0,
                                    cuda_graphs=cuda_graphs)

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def step(self, batch, marks=None):
        """One training step on `batch` (on the host, or already on the device); with `marks`, the
        times after a sync at the start and after data, forward, backward and optimizer (graphed:
        forward and backward are one mark)."""
        def mark():
            if marks is not None:
                self.sync()
                marks.append(time.perf_counter())
        mark()
        batch = batch.to(self.device)
        mark()
        loss = self.train_step.gradients(batch, mark=mark)
        mark()
        if self.train_step.cuda_graphs and marks is not None:
            marks.append(marks[-1])  # no separate backward
        self.train_step.update()
        mark()
        return loss


def host_probe(device) -> dict:
    """This process's host speed, to read the samples/s of host-bound cases against (it varied 1.4x between
    processes on one machine, bench/RESULTS.md): a pure Python loop of 10^6 additions, and the host time per
    launch of 2,000 one-element CUDA adds (queued, not waited for)."""
    import torch

    start, total = time.perf_counter(), 0
    for i in range(1_000_000):
        total += i
    probe = {"python_loop_ms": 1e3 * (time.perf_counter() - start)}
    if device.type == "cuda":
        t = torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(2000):
            t.add_(1)
        probe["launch_us"] = 1e6 * (time.perf_counter() - start) / 2000
        torch.cuda.synchronize(device)
    return probe


def kernel_time_by_op(prof, rows: int = 70) -> tuple[str, dict]:
    """GPU kernel time of a profiled step (eager: a CUDA graph's replay hides who launched what) by
    where it was launched: the autograd node for backward work, else ("fwd": the forward, and also
    the loss, the optimizer steps and copies) the two innermost frames of this repository's code
    where the profiler links the op to them ("?" where it does not: torch 2.11 on the H200 did
    not); then by the aten op and its input shapes under it. Returns the table and the profile's
    totals counted from the kernels themselves, each once (with_stack's Python frames are events
    too, and the profiler's own totals count their kernels again): gpu_kernel_ms,
    kernel_launches, top_kernels."""
    by_site, by_op, by_kernel = {}, {}, {}
    for event in prof.events():
        if not event.kernels:
            continue
        for kernel in event.kernels:
            calls, total = by_kernel.get(kernel.name, (0, 0.0))
            by_kernel[kernel.name] = (calls + 1, total + kernel.duration / 1e3)
        ms = sum(k.duration for k in event.kernels) / 1e3
        site, frames, parent = None, [], event
        while parent is not None and site is None:
            if parent.name.startswith("autograd::engine::evaluate_function: "):
                site = "bwd " + parent.name.split(": ", 1)[1]
            elif ".py(" in parent.name and any(f"{d}/" in parent.name for d in ("mtfm", "model", "kernels",
                                                                                   "platform")):
                frames.append(parent.name.split("/")[-1])
            parent = parent.cpu_parent
        if site is None:
            site = "fwd " + (" < ".join(frames[:2]) or "?")
        by_site[site] = by_site.get(site, 0.0) + ms
        key = (site, event.name, str(event.input_shapes)[:70])
        calls, total = by_op.get(key, (0, 0.0))
        by_op[key] = (calls + 1, total + ms)
    lines = [f"{ms:9.3f} ms  {site}" for site, ms in sorted(by_site.items(), key=lambda kv: -kv[1])[:rows]]
    lines.append("")
    lines += [f"{total:9.3f} ms {calls:4d}x  {site} | {op} {shapes}"
              for (site, op, shapes), (calls, total) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:2 * rows]]
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])
    totals = {"gpu_kernel_ms": sum(by_site.values()), "kernel_launches": sum(c for c, _ in by_kernel.values()),
              "top_kernels": [{"name": n[:120], "ms": ms, "calls": c} for n, (c, ms) in top[:15]]}
    return "\n".join(lines), totals


def run_case(name, part, config_path, overrides, batches, mixes, device, args, peak_tflops, ray_mode,
             cuda_graphs=False):
    import torch

    from mtfm.model.padding import GrowingShape
    from mtfm.model.summary import forward_flops, training_flops

    trainer = Trainer(config_path, overrides, device, args, ray_mode, cuda_graphs=cuda_graphs)
    config, model, cuda, sync, step = trainer.config, trainer.model, trainer.cuda, trainer.sync, trainer.step
    params = sum(p.numel() for p in model.parameters())

    batch_fwd = [forward_flops(config, model.registry, m) for m in mixes]
    batch_flops = [training_flops(f) * b.num_users for b, f in zip(batches, batch_fwd)]
    batch_flops_2x = [3 * f["total"] * b.num_users for b, f in zip(batches, batch_fwd)]
    real = batches  # what samples, tokens and FLOPs count
    if cuda_graphs:  # one shape that holds all four batches (each size their largest + 1), so one graph serves them
        shapes = GrowingShape(headroom=0.0, granule=1)
        for b in batches:
            shapes.fit(b)
        batches = [shapes.pad(b) for b in batches]
    # Throughput pass.
    sync()
    first = time.perf_counter()
    losses = [step(batches[0])]
    sync()
    first_step_s = time.perf_counter() - first  # with Triton's first compiles
    losses += [step(batches[i % len(batches)]) for i in range(1, args.warmup)]
    sync()
    start = time.perf_counter()
    users = tokens = 0
    flops = flops_2x = 0.0
    host = []
    for i in range(args.steps):
        b = batches[i % len(batches)]
        h0 = time.perf_counter()
        losses.append(step(b))
        host.append(time.perf_counter() - h0)
        users, tokens = users + real[i % len(real)].num_users, tokens + real[i % len(real)].num_tokens
        flops += batch_flops[i % len(batches)]
        flops_2x += batch_flops_2x[i % len(batches)]
    sync()
    elapsed = time.perf_counter() - start
    # Under DDP, every worker's samples, tokens and FLOPs over the workers' mean time (DDP keeps them in step).
    world = agreement().world_size
    gpus = world * min(args.gpus_per_worker, 1.0)  # what the workers hold together
    if world > 1:
        users, tokens, flops, flops_2x, elapsed = agreement().sums(users, tokens, flops, flops_2x, elapsed)
        elapsed /= world
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    # Split pass.
    parts = {"data": [], "forward": [], "backward": [], "optimizer": [], "total": []}
    for i in range(args.split_steps):
        marks: list[float] = []
        step(batches[i % len(batches)], marks)
        for key, (a, b) in zip(("data", "forward", "backward", "optimizer"), zip(marks, marks[1:])):
            parts[key].append(b - a)
        parts["total"].append(marks[-1] - marks[0])
    # Host syncs of one step.
    syncs = None
    if cuda:
        with SyncRecorder() as rec:
            step(batches[0])
            sync()
        syncs = rec.events
    # GPU busy time of one step (sum of device kernel times) and its top kernels.
    profile = None
    if cuda and any(p == name for p in (args.profile or [])):
        try:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            sync()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                               record_shapes=args.profile_ops, with_stack=args.profile_ops) as prof:
                w0 = time.perf_counter()
                step(batches[1])
                sync()
                wall = time.perf_counter() - w0
            averages = prof.key_averages()

            def dev(e):
                return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

            kernels = sorted(((e.key, dev(e) / 1e3, e.count) for e in averages if dev(e) > 0), key=lambda k: -k[1])
            profile = {"wall_ms_under_profiler": 1e3 * wall, "gpu_kernel_ms": sum(k[1] for k in kernels),
                       "kernel_launches": sum(k[2] for k in kernels),
                       "top_kernels": [{"name": n[:120], "ms": ms, "calls": c} for n, ms, c in kernels[:15]]}
            try:
                text = averages.table(sort_by="self_device_time_total", row_limit=40)
            except Exception:  # noqa: BLE001
                text = averages.table(sort_by="self_cuda_time_total", row_limit=40)
            host_text = averages.table(sort_by="self_cpu_time_total", row_limit=25)
            with open(os.devnull if rank() else Path(args.out).resolve().parent / "profiles.txt", "a") as fh:
                fh.write(f"==== {name}\n{text}\n==== {name}, by host time\n{host_text}\n")
                if args.profile_ops:
                    by_op, totals = kernel_time_by_op(prof)
                    profile.update(totals)
                    fh.write(f"==== {name}, GPU time by the op that launched it\n{by_op}\n")
        except Exception as exc:  # noqa: BLE001 - the profile is extra; keep the case's numbers
            if agreement().world_size > 1:
                raise  # under DDP the other workers may be waiting in its step's all-reduce
            profile = {"error": f"{type(exc).__name__}: {exc}"}
    fwd = forward_flops(config, model.registry, mixes[0])
    final_loss = float(torch.stack(losses).float().mean())
    train_flops = flops
    result = {
        "case": name, "part": part, "config": config_path, "overrides": overrides,
        "workers": world, "layout": config.hta_layout, "d_model": config.d_model, "num_heads": config.num_heads,
        "kv_heads": config.kv_heads, "layers": config.num_layers,
        "recompute_target_context": config.recompute_target_context,
        "attention_impl": config.attention_impl, "norm_impl": config.norm_impl, "parameters": params,
        "first_step_s": first_step_s,
        "steps": args.steps, "users_per_step": users / args.steps / world,
        "tokens_per_step": tokens / args.steps / world,
        "step_s": elapsed / args.steps, "samples_per_s": users / elapsed, "tokens_per_s": tokens / elapsed,
        "fwd_gflop_per_sample": fwd["total"] / 1e9, "fwd_attention_share": fwd["attention"] / fwd["total"],
        "train_tflop_per_step": train_flops / args.steps / world / 1e12,
        "achieved_tflops": train_flops / elapsed / 1e12,
        "mfu": (train_flops / elapsed / 1e12) / (gpus * peak_tflops) if peak_tflops else None,
        "mfu_backward_2x": (flops_2x / elapsed / 1e12) / (gpus * peak_tflops) if peak_tflops else None,
        "peak_mem_gib": peak, "peak_reserved_gib": reserved,
        "host_ms_per_step": 1e3 * statistics.mean(host), "host_probe": host_probe(device), "profile": profile,
        "split_ms": {k: 1e3 * statistics.median(v) for k, v in parts.items() if v},
        "mean_loss": final_loss, "host_syncs_one_step": syncs, "cuda_graphs": cuda_graphs,
        "graph_captures": trainer.train_step.captures,
        "padded_tokens_per_real": (sum(b.num_tokens for b in batches) / sum(b.num_tokens for b in real)),
    }
    del model, trainer, losses
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_pipeline(tables, collator, budget, pool_batches, device, args, ray_mode) -> dict:
    """Section (a), collation inline vs in the prefetch thread: the small model's step fed three
    ways in turn, W warm-up + P timed steps each (no host sync inside): pre-collated batches (the
    cases' setting, the floor), collation inline (train.py before issue 7: `token_budget_batches`
    then `batch.to` in the loop) and `BatchPrefetcher` (train.py now). The last two collate raw
    Arrow tables of `rows_per_read` users every step, cycling over `tables`."""
    import itertools

    from mtfm.model import BatchPrefetcher, token_budget_batches

    trainer = Trainer(SMALL, {}, device, args, ray_mode)

    def raw_batches():
        return token_budget_batches(itertools.cycle(tables), collator, budget)

    def timed(batches) -> dict:
        for _ in range(args.warmup):
            trainer.step(next(batches))
        trainer.sync()
        start = time.perf_counter()
        users = tokens = 0
        for _ in range(args.pipeline_steps):
            batch = next(batches)
            trainer.step(batch)
            users, tokens = users + batch.num_users, tokens + batch.num_tokens
        trainer.sync()
        elapsed = time.perf_counter() - start
        return {"step_ms": 1e3 * elapsed / args.pipeline_steps, "samples_per_s": users / elapsed,
                "tokens_per_s": tokens / elapsed}

    result = {"model": SMALL, "token_budget": budget, "steps": args.pipeline_steps,
              "rows_per_read": len(tables[0]) if tables else 0,
              "pre-collated": timed(itertools.cycle(pool_batches)), "inline": timed(raw_batches())}
    with BatchPrefetcher(raw_batches(), device) as prefetched:
        result["prefetch"] = timed(prefetched)
    result["prefetch_speedup_over_inline"] = result["inline"]["step_ms"] / result["prefetch"]["step_ms"]
    return result


@contextmanager
def fresh_triton_kernels(specialised: bool, cache_dir: str):
    """The jagged attention and GLN kernels replaced by new `JITFunction`s (nothing compiled in
    memory) that compile into `cache_dir` (nothing on disk): as shipped (`do_not_specialize` on the
    per-batch arguments) or, with `specialised`, without it (Triton specialises every integer and
    pointer argument, as before issue 7). Yields name -> kernel; restores the originals."""
    import triton

    from mtfm.kernels import group_layer_norm_triton, hstu_attention_triton

    names = {hstu_attention_triton: ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel"),
             group_layer_norm_triton: ("_gln_fwd_kernel", "_gln_bwd_kernel")}
    originals = {(module, name): getattr(module, name) for module, kernels in names.items() for name in kernels}
    previous_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        fresh = {}
        for (module, name), kernel in originals.items():
            options = {} if specialised else {"do_not_specialize": kernel.do_not_specialize}
            fresh[name] = triton.jit(kernel.fn, **options)
            setattr(module, name, fresh[name])
        yield fresh
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
        if previous_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous_cache


def compiled_variants(kernel) -> int | None:
    """Variants of a `JITFunction` compiled in this process (None where Triton keeps them otherwise)."""
    try:
        return sum(len(entry[0]) for entry in kernel.device_caches.values())
    except (AttributeError, IndexError, TypeError):
        return None


def run_compile_shapes(batches, warmup_batch, device, args, ray_mode) -> dict:
    """Section (b), Triton specialisation: the small model's first steps on N batches of new
    shapes (token and user counts, metadata alignment), one synchronised step each, with fresh
    kernels as shipped and then with fresh kernels specialised as before issue 7 (same batches,
    same order, an empty Triton cache each). A step that meets a new specialisation pays its
    compiles; the variants compiled per kernel are counted in memory and on disk."""
    import tempfile

    trainer = Trainer(SMALL, {}, device, args, ray_mode)
    trainer.step(warmup_batch)  # cuBLAS, allocator and autograd warm-up, outside both measurements
    trainer.sync()
    result = {"model": SMALL, "tokens": [b.num_tokens for b in batches], "users": [b.num_users for b in batches]}
    for mode, specialised in (("do_not_specialize", False), ("specialised", True)):
        with tempfile.TemporaryDirectory() as cache_dir, fresh_triton_kernels(specialised, cache_dir) as kernels:
            step_ms = []
            for batch in batches:
                start = time.perf_counter()
                trainer.step(batch)
                trainer.sync()
                step_ms.append(1e3 * (time.perf_counter() - start))
            result[mode] = {
                "step_ms": step_ms, "total_s": sum(step_ms) / 1e3,
                "variants": {name: compiled_variants(k) for name, k in kernels.items()},
                "compiled_on_disk": {name: len(list(Path(cache_dir).glob(f"*/{name}.json"))) for name in kernels},
            }
    return result


def worker(loop_config: dict) -> None:
    """Runs every case (the Ray Train worker function, or in-process with --no-ray)."""
    import numpy as np
    import torch

    from mtfm.model import Collator, split_by_token_budget
    from mtfm.model.sample_tables import random_aggregated_table
    from mtfm.platform.registry import load_registry

    args = argparse.Namespace(**loop_config["args"])
    ray_mode = loop_config["ray"]
    if ray_mode:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # batches on it compare equal
    lead = rank() == 0  # the worker that prints and writes the JSON

    def say(msg):
        if lead:
            sys.stdout.write(f"[bench] {msg}\n")
            sys.stdout.flush()
    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "workers": agreement().world_size}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    peak_tflops = matmul_tflops(device)
    info["host_probe"] = host_probe(device)
    say(f"{info}; dense bf16 matmul {peak_tflops} TFLOP/s")

    registry = load_registry(ROOT / "configs")
    collator = Collator(registry, max_len=MAX_LEN)
    rng = np.random.default_rng(rank())  # each worker its own users
    mix = TINY_MIX if args.tiny else MIX
    budgets = {"main": args.tokens, "kernels": args.kernel_tokens}
    pools, collate_ms = {}, {}
    mean_tokens_per_user = sum(sum(v) / 2 for v in mix.values())
    for key, budget in budgets.items():
        table = random_aggregated_table(registry, max(64, int(5 * budget / mean_tokens_per_user)), rng, lengths=mix)
        if key == "main":
            main_table = table
        cuts = split_by_token_budget(collator.token_counts(table), budget)
        batches, mixes, times = [], [], []
        for lo, hi in list(zip(cuts, cuts[1:]))[:4]:
            s = time.perf_counter()
            batches.append(collator(table.slice(lo, hi - lo)))
            times.append(time.perf_counter() - s)
            mixes.append(exact_mix(batches[-1]))
        pools[key] = (batches, mixes)
        collate_ms[key] = 1e3 * statistics.median(times)
        say(f"pool {key}: budget {budget}, {[b.num_tokens for b in batches]} tokens, "
            f"{[b.num_users for b in batches]} users, {[b.num_targets for b in batches]} targets; "
            f"collate {collate_ms[key]:.0f} ms/batch")

    results, sections = [], {}

    def write(extra: dict) -> None:
        if not lead:
            return
        out = {"info": info, "dense_bf16_matmul_tflops": peak_tflops, "collate_ms_per_batch": collate_ms,
               "args": vars(args), "ray": ray_mode, "wall_s": time.perf_counter() - t0, "sections": sections} | extra
        Path(loop_config["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(loop_config["out"]).write_text(json.dumps(out, indent=1, default=str))

    def run_section(name, run) -> None:
        try:
            sections[name] = run()
            say(f"{name}: {json.dumps(sections[name], default=str)}")
        except Exception as exc:  # noqa: BLE001 - record and go on with the cases
            sections[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            say(f"{name}: {sections[name]['error']}\n{sections[name]['traceback']}")
        write({"partial": True, "results": results})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.pipeline:
        reads = [main_table.slice(lo, args.rows_per_read) for lo in range(0, main_table.num_rows, args.rows_per_read)]
        run_section("collate_pipeline", lambda: run_pipeline(reads, collator, args.tokens, pools["main"][0], device,
                                                             args, ray_mode))
    if args.compile_shapes:
        table = random_aggregated_table(registry, int((args.compile_shapes + 1) * args.tokens / mean_tokens_per_user),
                                        rng, lengths=mix, first_user_id=10**6)
        cuts = split_by_token_budget(collator.token_counts(table), args.tokens)
        new_shapes = [collator(table.slice(lo, hi - lo)) for lo, hi in list(zip(cuts, cuts[1:]))[:args.compile_shapes]]
        run_section("compile_shapes", lambda: run_compile_shapes(new_shapes, pools["main"][0][0], device, args,
                                                                 ray_mode))

    for name, part, config_path, overrides, pool in CASES:
        if args.only and not any(o == name or (o in name and o not in CASE_NAMES) for o in args.only):
            continue
        over_budget = agreement().sums(float(time.perf_counter() - t0 > args.budget_s))[0]  # one verdict for all
        if over_budget:
            results.append({"case": name, "part": part, "skipped": "time budget"})
            say(f"{name}: skipped (time budget)")
            continue
        if device.type != "cuda" and "triton" in overrides.values():
            results.append({"case": name, "part": part, "skipped": "the Triton kernels need a GPU"})
            say(f"{name}: skipped (the Triton kernels need a GPU)")
            continue
        batches, mixes = pools[pool]
        graph_modes = [False] if part == "kernels" else {"off": [False], "on": [True], "both": [False, True]}[
            args.cuda_graphs]
        for graphed in graph_modes:
            case = name + (" graphed" if graphed and args.cuda_graphs == "both" else "")
            try:
                r = run_case(name, part, config_path, overrides, batches, mixes, device, args, peak_tflops, ray_mode,
                             cuda_graphs=graphed)
                r["case"] = case
                r["collate_ms_per_batch"] = collate_ms[pool]
                r["token_budget"] = budgets[pool]
                say(f"{case}: {r['samples_per_s']:.0f} samples/s, {r['tokens_per_s']:.0f} tokens/s, step "
                    f"{1e3 * r['step_s']:.1f} ms, split {r['split_ms']}, peak {r['peak_mem_gib']} GiB, mfu {r['mfu']}")
            except torch.OutOfMemoryError as exc:
                r = {"case": case, "part": part, "error": f"OOM: {str(exc).splitlines()[0]}"}
                say(f"{case}: OOM")
                end_if_distributed(r, results, write)
            except Exception as exc:  # noqa: BLE001 - record and go on with the next case
                r = {"case": case, "part": part, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-2000:]}
                say(f"{case}: {r['error']}\n{r['traceback']}")
                end_if_distributed(r, results, write)
            results.append(r)
            write({"partial": True, "results": results})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write({"results": results})
    if ray_mode:
        import ray.train

        ray.train.report({"cases": len(results)})


def end_if_distributed(failed: dict, results: list, write) -> None:
    """Under DDP a case that failed on one worker leaves the others waiting in its all-reduce: say so on
    this worker, write what was measured (the first worker), and end the run by raising again."""
    if agreement().world_size > 1:
        sys.stdout.write(f"[bench] worker {rank()}: {failed['case']}: {failed['error']}; ending the run\n")
        sys.stdout.flush()
        write({"partial": True, "results": results + [failed]})
        raise


def run_with_ray(loop_config: dict, use_gpu: bool, num_workers: int, gpus_per_worker: float = 1.0) -> None:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtfm.platform.cluster import init_ray
    from mtfm.platform.train import ddp_backend

    ray = init_ray(num_cpus=os.cpu_count(), log_to_driver=True)  # the platform's embedded Ray, as quiet
    cpus = max(1, min(8, ((os.cpu_count() or 2) - 1) // num_workers))
    trainer = TorchTrainer(worker, train_loop_config=loop_config,
                           torch_config=TorchConfig(backend=ddp_backend(use_gpu, gpus_per_worker)),
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                        resources_per_worker={"CPU": cpus} | (
                                                            {"GPU": gpus_per_worker} if use_gpu else {})),
                           run_config=RunConfig(name="train_gpu_bench", storage_path=tempfile.mkdtemp()))
    result = trainer.fit()
    if result.error:
        raise result.error
    ray.shutdown()


def print_table(out: dict) -> None:
    rows = out["results"]
    matmul = out["dense_bf16_matmul_tflops"]
    print(f"\n{out['info']}; dense bf16 matmul {f'{matmul:.1f} TFLOP/s' if matmul else 'not measured (no GPU)'}; "
          f"collate ms/batch {out['collate_ms_per_batch']}")
    print(f"{'case':<26} {'layout':<9} {'kv':>2} {'tok/step':>8} {'users':>5} {'samples/s':>9} {'tokens/s':>9} "
          f"{'step ms':>7} {'data':>5} {'fwd':>6} {'bwd':>6} {'opt':>5} {'peak GiB':>8} {'TFLOP/s':>7} {'MFU':>5} {'host ms':>7} {'GPU ms':>7}")
    for r in rows:
        if "samples_per_s" not in r:
            print(f"{r['case']:<26} {r.get('error') or r.get('skipped')}")
            continue
        s = r["split_ms"] | ({"backward": float("nan")} if r.get("cuda_graphs") else {})
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['case']:<26} {r['layout']:<9} {r['kv_heads']:>2} {r['tokens_per_step']:>8.0f} "
              f"{r['users_per_step']:>5.0f} {r['samples_per_s']:>9.1f} {r['tokens_per_s']:>9.0f} "
              f"{1e3 * r['step_s']:>7.1f} {s['data']:>5.1f} {s['forward']:>6.1f} {s['backward']:>6.1f} "
              f"{s['optimizer']:>5.1f} {peak:>8} {r['achieved_tflops']:>7.1f} {mfu:>5} {r['host_ms_per_step']:>7.1f}"
              + (f" {r['profile']['gpu_kernel_ms']:>7.1f}" if (r.get("profile") or {}).get("gpu_kernel_ms") else ""))
    by = {r["case"]: r for r in rows if "samples_per_s" in r}

    def ratio(a, b, key):
        return by[a][key] / by[b][key] if a in by and b in by and by[b][key] else None

    graphed = {
        "graphed (3:1)*4 / (0:16)*1 samples/s (goal >= 2.0)": ratio("t4 (3:1)*4 graphed", "t4 (0:16)*1 graphed",
                                                                    "samples_per_s"),
        "graphed (3:1)*4 GQA / no GQA samples/s (goal >= 1.15)": ratio("t4 (3:1)*4 graphed",
                                                                       "t4 (3:1)*4 no GQA graphed", "samples_per_s"),
        "graphed large MFU (goal >= 0.40)": by.get("large graphed", {}).get("mfu"),
    }
    goals = {k: v for k, v in graphed.items() if v is not None} | {
        "(3:1)*4 / (0:16)*1 samples/s (goal >= 2.0)": ratio("t4 (3:1)*4", "t4 (0:16)*1", "samples_per_s"),
        "(3:1)*4 / (0:16)*1 peak memory (goal <= 0.55)": ratio("t4 (3:1)*4", "t4 (0:16)*1", "peak_mem_gib"),
        "(3:1)*4 recompute / keep context samples/s": ratio("t4 (3:1)*4", "t4 (3:1)*4 keep context",
                                                            "samples_per_s"),
        "(3:1)*4 recompute / keep context peak memory": ratio("t4 (3:1)*4", "t4 (3:1)*4 keep context",
                                                              "peak_mem_gib"),
        "(3:1)*4 GQA / no GQA samples/s (goal >= 1.15)": ratio("t4 (3:1)*4", "t4 (3:1)*4 no GQA", "samples_per_s"),
        "(3:1)*4 GQA / no GQA peak memory": ratio("t4 (3:1)*4", "t4 (3:1)*4 no GQA", "peak_mem_gib"),
        "small triton / reference samples/s (goal >= 1.6)": ratio("kern small triton", "kern small reference",
                                                                  "samples_per_s"),
        "(3:1)*4 triton / reference samples/s (goal >= 1.6)": ratio("kern t4 (3:1)*4 triton",
                                                                    "kern t4 (3:1)*4 reference", "samples_per_s"),
        "large MFU (goal >= 0.40)": by.get("large", {}).get("mfu"),
    }
    out["goals"] = goals
    print()
    for k, v in goals.items():
        print(f"{k:<52} {'-' if v is None else f'{v:.3f}'}")
    print_sections(out.get("sections") or {})


def print_sections(sections: dict) -> None:
    pipeline = sections.get("collate_pipeline")
    if pipeline and "error" not in pipeline:
        print(f"\n(a) small model, {pipeline['token_budget']} tokens/step, {pipeline['steps']} timed steps per feed")
        for feed in ("pre-collated", "inline", "prefetch"):
            r = pipeline[feed]
            print(f"  {feed:<13} {r['step_ms']:>7.1f} ms/step {r['samples_per_s']:>8.0f} samples/s "
                  f"{r['tokens_per_s']:>9.0f} tokens/s")
        print(f"  prefetch / inline speed-up {pipeline['prefetch_speedup_over_inline']:.2f}x")
    shapes = sections.get("compile_shapes")
    if shapes and "error" not in shapes:
        print(f"\n(b) small model, first step on each of {len(shapes['tokens'])} new batch shapes "
              f"(tokens {shapes['tokens']})")
        for mode in ("do_not_specialize", "specialised"):
            r = shapes[mode]
            print(f"  {mode:<17} total {r['total_s']:>6.2f} s; ms per step {[round(t) for t in r['step_ms']]}; "
                  f"variants {r['variants']}")
    for name, section in sections.items():
        if "error" in section:
            print(f"\n{name}: {section['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON results (default under $OUT or bench/out: "
                        "train_gpu.json, or train_gpu_tiny.json with --tiny, so that a debugging run keeps "
                        "the recorded GPU results)")
    parser.add_argument("--no-ray", action="store_true", help="run the worker in-process (debugging)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu (with --tiny, to check the script)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and sequences (CPU debugging)")
    parser.add_argument("--tokens", type=int, default=None, help="token budget per step (default 131072; tiny 2048)")
    parser.add_argument("--kernel-tokens", type=int, default=None,
                        help="token budget of the kernels-vs-reference cases (default 16384; tiny 1024)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps (default 5; >= 4: every batch shape once)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--split-steps", type=int, default=4,
                        help="steps timed again with a sync around data, forward, backward and optimizer (default 4)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip cases that would start after this many seconds (default 420)")
    parser.add_argument("--profile", nargs="*", default=["large", "t4 (3:1)*4", "t4 (0:16)*1", "medium"],
                        help="cases to profile for one step (GPU kernel time, top kernels)")
    parser.add_argument("--profile-ops", action="store_true",
                        help="add to profiles.txt each profiled case's GPU time by the op and code that launched it "
                             "(with --cuda-graphs off: a graph's replay hides who launched what)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these cases: a case's exact name, or a part of names (\"t4\", \"kern\")")
    parser.add_argument("--cuda-graphs", choices=["off", "on", "both"], default="off",
                        help="replay forward and backward from a CUDA graph over padded batches: off, on, or each "
                             "case both ways (\" graphed\" rows); the kern cases always step eagerly")
    parser.add_argument("--pipeline", action="store_true",
                        help="section (a): small-model steps with collation inline vs in the prefetch thread")
    parser.add_argument("--pipeline-steps", type=int, default=20, help="timed steps per feed of section (a)")
    parser.add_argument("--rows-per-read", type=int, default=256, help="users per raw Arrow table in section (a)")
    parser.add_argument("--compile-shapes", type=int, default=0, metavar="N",
                        help="section (b): first steps on N new batch shapes, kernels with vs without do_not_specialize")
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray Train workers, one GPU each, under DDP (default 1); with N > 1 steps are eager")
    parser.add_argument("--gpus-per-worker", type=float, default=1.0, metavar="F",
                        help="GPUs each worker holds (default 1); below 1 workers share GPUs, DDP over gloo (a check "
                             "that the path runs, not a scaling figure)")
    args = parser.parse_args()
    import torch

    if args.workers < 1:
        parser.error(f"--workers: expected an integer >= 1, found {args.workers}")
    if args.workers > 1 and (args.no_ray or args.cuda_graphs != "off" or args.pipeline or args.compile_shapes):
        parser.error("--workers N > 1 runs DDP through Ray Train with eager steps: not with --no-ray, --cuda-graphs "
                     "on/both, --pipeline or --compile-shapes")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (a CPU check: --no-ray --device cpu --tiny)")
    if not 0 < args.gpus_per_worker <= 1:
        parser.error(f"--gpus-per-worker: expected a number in (0, 1], found {args.gpus_per_worker}")
    if (args.workers * args.gpus_per_worker > torch.cuda.device_count() and args.device == "cuda"
            and not os.environ.get("RAY_ADDRESS")):
        parser.error(f"--workers {args.workers} x --gpus-per-worker {args.gpus_per_worker:g}: this machine has "
                     f"{torch.cuda.device_count()} GPU(s)")
    if args.profile_ops and args.cuda_graphs != "off":
        parser.error("--profile-ops needs --cuda-graphs off: a graph's replay hides which op launched a kernel")
    if args.out is None:
        args.out = default_out("train_gpu_tiny.json" if args.tiny else "train_gpu.json")
    args.tokens = args.tokens or (2048 if args.tiny else 131072)
    args.kernel_tokens = args.kernel_tokens or (1024 if args.tiny else 16384)
    out_path = str(Path(args.out).resolve())
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    loop_config = {"args": vars(args), "ray": not args.no_ray, "out": out_path}
    start = time.perf_counter()
    ensure_mtfm_importable()  # before Ray starts: its workers inherit PYTHONPATH
    if args.no_ray:
        worker(loop_config)
    else:
        run_with_ray(loop_config, use_gpu=args.device == "cuda", num_workers=args.workers,
                     gpus_per_worker=args.gpus_per_worker)
    out = json.loads(Path(out_path).read_text())
    out["command"] = "python " + " ".join(sys.argv)
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["total_wall_s"] = time.perf_counter() - start
    print_table(out)
    Path(out_path).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
