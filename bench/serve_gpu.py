"""GPU serving benchmark (issue 7 part 3): one scenario's subgraph under Ray Serve on the GPU.

    python bench/serve_gpu.py --out $OUT/serve_gpu_large.json --budget-s 200        # GPU machine
    python bench/serve_gpu.py --device cpu --tiny                                   # CPU check
    python bench/serve_gpu.py --profile 200 --out bench/results/serve_profile.json   # where one request's time goes
    python bench/serve_gpu.py --no-cuda-graphs ...                                  # serve without CUDA graphs
    python bench/serve_gpu.py --direct-ingress ...                                  # HTTP without Serve's proxy
    python bench/serve_gpu.py --parse-only --device cpu --out bench/results/request_parse.json  # body forms
    python bench/serve_gpu.py --ks 200 --requests 2000 ...                          # one K, longer cells
    python bench/serve_gpu.py --pacing 200 --out $OUT/serve_pacing.json             # thread, gaps, BatchQueue
    python bench/serve_gpu.py --single-only --ks 200 --requests 1000 ...            # the p99 goal's cells alone

What runs: the `large` model (configs/model/large.yaml: 15 layers, d_model 768, bf16 autocast),
randomly initialised, saved as a checkpoint and served by the production app
(`mtfm.deployments.app:build_app`) on a private local Ray: the router validates the JSON, the
`ranker_hp` replica (1 GPU) batches concurrent requests (deployments/batch_queue.py) and scores with the
PyTorch backend: CUDA, bf16, and the Triton attention and Group LayerNorm kernels (the checkpoint
asks for `triton` explicitly, so a fallback to the PyTorch references would fail loudly). Each
request is one user of scenario hp with 1000 history events (1000 H-tokens, no realtime events)
and K candidates, K in {50, 200, 1000}; candidates are scored in one chunk (chunk_size 1024).
The served replica replays CUDA graphs (`serving.cuda_graphs`, on by default; --no-cuda-graphs
turns it off): a batch is padded to a bucketed shape and replayed from that shape's graph
(deployments/cuda_graphs.py). With the user-side cache, a batch of cached users replays a graph
of its candidates alone against their cached keys and values; any other batch replays the
single pass that also returns each user side, which is cached.

User-side reuse (the replica's `UserSideCache` of encoded H/R keys and values):
    on    requests rotate over 4 users whose user sides are cached (hits; TTL longer than the run)
    off   every request is a new user (a miss: the user side is encoded, then cached and unused)

Measured, after a warm-up (Triton compiles, first CUDA allocations) that is timed and reported:
    in process    no HTTP and no Serve: `TorchBackend.score` of one parsed request (collate, H2D,
                  model, D2H; 1 CPU thread, as a replica), p50/p99 over 50 calls, for the plain
                  single pass (no user-side split), reuse off, reuse on and (on CUDA) from CUDA
                  graphs: "graphs" the padded single pass, "graphs reuse off" the pass that also
                  encodes and caches the user side (a new user each call), "graphs reuse on"
                  the candidates alone against the cached user side; the request parse
                  (the router's validation) separately; and the largest score difference from
                  the float32 CPU subgraph (the PyTorch references).
    HTTP, single  200 sequential requests per cell, one at a time: p50/p99 latency, sent with the
                  standard library's http.client over a keep-alive connection. It includes the
                  replica's batch wait for more requests (--batch-wait-ms, default 0). Each
                  response's Server-Timing header splits it (p50/p99 of each part): the ingress's
                  parse, the replica's queue and score, the server's total, and the transport
                  (the client's latency minus that total: HTTP server, Serve, sockets, client).
    handle        the same sequential requests, parsed in this process and sent straight to the
                  replica through a DeploymentHandle (no HTTP proxy, no router, no JSON): HTTP single
                  minus this is what the proxy, the router and the JSON cost. Beside it, ray.put +
                  ray.get of a parsed request (as the router hands it to Ray: one Arrow IPC stream)
                  and of its table alone (which Ray's own Arrow reducer takes column by column).
    HTTP, loaded  a closed loop of 16 clients for 2 s: throughput (requests/s), p50/p99 latency
                  and the mean number of requests per scored batch; then the same closed loop
                  through the handle, which shows whether loaded requests queue at the replica or
                  in front of it (proxy, router). Every response says how long it was queued in
                  the replica and how long its batch scored; their medians are printed beside
                  each latency, so the replica's share and the transport's can be read off.
The HTTP front (default: Serve's proxy, then the router, then the replica):
    --direct-ingress    Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, set here for
                        the private Ray this script starts): the ingress replicas serve HTTP
                        themselves on ports of their own, no proxy in the path; clients spread over them.
    --scenario-ingress  the hp replica is its app's ingress (app arg scenario_ingress): no router,
                        the replica parses the JSON itself.
    --columns           bodies with events and candidates as objects of columns (in process, both
                        forms' json.loads + parse are timed anyway).
    --user-code-on-main-loop  Serve runs the deployment's code on the replica's main event loop,
                        not on a loop of its own in another thread (one thread hop less each way).
Goals, as ratios in the same run: p99 < 10 ms at K=200, and p50 at K=1000 < 3x p50 at K=50.
A --budget-s guard skips the remaining cells (marked skipped) rather than overrunning. Prints a
table; writes JSON (--out). --tiny: the tiny model, 50 history events, 10 requests per cell,
4 clients for 0.3 s per closed loop (a CPU check of the whole path in under a minute).

GPU machine (no install: `bench/checkout.py` lets this process and the Ray workers import
mtfm from the checkout): Ray from the bundle unpacked at /tmp/site (see bench/RESULTS.md, "GPU
training"), `export PYTHONPATH=/tmp/site:$PWD`, then the first command above.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkout import default_out, ensure_mtfm_importable, random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = "hp"
PATH = f"/{SCENARIO}/rank"
IN_PROCESS_MODES = ("plain", "reuse off", "reuse on", "graphs", "graphs reuse off", "graphs reuse on")
USER_CACHE_TTL_S = 3600.0  # longer than any run: reuse-on requests always hit
# Holds the 4 cached users of the large model (about 46 MB each: 15 layers of bf16 keys and values
# of 1000 tokens) with room to spare; reuse-off users are evicted least recently used first.
USER_CACHE_MB = 1024
CACHED_USERS = 4
GOAL_P99_MS, GOAL_K = 10.0, 200
GOAL_K_RATIO = 3.0


@dataclass(frozen=True)
class Shapes:
    model_config: str
    history_events: int
    ks: tuple[int, ...]
    requests: int
    concurrency: int
    duration_s: float
    inprocess_repeats: int
    router_replicas: int


FULL = Shapes("configs/model/large.yaml", 1000, (50, 200, 1000), requests=200, concurrency=16, duration_s=4.0,
              inprocess_repeats=50, router_replicas=4)
TINY = Shapes("configs/model/tiny.yaml", 50, (50, 200, 1000), requests=10, concurrency=4, duration_s=0.6,
              inprocess_repeats=5, router_replicas=1)


class Budget:
    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:5.1f} s] {message}", flush=True)


# ---------------------------------------------------------------- model, registry and requests

def write_config_dir(folder: Path, history_events: int) -> Path:
    """configs/ with only scenario hp, and the history sequence keeping `history_events` events."""
    import yaml

    sequences = yaml.safe_load((ROOT / "configs/sequences.yaml").read_text())
    for sequence in sequences["sequences"]:
        if sequence["kind"] == "history":
            sequence["max_len"] = max(sequence["max_len"], history_events)
    (folder / "scenarios").mkdir(parents=True)
    (folder / "sequences.yaml").write_text(yaml.safe_dump(sequences, sort_keys=False))
    (folder / "scenarios" / f"{SCENARIO}.yaml").write_text((ROOT / f"configs/scenarios/{SCENARIO}.yaml").read_text())
    return folder


def write_checkpoint(model_config: str, registry, folder: Path, kernels: str) -> Path:
    """The model config, randomly initialised (cost does not depend on the weights), with both
    kernel choices set to `kernels`."""
    from mtfm.model import load_model_config

    config = load_model_config(ROOT / model_config).replace(attention_impl=kernels, norm_impl=kernels)
    return random_checkpoint(config, registry, folder)


class RequestBodies:
    """JSON bodies of one K: the same events and candidates, any user id (the cache key)."""

    USER_ID_PLACEHOLDER = 987654321987654321

    def __init__(self, registry, k: int, history_events: int, columns: bool = False):
        from mtfm.deployments.rank_request import example_request

        body = example_request(registry, SCENARIO, candidates=k, events=history_events,
                               user_id=self.USER_ID_PLACEHOLDER, ts=int(time.time() * 1000), columns=columns)
        body["sequences"] = {name: events if registry.sequences[name].kind == "history" else type(events)()
                             for name, events in body["sequences"].items()}
        self.example = body
        self.head, self.tail = json.dumps(body).split(str(self.USER_ID_PLACEHOLDER))

    def for_user(self, user_id: int) -> bytes:
        return f"{self.head}{user_id}{self.tail}".encode()


class UserIds:
    """reuse on: the same few users again and again; off: a user never seen before, every time."""

    def __init__(self):
        self.next_new = 10**9
        self.lock = threading.Lock()

    def pick(self, reuse: bool, i: int) -> int:
        if reuse:
            return i % CACHED_USERS
        with self.lock:
            self.next_new += 1
            return self.next_new


# ---------------------------------------------------------------- in process

def run_in_process(checkpoint: Path, registry, shapes: Shapes, device_name: str, chunk_size: int,
                   budget: Budget) -> tuple[list[dict], float]:
    """Rows per K and, first, the warm-up seconds (every K and mode scored twice)."""
    import torch

    from mtfm.deployments.backends import TorchBackend
    from mtfm.deployments.rank_request import RankRequestParser
    from mtfm.deployments.scenario import load_scenario_ranker
    from mtfm.deployments.user_cache import UserSideCache
    from mtfm.model import ScenarioRanker

    device = torch.device(device_name)
    parser = RankRequestParser(registry, SCENARIO, max_candidates=max(shapes.ks))
    requests = {}
    for k in shapes.ks:
        body = RequestBodies(registry, k, shapes.history_events).example
        body["user_id"] = 0
        requests[k] = (body, parser.parse(body, now_ms=body["ts"]))
    served = load_scenario_ranker(checkpoint, SCENARIO)[0]
    reference_config = served.config.replace(attention_impl="reference", norm_impl="reference")
    reference_ranker = ScenarioRanker(reference_config, registry, SCENARIO)
    reference_ranker.load_state_dict(served.state_dict())
    reference = TorchBackend(reference_ranker, device=torch.device("cpu"), reuse_user_side=False)
    expected = {k: reference.score([request])[0] for k, (_, request) in requests.items()}
    del served, reference_ranker, reference

    torch.set_num_threads(1)  # as a replica with num_cpus 1 (deployments/scenario.py)
    cache = UserSideCache(USER_CACHE_TTL_S, USER_CACHE_MB * 2**20)
    modes = {
        "plain": TorchBackend(load_scenario_ranker(checkpoint, SCENARIO)[0], device=device, reuse_user_side=False),
        "reuse off": TorchBackend(load_scenario_ranker(checkpoint, SCENARIO)[0], device=device, chunk_size=chunk_size,
                                  user_cache=cache),
    }
    modes["reuse on"] = modes["reuse off"]
    if device.type == "cuda":
        modes["graphs"] = TorchBackend(load_scenario_ranker(checkpoint, SCENARIO)[0], device=device, cuda_graphs=True)
        modes["graphs reuse off"] = TorchBackend(load_scenario_ranker(checkpoint, SCENARIO)[0], device=device,
                                                 cuda_graphs=True,
                                                 user_cache=UserSideCache(USER_CACHE_TTL_S, USER_CACHE_MB * 2**20))
        modes["graphs reuse on"] = modes["graphs reuse off"]
    fresh_users = iter(range(10**9))

    def request_for(mode: str, request):
        # Reuse off scores a user the cache has never seen; reuse on user 0, cached by its first call.
        if mode.endswith("reuse off"):
            return dataclasses.replace(request, user_state=f"new-{next(fresh_users)}")
        return request

    budget.log("in process: warm-up")
    started = time.perf_counter()
    for k, (_, request) in requests.items():
        for mode, backend in modes.items():
            for _ in range(2):
                backend.score([request_for(mode, request)])
    warmup_s = time.perf_counter() - started

    rows = []
    for k, (body, request) in requests.items():
        if budget.left() < 0:
            rows.append({"k": k, "skipped": "budget"})
            continue
        repeats = max(shapes.inprocess_repeats // 5, 3)
        parse_ms = _timed(lambda: parser.parse(body, now_ms=body["ts"]), repeats)
        row = {"k": k, "parse_ms": _percentiles(parse_ms)}
        row |= decode_parse_times(registry, parser, k, shapes.history_events, repeats)
        for mode, backend in modes.items():
            scores = backend.score([request_for(mode, request)])[0]
            times = []
            for _ in range(shapes.inprocess_repeats):
                one = request_for(mode, request)
                start = time.perf_counter()
                backend.score([one])  # returns host arrays: includes the device sync
                times.append(time.perf_counter() - start)
            row[mode] = _percentiles(np.array(times) * 1000) | {
                "max_abs_diff_vs_cpu_fp32": float(np.abs(scores - expected[k]).max())}
        rows.append(row)
        budget.log(_in_process_text(row).strip())
    del modes, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, warmup_s


def profile_in_process(checkpoint: Path, registry, shapes: Shapes, device_name: str, k: int, out: Path) -> None:
    """Where one request's time goes: torch.profiler over 20 warm `TorchBackend.score` calls of
    the plain pass, then (on CUDA) replayed from CUDA graphs: the single pass, the pass that also
    encodes and caches the user side (a new user each call) and the candidates against a cached one."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mtfm.deployments.backends import TorchBackend
    from mtfm.deployments.rank_request import RankRequestParser
    from mtfm.deployments.scenario import load_scenario_ranker
    from mtfm.deployments.user_cache import UserSideCache

    torch.set_num_threads(1)
    body = RequestBodies(registry, k, shapes.history_events).example
    request = RankRequestParser(registry, SCENARIO, max_candidates=k).parse(body, now_ms=body["ts"])
    fresh_users = iter(range(10**9))
    texts = []
    modes = [("plain", False, False, False)]
    if device_name == "cuda":
        modes += [("graphs", True, False, False), ("graphs reuse off", True, True, False),
                  ("graphs reuse on", True, True, True)]
    for name, graphs, cached, hit in modes:
        cache = UserSideCache(USER_CACHE_TTL_S, USER_CACHE_MB * 2**20) if cached else None
        backend = TorchBackend(load_scenario_ranker(checkpoint, SCENARIO)[0], device=torch.device(device_name),
                               reuse_user_side=cached, cuda_graphs=graphs, user_cache=cache)

        def one_request():
            return request if hit or not cached else dataclasses.replace(request, user_state=f"new-{next(fresh_users)}")

        for _ in range(5):
            backend.score([one_request()])
        calls = 20
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_name == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                backend.score([one_request()])
            wall_ms = (time.perf_counter() - start) * 1000 / calls
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1000 / calls
        launches = sum(e.count for e in kernels) / calls
        texts.append(f"K={k}, {name}, {calls} calls: wall {wall_ms:.2f} ms per call, GPU kernels {gpu_ms:.2f} ms per "
                     f"call ({launches:.0f} kernels per call)\n\n"
                     + events.table(sort_by="self_cpu_time_total", row_limit=30) + "\n"
                     + events.table(sort_by="self_device_time_total" if device_name == "cuda" else "cpu_time_total",
                                    row_limit=20))
        print(texts[-1])
        del backend
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(texts))
    print(f"wrote {out}")


