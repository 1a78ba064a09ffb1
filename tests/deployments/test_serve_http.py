"""Serving over real HTTP on the session Ray cluster: one app deployment for the module.

Scores equal the offline subgraph's, concurrent requests are batched and each gets its own
answer, every bad request gets its 4xx naming the field, metrics reach Ray's Prometheus
endpoint with exact counts, a killed replica loses no retried request, a scenario added by YAML is
served after a redeploy, a single-scenario checkpoint serves its scenario, and a backend a
replica cannot run fails that replica with a clear error. Each test sends its own requests and
makes its own files.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from mtfm.deployments.app import build_app
from mtfm.deployments.rank_request import RankRequestParser, example_request
from mtfm.platform.cluster import unused_port
from mtfm.platform.registry import load_registry
from serve_test_utils import OfflineScorer, write_tiny_checkpoint

APP = "mtfm"
SMALL_REPLICA = {"num_cpus": 0.1, "batch_wait_timeout_s": 0.05}


def _deploy(config_dir: Path, checkpoint: Path, name: str = APP, route_prefix: str = "/") -> None:
    from ray import serve

    scenarios = {scenario: SMALL_REPLICA for scenario in load_registry(config_dir).scenarios}
    app = build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir), "scenarios": scenarios,
                     "router_num_cpus": 0.1, "max_body_bytes": 256 * 1024})
    serve.run(app, name=name, route_prefix=route_prefix)


def _config_dir_with(source: Path, target: Path, *, only: list[str] | None = None, add: dict[str, str] | None = None,
                     ) -> Path:
    """A copy of config dir `source` at `target` with just the scenarios `only` (default: all) and
    `add` ({new scenario: scenario whose YAML it copies under the new name})."""
    shutil.copytree(source, target)
    for path in (target / "scenarios").glob("*.yaml"):
        if only is not None and path.stem not in only:
            path.unlink()
    for new, old in (add or {}).items():
        text = (source / "scenarios" / f"{old}.yaml").read_text().replace(f"name: {old}", f"name: {new}")
        (target / "scenarios" / f"{new}.yaml").write_text(text)
    return target


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    config_dir = root / "configs"
    shutil.copytree(Path(__file__).resolve().parents[2] / "configs", config_dir,
                    ignore=shutil.ignore_patterns("movielens"))
    registry = load_registry(config_dir)
    checkpoint = write_tiny_checkpoint(registry, root / "run-a" / "checkpoint_00000007")
    port = unused_port()
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
        ("empty body", "hp", b"", 400, "invalid_json", "body"),
        ("NaN for a number", "hp", not_a_number, 422, "wrong_type", "candidates[0].poi_rating"),
        ("nested too deeply", "hp", b"[" * 5000 + b"]" * 5000, 400, "invalid_json", "body"),
        ("an integer of 5000 digits", "hp", b'{"user_id": ' + b"9" * 5000 + b"}", 400, "invalid_json", "body"),
        ("not an object", "hp", b"[1, 2]", 400, "wrong_type", "body"),
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
    _check_a_client_that_sends_its_whole_body_first_gets_the_413(url)
    empty = requests.post(f"{url}/hp/rank", data=b"", timeout=60, headers={"content-type": "application/json"})
    assert empty.json()["error"]["message"] == "empty body; expected a JSON object (a rank request)"
    huge = requests.post(f"{url}/hp/rank", data=b'{"user_id": ' + b"9" * 5000 + b"}", timeout=60,
                         headers={"content-type": "application/json"})
    assert huge.json()["error"]["message"] == ("a number with more digits than any field takes (over 4300); expected "
                                               "numbers of at most 64 bits")
    wrong = requests.get(f"{url}/hp/rank", timeout=60)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    wrong = requests.post(f"{url}/healthz", json={}, timeout=60)
    assert (wrong.status_code, wrong.json()["error"]["kind"], wrong.headers["allow"]) == (
        405, "method_not_allowed", "GET, HEAD")
    assert requests.head(f"{url}/healthz", timeout=60).status_code == 200
    response = requests.post(f"{url}/hp/rank", json=example_request(registry, "hp"), timeout=60)
    assert response.status_code == 200, response.text


def _check_a_client_that_sends_its_whole_body_first_gets_the_413(url: str) -> None:
    """Python's urllib sends the whole body before it reads a byte of the answer: a body of 40 times
    the limit must still get the 413, not a connection reset under it."""
    body = b"[" + b"0," * (5 * 1024 * 1024) + b"0]"
    request = urllib.request.Request(f"{url}/hp/rank", data=body, headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["kind"] == "body_too_large"


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
    # CUDA graphs as in effect (none on a CPU), next to the serving block as configured.
    assert {(info["cuda_graphs"], info["serving"]["cuda_graphs"]) for info in scenarios.values()} == {(False, True)}
    assert requests.get(f"{service['url']}/-/healthz", timeout=60).status_code == 200


def test_pins_no_app_loads_are_pruned_and_the_served_one_kept(service, tmp_path, capsys):
    """`mtfm serve pins`: every app reports the pin its replicas load, and --prune removes only pins no app loads
    that are older than the newest one loaded (a newer one may be a rollout's), nothing without --url (or while a
    scenario does not answer: test_a_backend_the_replica_cannot_run_...)."""
    import os

    from mtfm.deployments.pins import run_pins
    from mtfm.platform.checkpoint import pin_for_serving
    from mtfm.platform.cli import main

    run = service["root"] / "run-a"
    [served] = (run / ".serving").glob("*/checkpoint_00000007")
    scenarios = requests.get(f"{service['url']}/healthz", timeout=60).json()["scenarios"]
    assert {info["checkpoint"] for info in scenarios.values()} == {str(served.resolve())}
    # The pin of an earlier rollout, whose checkpoint the run has pruned since (the pin holds the only link to its
    # files), and one made after the served pin, as by a rollout starting.
    earlier = write_tiny_checkpoint(service["registry"], run / "checkpoint_00000003", step=3)
    stale = pin_for_serving(earlier)
    before = served.stat().st_mtime - 3600  # older than the 10 minutes a recently chosen pin is kept
    os.utime(stale, (before, before))
    stale_bytes = sum(f.stat().st_size for f in stale.iterdir())
    shutil.rmtree(earlier)
    rolling = pin_for_serving(write_tiny_checkpoint(service["registry"], run / "checkpoint_00000009", step=9))
    assert [(p.folder, p.step, p.unshared_bytes) for p in run_pins(run)] == [
        (rolling, 9, 0), (served, 7, 0), (stale, 3, stale_bytes)]

    assert main(["serve", "pins", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: no pins")
    assert main(["serve", "pins", str(run)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == f"{run / '.serving'}: 3 pin(s), newest first"
    assert [line.split()[:2] for line in listed[2:]] == [[str(pin.relative_to(run)), step] for pin, step in
                                                        ((rolling, "9"), (served, "7"), (stale, "3"))]
    assert all(line.endswith("(no --url asked)") for line in listed[2:])
    assert main(["serve", "pins", str(run), "--prune"]) == 1
    assert "--prune needs --url, the HTTP address of each Serve instance" in capsys.readouterr().err
    nobody = f"http://127.0.0.1:{unused_port()}"
    assert main(["serve", "pins", str(run), "--url", nobody, "--prune"]) == 1
    assert f"{nobody}/-/routes: no answer" in capsys.readouterr().err

    other = tmp_path / "run-other"
    pin_for_serving(write_tiny_checkpoint(service["registry"], other / "checkpoint_00000001", step=1))
    assert main(["serve", "pins", str(other), "--url", service["url"], "--prune"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"no app at {service['url']} loads a pin of {other}: "
                                                               "nothing removed")
    # A rollback to the earlier pin (an app built on it again): now the newest pin, kept while its replicas start.
    assert pin_for_serving(stale) == stale and [p.folder for p in run_pins(run)] == [stale, rolling, served]
    assert main(["serve", "pins", str(run), "--url", service["url"], "--prune"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("removed 0 pin(s) no app loads, freeing 0 B; kept 3, of them "
                                                        "2 newer than every pin an app loads (a rollout may be "
                                                        "starting on it)")
    os.utime(stale, (before, before))  # as it was: a rollout long past
    assert main(["serve", "pins", str(run), "--url", service["url"], "--prune"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[2].split()[-1] == "-" and said[3].endswith(", sqs (mtfm)") and said[4].split()[-1] == "-"
    freed = re.fullmatch(r"removed 1 pin\(s\) no app loads, freeing ([\d.]+) (KiB|MiB); kept 2, of them 1 newer "
                         r"than every pin an app loads \(a rollout may be starting on it\)", said[-1])
    assert freed and abs(float(freed[1]) * {"KiB": 2**10, "MiB": 2**20}[freed[2]] - stale_bytes) <= 0.05 * 2**20
    assert not stale.parent.exists() and served.is_dir() and rolling.is_dir()
    assert requests.post(f"{service['url']}/hp/rank", json=example_request(service["registry"], "hp"),
                         timeout=60).status_code == 200
    shutil.rmtree(rolling.parent)
    shutil.rmtree(run / "checkpoint_00000009")


def test_metrics_reach_the_prometheus_endpoint_with_exact_counts(service):
    """An app of its own (one scenario behind its router; its series carry its name): read the
    counters, send known requests, and every counter and histogram count grows by exactly them; the
    user-side cache's lookups by exactly the requests' hits and misses (the last request repeats the
    second's user and events, well within the cache's 30 s), as /healthz reports them too."""
    import ray
    from ray import serve

    app = "metrics_phf"
    config_dir = _config_dir_with(service["config_dir"], service["root"] / "metrics-configs", only=["phf"])
    _deploy(config_dir, service["checkpoint"], name=app, route_prefix="/metrics-phf")
    try:
        registry, url = service["registry"], f"{service['url']}/metrics-phf"
        port = ray.nodes()[0]["MetricsExportPort"]
        ours = {"application": app, "scenario": "phf"}

        def counts() -> dict[str, float]:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            return {
                "candidates": _metric_total(text, "ray_mtfm_candidates_total", **ours),
                "accepted": _metric_total(text, "ray_mtfm_candidates_per_request_count", **ours),
                "scored": _metric_total(text, "ray_mtfm_scored_requests_total", **ours),
                "tokens": _metric_total(text, "ray_mtfm_scored_tokens_total", **ours),
                "batches": _metric_total(text, "ray_mtfm_batch_requests_count", **ours),
                "latency 2xx": _metric_total(text, "ray_mtfm_request_latency_ms_count", status="2xx", **ours),
                "latency 4xx": _metric_total(text, "ray_mtfm_request_latency_ms_count", status="4xx", **ours),
                "too_many_candidates": _metric_total(text, "ray_mtfm_request_errors_total",
                                                     kind="too_many_candidates", **ours),
                "cache hits": _metric_total(text, "ray_mtfm_user_cache_lookups_total", result="hit", **ours),
                "cache misses": _metric_total(text, "ray_mtfm_user_cache_lookups_total", result="miss", **ours),
                "cache bytes": _metric_total(text, "ray_mtfm_user_cache_bytes", **ours),
            }

        before = counts()
        shapes = [(1, 0), (4, 3), (9, 40), (30, 5), (120, 300), (4, 3)]  # (candidates, events per sequence)
        for k, (candidates, events) in enumerate(shapes):  # one at a time: one request per batch
            user = 1 if k == 5 else k  # the last: the second request again (its user and events), a cache hit
            body = example_request(registry, "phf", candidates=candidates, events=events, seed=user,
                                   user_id=500 + user)
            response = requests.post(f"{url}/phf/rank", json=body, timeout=60)
            assert response.status_code == 200, response.text
        most = registry.scenario("phf").serving.max_candidates
        too_many = example_request(registry, "phf", candidates=most + 1)
        refused = requests.post(f"{url}/phf/rank", json=too_many, timeout=60)
        assert (refused.status_code, refused.json()["error"]["kind"]) == (422, "too_many_candidates")
        # Tokens: the candidates and each sequence's newest max_len events.
        tokens = sum(c + sum(min(e, seq.max_len) for seq in registry.sequences.values()) for c, e in shapes)
        expected = {"candidates": 1 + 4 + 9 + 30 + 120 + 4, "accepted": 6, "scored": 6, "tokens": tokens, "batches": 6,
                    "latency 2xx": 6, "latency 4xx": 1, "too_many_candidates": 1, "cache hits": 1,
                    "cache misses": 5}
        deadline = time.monotonic() + 120
        while True:  # Ray exports metrics every few seconds, later on a loaded machine
            grown = {name: value - before[name] for name, value in counts().items()}
            if all(grown[name] >= expected[name] for name in expected) or time.monotonic() > deadline:
                break
            time.sleep(2)
        cached = grown.pop("cache bytes")
        assert grown == expected, f"on port {port}, {app}'s series grew by {grown}"
        [health] = requests.get(f"{url}/healthz", timeout=60).json()["scenarios"].values()
        assert {k: health["user_cache"][k] for k in ("users", "hits", "misses")} == {"users": 5, "hits": 1,
                                                                                       "misses": 5}
        assert health["user_cache"]["bytes"] == before["cache bytes"] + cached > 0
    finally:
        serve.delete(app)


def _metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of one metric over its series, in a Prometheus text page, that carry `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


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


@pytest.fixture(scope="module")
def coupon(service):
    """A config dir that adds scenario `coupon` (sqs's features under a new name) and a checkpoint
    trained on it (run-b)."""
    root = service["root"] / "coupon"
    config_dir = _config_dir_with(service["config_dir"], root / "configs", add={"coupon": "sqs"})
    checkpoint = write_tiny_checkpoint(load_registry(config_dir), root / "run-b" / "checkpoint_00000009", step=9)
    return {"config_dir": config_dir, "checkpoint": checkpoint}


def test_a_scenario_added_by_yaml_is_served_after_redeploy(service, coupon):
    _deploy(coupon["config_dir"], coupon["checkpoint"])
    registry = load_registry(coupon["config_dir"])
    body = example_request(registry, "coupon", candidates=4)
    response = requests.post(f"{service['url']}/coupon/rank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "run-b/checkpoint_00000009@step9"
    parser = RankRequestParser(registry, "coupon", max_candidates=10)
    table = parser.parse(body, now_ms=int(time.time() * 1000)).table
    offline = OfflineScorer(coupon["checkpoint"]).scores("coupon", table)
    np.testing.assert_allclose(_served(response), offline, atol=1e-5)


def test_a_scenario_whose_yaml_is_removed_is_not_served_after_redeploy(service, coupon, tmp_path):
    """Retiring: the checkpoint still holds `coupon`, the registry no longer does."""
    config_dir = _config_dir_with(coupon["config_dir"], tmp_path / "configs")
    (config_dir / "scenarios" / "coupon.yaml").unlink()
    _deploy(config_dir, coupon["checkpoint"])
    registry = load_registry(config_dir)
    assert "coupon" not in registry.scenarios
    body = example_request(registry, "hp", candidates=2)
    gone = requests.post(f"{service['url']}/coupon/rank", json=body, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["kind"] == "unknown_scenario"
    kept = requests.post(f"{service['url']}/hp/rank", json=body, timeout=60)
    assert kept.status_code == 200, kept.text
    assert kept.json()["model_version"] == "run-b/checkpoint_00000009@step9"


def test_a_single_scenario_checkpoint_serves_its_scenario(service, tmp_path):
    """A model trained on hp alone (a model config's `scenarios: [hp]`) is served for hp, by an
    app of its own here; build_app refuses it for scenarios it lacks (test_serve_backends.py)."""
    from ray import serve

    registry = service["registry"]
    checkpoint = write_tiny_checkpoint(registry, tmp_path / "run-hp" / "checkpoint_00000005", step=5, seed=1,
                                       scenarios=["hp"])
    app = build_app({"checkpoint": str(checkpoint), "config_dir": str(service["config_dir"]),
                     "scenarios": {"hp": SMALL_REPLICA}, "scenario_ingress": "hp"})
    serve.run(app, name="hp_trained_alone", route_prefix="/hp-trained-alone")
    try:
        body = example_request(registry, "hp", candidates=5, events=4, seed=2)
        response = requests.post(f"{service['url']}/hp-trained-alone/hp/rank", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "run-hp/checkpoint_00000005@step5"
        table = RankRequestParser(registry, "hp", max_candidates=10).parse(body, now_ms=int(time.time() * 1000)).table
        np.testing.assert_allclose(_served(response), OfflineScorer(checkpoint).scores("hp", table), atol=1e-5)
    finally:
        serve.delete("hp_trained_alone")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_a_backend_the_replica_cannot_run_fails_the_replica_with_a_clear_error(service, tmp_path, capsys):
    """The builder (on the controller's node) accepts backend tensorrt by name; the replica, on
    the node it runs on (here without the `tensorrt` package), refuses it and says why. The
    router keeps serving the other scenarios, and /healthz says which one is down, promptly."""
    from ray import serve

    from mtfm.deployments.router import HEALTH_TIMEOUT_S

    registry = service["registry"]
    scenarios = {name: SMALL_REPLICA for name in registry.scenarios} | {"sqs": {**SMALL_REPLICA, "backend": "tensorrt"}}
    app = build_app({"checkpoint": str(service["checkpoint"]), "config_dir": str(service["config_dir"]),
                     "scenarios": scenarios, "router_num_cpus": 0.1})
    url = f"{service['url']}/sqs-tensorrt"
    try:
        with pytest.raises(RuntimeError, match="Deploying application sqs_tensorrt failed"):
            serve.run(app, name="sqs_tensorrt", route_prefix="/sqs-tensorrt")
        status = serve.status().applications["sqs_tensorrt"].deployments["ranker_sqs"]
        message = status.message
        assert status.status == "DEPLOY_FAILED", (status.status, message)
        assert "BackendUnavailable" in message, message
        assert "scenario sqs: backend tensorrt needs the `tensorrt` package" in message, message
        assert "args.scenarios.sqs.backend" in message, message

        started = time.perf_counter()
        health = requests.get(f"{url}/healthz", timeout=60)
        assert time.perf_counter() - started < HEALTH_TIMEOUT_S + 5
        assert health.status_code == 200, health.text
        report = health.json()
        assert report["status"] == "degraded" and report["scenarios"]["sqs"]["status"] == "unavailable", report
        # Serve's reason, not a timeout: only a redeploy brings the scenario back.
        error = report["scenarios"]["sqs"]["error"]
        assert error.startswith("failed to deploy (redeploy once fixed): The deployment failed to start "), error
        assert "BackendUnavailable: scenario sqs: backend tensorrt needs the `tensorrt` package" in error, error
        assert "\n" not in error and "Traceback" not in error and "\x1b" not in error, error  # one line: the cause
        assert {name for name, info in report["scenarios"].items() if "model_version" in info} == {"hp", "phf"}
        assert requests.head(f"{url}/healthz", timeout=60).status_code == 200
        refused = requests.post(f"{url}/sqs/rank", json=example_request(registry, "sqs", candidates=2, events=2),
                                timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["kind"] == "deployment_failed", refused.text
        message = refused.json()["error"]["message"]
        assert message.startswith("scenario sqs: its deployment failed to deploy and serves again only once "
                                  "redeployed; retrying will not help: ") and "tensorrt` package" in message, message
        body = example_request(registry, "hp", candidates=3, events=4, seed=5)
        response = requests.post(f"{url}/hp/rank", json=body, timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(_served(response), _offline(service, "hp", body), atol=1e-5)
        # While a scenario does not answer, `mtfm serve pins --prune` removes nothing, and says which.
        from mtfm.platform.checkpoint import pin_for_serving
        from mtfm.platform.cli import main

        pin = pin_for_serving(write_tiny_checkpoint(registry, tmp_path / "run-b" / "checkpoint_00000001", step=1))
        assert main(["serve", "pins", str(tmp_path / "run-b"), "--url", service["url"], "--prune"]) == 1
        said = capsys.readouterr().err
        assert f"{service['url']}: scenario sqs of app sqs_tensorrt did not report the checkpoint it loads" in said
        assert pin.is_dir()
    finally:
        serve.delete("sqs_tensorrt")
