"""Kernel benchmark (issue 4): HSTU attention (full, target) and Group LayerNorm on one GPU.

Checks correctness at real sizes in bf16 against a float64 reference first, then times
(triton.testing.do_bench, median) and prints a table; writes JSON to --out
(default $OUT/kernels.json, or bench/out/kernels.json where OUT is not set). FLOP convention (DESIGN.md): forward =
4 * Hq * d * visible query-key pairs, backward = 2.5 x forward; torch SDPA (causal, same
tokens, heads and dim, as a dense batch of equal-length users) is counted the same way over
its causal pairs. Usage: python bench/kernels.py [--out PATH] [--quick]
--serving: only the forward at serving sizes (one request: few queries, 1000 history keys), with
each program's keys split across programs (`key_splits`) or not. --gln-stacked: only the stacked
GLN of a run of target layers (and its backward's block sweep). --silu: only the projections'
silu backward with the bias gradient against torch's silu_backward and column sum. --registers:
only each attention kernel's GPU ms on the training mix and the registers and spills of every
kernel variant the study compiles.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench


sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import default_out, ensure_mtfm_importable  # noqa: E402

ensure_mtfm_importable()
from mtfm.kernels.group_layer_norm import group_layer_norm  # noqa: E402
from mtfm.kernels.hstu_attention import (  # noqa: E402
    hstu_attention, hstu_split_target_attention, hstu_target_attention)

ALPHA = 1.0 / 128 ** 0.5
BENCH_HQ = 4  # query heads of the attention table, the correctness checks and SDPA's rows
SCENARIOS = 3


def make_batch(length: int, users: int, hq: int, hkv: int, d: int, dtype, device, seed: int):
    """Users of `length` tokens with the MTFM mix (80% H, 5% R, 15% T in SCENARIOS groups)."""
    n_r, n_t = int(0.05 * length), int(0.15 * length)
    batch = _users_batch([(length - n_r - n_t, n_r, n_t)] * users, hq, hkv, d, dtype, device, seed)
    return dict(batch, n_t=n_t, length=length)


def training_mix_batch(total_tokens: int, hq: int, hkv: int, d: int, dtype, device, seed: int):
    """Users with the training batches' lengths (bench/train_gpu.py's MIX: history 200-1000,
    realtime 20-100, 50-300 targets over SCENARIOS scenarios), as many as fit in total_tokens: what
    the sweep should time, since users of one length favour larger blocks (bench/RESULTS.md, "dK
    and dV in launches of their own"). `length` is the normaliser n (model configs' max_seq_len)."""
    from train_gpu import MIX

    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(part):
        low, high = MIX[part]
        return int(torch.randint(low, high + 1, (1,), generator=g))

    parts, tokens = [], 0
    while True:
        user = (draw("history"), draw("realtime"), draw("hp") + draw("phf") + draw("sqs"))
        if parts and tokens + sum(user) > total_tokens:
            break
        parts.append(user)
        tokens += sum(user)
    return dict(_users_batch(parts, hq, hkv, d, dtype, device, seed), length=2048)


def _users_batch(parts, hq: int, hkv: int, d: int, dtype, device, seed: int) -> dict:
    """A packed batch of users with (n_h, n_r, n_t) tokens each, in the kernels' token order (H, R by
    ts, T by scenario and ts), random q, k, v."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kinds, stamps = [], []
    for n_h, n_r, n_t in parts:
        ts_h = torch.randint(0, 10**6, (n_h,), generator=g)
        ts_r = torch.randint(10**6, 2 * 10**6, (n_r,), generator=g).sort().values
        ts_t = torch.randint(10**6, 2 * 10**6 + 10**5, (n_t,), generator=g)
        ts_t = torch.cat([part.sort().values for part in ts_t.chunk(SCENARIOS)])
        kinds.append(torch.tensor([0] * n_h + [1] * n_r + [2] * n_t, dtype=torch.int8))
        stamps.append(torch.cat([ts_h, ts_r, ts_t]))
    offsets = torch.tensor([0] + [sum(p) for p in parts]).cumsum(0)
    target_offsets = torch.tensor([0] + [p[2] for p in parts]).cumsum(0)
    n = int(offsets[-1])
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    to = dict(device=device)
    return dict(
        q=q.to(dtype=dtype, **to), k=k.to(dtype=dtype, **to), v=v.to(dtype=dtype, **to),
        offsets=offsets.to(**to), kind=torch.cat(kinds).to(**to), ts=torch.cat(stamps).to(**to),
        target_offsets=target_offsets.to(**to), users=len(parts),
    )


def visible_pairs(batch) -> tuple[int, int]:
    """Visible (query, key) pairs of full attention and of target attention, by the mask rule."""
    full = target = 0
    length, n_t = batch["length"], batch["n_t"]
    for b in range(batch["users"]):
        kind = batch["kind"][b * length:(b + 1) * length]
        ts = batch["ts"][b * length:(b + 1) * length]
        n_h = int((kind == 0).sum())
        r_ts = ts[kind == 1]
        earlier_r = torch.searchsorted(r_ts, ts, right=False)
        own = (kind != 0).to(torch.int64)  # H queries count themselves among the H keys
        per_query = n_h + earlier_r + own
        full += int(per_query.sum())
        target += int(per_query[length - n_t:].sum())
    return full, target


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_attention(length: int, hkv: int, d: int, device) -> dict:
    """bf16 Triton vs float64 reference on two users: out, dq, dk, dv (full), target, and split
    target attention's output and gradients (dk_t, dv_t of the T rows' own keys)."""
    batch = make_batch(length, 2, BENCH_HQ, hkv, d, torch.bfloat16, device, seed=length + hkv + d)
    meta = (batch["offsets"], batch["kind"], batch["ts"])
    norm = float(length)
    grad = torch.randn(batch["q"].shape[0], BENCH_HQ, d, device=device, dtype=torch.bfloat16)
    results = {}
    for dtype, impl in ((torch.float64, "reference"), (torch.bfloat16, "triton")):
        q, k, v = (batch[n].to(dtype).requires_grad_() for n in "qkv")
        out = hstu_attention(q, k, v, *meta, alpha=ALPHA, norm=norm, impl=impl)
        out.backward(grad.to(dtype))
        rows = torch.cat([torch.arange((b + 1) * length - batch["n_t"], (b + 1) * length) for b in range(2)]).to(device)
        q_t = q.detach()[rows].requires_grad_()
        out_t = hstu_target_attention(q_t, k, v, *meta, batch["target_offsets"], alpha=ALPHA, norm=norm, impl=impl)
        results[impl] = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, target=out_t.detach())
        half = {name: (t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t)
                for name, t in split_halves(batch).items()}
        out_s = hstu_split_target_attention(**half, alpha=ALPHA, norm=norm, impl=impl)
        out_s.backward(grad[rows].to(dtype))
        results[impl].update(split=out_s.detach(), split_dq=half["q_t"].grad, split_dk_context=half["k_context"].grad,
                             split_dv_context=half["v_context"].grad, split_dk_t=half["k_t"].grad,
                             split_dv_t=half["v_t"].grad)
    return {name: rel_err(results["triton"][name], ref) for name, ref in results["reference"].items()}


def bench_attention(length, hkv, d, device, total_tokens, quick) -> dict:
    users = max(1, total_tokens // length)
    batch = make_batch(length, users, BENCH_HQ, hkv, d, torch.bfloat16, device, seed=1)
    meta = (batch["offsets"], batch["kind"], batch["ts"])
    norm = float(length)
    pairs, target_pairs = visible_pairs(batch)
    q, k, v = (batch[n].requires_grad_() for n in "qkv")
    grad = torch.randn_like(q.detach())

    def forward():
        return hstu_attention(q, k, v, *meta, alpha=ALPHA, norm=norm, impl="triton")

    out = forward()
    t_fwd = do_bench(forward, return_mode="median")
    t_bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), return_mode="median")
    del out
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.autograd.grad(forward(), (q, k, v), grad)
    peak = torch.cuda.max_memory_allocated(device) - base

    rows = torch.cat([torch.arange((b + 1) * length - batch["n_t"], (b + 1) * length) for b in range(users)]).to(device)
    q_t = q.detach()[rows].requires_grad_()
    grad_t = grad[rows]

    def target_forward():
        return hstu_target_attention(q_t, k, v, *meta, batch["target_offsets"], alpha=ALPHA, norm=norm, impl="triton")

    out_t = target_forward()
    t_tfwd = do_bench(target_forward, return_mode="median")
    t_tbwd = do_bench(lambda: torch.autograd.grad(out_t, (q_t, k, v), grad_t, retain_graph=True), return_mode="median")
    del out_t

    flops = 4 * BENCH_HQ * d * pairs  # DESIGN.md's convention: backward 2.5x
    target_flops = 4 * BENCH_HQ * d * target_pairs
    row = dict(
        length=length, users=users, tokens=users * length, hq=BENCH_HQ, hkv=hkv, d=d, visible_pairs=pairs,
        fwd_ms=t_fwd, bwd_ms=t_bwd, fwd_tflops=flops / t_fwd * 1e-9, bwd_tflops=2.5 * flops / t_bwd * 1e-9,
        peak_mib=peak / 2**20, peak_bytes_per_token=peak / (users * length),
        target_fwd_ms=t_tfwd, target_bwd_ms=t_tbwd,
        target_fwd_tflops=target_flops / t_tfwd * 1e-9,
        target_bwd_tflops=2.5 * target_flops / t_tbwd * 1e-9,
    )
    row["fwd_graph_ms"] = graph_time(forward)
    row["target_fwd_graph_ms"] = graph_time(target_forward)
    if length <= 2048 and hkv == 4 and not quick:
        with torch.no_grad():
            reference = lambda: hstu_attention(q, k, v, *meta, alpha=ALPHA, norm=norm, impl="reference")
            reference()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            reference()
            torch.cuda.synchronize()
        row["reference_fwd_ms"] = (time.perf_counter() - t0) * 1e3
    return row


def graph_time(fn) -> float:
    """Median time of fn replayed from a CUDA graph: the device time without launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return do_bench(graph.replay, return_mode="median")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates tried by --sweep, per kernel and head dim.