PACING_GAP_S = 0.004  # about the time a replica spends outside scoring between sequential HTTP requests


def pacing_probe(checkpoint: Path, registry, shapes: Shapes, device_name: str, k: int, repeats: int) -> list[dict]:
    """Is the replica's scoring slower than in-process because it runs in a worker thread, because
    requests come with idle gaps between them, or because of the BatchQueue's hand-offs? The same
    `TorchBackend.score` of one cached user's K candidates (graphed on CUDA), timed five ways:
    on the main thread or in a worker thread, back to back or `PACING_GAP_S` apart, and through a
    `BatchQueue` on an event loop (as the replica) with the same gaps; p50/p99 ms of the call.

    What wakes slowly after a gap is separated two ways. The same gaps spent otherwise: the CPU
    spinning (the core never idles), spinning while a tiny kernel is launched every 0.25 ms (the
    GPU never idles either), or sleeping while a side thread launches a tiny kernel every 0.5 ms
    (a keep-warm thread a replica could run). And fixed work timed after a gap and back to back:
    a bf16 matmul on the GPU (CUDA events: the GPU's own time, its clocks) and a Python loop on
    the CPU (the core's clock and idle state)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mtfm.deployments.backends import TorchBackend
    from mtfm.deployments.batch_queue import BatchQueue
    from mtfm.deployments.rank_request import RankRequestParser
    from mtfm.deployments.scenario import load_scenario_ranker
    from mtfm.deployments.user_cache import UserSideCache

    torch.set_num_threads(1)
    body = RequestBodies(registry, k, shapes.history_events).example
    request = RankRequestParser(registry, SCENARIO, max_candidates=k).parse(body, now_ms=body["ts"])
    backend = TorchBackend(load_scenario_ranker(checkpoint, SCENARIO)[0], device=torch.device(device_name),
                           cuda_graphs=device_name == "cuda",
                           user_cache=UserSideCache(USER_CACHE_TTL_S, USER_CACHE_MB * 2**20))
    def timed_score(_=None) -> float:
        start = time.perf_counter()
        backend.score([request])
        return (time.perf_counter() - start) * 1000

    def serial(call, gap_s: float) -> np.ndarray:
        for _ in range(5):
            call()
        times = []
        for _ in range(repeats):
            times.append(call())
            if gap_s:
                time.sleep(gap_s)
        return np.array(times)

    async def through_queue(caller_timed: bool = False) -> np.ndarray:
        """The score's own time, or (caller_timed) the submit's: the queue's hand-offs included."""
        queue = BatchQueue(lambda items: [timed_score() for _ in items], max_cost=1)
        times = []
        for i in range(repeats + 5):
            start = time.perf_counter()
            ms = await queue.submit(i, 1)
            if caller_timed:
                ms = (time.perf_counter() - start) * 1000
            if i >= 5:
                times.append(ms)
            await asyncio.sleep(PACING_GAP_S)
        return np.array(times)

    tick = torch.zeros(1, device=device_name)

    def spin(gap_s: float, tick_every_s: float | None = None) -> None:
        end = time.perf_counter() + gap_s
        next_tick = 0.0
        while (now := time.perf_counter()) < end:
            if tick_every_s is not None and now >= next_tick:
                tick.add_(1)
                next_tick = now + tick_every_s

    def spun(call, gap_s: float, tick_every_s: float | None = None) -> np.ndarray:
        times = []
        for i in range(repeats + 5):
            ms = call()
            if i >= 5:
                times.append(ms)
            spin(gap_s, tick_every_s)
        return np.array(times)

    def with_keep_warm_thread(measure) -> np.ndarray:
        import threading

        stop = threading.Event()

        def keep_warm():
            while not stop.wait(0.0005):
                tick.add_(1)

        thread = threading.Thread(target=keep_warm, daemon=True)
        thread.start()
        try:
            return measure()
        finally:
            stop.set()
            thread.join()

    def handed_off(spin_worker: bool, spin_caller: bool) -> np.ndarray:
        """The caller sleeps a gap, hands the call to a worker thread and waits for its result (as
        a replica's event loop hands a batch to its scoring thread); timed by the caller, hand-offs
        included. A spinning side polls with time.sleep(0), which releases the GIL, instead of
        blocking, so its CPU never idles."""
        import threading
        from collections import deque

        tasks, results, stop = deque(), deque(), threading.Event()
        task_ready, result_ready = threading.Event(), threading.Event()

        def serve_tasks():
            while not stop.is_set():
                if spin_worker:
                    while not tasks and not stop.is_set():
                        time.sleep(0)
                else:
                    task_ready.wait()
                    task_ready.clear()
                while tasks:
                    tasks.popleft()
                    results.append(timed_score())
                    result_ready.set()

        thread = threading.Thread(target=serve_tasks, daemon=True)
        thread.start()
        times = []
        try:
            for i in range(repeats + 5):
                time.sleep(PACING_GAP_S)
                start = time.perf_counter()
                tasks.append(i)
                task_ready.set()
                if spin_caller:
                    while not results:
                        time.sleep(0)
                else:
                    result_ready.wait()
                result_ready.clear()
                results.popleft()
                if i >= 5:
                    times.append((time.perf_counter() - start) * 1000)
        finally:
            stop.set()
            task_ready.set()
            thread.join()
        return np.array(times)

    gap_ms = PACING_GAP_S * 1000
    with ThreadPoolExecutor(1) as worker:
        in_worker = lambda: worker.submit(timed_score).result()  # noqa: E731
        ways = {
            "main thread, back to back": lambda: serial(timed_score, 0),
            "worker thread, back to back": lambda: serial(in_worker, 0),
            f"main thread, {gap_ms:g} ms apart": lambda: serial(timed_score, PACING_GAP_S),
            f"worker thread, {gap_ms:g} ms apart": lambda: serial(in_worker, PACING_GAP_S),
            f"BatchQueue, {gap_ms:g} ms apart": lambda: asyncio.run(through_queue()),
            f"main thread, {gap_ms:g} ms spun": lambda: spun(timed_score, PACING_GAP_S),
            f"main thread, {gap_ms:g} ms spun, GPU ticks": lambda: spun(timed_score, PACING_GAP_S, 0.00025),
            f"main thread, {gap_ms:g} ms apart, keep-warm thread":
                lambda: with_keep_warm_thread(lambda: serial(timed_score, PACING_GAP_S)),
            f"BatchQueue, {gap_ms:g} ms apart, keep-warm thread":
                lambda: with_keep_warm_thread(lambda: asyncio.run(through_queue())),
            f"hand-off, {gap_ms:g} ms apart, both block": lambda: handed_off(False, False),
            f"hand-off, {gap_ms:g} ms apart, worker spins": lambda: handed_off(True, False),
            f"hand-off, {gap_ms:g} ms apart, both spin": lambda: handed_off(True, True),
            f"BatchQueue, {gap_ms:g} ms apart, caller-timed": lambda: asyncio.run(through_queue(True)),
        }
        rows = [{"way": way, "k": k} | _percentiles(measure()) for way, measure in ways.items()]
    return rows + wake_probes(device_name, repeats, spin)


