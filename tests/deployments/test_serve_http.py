"""Serving over real HTTP on the session Ray cluster: one app deployment for the module.

Scores equal the offline subgraph's, concurrent requests are batched and each gets its own
answer, every bad request gets its 4xx naming the field, metrics reach Ray's Prometheus
endpoint, a killed replica loses no retried request, and a scenario added by YAML is served
after a redeploy.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from mtfm.deployments.app import build_app
from mtfm.deployments.rank_request import RankRequestParser, example_request
from mtfm.platform.registry import load_registry
from serve_test_utils import OfflineScorer, write_tiny_checkpoint

APP = "mtfm"
SMALL_REPLICA = {"num_cpus": 0.1, "batch_wait_timeout_s": 0.05}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(config_dir: Path, checkpoint: Path) -> None:
    from ray import serve

    scenarios = {name: SMALL_REPLICA for name in load_registry(config_dir).scenarios}
    app = build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir), "scenarios": scenarios,
                     "router_num_cpus": 0.1, "max_body_bytes": 256 * 1024})
    serve.run(app, name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    config_dir = root / "configs"
    shutil.copytree(Path(__file__).resolve().parents[2] / "configs", config_dir,
                    ignore=shutil.ignore_patterns("movielens"))
    registry = load_registry(config_dir)
    checkpoint = write_tiny_checkpoint(registry, root / "run-a" / "checkpoint_00000007")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(config_dir, checkpoint)
    yield {"url": f"http://127.0.0.1:{port}", "registry": registry, "checkpoint": checkpoint,
           "config_dir": config_dir, "root": root, "offline": OfflineScorer(checkpoint)}
    serve.shutdown()


def _offline(service, scenario: str, body: dict) -> np.ndarray:
    parser = RankRequestParser(service["registry"], scenario, max_candidates=10_000)
    return service["offline"].scores(scenario, parser.parse(body, now_ms=int(time.time() * 1000)).table)


def _served(response: requests.Response) -> np.ndarray:
    body = response.json()
    return np.array([[row[t] for t in body["tasks"]] for row in body["scores"]])


def test_scores_equal_the_offline_model(service):
    for scenario in service["registry"].scenarios:
        body = example_request(service["registry"], scenario, candidates=7, events=5, seed=3)
        response = requests.post(f"{service['url']}/{scenario}/rank", json=body, timeout=60)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["model_version"] == "run-a/checkpoint_00000007@step7"
        assert result["tasks"] == list(service["registry"].scenario(scenario).task_names)
        np.testing.assert_allclose(_served(response), _offline(service, scenario, body), atol=1e-5)
        # The same request with events and candidates as columns scores the same.
        columns = example_request(service["registry"], scenario, candidates=7, events=5, seed=3, columns=True)
        response = requests.post(f"{service['url']}/{scenario}/rank", json=columns, timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(_served(response), _offline(service, scenario, body), atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(service):
    registry, url = service["registry"], service["url"]
    bodies = [example_request(registry, "hp", candidates=5 + i % 7, events=i % 6, seed=i, user_id=i) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{url}/hp/rank", json=b, timeout=60), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for body, response in zip(bodies, responses):
        np.testing.assert_allclose(_served(response), _offline(service, "hp", body), atol=1e-5)
    batches = [r.json()["batch"] for r in responses]
    assert max(b["requests"] for b in batches) > 1
    # A request's replica time is its queueing then its batch's scoring, both measured.
    assert all(b["queued_ms"] >= 0 and b["score_ms"] > 0 for b in batches)


def test_server_timing_splits_a_response_time_into_its_parts(service):
    body = example_request(service["registry"], "hp", candidates=4, events=3, seed=5)
    start = time.perf_counter()
    response = requests.post(f"{service['url']}/hp/rank", json=body, timeout=60)
    client_ms = (time.perf_counter() - start) * 1000
    assert response.status_code == 200, response.text
    timing = {}
    for part in response.headers["server-timing"].split(","):
        name, duration = part.strip().split(";dur=")
        timing[name] = float(duration)
    assert list(timing) == ["parse", "queue", "score", "total"]
    batch = response.json()["batch"]
    assert timing["queue"] == pytest.approx(batch["queued_ms"], abs=1e-3)
    assert timing["score"] == pytest.approx(batch["score_ms"], abs=1e-3)
    assert timing["parse"] > 0 and timing["score"] > 0
    # Measured in one process from the request's arrival: its parts fit in it, and it fits in the client's time.
    assert timing["parse"] + timing["queue"] + timing["score"] <= timing["total"] <= client_ms


def _bad_requests(registry) -> list[tuple[str, str, dict | bytes, int, str, str]]:
    """(case, scenario, body, status, error kind, field)."""
    good = example_request(registry, "hp", candidates=3)

    def edit(**changes):
        return {**good, **changes}

    future = int(time.time() * 1000) + 3_600_000
    missing_item = edit(candidates=[{k: v for k, v in good["candidates"][0].items() if k != "poi_id"}])
    wrong_type = edit(candidates=[{**good["candidates"][0], "poi_rating": "high"}])
    late_event = edit(sequences={"history": [{**good["sequences"]["history"][0], "ts": good["ts"] + 1}]})
    # Not JSON to orjson; the standard library reads it, and the parser names the field.
    not_a_number = json.dumps(edit(candidates=[{**good["candidates"][0], "poi_rating": float("nan")}])).encode()
    return [
        ("unknown scenario", "nope", good, 404, "unknown_scenario", "path"),
        ("missing user feature", "hp", edit(user={"user_level": 1}), 422, "missing_field", "user.user_city"),
        ("missing candidate feature", "hp", missing_item, 422, "missing_field", "candidates[0].poi_id"),
        ("missing ts", "hp", {k: v for k, v in good.items() if k != "ts"}, 422, "missing_field", "ts"),
        ("wrong type", "hp", wrong_type, 422, "wrong_type", "candidates[0].poi_rating"),
        ("wrong type of id", "hp", edit(user_id="u1"), 422, "wrong_type", "user_id"),
        ("unknown feature", "hp", edit(user={**good["user"], "user_age": 3}), 422, "unknown_field", "user.user_age"),
        ("empty candidates", "hp", edit(candidates=[]), 422, "empty_candidates", "candidates"),
        ("too many candidates", "hp", edit(candidates=good["candidates"][:1] * 1001), 422, "too_many_candidates",
         "candidates"),
        ("ts in the future", "hp", edit(ts=future), 422, "ts_in_future", "ts"),
        ("event after the request", "hp", late_event, 422, "event_after_request", "sequences.history[0].ts"),
        ("invalid json", "hp", b"{not json", 400, "invalid_json", "body"),
        ("NaN for a number", "hp", not_a_number, 422, "wrong_type", "candidates[0].poi_rating"),
        ("nested too deeply", "hp", b"[" * 5000 + b"]" * 5000, 400, "invalid_json", "body"),
        ("an integer of 5000 digits", "hp", b'{"user_id": ' + b"9" * 5000 + b"}", 400, "invalid_json", "body"),
        ("not an object", "hp", b"[1, 2]", 400, "wrong_type", ""),
        ("oversized body", "hp", b"[" + b"0," * 200_000 + b"0]", 413, "body_too_large", "body"),
    ]


def test_every_bad_request_gets_its_4xx_and_the_service_keeps_serving(service):
    _check_bad_requests(service["registry"], service["url"])


def _check_bad_requests(registry, url: str) -> None:
    for case, scenario, body, status, kind, field in _bad_requests(registry):
        if isinstance(body, bytes):
            response = requests.post(f"{url}/{scenario}/rank", data=body, timeout=60,
                                     headers={"content-type": "application/json"})
        else:
            response = requests.post(f"{url}/{scenario}/rank", json=body, timeout=60)
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert (error["kind"], error["field"]) == (kind, field), (case, error)
        assert error["message"], case
    wrong = requests.get(f"{url}/hp/rank", timeout=60)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    wrong = requests.post(f"{url}/healthz", json={}, timeout=60)
    assert (wrong.status_code, wrong.json()["error"]["kind"], wrong.headers["allow"]) == (
        405, "method_not_allowed", "GET, HEAD")
    assert requests.head(f"{url}/healthz", timeout=60).status_code == 200
    response = requests.post(f"{url}/hp/rank", json=example_request(registry, "hp"), timeout=60)
    assert response.status_code == 200, response.text


def test_a_scenario_replica_takes_http_itself(service):
    """`scenario_ingress`: an app of hp alone, its replica the ingress (no router), answers the
    same API below its route prefix, and /rank as well: offline scores, every 4xx, its /healthz;
    other scenarios are not served there."""
    from ray import serve

    registry = service["registry"]
    app = build_app({"checkpoint": str(service["checkpoint"]), "config_dir": str(service["config_dir"]),
                     "scenarios": {"hp": SMALL_REPLICA}, "max_body_bytes": 256 * 1024, "scenario_ingress": "hp"})
    serve.run(app, name="hp_alone", route_prefix="/hp-alone")
    url = f"{service['url']}/hp-alone"
    try:
        assert list(serve.status().applications["hp_alone"].deployments) == ["ranker_hp"]
        body = example_request(registry, "hp", candidates=6, events=5, seed=8)
        for path in ("/hp/rank", "/rank"):
            response = requests.post(f"{url}{path}", json=body, timeout=60)
            assert response.status_code == 200, (path, response.text)
            np.testing.assert_allclose(_served(response), _offline(service, "hp", body), atol=1e-5)
        _check_bad_requests(registry, url)
        response = requests.post(f"{url}/sqs/rank", json=example_request(registry, "sqs"), timeout=60)
        assert (response.status_code, response.json()["error"]["kind"]) == (404, "unknown_scenario")
        assert list(requests.get(f"{url}/healthz", timeout=60).json()["scenarios"]) == ["hp"]
    finally:
        serve.delete("hp_alone")


def test_health(service):
    response = requests.get(f"{service['url']}/healthz", timeout=60)
    assert response.status_code == 200
    scenarios = response.json()["scenarios"]
    assert set(scenarios) == set(service["registry"].scenarios)
    assert {info["device"] for info in scenarios.values()} == {"cpu"}  # num_gpus 0: scored on the CPU
    assert requests.get(f"{service['url']}/-/healthz", timeout=60).status_code == 200


def test_metrics_reach_the_prometheus_endpoint(service):
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ["ray_mtfm_request_latency_ms", "ray_mtfm_request_errors_total", "ray_mtfm_candidates_per_request",
              "ray_mtfm_batch_requests", "ray_mtfm_batch_tokens", "ray_mtfm_candidates_total",
              "ray_mtfm_scored_requests_total", "ray_mtfm_scored_tokens_total"]
    deadline, text = time.monotonic() + 120, ""
    while time.monotonic() < deadline:  # metrics are exported every few seconds, later on a loaded machine
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted) and 'scenario="hp"' in text and 'kind="too_many_candidates"' in text:
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported on port {port}: {missing}"
    assert 'kind="too_many_candidates"' in text
    # The counters are exact: every batch holds at least one request and each request at least one
    # candidate (Ray's histogram sums, from bucket midpoints, give 0.5 for a batch of one).
    batches = _metric_total(text, "ray_mtfm_batch_requests_count")
    scored = _metric_total(text, "ray_mtfm_scored_requests_total")
    accepted, candidates = (_metric_total(text, "ray_mtfm_candidates_per_request_count"),
                            _metric_total(text, "ray_mtfm_candidates_total"))
    assert scored >= batches > 0 and scored == int(scored), (scored, batches)
    assert candidates >= accepted > 0 and candidates == int(candidates), (candidates, accepted)


def test_serving_metrics_record_exact_totals_beside_the_histograms(monkeypatch):
    """Ray-free: each Counter and Histogram the serving metrics make, with what they were given."""
    from mtfm.deployments import metrics as serving_metrics

    recorded: dict[str, list] = {}

    class Fake:
        def __init__(self, name, description="", boundaries=None, tag_keys=()):
            self.name = name

        def observe(self, value, tags):
            recorded.setdefault(self.name, []).append((value, tags["scenario"]))

        def inc(self, value=1.0, tags=None):
            recorded.setdefault(self.name, []).append((value, tags["scenario"]))

    monkeypatch.setattr(serving_metrics, "metrics", SimpleNamespace(Counter=Fake, Histogram=Fake))
    batches, requests_ = serving_metrics.BatchMetrics("hp"), serving_metrics.RequestMetrics()
    for size, tokens in ((1, 300), (3, 1200)):
        batches.batch(size, tokens, 4.0)
    requests_.accepted("hp", 200)
    requests_.accepted("hp", 50)
    assert recorded["mtfm_scored_requests_total"] == recorded["mtfm_batch_requests"] == [(1, "hp"), (3, "hp")]
    assert recorded["mtfm_scored_tokens_total"] == [(300, "hp"), (1200, "hp")]
    assert recorded["mtfm_candidates_total"] == recorded["mtfm_candidates_per_request"] == [(200, "hp"), (50, "hp")]


def _metric_total(text: str, name: str) -> float:
    """The sum over every series of one metric in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_a_killed_replica_loses_no_retried_request(service):
    import ray

    registry, url = service["registry"], service["url"]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ranker_sqs" in a["name"]]
    assert len(replicas) == 1, replicas
    answers: dict[int, np.ndarray] = {}
    stop = threading.Event()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set() or i < 3:
            key = worker * 1000 + i
            body = example_request(registry, "sqs", candidates=4, seed=key, user_id=key)
            for _ in range(60):  # retry until answered: a 503 or a dropped connection while Serve recovers
                try:
                    response = requests.post(f"{url}/sqs/rank", json=body, timeout=60)
                except requests.ConnectionError:
                    time.sleep(0.5)
                    continue
                if response.status_code == 200:
                    answers[key] = (_served(response), body)
                    break
                assert response.status_code == 503, response.text
                time.sleep(0.5)
            else:
                raise AssertionError(f"request {key} never answered")
            i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(answers) >= 12
    for scores, body in answers.values():
        np.testing.assert_allclose(scores, _offline(service, "sqs", body), atol=1e-5)
    after = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ranker_sqs" in a["name"]]
    assert after and after[0]["name"] != replicas[0]["name"]


