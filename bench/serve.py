"""Serving benchmark: HTTP load against a local Ray Serve app, and in-process scoring cost vs K.

    python bench/serve.py --out bench/results/serve.json

HTTP (localhost only, bounded in time): for each setup (PyTorch with batching, PyTorch without
batching, onnxruntime with batching) the app is deployed on a local Ray, then per scenario and
K in {50, 200, 1000} candidates:
    closed loop   c concurrent clients send back to back for --duration s (c = 1 and 8)
    fixed rate    (PyTorch with batching only) requests sent on a fixed schedule at half the c=8
                  throughput; latency counts from the scheduled send time, so queueing shows
p50/p95/p99 latency (ms) and throughput (requests/s). Each request is one user with 256 events in
each sequence (the parser keeps each sequence's newest max_len: 256 history, 32 realtime) and K
candidates. `k_ratios` gives, per setup, the c=1 p50 latency at the largest K over the smallest
(K=1000 over K=50: per-candidate scoring would be 20x), and the same for the in-process times.

In process: one request's scoring time (median of --repeats) per backend (PyTorch with
user-side reuse, PyTorch plain, onnxruntime) and K, for each --inprocess-models config.

The model is randomly initialised (scores are irrelevant here, cost is not). Client, proxy,
router and replicas share the machine's cores, so absolute numbers are a floor.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from checkout import default_out, random_checkpoint

REPO = Path(__file__).resolve().parents[1]
EVENTS_PER_SEQUENCE = 256
SETUPS = {  # name -> (backend, max_batch_requests, scenarios limited to the first one?)
    "torch+batching": ("torch", 16, False),
    "torch, no batching": ("torch", 1, True),
    "onnx+batching": ("onnx", 16, True),
}


def write_checkpoint(model_config: str, folder: Path) -> Path:
    from mtfm.model import load_model_config
    from mtfm.platform.registry import load_registry

    return random_checkpoint(load_model_config(REPO / model_config), load_registry(REPO / "configs"), folder)


def request_bodies(registry, scenario: str, k: int, count: int = 8) -> list[bytes]:
    from mtfm.deployments.rank_request import example_request

    now = int(time.time() * 1000)
    return [json.dumps(example_request(registry, scenario, candidates=k, events=EVENTS_PER_SEQUENCE, seed=i,
                                       user_id=i, ts=now)).encode() for i in range(count)]


def _post(session, url: str, body: bytes) -> int:
    return session.post(url, data=body, headers={"content-type": "application/json"}, timeout=120).status_code


def closed_loop(url: str, bodies: list[bytes], concurrency: int, duration: float) -> dict:
    latencies, statuses, stop = [], [], time.perf_counter() + duration

    def client(worker: int) -> None:
        session, i = requests.Session(), worker
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status = _post(session, url, bodies[i % len(bodies)])
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                statuses.append(status)
            i += concurrency

    begin = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(latencies, len(statuses), time.perf_counter() - begin)


def fixed_rate(url: str, bodies: list[bytes], rate: float, duration: float) -> dict:
    count = max(int(rate * duration), 1)
    sessions = threading.local()

    def send(i: int, scheduled: float) -> tuple[float, int]:
        time.sleep(max(scheduled - time.perf_counter(), 0))
        if not hasattr(sessions, "s"):
            sessions.s = requests.Session()
        status = _post(sessions.s, url, bodies[i % len(bodies)])
        return time.perf_counter() - scheduled, status

    begin = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: send(i, begin + i / rate), range(count)))
    latencies = [lat for lat, status in results if status == 200]
    return _summary(latencies, len(results) - len(latencies), time.perf_counter() - begin) | {"rate": rate}


def _summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": errors, "throughput_rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def run_http(checkpoint: Path, scenarios: list[str], ks: list[int], duration: float) -> list[dict]:
    import ray
    from ray import serve

    from mtfm.deployments.app import build_app
    from mtfm.platform.cluster import unused_port
    from mtfm.platform.registry import load_registry

    registry = load_registry(REPO / "configs")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = unused_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for setup, (backend, batch_requests, first_only) in SETUPS.items():
            served = scenarios[:1] if first_only else scenarios
            knobs = {"backend": backend, "max_batch_requests": batch_requests, "num_cpus": 0.25,
                     "max_candidates": max(ks), "max_ongoing_requests": 64}
            started = time.perf_counter()
            serve.run(build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs"),
                                 "scenarios": {s: knobs for s in registry.scenarios}, "router_num_cpus": 0.25}),
                      name="bench", route_prefix="/")
            print(f"[bench] deployed {setup} in {time.perf_counter() - started:.0f} s", flush=True)
            for scenario in served:
                url = f"http://127.0.0.1:{port}/{scenario}/rank"
                for k in ks:
                    bodies = request_bodies(registry, scenario, k)
                    _post(requests, url, bodies[0])  # warm up
                    single = closed_loop(url, bodies, 1, duration)
                    loaded = closed_loop(url, bodies, 8, duration)
                    cells = {"closed c=1": single, "closed c=8": loaded}
                    if setup == "torch+batching":
                        cells["fixed rate"] = fixed_rate(url, bodies, max(loaded["throughput_rps"] / 2, 0.5), duration)
                    for load, summary in cells.items():
                        rows.append({"setup": setup, "scenario": scenario, "k": k, "load": load, **summary})
                        print(_row_text(rows[-1]), flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def run_in_process(model_configs: list[str], scenario: str, ks: list[int], repeats: int, root: Path,
                   device_name: str = "cpu", threads: int = 1) -> list[dict]:
    """Scoring time of one request per backend and K, with `threads` CPU threads for PyTorch and
    onnxruntime alike. Also the largest score difference from the float32 CPU subgraph (on CUDA:
    the config's compute dtype and the Triton kernels)."""
    import torch

    from mtfm.deployments.backends import TorchBackend, create_backend
    from mtfm.deployments.rank_request import RankRequestParser, example_request
    from mtfm.platform.checkpoint import load_model

    device = torch.device(device_name)
    torch.set_num_threads(threads)
    rows = []
    for model_config in model_configs:
        model, _ = load_model(write_checkpoint(model_config, root / Path(model_config).stem / "checkpoint_0"))
        reference = TorchBackend(model.subgraph(scenario), device=torch.device("cpu"), reuse_user_side=False)
        backends = {"torch user-side reuse": TorchBackend(model.subgraph(scenario), device=device),
                    "torch plain": TorchBackend(model.subgraph(scenario), device=device, reuse_user_side=False)}
        if device.type == "cpu":
            backends["onnxruntime"] = create_backend("onnx", model.subgraph(scenario), device=device, chunk_size=256,
                                                     threads=threads)
        parser = RankRequestParser(model.registry, scenario, max_candidates=max(ks))
        for k in ks:
            body = example_request(model.registry, scenario, candidates=k, events=EVENTS_PER_SEQUENCE)
            request = parser.parse(body, now_ms=body["ts"])
            expected = reference.score([request])[0]
            for name, backend in backends.items():
                scores = backend.score([request])[0]
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    backend.score([request])  # returns host arrays: includes the device sync
                    times.append(time.perf_counter() - start)
                rows.append({"model": Path(model_config).stem, "backend": name, "device": device_name,
                             "scenario": scenario, "k": k, "ms": statistics.median(times) * 1000,
                             "max_abs_diff_vs_cpu_fp32": float(np.abs(scores - expected).max())})
                print(f"[bench] in-process {rows[-1]['model']:<6} {name:<22} {device_name:<5} K={k:<5} "
                      f"{rows[-1]['ms']:8.1f} ms  (max |diff| vs CPU fp32 {rows[-1]['max_abs_diff_vs_cpu_fp32']:.1e})",
                      flush=True)
    return rows


def _row_text(r: dict) -> str:
    return (f"{r['setup']:<20} {r['scenario']:<4} K={r['k']:<5} {r['load']:<11} {r['throughput_rps']:7.1f} rps  "
            f"p50 {r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  ({r['requests']} ok, "
            f"{r['errors']} errors)")


def k_ratios(http: list[dict], in_process: list[dict], ks: list[int]) -> list[dict]:
    lo, hi = min(ks), max(ks)
    out = []
    for (setup, scenario) in sorted({(r["setup"], r["scenario"]) for r in http}):
        p50 = {r["k"]: r["p50_ms"] for r in http if (r["setup"], r["scenario"], r["load"]) == (setup, scenario, "closed c=1")}
        out.append({"where": f"http {setup}", "scenario": scenario, "ratio": p50[hi] / p50[lo]})
    for (model, backend) in sorted({(r["model"], r["backend"]) for r in in_process}):
        ms = {r["k"]: r["ms"] for r in in_process if (r["model"], r["backend"]) == (model, backend)}
        out.append({"where": f"in-process {model} {backend} ({in_process[0]['device']})",
                    "scenario": in_process[0]["scenario"],
                    "ratio": ms[hi] / ms[lo]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out("serve.json"), help="JSON results file")
    parser.add_argument("--model", default="configs/model/tiny.yaml", help="model config served over HTTP")
    parser.add_argument("--inprocess-models", default="configs/model/tiny.yaml,configs/model/small.yaml",
                        help="comma-separated model configs timed in process (default tiny and small)")
    parser.add_argument("--scenarios", default="hp,phf,sqs",
                        help="comma-separated scenarios to load (default hp,phf,sqs)")
    parser.add_argument("--ks", default="50,200,1000", help="comma-separated candidate counts K (default 50,200,1000)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per HTTP load cell")
    parser.add_argument("--repeats", type=int, default=5, help="in-process timings per cell (median)")
    parser.add_argument("--device", default="cpu", help="in-process device: cpu, or cuda (bf16 + Triton kernels)")
    parser.add_argument("--skip-http", action="store_true", help="in-process timings only (no Ray Serve)")
    parser.add_argument("--threads", type=int, default=1, help="in-process CPU threads (default 1, as a replica "
                        "with num_cpus <= 1)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (the default --device cpu runs on the CPU)")
    ks = [int(k) for k in args.ks.split(",")]
    scenarios = args.scenarios.split(",")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtfm-bench-serve-") as tmp:
        in_process = run_in_process(args.inprocess_models.split(","), scenarios[0], ks, args.repeats, Path(tmp),
                                    args.device, args.threads)
        http = [] if args.skip_http else run_http(write_checkpoint(args.model, Path(tmp) / "http" / "checkpoint_0"),
                                                  scenarios, ks, args.duration)
    ratios = k_ratios(http, in_process, ks)
    print(f"\n{'setup':<20} {'scn':<4} {'K':<7} {'load':<11} {'rps':>11}  latency ms")
    for r in http:
        print(_row_text(r))
    print(f"\ntime at K={max(ks)} over K={min(ks)} (per-candidate scoring would be {max(ks) / min(ks):.0f}x)")
    for r in ratios:
        print(f"  {r['where']:<44} {r['scenario']:<4} {r['ratio']:5.2f}x")
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.processor() or platform.machine()}, see bench/RESULTS.md", "model": args.model,
              "events_per_sequence": EVENTS_PER_SEQUENCE, "http": http, "in_process": in_process, "k_ratios": ratios,
              "runtime_s": time.perf_counter() - began}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out} ({result['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