def wake_probes(device_name: str, repeats: int, spin) -> list[dict]:
    """Fixed work timed back to back and after a `PACING_GAP_S` sleep or spin: a bf16 matmul's GPU
    time by CUDA events (the GPU's clocks after idling) and a Python loop's wall time (the CPU's)."""
    import torch

    def python_loop() -> float:
        start = time.perf_counter()
        total = 0
        for i in range(20_000):
            total += i
        return (time.perf_counter() - start) * 1000

    probes = {"Python loop (CPU)": python_loop}
    if device_name == "cuda":
        a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def gpu_matmul() -> float:
            start_event.record()
            for _ in range(4):
                a @ a
            end_event.record()
            end_event.synchronize()
            return start_event.elapsed_time(end_event)

        probes["bf16 matmul 4x2048^3 (GPU events)"] = gpu_matmul
    gap_ms = PACING_GAP_S * 1000
    rows = []
    for name, probe in probes.items():
        for how, gap in (("back to back", lambda: None),
                         (f"after {gap_ms:g} ms asleep", lambda: time.sleep(PACING_GAP_S)),
                         (f"after {gap_ms:g} ms spun", lambda: spin(PACING_GAP_S))):
            times = []
            for i in range(repeats + 5):
                gap()
                ms = probe()
                if i >= 5:
                    times.append(ms)
            rows.append({"way": f"{name}, {how}", "k": 0} | _percentiles(np.array(times)))
    return rows