def test_a_scenario_added_by_yaml_is_served_after_redeploy(service):
    config_dir, root = service["config_dir"], service["root"]
    text = (config_dir / "scenarios" / "sqs.yaml").read_text().replace("name: sqs", "name: coupon")
    (config_dir / "scenarios" / "coupon.yaml").write_text(text)
    registry = load_registry(config_dir)
    checkpoint = write_tiny_checkpoint(registry, root / "run-b" / "checkpoint_00000009", step=9)
    _deploy(config_dir, checkpoint)
    body = example_request(registry, "coupon", candidates=4)
    response = requests.post(f"{service['url']}/coupon/rank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "run-b/checkpoint_00000009@step9"
    parser = RankRequestParser(registry, "coupon", max_candidates=10)
    table = parser.parse(body, now_ms=int(time.time() * 1000)).table
    np.testing.assert_allclose(_served(response), OfflineScorer(checkpoint).scores("coupon", table), atol=1e-5)


def test_a_scenario_whose_yaml_is_removed_is_not_served_after_redeploy(service):
    """Retiring: the checkpoint still holds `coupon` (trained above), the registry no longer does."""
    config_dir, root = service["config_dir"], service["root"]
    (config_dir / "scenarios" / "coupon.yaml").unlink()
    _deploy(config_dir, root / "run-b" / "checkpoint_00000009")
    registry = load_registry(config_dir)
    gone = requests.post(f"{service['url']}/coupon/rank", json=example_request(registry, "hp", candidates=2), timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["kind"] == "unknown_scenario"
    kept = requests.post(f"{service['url']}/hp/rank", json=example_request(registry, "hp", candidates=2), timeout=60)
    assert kept.status_code == 200, kept.text