# The d=256 lists end with configs that fit two programs on an SM with no spills inside their tile
# loops (`bench/kernel_resources.py`, sm_90, triton 3.6; bench/RESULTS.md, "What the attention
# kernels compile to"): not yet timed on a GPU.
SWEEP = {
    "fwd": {128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
            256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3),
                  (64, 32, 4, 2), (64, 32, 4, 1), (64, 16, 4, 3)]},
    "dq": {128: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 8, 2)],
           256: [(64, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3),
                 (128, 64, 8, 1), (64, 64, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3)]},
    "dkdv": {128: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (32, 128, 4, 3)],
             256: [(64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 32, 8, 2),
                   (32, 128, 8, 2), (64, 64, 8, 1), (64, 128, 8, 1), (16, 64, 4, 3), (32, 32, 4, 3),
                   (64, 32, 4, 2)]},
}
# Split target attention (--sweep-targets): a key block meets a few query blocks (the user's T
# rows), so smaller and differently shaped tiles are tried too.
SPLIT_SWEEP = {
    "fwd": {128: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
            256: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 3),
                  (64, 32, 4, 2), (64, 32, 4, 1), (64, 16, 4, 3)]},
    "dq": {128: [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
           256: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 4, 3),
                 (32, 32, 4, 3), (64, 16, 4, 2), (64, 16, 4, 3)]},
    "dkdv": {128: [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 8, 3)],
             256: [(32, 32, 4, 3), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 4, 3), (64, 32, 4, 2),
                   (16, 128, 8, 2), (32, 128, 8, 1), (64, 64, 4, 2), (16, 32, 4, 3)]},
}