def decode_parse_times(registry, parser, k: int, history_events: int, repeats: int) -> dict:
    """What the ingress does with a body: decode (orjson, as deployments/http_api.py does) + parse,
    events and candidates as lists of objects (the default) or as objects of columns; p50/p99 ms
    and the body's bytes. Beside it the same with the standard library's json.loads, as before."""
    import orjson

    out = {}
    for form, columns in (("rows", False), ("columns", True)):
        body = RequestBodies(registry, k, history_events, columns).example
        raw = json.dumps(body).encode()
        for suffix, loads in (("", orjson.loads), ("_stdlib_json", json.loads)):
            parser.parse(loads(raw), now_ms=body["ts"])
            out[f"decode_parse_{form}{suffix}_ms"] = _percentiles(
                _timed(lambda: parser.parse(loads(raw), now_ms=body["ts"]), repeats)) | {"body_bytes": len(raw)}
    return out


def _timed(fn, repeats: int) -> np.ndarray:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1000


def _percentiles(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": int(len(ms))}


# ---------------------------------------------------------------- HTTP

class Client:
    """One keep-alive HTTP/1.1 connection to the local Serve proxy (standard library only)."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: bytes) -> tuple[int, bytes, float, dict[str, float]]:
        """(status, response body, seconds from send to the last byte read, the response's
        Server-Timing parts in ms: parse, queue, score, total)."""
        start = time.perf_counter()
        self.connection.request("POST", path, body, {"content-type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        seconds = time.perf_counter() - start
        timing = {}
        for part in (response.getheader("server-timing") or "").split(","):
            name, _, duration = part.strip().partition(";dur=")
            if duration:
                timing[name] = float(duration)
        return response.status, data, seconds, timing

    def close(self) -> None:
        self.connection.close()


def sequential(port: int, bodies: RequestBodies, reuse: bool, users: UserIds, count: int, deadline: float) -> dict:
    client = Client(port)
    for i in range(CACHED_USERS):  # untimed: opens the connection and caches every reused user
        client.post(PATH, bodies.for_user(users.pick(reuse, i)))
    latencies, batches, timings, errors = [], [], [], 0
    for i in range(count):
        if time.perf_counter() > deadline:
            break
        status, data, seconds, timing = client.post(PATH, bodies.for_user(users.pick(reuse, i)))
        if status == 200:
            latencies.append(seconds)
            batches.append(_batch_of(data))
            if "total" in timing:
                timings.append(timing | {"transport": seconds * 1000 - timing["total"]})
        else:
            errors += 1
    client.close()
    return _latency_summary(latencies, errors, batches) | {"server_timing": _server_timing_summary(timings)}


def _server_timing_summary(timings: list[dict[str, float]]) -> dict:
    """p50 and p99 of each Server-Timing part, and of the transport (the client's latency minus the
    server's total): which part a slow request's time went to."""
    parts = {name: [t[name] for t in timings if name in t] for name in ("parse", "queue", "score", "total", "transport")}
    return {name: _percentiles(np.array(values)) for name, values in parts.items() if values}


def handle_sequential(handle, request_for: Callable[[int], object], reuse: bool, users: UserIds, count: int,
                      deadline: float) -> dict:
    """`sequential` without HTTP: `request_for(user_id)` is that user's parsed request."""
    for i in range(CACHED_USERS):
        handle.rank.remote(request_for(users.pick(reuse, i))).result()
    latencies, batches = [], []
    for i in range(count):
        if time.perf_counter() > deadline:
            break
        request = request_for(users.pick(reuse, i))
        start = time.perf_counter()
        result = handle.rank.remote(request).result()
        latencies.append(time.perf_counter() - start)
        batches.append(result["batch"])
    return _latency_summary(latencies, 0, batches)


def handle_closed_loop(handle, request_for: Callable[[int], object], reuse: bool, users: UserIds, concurrency: int,
                       duration_s: float) -> dict:
    """`closed_loop` without HTTP: where the loaded requests queue, the replica or what is in front of it."""
    latencies, batches = [], []
    stop = time.perf_counter() + duration_s

    def client_loop(worker: int) -> None:
        i = worker
        while time.perf_counter() < stop:
            request = request_for(users.pick(reuse, i))
            start = time.perf_counter()
            result = handle.rank.remote(request).result()
            latencies.append(time.perf_counter() - start)
            batches.append(result["batch"])
            i += concurrency

    begin = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _latency_summary(latencies, 0, batches) | {
        "concurrency": concurrency, "throughput_rps": len(latencies) / (time.perf_counter() - begin)}


def closed_loop(ports: list[int], bodies: RequestBodies, reuse: bool, users: UserIds, concurrency: int,
                duration_s: float) -> dict:
    latencies, batches, errors = [], [], []
    stop = time.perf_counter() + duration_s

    def client_loop(worker: int) -> None:
        client, i = Client(ports[worker % len(ports)]), worker
        while time.perf_counter() < stop:
            try:
                status, data, seconds, _ = client.post(PATH, bodies.for_user(users.pick(reuse, i)))
                if status == 200:
                    batches.append(_batch_of(data))
                    latencies.append(seconds)
                else:
                    errors.append(status)
            except (OSError, http.client.HTTPException, ValueError) as error:  # counted, not a dead client
                errors.append(type(error).__name__)
                client.close()
                client = Client(ports[worker % len(ports)])
                time.sleep(0.05)
            i += concurrency
        client.close()

    begin = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    return _latency_summary(latencies, len(errors), batches) | {
        "concurrency": concurrency, "throughput_rps": len(latencies) / elapsed}


def _batch_of(response: bytes) -> dict:
    """The response's "batch" object. Only that last key (ScenarioDeployment.rank's order) is
    parsed: json.loads of a whole K=1000 response would make client threads compete for the GIL."""
    return json.loads(b"{" + response[response.rindex(b'"batch"'):])["batch"]


def _latency_summary(latencies: list[float], errors: int, batches: list[dict]) -> dict:
    """Latency percentiles, and from the replica's "batch" answers: requests per batch, and the
    median time a request spent in the replica queued (batch wait, earlier batches) and scoring."""
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])

    def mean_and_median(key: str) -> tuple[float, float]:
        values = np.array([b[key] for b in batches], dtype=float) if batches else np.array([np.nan])
        return float(np.mean(values)), float(np.median(values))

    return {"requests": len(latencies), "errors": errors, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(np.mean(ms)),
            "mean_batch_requests": mean_and_median("requests")[0],
            "replica_queued_p50_ms": mean_and_median("queued_ms")[1],
            "replica_score_p50_ms": mean_and_median("score_ms")[1]}