def split_halves(batch) -> dict:
    """A batch's users as split target attention takes them: each user's T rows (its last
    target_offsets[b+1] - target_offsets[b]) are the queries and the T half of the keys, the rest
    the context half. Keyword names of `hstu_split_target_attention`, in the positional order of the
    Triton module's functions."""
    offsets, target_offsets = batch["offsets"], batch["target_offsets"]
    lengths, n_t = offsets.diff(), target_offsets.diff()
    user = torch.repeat_interleave(torch.arange(batch["users"], device=offsets.device), lengths)
    is_target = torch.arange(int(offsets[-1]), device=offsets.device) - offsets[user] >= (lengths - n_t)[user]
    context, target = (~is_target).nonzero().squeeze(1), is_target.nonzero().squeeze(1)
    return dict(q_t=batch["q"][target], k_context=batch["k"][context], v_context=batch["v"][context],
                k_t=batch["k"][target], v_t=batch["v"][target],
                context_offsets=offsets - target_offsets, target_offsets=target_offsets,
                context_kind=batch["kind"][context], context_ts=batch["ts"][context], target_ts=batch["ts"][target])


def sweep_configs(device, total_tokens, length: int = 4096, dims=(128, 256), hq: int = 4, hkv: int = 2,
                  targets: bool = False) -> dict:
    """Time each candidate block config at `length` tokens per user (the MTFM mix of make_batch; 0:
    the training batches' lengths, `training_mix_batch`) and keep the fastest: of full attention,
    or with `targets` of split target attention (each user's T rows the queries)."""
    from mtfm.kernels import hstu_attention_triton as kernels

    chosen = {}
    for d in dims:
        if length:
            batch = make_batch(length, total_tokens // length, hq, hkv, d, torch.bfloat16, device, seed=3)
        else:
            batch = training_mix_batch(total_tokens, hq, hkv, d, torch.bfloat16, device, seed=3)
        norm = float(batch["length"])
        if targets:
            half = split_halves(batch)
            args = (*half.values(), ALPHA, norm)
            grad = torch.randn_like(half["q_t"])
            runs = {name: lambda: kernels.jagged_split_target_attention_backward(grad, *args) for name in ("dkdv", "dq")}
            runs["fwd"] = lambda: kernels.jagged_split_target_attention(*args)
        else:
            args = (batch["q"], batch["k"], batch["v"], batch["offsets"], batch["offsets"], batch["kind"],
                    batch["ts"], ALPHA, norm)
            grad = torch.randn_like(batch["q"])
            runs = {"fwd": lambda: kernels.jagged_hstu_attention(*args),
                    "dq": lambda: kernels.jagged_hstu_attention_backward(grad, *args),
                    "dkdv": lambda: kernels.jagged_hstu_attention_backward(grad, *args)}
        for name, fn in runs.items():
            times = {}
            # split target attention reads its own table when the kernel module has one
            key = f"{name}_split" if targets else name
            table = kernels._CONFIGS.setdefault(key, dict(kernels._CONFIGS[name]))
            for config in (SPLIT_SWEEP if targets else SWEEP)[name][d]:
                table[d] = config
                try:
                    times[config] = do_bench(fn, warmup=5, rep=40, return_mode="median")
                except Exception as error:  # a config that does not fit (shared memory, registers)
                    print(f"sweep {name} d={d} {config}: {type(error).__name__}", flush=True)
            best = min(times, key=times.get)
            table[d] = best
            chosen[f"{name}{'_split' if targets else ''}_d{d}_h{hq}_{hkv}"] = dict(
                best=best, ms={str(c): t for c, t in times.items()})
            print(f"sweep {name} d={d}: " + ", ".join(f"{c}: {t:.3f}" for c, t in times.items()) + f" -> {best}",
                  flush=True)
    return chosen


def bench_sdpa(length, d, device, total_tokens) -> dict:
    """torch SDPA, causal, bf16, Hq=4 heads, as (users, 4, length, d); best of cuDNN and flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    users = max(1, total_tokens // length)
    q, k, v = (torch.randn(users, BENCH_HQ, length, d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    flops = 4 * BENCH_HQ * d * users * length * (length + 1) // 2
    best = None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(backend):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                out = f()
                grad = torch.randn_like(out)
                t_fwd = do_bench(f, return_mode="median")
                t_bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), return_mode="median")
        except RuntimeError as error:
            print(f"sdpa {backend.name} L={length} d={d}: {str(error).splitlines()[0]}")
            continue
        row = dict(backend=backend.name, fwd_ms=t_fwd, bwd_ms=t_bwd,
                   fwd_tflops=flops / t_fwd * 1e-9, bwd_tflops=2.5 * flops / t_bwd * 1e-9)
        if best is None or row["fwd_tflops"] > best["fwd_tflops"]:
            best = row
    return best


def group_runs(n, groups, device, mean_run=None):
    """Group ids in runs (a user's tokens of one sequence or scenario), or i.i.d. per token
    when mean_run is None (the worst case for the backward's per-group sums)."""
    if mean_run is None:
        return torch.randint(0, groups, (n,), device=device)
    runs = torch.randint(1, 2 * mean_run, (n,))
    ids = torch.randint(0, groups, runs.shape)
    return ids.repeat_interleave(runs)[:n].to(device)


def bench_gln(n, d, groups, device, mean_run=64) -> dict:
    """Correctness against float64, then the public op's eager time and the kernels' device time
    (CUDA graph replay); GB/s counts x and y (forward), x, dy and dx (backward), and group."""
    from mtfm.kernels import group_layer_norm_triton as kernels

    x = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    group = group_runs(n, groups, device, mean_run)
    weight = torch.randn(groups, d, device=device, requires_grad=True)
    bias = torch.randn(groups, d, device=device, requires_grad=True)
    y_ref = group_layer_norm(x.double(), group, weight.double(), bias.double(), impl="reference")
    y = group_layer_norm(x, group, weight, bias, impl="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), dy.double())
    errors = dict(out=rel_err(y, y_ref), dx=rel_err(grads[0], grads_ref[0]),
                  dweight=rel_err(grads[1], grads_ref[1]), dbias=rel_err(grads[2], grads_ref[2]))
    xd, wd, bd = x.detach(), weight.detach(), bias.detach()
    t_fwd = do_bench(lambda: group_layer_norm(x, group, weight, bias, impl="triton"), return_mode="median")
    t_bwd = do_bench(lambda: torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True), return_mode="median")
    t_fwd_graph = graph_time(lambda: kernels.group_layer_norm(xd, group, wd, bd, 1e-5))
    t_bwd_graph = graph_time(lambda: kernels.group_layer_norm_backward(dy, xd, group, wd, 1e-5))
    with torch.no_grad():
        t_ref_fwd = do_bench(lambda: group_layer_norm(x, group, weight, bias, impl="reference"), return_mode="median")
    fwd_bytes = 2 * n * d * 2 + n * 8
    bwd_bytes = 3 * n * d * 2 + n * 8
    return dict(n=n, d=d, groups=groups, mean_run=mean_run, errors=errors, fwd_ms=t_fwd, bwd_ms=t_bwd, fwd_graph_ms=t_fwd_graph,
                bwd_graph_ms=t_bwd_graph, reference_fwd_ms=t_ref_fwd,
                fwd_gbps=fwd_bytes / t_fwd_graph * 1e-6, bwd_gbps=bwd_bytes / t_bwd_graph * 1e-6)


def sweep_gln(device) -> dict:
    """Backward block size, warps and programs per SM for Group LayerNorm, timed on 131,072 rows as
    the model has them under autocast (bfloat16 x and output gradient, float32 affine parameters,
    runs of 64 tokens of one of 8 groups) at D = 512 and 768; keeps the best of each width in
    `_BWD_CONFIGS` (by padded width)."""
    from mtfm.kernels import group_layer_norm_triton as kernels

    n = 131072
    result = {"best": {}, "ms": {}}
    for d in (512, 768):
        args = (torch.randn(n, d, device=device, dtype=torch.bfloat16),
                torch.randn(n, d, device=device, dtype=torch.bfloat16), group_runs(n, 8, device, 64),
                torch.randn(8, d, device=device, dtype=torch.float32))
        block_d = triton.next_power_of_2(d)
        times = {}
        for config in itertools.product((2048, 4096, 8192), (2, 4, 8), (1, 2, 4, 8)):
            kernels._BWD_CONFIGS[block_d] = config
            times[config] = graph_time(lambda: kernels.group_layer_norm_backward(*args, 1e-5))
        best = min(times, key=times.get)
        kernels._BWD_CONFIGS[block_d] = best
        result["best"][d], result["ms"][d] = best, {str(c): t for c, t in times.items()}
        print(f"sweep gln bwd D={d} (elements, warps, programs/SM): "
              + ", ".join(f"{c}: {t:.3f}" for c, t in sorted(times.items(), key=lambda kv: kv[1])[:6])
              + f" -> {best}", flush=True)
    return result


def bench_gln_stacked(device, n: int = 104000) -> list[dict]:
    """The stacked GLN of a run of target layers (S sets of affine parameters on the same H and R
    rows, as `model/context_kv.py` calls it under autocast: bfloat16 x, output and gradients) against
    S plain calls and the float32 sum of their dx (what each layer running its own GLN cost), after
    checking it against the float64 reference; then the backward's block size, warps and programs
    per SM for the runs the training step has (D = 512 with 3 sets, D = 768 with 4)."""
    from mtfm.kernels import group_layer_norm_reference as reference
    from mtfm.kernels import group_layer_norm_triton as kernels

    rows = []
    for d in (512, 768):
        x, group = torch.randn(n, d, device=device, dtype=torch.bfloat16), group_runs(n, 6, device, 200)
        for sets in (1, 3, 4, 5):
            weight = 1 + 0.3 * torch.randn(sets, 6, d, device=device)
            bias = 0.3 * torch.randn(sets, 6, d, device=device)
            dy = torch.randn(sets, n, d, device=device, dtype=torch.bfloat16)
            out = kernels.group_layer_norm_stacked(x, group, weight, bias, 1e-5, torch.bfloat16)
            grads = kernels.group_layer_norm_stacked_backward(dy, x, group, weight, 1e-5)
            exact = reference.group_layer_norm_stacked(x.double(), group, weight.double(), bias.double(), 1e-5)
            exact_grads = reference.group_layer_norm_stacked_backward(dy.double(), x.double(), group, weight.double(),
                                                                      1e-5)
            errors = dict(out=rel_err(out, exact), **{name: rel_err(g, e) for name, g, e in
                                                      zip(("dx", "dweight", "dbias"), grads, exact_grads)})

            def stacked():
                kernels.group_layer_norm_stacked(x, group, weight, bias, 1e-5, torch.bfloat16)
                kernels.group_layer_norm_stacked_backward(dy, x, group, weight, 1e-5)

            def one_by_one():
                dx = None
                for s in range(sets):
                    kernels.group_layer_norm(x, group, weight[s], bias[s], 1e-5, torch.bfloat16)
                    dx_s = kernels.group_layer_norm_backward(dy[s], x, group, weight[s], 1e-5)[0]
                    dx = dx_s if dx is None else dx + dx_s
            row = dict(n=n, d=d, sets=sets, errors=errors, stacked_ms=graph_time(stacked),
                       one_by_one_ms=graph_time(one_by_one))
            if (d, sets) in ((512, 3), (768, 4)):  # the runs of `t4 (3:1)*4` and `large`
                table, block_d = kernels._BWD_STACKED_CONFIGS, triton.next_power_of_2(d)
                chosen = table.get(block_d)
                row["bwd_ms"] = graph_time(lambda: kernels.group_layer_norm_stacked_backward(dy, x, group, weight, 1e-5))
                row["bwd_gbps"] = (2 * x.numel() * x.element_size() + dy.numel() * dy.element_size()) / row["bwd_ms"] * 1e-6
                row["bwd_sweep_ms"] = {}
                for config in itertools.product((1024, 2048, 4096, 8192), (1, 2, 4, 8), (2, 4, 8)):
                    table[block_d] = config
                    row["bwd_sweep_ms"][",".join(map(str, config))] = graph_time(
                        lambda: kernels.group_layer_norm_stacked_backward(dy, x, group, weight, 1e-5))
                if chosen is None:
                    del table[block_d]
                else:
                    table[block_d] = chosen
                best = min(row["bwd_sweep_ms"], key=row["bwd_sweep_ms"].get)
                print(f"stacked bwd D={d} sets={sets}: {row['bwd_ms']:.3f} ms ({row['bwd_gbps']:.0f} GB/s) as set, "
                      f"best (elements, warps, programs/SM) {best}: {row['bwd_sweep_ms'][best]:.3f} ms", flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_silu_backward(device) -> list[dict]:
    """The projections' silu backward with the bias gradient in one pass (`linear_silu_triton`)
    against torch's silu_backward and column sum (what autograd ran), after checking it against
    float64, at the training step's shapes: a full layer's Q/U/K/V projection (large: 3 x 256 x 4
    columns), a target layer's T rows, a run's H and R rows' K/V (large, and the Table 4 models')."""
    from mtfm.kernels import linear_silu_triton as kernels

    rows = []
    for n, c in ((131072, 3072), (27648, 3072), (104000, 1536), (131072, 1536), (104000, 512)):
        pre = 2 * torch.randn(n, c, device=device, dtype=torch.bfloat16)
        dy = torch.randn(n, c, device=device, dtype=torch.bfloat16)
        grad_pre, grad_bias = kernels.silu_backward_bias_grad(dy, pre)
        s = torch.sigmoid(pre.double())
        exact = dy.double() * s * (1 + pre.double() * (1 - s))
        errors = dict(grad_pre=rel_err(grad_pre, exact), grad_bias=rel_err(grad_bias, exact.sum(0)))
        out = torch.empty_like(pre)

        def torch_ops():
            torch.ops.aten.silu_backward.grad_input(dy, pre, grad_input=out)
            return out.sum(0)

        fused_ms = graph_time(lambda: kernels.silu_backward_bias_grad(dy, pre, out))
        torch_ms = graph_time(torch_ops)
        bytes_moved = 3 * n * c * 2
        row = dict(n=n, c=c, errors=errors, fused_ms=fused_ms, torch_ms=torch_ms,
                   fused_gbps=bytes_moved / fused_ms * 1e-6, torch_gbps=(bytes_moved + n * c * 2) / torch_ms * 1e-6)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ceilings(device) -> dict:
    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t_mm = do_bench(lambda: a @ b, return_mode="median")
    return dict(copy_gbps=2 * src.numel() * 4 / t_copy * 1e-6, matmul_bf16_tflops=2 * 8192**3 / t_mm * 1e-9)


def serving_batch(users: int, history: int, candidates: int, hq: int, hkv: int, d: int, device, seed: int = 3):
    """A serving batch: per user `history` H-tokens then `candidates` T-tokens (one scenario)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    length = history + candidates
    n = users * length
    kind = torch.tensor(([0] * history + [2] * candidates) * users, dtype=torch.int8)
    ts = torch.cat([torch.cat([torch.randint(0, 10**6, (history,), generator=g).sort().values,
                               torch.full((candidates,), 2 * 10**6)]) for _ in range(users)])
    offsets = torch.arange(users + 1) * length
    target_offsets = torch.arange(users + 1) * candidates
    rows = torch.cat([torch.arange(b * length + history, (b + 1) * length) for b in range(users)])
    q, k, v = (torch.randn(n, h, d, generator=g).to(torch.bfloat16) for h in (hq, hkv, hkv))
    on = lambda t: t.to(device)
    return dict(q=on(q), k=on(k), v=on(v), offsets=on(offsets), kind=on(kind), ts=on(ts),
                target_offsets=on(target_offsets), target_rows=on(rows))


def bench_key_splits(device) -> list[dict]:
    """The forward at serving sizes (the large config's 3 heads of 256, 1000 history tokens per
    user, K candidates), with each program's keys split as `_key_splits` picks, against one
    program per (query block, head); device time from a CUDA graph, and the largest difference."""
    from mtfm.kernels import hstu_attention_triton as triton_impl

    rows = []
    for users, k_cands in ((1, 50), (1, 200), (1, 1000), (4, 200), (16, 200)):
        b = serving_batch(users, 1000, k_cands, 3, 3, 256, device)
        meta = (b["offsets"], b["kind"], b["ts"])
        q_t = b["q"][b["target_rows"]]
        for name, q, q_offsets in (("full", b["q"], b["offsets"]), ("target", q_t, b["target_offsets"])):
            def run(splits, q=q, q_offsets=q_offsets):
                return triton_impl.jagged_hstu_attention(q, b["k"], b["v"], meta[0], q_offsets, meta[1], meta[2],
                                                         ALPHA, 1000.0, key_splits=splits)
            block_m, block_n = triton_impl._launch_params("fwd", q)[0][:2]
            query_blocks, head_programs = triton_impl._query_grid(q, b["k"], users, block_m)[:2]
            chosen = triton_impl._key_splits(query_blocks * head_programs, b["k"].shape[0] // users, block_n, device)
            with torch.no_grad():
                one, split = run(1), run(None)
            diff = (split.float() - one.float()).abs().max().item() / one.float().abs().max().item()
            row = dict(users=users, candidates=k_cands, attention=name, queries=q.shape[0], key_splits=chosen,
                       unsplit_ms=graph_time(lambda: run(1)), split_ms=graph_time(lambda: run(None)),
                       max_rel_diff=diff)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_registers(device) -> dict:
    """Each attention kernel's GPU ms on the training mix (full and split target attention, d=256,
    Hq/Hkv 2/1 and 3/3, the mean of 20 calls of each op under torch.profiler), and for each Triton
    kernel variant this study compiles (those, and the GLN, the silu backward and merge_rows at
    training shapes) its registers per thread, `spilled` (Triton's n_spills: the local memory a
    thread uses, in 32-bit words) and shared memory."""
    from mtfm.kernels import group_layer_norm_triton, linear_silu_triton, merge_rows_triton
    from mtfm.kernels import hstu_attention_triton as attn
    from mtfm.kernels.linear_silu import linear_silu
    from mtfm.kernels.merge_rows import merge_rows

    jitted = [fn for module in (attn, group_layer_norm_triton, linear_silu_triton, merge_rows_triton)
              for fn in vars(module).values() if isinstance(fn, triton.runtime.jit.JITFunction)]
    seen, compiled, timings = set(), [], []

    def record_new_variants(label):
        for fn in jitted:
            for cache, *_ in fn.device_caches.values():
                for kernel in cache.values():
                    if id(kernel) not in seen:
                        seen.add(id(kernel))
                        compiled.append(dict(op=label, kernel=fn.fn.__name__, registers=kernel.n_regs,
                                             spilled=kernel.n_spills, shared_kib=kernel.metadata.shared / 1024,
                                             warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages))

    def kernel_ms(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        return {e.key: e.device_time_total / reps / 1000
                for e in prof.key_averages() if e.key.endswith("_kernel")}

    for hq, hkv in ((2, 1), (3, 3)):
        batch = training_mix_batch(131072, hq, hkv, 256, torch.bfloat16, device, seed=3)
        full = (batch["q"], batch["k"], batch["v"], batch["offsets"], batch["offsets"], batch["kind"], batch["ts"],
                ALPHA, float(batch["length"]))
        half = split_halves(batch)
        split = (*half.values(), ALPHA, float(batch["length"]))
        grad_full, grad_split = torch.randn_like(batch["q"]), torch.randn_like(half["q_t"])
        ops = {"full": (lambda: attn.jagged_hstu_attention(*full, key_splits=1),
                        lambda: attn.jagged_hstu_attention_backward(grad_full, *full)),
               "split": (lambda: attn.jagged_split_target_attention(*split, key_splits=1),
                         lambda: attn.jagged_split_target_attention_backward(grad_split, *split))}
        for attention, (forward, backward) in ops.items():
            for kernel, ms in {**kernel_ms(forward), **kernel_ms(backward)}.items():
                timings.append(dict(hq=hq, hkv=hkv, attention=attention, kernel=kernel, ms=ms))
            record_new_variants(f"{attention} attention, Hq={hq}, Hkv={hkv}")
    x = torch.randn(131072, 512, device=device, dtype=torch.bfloat16, requires_grad=True)
    group = torch.randint(0, 5, (x.shape[0],), device=device)
    weight, bias = (torch.randn(5, 512, device=device, requires_grad=True) for _ in range(2))
    group_layer_norm(x, group, weight, bias, impl="triton").sum().backward()
    w = torch.randn(1536, 512, device=device, dtype=torch.bfloat16, requires_grad=True)
    linear_silu(x, w, torch.zeros(1536, device=device, dtype=torch.bfloat16, requires_grad=True),
                impl="triton").float().sum().backward()
    merge_rows(x.detach()[:1000], x.detach()[1000:], torch.randperm(x.shape[0], device=device), impl="triton")
    torch.cuda.synchronize()
    record_new_variants("GLN and merge_rows 131,072 x 512, silu backward 131,072 x 1536, bf16")
    return dict(timings=timings, compiled=compiled)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out("kernels.json"), help="JSON results ($OUT or bench/out)")
    parser.add_argument("--tokens", type=int, default=65536, help="total tokens per batch")
    parser.add_argument("--quick", action="store_true", help="correctness and the 4K / d=128 shapes only")
    parser.add_argument("--sweep", choices=("none", "attention", "gln", "all"), default="none",
                        help="pick block configs by timing candidates first")
    parser.add_argument("--sweep-length", type=int, default=4096,
                        help="tokens per user of the attention sweep; 0: the training batches' lengths "
                             "(history 200-1000, realtime 20-100, 50-300 targets per user)")
    parser.add_argument("--sweep-dims", type=int, nargs="+", default=[128, 256], help="head dims the sweep tries")
    parser.add_argument("--sweep-heads", type=int, nargs=2, default=[4, 2], metavar=("HQ", "HKV"),
                        help="query and kv heads of the sweep's batch")
    parser.add_argument("--sweep-targets", action="store_true",
                        help="the attention sweep times split target attention (T rows as queries)")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweeps (no correctness checks, no tables)")
    parser.add_argument("--serving", action="store_true",
                        help="only the forward at serving sizes, keys split across programs or not")
    parser.add_argument("--silu", action="store_true",
                        help="only the projections' silu backward with the bias gradient against torch's two kernels")
    parser.add_argument("--gln-stacked", action="store_true",
                        help="only the stacked GLN of a run of target layers against one call per layer")
    parser.add_argument("--registers", action="store_true",
                        help="only each attention kernel's GPU ms on the training mix and the registers, spills "
                             "and shared memory of every kernel variant the study compiles")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times the Triton kernels there (their correctness on the CPU: "
                     "TRITON_INTERPRET=1 python -m pytest tests/kernels)")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    result = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if args.serving or args.gln_stacked or args.silu or args.registers:  # one study alone, its table
        if args.registers:
            result["registers"] = bench_registers(device)
            for r in result["registers"]["timings"]:
                print(f"Hq={r['hq']} Hkv={r['hkv']} {r['attention']:5s} {r['kernel']:18s} {r['ms']:.3f} ms")
            header = "op | kernel | registers | spilled | shared KiB | warps | stages"
            rows = [f"{r['op']} | {r['kernel']} | {r['registers']} | {r['spilled']} | {r['shared_kib']:.0f} | "
                    f"{r['warps']} | {r['stages']}" for r in result["registers"]["compiled"]]
        elif args.silu:
            result["silu_backward"] = bench_silu_backward(device)
            header = "rows | columns | fused ms | torch silu_backward + sum ms | speed-up | fused GB/s | max rel err"
            rows = [f"{r['n']} | {r['c']} | {r['fused_ms']:.3f} | {r['torch_ms']:.3f} | "
                    f"{r['torch_ms'] / r['fused_ms']:.2f}x | {r['fused_gbps']:.0f} | {max(r['errors'].values()):.1e}"
                    for r in result["silu_backward"]]
        elif args.serving:
            result["key_splits"] = bench_key_splits(device)
            header = "users | K | attention | queries | key splits | unsplit ms | split ms | speed-up | max rel diff"
            rows = [f"{r['users']} | {r['candidates']} | {r['attention']} | {r['queries']} | {r['key_splits']} | "
                    f"{r['unsplit_ms']:.4f} | {r['split_ms']:.4f} | {r['unsplit_ms'] / r['split_ms']:.2f}x | "
                    f"{r['max_rel_diff']:.1e}" for r in result["key_splits"]]
        else:
            result["gln_stacked"] = bench_gln_stacked(device)
            header = "D | sets | stacked fwd+bwd ms | one call per set ms | speed-up | max rel err"
            rows = [f"{r['d']} | {r['sets']} | {r['stacked_ms']:.3f} | {r['one_by_one_ms']:.3f} | "
                    f"{r['one_by_one_ms'] / r['stacked_ms']:.2f}x | {max(r['errors'].values()):.1e}"
                    for r in result["gln_stacked"]]
        print(f"\n| {header} |\n|" + "---|" * (header.count("|") + 1))
        for row in rows:
            print(f"| {row} |")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return

    lengths = [4096] if args.quick else [1024, 2048, 4096, 8192]
    dims = [128] if args.quick else [128, 256]
    heads_kv = [4, 1] if args.quick else [4, 2, 1]

    t0 = time.perf_counter()
    result["correctness"] = []
    for d in () if args.sweep_only else (64, 128, 256):
        for length, hkv in ((1024, 4), (2048, 1), (4096, 2)):
            if args.quick and length != 1024:
                continue
            errs = check_attention(length, hkv, d, device)
            result["correctness"].append(dict(length=length, hkv=hkv, d=d, **errs))
            print(f"check L={length} Hkv={hkv} d={d}: " + " ".join(f"{k}={e:.2e}" for k, e in errs.items()), flush=True)
    print(f"correctness checks {time.perf_counter() - t0:.0f} s", flush=True)

    if args.sweep in ("attention", "all"):
        result["sweep"] = sweep_configs(device, args.tokens, args.sweep_length, args.sweep_dims, *args.sweep_heads,
                                        targets=args.sweep_targets)
    if args.sweep_only:
        if args.sweep in ("gln", "all"):
            result["sweep_gln"] = sweep_gln(device)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return
    tiny = make_batch(64, 1, 4, 1, 128, torch.bfloat16, device, seed=2)
    result["dispatch_floor_ms"] = do_bench(lambda: hstu_attention(
        tiny["q"], tiny["k"], tiny["v"], tiny["offsets"], tiny["kind"], tiny["ts"], alpha=ALPHA, norm=64.0),
        return_mode="median")
    print(f"one call on 64 tokens (dispatch and launch floor): {result['dispatch_floor_ms']:.3f} ms", flush=True)
    result["ceilings"] = ceilings(device)
    print(result["ceilings"], flush=True)
    result["attention"] = []
    for d in dims:
        for length in lengths:
            sdpa = bench_sdpa(length, d, device, args.tokens)
            for hkv in heads_kv:
                row = bench_attention(length, hkv, d, device, args.tokens, args.quick)
                row["sdpa"] = sdpa
                result["attention"].append(row)
                print(json.dumps(row), flush=True)
    if args.sweep in ("gln", "all"):
        result["sweep_gln"] = sweep_gln(device)
    result["gln"] = [bench_gln(262144, d, 8, device) for d in ((512,) if args.quick else (256, 512, 1024))]
    result["gln"].append(bench_gln(262144, 512, 8, device, mean_run=None))
    for row in result["gln"]:
        print(json.dumps(row), flush=True)

    print("\n| L | users | Hkv | d | fwd ms (graph) | fwd TFLOP/s | x SDPA | bwd ms | bwd TFLOP/s | x SDPA | "
          "target fwd ms (graph) | target fwd+bwd / full | reference fwd / fwd | peak B/token |")
    print("|" + "---|" * 14)
    for r in result["attention"]:
        s = r["sdpa"] or dict(fwd_tflops=float("nan"), bwd_tflops=float("nan"))
        target = (r["target_fwd_ms"] + r["target_bwd_ms"]) / (r["fwd_ms"] + r["bwd_ms"])
        speedup = f"{r['reference_fwd_ms'] / r['fwd_ms']:.0f}" if "reference_fwd_ms" in r else "-"
        print(f"| {r['length']} | {r['users']} | {r['hkv']} | {r['d']} | {r['fwd_ms']:.3f} ({r['fwd_graph_ms']:.3f}) | "
              f"{r['fwd_tflops']:.0f} | {r['fwd_tflops'] / s['fwd_tflops']:.2f} | {r['bwd_ms']:.3f} | "
              f"{r['bwd_tflops']:.0f} | {r['bwd_tflops'] / s['bwd_tflops']:.2f} | "
              f"{r['target_fwd_ms']:.3f} ({r['target_fwd_graph_ms']:.3f}) | {target:.2f} | {speedup} | "
              f"{r['peak_bytes_per_token']:.0f} |")
    seen = set()
    for r in result["attention"]:
        if r["sdpa"] and (r["length"], r["d"]) not in seen:
            seen.add((r["length"], r["d"]))
            s = r["sdpa"]
            print(f"SDPA {s['backend']} L={r['length']} d={r['d']}: fwd {s['fwd_ms']:.3f} ms {s['fwd_tflops']:.0f} "
                  f"TFLOP/s, bwd {s['bwd_ms']:.3f} ms {s['bwd_tflops']:.0f} TFLOP/s")
    copy = result["ceilings"]["copy_gbps"]
    for r in result["gln"]:
        print(f"GLN N={r['n']} D={r['d']} G={r['groups']} run={r['mean_run']}: device fwd {r['fwd_graph_ms']:.3f} ms {r['fwd_gbps']:.0f} GB/s "
              f"({r['fwd_gbps'] / copy:.0%} of copy), bwd {r['bwd_graph_ms']:.3f} ms {r['bwd_gbps']:.0f} GB/s "
              f"({r['bwd_gbps'] / copy:.0%}); eager op fwd {r['fwd_ms']:.3f} ms, bwd {r['bwd_ms']:.3f} ms; "
              f"reference fwd {r['reference_fwd_ms']:.3f} ms; errors " + " ".join(f"{k}={e:.1e}" for k, e in r["errors"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