DIRECT_INGRESS_PORTS = 16


def direct_ingress_environment() -> int:
    """Sets Ray Serve's direct ingress (ingress replicas serve HTTP themselves, no proxy) for the
    Ray started next, and returns the first port of the range their ports come from."""
    from mtfm.platform.cluster import unused_port

    port = unused_port()
    os.environ.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
                      RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + DIRECT_INGRESS_PORTS))
    return port


def listening_ingress_ports(first: int, count: int, proxy_port: int, timeout_s: float = 60.0) -> list[int]:
    """The ports of the range starting at `first` where Serve answers `/-/healthz`, once `count`
    do (Ray takes the lowest free ones, skipping any that something else holds)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        ports = []
        for port in [p for p in range(first, first + DIRECT_INGRESS_PORTS) if p != proxy_port]:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/-/healthz")
                if connection.getresponse().status == 200:
                    ports.append(port)
                connection.close()
            except (OSError, http.client.HTTPException):  # nothing there, or something that does not speak HTTP
                pass
        if len(ports) >= count:
            return ports
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{len(ports)} of {count} ingress replicas answer on ports {first}-"
                               f"{first + DIRECT_INGRESS_PORTS - 1}: {ports}")
        time.sleep(0.5)


def run_http(checkpoint: Path, config_dir: Path, registry, shapes: Shapes, device_name: str, chunk_size: int,
             batch_wait_s: float, cuda_graphs: bool, direct_ingress_port: int | None, scenario_ingress: bool,
             columns: bool, budget: Budget, stacks_out: Path | None = None,
             single_only: bool = False) -> tuple[list[dict], dict]:
    """Rows per (K, reuse) and the setup facts (deploy and warm-up seconds, the replica's /healthz).
    `stacks_out`: py-spy samples the replica during the HTTP single cell of K=200 (else the first
    K), reuse on, into this raw file; the summary goes in the setup facts. `single_only`: only the
    sequential HTTP cells (no handle or loaded cells)."""
    import ray
    from ray import serve

    from mtfm.deployments.app import build_app
    from mtfm.deployments.rank_request import RankRequestParser
    from mtfm.platform.cluster import unused_port

    # address="local": always a private cluster, never one that someone else started on this machine.
    budget.log("starting a local Ray and Serve")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = unused_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    knobs = {"backend": "torch", "num_gpus": 1.0 if device_name == "cuda" else 0.0, "num_cpus": 1.0,
             "max_batch_requests": 16, "max_ongoing_requests": 64, "max_candidates": max(shapes.ks),
             "batch_wait_timeout_s": batch_wait_s, "cuda_graphs": cuda_graphs}
    rows: list[dict] = []
    try:
        started = time.perf_counter()
        serve.run(build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir),
                             "scenarios": {SCENARIO: knobs}, "chunk_size": chunk_size,
                             "user_cache_ttl_s": USER_CACHE_TTL_S, "user_cache_mb": USER_CACHE_MB,
                             "router_replicas": shapes.router_replicas, "router_num_cpus": 0.5,
                             "scenario_ingress": SCENARIO if scenario_ingress else None}),
                  name="bench", route_prefix="/")
        ingress_replicas = registry.scenarios[SCENARIO].serving.replicas if scenario_ingress else shapes.router_replicas
        ports = (listening_ingress_ports(direct_ingress_port, ingress_replicas, port) if direct_ingress_port is not None
                 else [port])
        port = ports[0]
        setup = {"deploy_s": time.perf_counter() - started, "ports": ports, "serving": knobs,
                 "chunk_size": chunk_size, "router_replicas": 0 if scenario_ingress else shapes.router_replicas,
                 "direct_ingress": direct_ingress_port is not None, "scenario_ingress": scenario_ingress,
                 "columns": columns, "user_code_on_main_loop":
                     os.environ.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD") == "0"}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/healthz")
        setup["healthz"] = json.loads(connection.getresponse().read())["scenarios"][SCENARIO]
        connection.close()
        served_on = setup["healthz"]["device"]
        if served_on != device_name:
            raise RuntimeError(f"the {SCENARIO} replica scores on {served_on}, expected {device_name}")
        budget.log(f"deployed in {setup['deploy_s']:.1f} s, scoring on {served_on}")

        bodies = {k: RequestBodies(registry, k, shapes.history_events, columns) for k in shapes.ks}
        users = UserIds()
        replica = serve.get_deployment_handle(f"ranker_{SCENARIO}", app_name="bench")
        parser = RankRequestParser(registry, SCENARIO, max_candidates=max(shapes.ks))

        parsed = {k: parser.parse(bodies[k].example, now_ms=bodies[k].example["ts"]) for k in shapes.ks}
        # What handing a parsed request to Ray costs (serialize, store, read back): as it crosses
        # now (one Arrow IPC stream), and its table alone, which Ray reduces column by column.
        setup["ray_put_get_ms"] = {
            k: {"request": _percentiles(_timed(lambda r=parsed[k]: ray.get(ray.put(r)), 50))["p50_ms"],
                "table_by_ray": _percentiles(_timed(lambda r=parsed[k]: ray.get(ray.put(r.table)), 50))["p50_ms"]}
            for k in shapes.ks}

        def request_for(k: int) -> Callable[[int], object]:
            # The user id only keys the replica's user-side cache: the parsed request with that key.
            return lambda user: dataclasses.replace(parsed[k], user_state=f"handle-user-{user}")

        started = time.perf_counter()
        for k in shapes.ks:
            sequential(port, bodies[k], True, users, 2, float("inf"))
            if not single_only:
                closed_loop(ports, bodies[k], False, users, shapes.concurrency, shapes.duration_s / 4)
        setup["warmup_s"] = time.perf_counter() - started
        budget.log(f"HTTP warm-up {setup['warmup_s']:.1f} s")

        cells = [(k, reuse) for k in shapes.ks for reuse in (True, False)]
        loaded_s = 0.0 if single_only else shapes.duration_s
        for index, (k, reuse) in enumerate(cells):
            # Each remaining cell gets an equal share of what is left of the budget.
            share = budget.left() / (len(cells) - index)
            row = {"k": k, "reuse": "on" if reuse else "off"}
            if share < loaded_s + 1.0:
                rows.append(row | {"skipped": "budget"})
                budget.log(f"K={k} reuse {row['reuse']}: skipped (budget)")
                continue
            single_deadline = time.perf_counter() + (share - loaded_s) / (1 if single_only else 2)
            sampler = None
            if stacks_out is not None and reuse and k == (GOAL_K if GOAL_K in shapes.ks else shapes.ks[0]):
                sampler = StackSampler(replica_pid("bench", f"ranker_{SCENARIO}"), stacks_out)
            row["single"] = sequential(port, bodies[k], reuse, users, shapes.requests, single_deadline)
            if sampler is not None:
                setup["replica_stacks"] = sampler.stop() | {"k": k, "file": str(stacks_out)}
            if single_only:
                rows.append(row)
                budget.log(_http_text(row).strip())
                continue
            row["handle"] = handle_sequential(replica, request_for(k), reuse, users, shapes.requests,
                                              single_deadline + (share - shapes.duration_s) / 2)
            row["loaded"] = closed_loop(ports, bodies[k], reuse, users, shapes.concurrency, shapes.duration_s / 2)
            row["handle_loaded"] = handle_closed_loop(replica, request_for(k), reuse, users, shapes.concurrency,
                                                      shapes.duration_s / 2)
            rows.append(row)
            budget.log(_http_text(row).strip())
        serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows, setup



# ---------------------------------------------------------------- the replica's stacks (py-spy)

def replica_pid(app: str, deployment: str) -> int:
    """The pid of the replica process of `deployment` (Ray titles it ray::ServeReplica:<app>:<deployment>)."""
    title = f"ServeReplica:{app}:{deployment}".encode()
    found = [int(proc.name) for proc in Path("/proc").iterdir()
             if proc.name.isdigit() and title in _read_or_empty(proc / "cmdline")]
    if len(found) != 1:
        raise RuntimeError(f"expected one process titled {title.decode()}, found pids {found}")
    return found[0]


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended, or is not ours to read
        return b""


def py_spy() -> str | None:
    """py-spy on PATH, or beside this Python (a virtual environment's bin/, not on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


class StackSampler:
    """py-spy sampling every thread of one process (idle ones too) without pausing it, into a
    raw file of `thread (tid): name;frame;...;frame count` lines, until `stop`."""

    def __init__(self, pid: int, out: Path, rate_hz: int = 500):
        exe = py_spy()
        if exe is None:
            raise RuntimeError("--spy-replica needs py-spy (pip install py-spy)")
        self.out = out
        self.process = subprocess.Popen([exe, "record", "--pid", str(pid), "--nonblocking", "--idle", "--threads",
                                         "--rate", str(rate_hz), "--format", "raw", "-o", str(out)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict:
        """Stops sampling (py-spy writes its file on SIGINT) and summarizes the stacks."""
        self.process.send_signal(signal.SIGINT)
        _, stderr = self.process.communicate(timeout=60)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no {self.out}: {stderr.decode()[-500:]}")
        return summarize_stacks(self.out.read_text())


def summarize_stacks(raw: str, top: int = 12, min_share: float = 0.02) -> dict:
    """Per thread with at least `min_share` of the samples: its samples, the frames at the top of
    its stack most often (self), and the functions most often anywhere on it (inclusive), each
    as a share of that thread's samples. A thread's samples span the recording, busy or idle."""
    self_counts: dict[str, Counter] = {}
    inclusive: dict[str, Counter] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        label, _, frames = stack.partition(";")  # "thread (tid): name", or "thread (tid)" for a nameless one
        thread, _, name = label.partition(": ")
        key = f"{name or 'thread'} {thread.removeprefix('thread ')}"
        frames = frames.split(";") if frames else ["(no Python frame)"]
        self_counts.setdefault(key, Counter())[frames[-1]] += int(count)
        inclusive.setdefault(key, Counter()).update({frame: int(count) for frame in set(frames)})
    total = sum(sum(c.values()) for c in self_counts.values())
    threads = {}
    for key, counts in sorted(self_counts.items(), key=lambda item: -sum(item[1].values())):
        samples = sum(counts.values())
        if samples < min_share * total:
            continue
        threads[key] = {"samples": samples,
                        "self": [(frame, n / samples) for frame, n in counts.most_common(top)],
                        "inclusive": [(frame, n / samples) for frame, n in inclusive[key].most_common(top)]}
    return {"samples": total, "threads": threads}


def print_stacks(summary: dict) -> None:
    print(f"\nthe replica's threads during the HTTP single cell of K={summary['k']}, reuse on ({summary['samples']} "
          "samples; shares of each thread's samples, busy or idle)")
    for key, t in summary["threads"].items():
        print(f"  {key}: {t['samples']} samples")
        for label in ("self", "inclusive"):
            print(f"    {label}:")
            for frame, share in t[label]:
                print(f"      {share:6.1%}  {frame}")


# ---------------------------------------------------------------- report

def goals(in_process: list[dict], http_rows: list[dict], ks: tuple[int, ...]) -> list[dict]:
    """p99 at K=200 against 10 ms and p50 at the largest K over the smallest against 3x."""
    lo, hi = min(ks), max(ks)
    out = []
    series: dict[str, dict] = {}
    for r in http_rows:
        if "single" in r:
            series.setdefault(f"HTTP reuse {r['reuse']}", {})[r["k"]] = r["single"]
    for mode in IN_PROCESS_MODES:
        series[f"in-process {mode}"] = {r["k"]: r[mode] for r in in_process if mode in r}
    for where, by_k in series.items():
        if GOAL_K in by_k:
            p99 = by_k[GOAL_K]["p99_ms"]
            out.append({"goal": f"p99 < {GOAL_P99_MS:g} ms at K={GOAL_K}", "where": where, "measured": p99,
                        "ratio_to_goal": p99 / GOAL_P99_MS, "met": bool(p99 < GOAL_P99_MS)})
        if lo != hi and lo in by_k and hi in by_k:
            ratio = by_k[hi]["p50_ms"] / by_k[lo]["p50_ms"]
            out.append({"goal": f"p50 K={hi} < {GOAL_K_RATIO:g}x p50 K={lo}", "where": where, "measured": ratio,
                        "ratio_to_goal": ratio / GOAL_K_RATIO, "met": bool(ratio < GOAL_K_RATIO)})
    return out


def _in_process_text(r: dict) -> str:
    modes = [m for m in IN_PROCESS_MODES if m in r]
    cells = "  ".join(f"{mode} {r[mode]['p50_ms']:6.2f}/{r[mode]['p99_ms']:6.2f}" for mode in modes)
    diff = max(r[mode]["max_abs_diff_vs_cpu_fp32"] for mode in modes)
    decode = "  ".join(f"decode+parse {form} {r[f'decode_parse_{form}_ms']['p50_ms']:5.2f} "
                       f"(json {r[f'decode_parse_{form}_stdlib_json_ms']['p50_ms']:5.2f}, "
                       f"{r[f'decode_parse_{form}_ms']['body_bytes'] // 1000} KB)" for form in ("rows", "columns"))
    return f"  K={r['k']:<5} parse {r['parse_ms']['p50_ms']:6.2f}  {decode}  {cells}   max |diff| vs CPU fp32 {diff:.1e}"


def _http_text(r: dict) -> str:
    if "skipped" in r:
        return f"  K={r['k']:<5} reuse {r['reuse']:<3}  skipped ({r['skipped']})"

    def cell(name: str, c: dict) -> str:
        load = f"c={c['concurrency']} {c['throughput_rps']:6.1f} rps " if "concurrency" in c else ""
        return (f"{name} {load}{c['p50_ms']:6.2f}/{c['p99_ms']:6.2f} ms [replica {c['replica_queued_p50_ms']:5.2f} queued "
                f"+ {c['replica_score_p50_ms']:5.2f} scoring, batch {c['mean_batch_requests']:3.1f}]")

    cells = [(name, key) for name, key in (("HTTP", "single"), ("handle", "handle"), ("HTTP", "loaded"),
                                           ("handle", "handle_loaded")) if key in r]
    errors = sum(r[key]["errors"] for _, key in cells)
    text = (f"  K={r['k']:<5} reuse {r['reuse']:<3} " + "  ".join(cell(name, r[key]) for name, key in cells)
            + f"  ({errors} errors)")
    timing = r["single"].get("server_timing")
    if timing:
        text += ("\n        HTTP single, Server-Timing p50/p99 ms: " +
                 "  ".join(f"{name} {t['p50_ms']:5.2f}/{t['p99_ms']:5.2f}" for name, t in timing.items()))
    return text


def print_report(result: dict) -> None:
    if result["in_process"]:
        print(f"\nin process (no HTTP, no Serve), {result['device']}, {result['model']}, "
              f"{result['history_events']} history events; ms p50/p99 per request")
    for r in result["in_process"]:
        print(_in_process_text(r) if "skipped" not in r else f"  K={r['k']:<5} skipped ({r['skipped']})")
    setup = result["http_setup"]
    front = f"{SCENARIO} replica as the ingress" if setup["scenario_ingress"] else f"router + {SCENARIO} replica"
    handle = any("handle" in r for r in result["http"])
    print(f"\nHTTP through Ray Serve ({front}"
          f"{', direct ingress' if setup['direct_ingress'] else ', proxy'})"
          f"{' and a handle straight to the replica' if handle else ''}, "
          f"p50/p99 and the replica's own median times; warm-up {setup['warmup_s']:.1f} s")
    print("  ray.put + ray.get, p50 ms, of a parsed request (one Arrow stream) / of its table by Ray's Arrow reducer: " +
          ", ".join(f"K={k} {ms['request']:.2f} / {ms['table_by_ray']:.2f}" for k, ms in setup["ray_put_get_ms"].items()))
    for r in result["http"]:
        print(_http_text(r))
    if "replica_stacks" in setup:
        print_stacks(setup["replica_stacks"])
    print("\ngoals")
    for g in result["goals"]:
        unit = " ms" if g["goal"].startswith("p99") else "x"
        print(f"  {g['goal']:<26} {g['where']:<22} {g['measured']:8.2f}{unit:<3}  ({g['ratio_to_goal']:.2f} of the goal)  "
              f"{'met' if g['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="JSON results file (default $OUT or bench/out: serve_gpu[_parse|_profile|_pacing]_<device>[_tiny].json, "
                             "not a recorded run's)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny model, 50 history events, short cells (CPU check)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cells after this")
    parser.add_argument("--chunk-size", type=int, default=1024, help="candidates scored together (app chunk_size)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="the replica's wait for more requests after a batch's first one (serving."
                             "batch_wait_timeout_s; included in single-request latency)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="serve without CUDA graphs (serving.cuda_graphs false); in process, graphs are timed anyway")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="Ray Serve's direct ingress: HTTP goes straight to the ingress replicas (the routers, "
                             "or the hp replica with --scenario-ingress), no proxy (RAY_SERVE_ENABLE_DIRECT_INGRESS=1 "
                             "in the environment Ray starts with)")
    parser.add_argument("--scenario-ingress", action="store_true",
                        help="serve the hp replica as its app's HTTP ingress, no router (app arg scenario_ingress)")
    parser.add_argument("--columns", action="store_true",
                        help="HTTP bodies with events and candidates as objects of columns (rank_request.py)")
    parser.add_argument("--parse-only", action="store_true",
                        help="measure nothing else: json.loads + parse of one request, rows vs columns (CPU)")
    parser.add_argument("--profile", type=int, default=None, metavar="K",
                        help="measure nothing else: profile one in-process request of K candidates and write the "
                             "profiler tables to --out with .txt")
    parser.add_argument("--pacing", type=int, default=None, metavar="K",
                        help="measure nothing else: one cached user's K candidates scored in process on the main "
                             "thread, in a worker thread, back to back, with gaps, and through a BatchQueue "
                             "(why a replica scores slower than a loop does)")
    parser.add_argument("--spy-replica", action="store_true",
                        help="sample the replica's Python stacks with py-spy (on PATH or beside this Python) during "
                             "the HTTP single cell "
                             "of K=200 (else the first K), reuse on: a summary per thread, and the raw stacks "
                             "beside --out (_replica_stacks.raw)")
    parser.add_argument("--user-code-on-main-loop", action="store_true",
                        help="run Serve's user code on the replica's main event loop "
                             "(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the environment Ray starts with)")
    parser.add_argument("--single-only", action="store_true",
                        help="measure only the sequential HTTP cells, the p99 goal's (no in-process, handle or "
                             "loaded cells): a quick A/B of the replica's request path")
    parser.add_argument("--ks", type=int, nargs="+", default=None, metavar="K",
                        help="candidate counts to measure (default 50 200 1000)")
    parser.add_argument("--requests", type=int, default=None, metavar="N",
                        help="sequential requests per HTTP and handle cell, at most (default 200; 10 with --tiny): "
                             "the budget may end a cell sooner, and each row's `requests` says how many ran")
    args = parser.parse_args(argv)
    for flag, value, least in (("--chunk-size", args.chunk_size, 1), ("--batch-wait-ms", args.batch_wait_ms, 0),
                               ("--profile", args.profile, 1), ("--pacing", args.pacing, 1),
                               ("--budget-s", args.budget_s, 0)):
        if value is not None and not value >= least:  # NaN too
            parser.error(f"{flag}: expected a value >= {least}, found {value}")
    if args.out is None:  # not the name of a recorded run
        mode = ("_parse" if args.parse_only else "_profile" if args.profile is not None
                else "_pacing" if args.pacing is not None else "")
        args.out = default_out(f"serve_gpu{mode}_{args.device}{'_tiny' if args.tiny else ''}.json")
    if args.spy_replica and py_spy() is None:
        parser.error("--spy-replica needs py-spy, found neither on PATH nor beside this Python (pip install py-spy)")
    shapes = TINY if args.tiny else FULL
    if args.ks is not None:
        if min(args.ks) < 1:
            parser.error(f"--ks: candidate counts must be >= 1, found {args.ks}")
        shapes = dataclasses.replace(shapes, ks=tuple(args.ks))
    if args.requests is not None:
        if args.requests < 1:
            parser.error(f"--requests: expected at least 1, found {args.requests}")
        shapes = dataclasses.replace(shapes, requests=args.requests)
    budget = Budget(args.budget_s)
    direct_ingress_port = direct_ingress_environment() if args.direct_ingress else None
    if args.user_code_on_main_loop:
        os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"

    ensure_mtfm_importable()
    import torch

    from mtfm.platform.registry import load_registry

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    with tempfile.TemporaryDirectory(prefix="mtfm-bench-serve-gpu-") as tmp:
        config_dir = write_config_dir(Path(tmp) / "configs", shapes.history_events)
        registry = load_registry(config_dir)
        if args.parse_only:
            from mtfm.deployments.rank_request import RankRequestParser

            request_parser = RankRequestParser(registry, SCENARIO, max_candidates=max(shapes.ks))
            rows = [{"k": k} | decode_parse_times(registry, request_parser, k, shapes.history_events, 300) for k in shapes.ks]
            print(f"decode + parse of one request, {shapes.history_events} history events, p50 / p99 ms, with "
                  "orjson and (json) with the standard library's json.loads (body KB):")
            for r in rows:
                print(f"  K={r['k']:<5}" + "  ".join(
                    f"{form} {r[f'decode_parse_{form}_ms']['p50_ms']:5.2f} / {r[f'decode_parse_{form}_ms']['p99_ms']:5.2f}"
                    f" (json {r[f'decode_parse_{form}_stdlib_json_ms']['p50_ms']:5.2f} / "
                    f"{r[f'decode_parse_{form}_stdlib_json_ms']['p99_ms']:5.2f}, {r[f'decode_parse_{form}_ms']['body_bytes'] // 1000})"
                    for form in ("rows", "columns")))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                  "machine": platform.processor() or platform.machine(),
                                                  "history_events": shapes.history_events, "decode_parse": rows},
                                                 indent=1))
            print(f"wrote {args.out}")
            return 0
        kernels = "triton" if args.device == "cuda" else "auto"
        checkpoint = write_checkpoint(shapes.model_config, registry, Path(tmp) / "run" / "checkpoint_0", kernels)
        if args.profile is not None:
            profile_in_process(checkpoint, registry, shapes, args.device, args.profile,
                               Path(args.out).with_suffix(".txt"))
            return 0
        if args.pacing is not None:
            repeats = shapes.requests
            rows = pacing_probe(checkpoint, registry, shapes, args.device, args.pacing, repeats)
            print(f"one cached user's {args.pacing} candidates, {shapes.model_config} on {args.device}, "
                  f"{repeats} calls each: TorchBackend.score p50 / p99 ms")
            for r in rows:
                print(f"  {r['way']:<52} {r['p50_ms']:6.3f} / {r['p99_ms']:6.3f}")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})"
            Path(args.out).write_text(json.dumps({
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
                "torch": torch.__version__, "cpus": os.cpu_count(), "model": shapes.model_config,
                "history_events": shapes.history_events, "gap_ms": PACING_GAP_S * 1000, "pacing": rows}, indent=1))
            print(f"wrote {args.out}")
            return 0
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        budget.log(f"{shapes.model_config} on {args.device}, {shapes.history_events} history events, K in {shapes.ks}")
        in_process, inprocess_warmup_s = ([], 0.0) if args.single_only else run_in_process(
            checkpoint, registry, shapes, args.device, args.chunk_size, budget)
        stacks_out = Path(args.out).with_name(Path(args.out).stem + "_replica_stacks.raw") if args.spy_replica else None
        http_rows, http_setup = run_http(checkpoint, config_dir, registry, shapes, args.device, args.chunk_size,
                                         args.batch_wait_ms / 1000, not args.no_cuda_graphs, direct_ingress_port,
                                         args.scenario_ingress, args.columns, budget, stacks_out,
                                         args.single_only)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__, "cpus": os.cpu_count(), "model": shapes.model_config, "scenario": SCENARIO,
        "history_events": shapes.history_events, "ks": shapes.ks, "kernels": kernels,
        "batch_wait_ms": args.batch_wait_ms, "cached_users": CACHED_USERS, "cuda_graphs": not args.no_cuda_graphs,
        "inprocess_warmup_s": inprocess_warmup_s, "in_process": in_process,
        "http_setup": http_setup, "http": http_rows, "goals": goals(in_process, http_rows, shapes.ks),
        "runtime_s": time.perf_counter() - budget.start,
    }
    print_report(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out} ({result['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
