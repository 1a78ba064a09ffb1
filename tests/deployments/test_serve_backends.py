"""Scoring backends and serving config, in-process (no Serve): user-side reuse, the CUDA-graph
runner's padded static buffers and ONNX give the plain subgraph's scores, TensorRT fails
clearly where it cannot run, serve.yaml is the generator's output, the builder's checks and the
example request."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from pydantic import ValidationError

from mtfm.deployments.app import (AppArgs, ServeConfigError, build_app, resolve_checkpoint, scenario_serving,
                                  serving_revision)
from mtfm.deployments.backends import BackendUnavailable, TorchBackend, create_backend, without_events
from mtfm.deployments.cuda_graphs import CudaGraphRunner
from mtfm.deployments.rank_request import RankRequestParser, example_request
from mtfm.deployments.serve_config import render_serve_config
from mtfm.deployments.user_cache import UserSideCache, split_users, user_side_bytes
from mtfm.model.padding import batch_shape
from mtfm.platform.checkpoint import load_model
from mtfm.platform.cli import main
from mtfm.platform.registry import load_registry
from serve_test_utils import REPO, write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(load_registry(REPO / "configs"), tmp_path_factory.mktemp("run") / "checkpoint_00000003")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0]


def _varied_requests(registry, scenario: str):
    """Requests with no events, many candidates, events at the request ts, nulls and empty lists."""
    parser = RankRequestParser(registry, scenario, max_candidates=1000)
    bodies = [example_request(registry, scenario, candidates=k, events=e, seed=k + e, user_id=k)
              for k, e in [(3, 4), (70, 0), (9, 40), (1, 1)]]
    edited = bodies[2]
    for s in edited["sequences"].values():
        s[-1]["ts"] = edited["ts"]  # an R event at the request's ts stays invisible to its candidates
    for c in edited["candidates"][::2]:
        for name, value in list(c.items()):
            if isinstance(value, list):
                c[name] = []
            elif not any(f.name == name and f.required for f in registry.scenario(scenario).features):
                c[name] = None
    for i, c in enumerate(edited["candidates"][1::2]):  # lists of several lengths in one request: padded apart
        for name, value in list(c.items()):
            if isinstance(value, list) and value:
                c[name] = (value * 4)[:(1, 2, 3)[i % 3]]
    return [parser.parse(b, now_ms=int(time.time() * 1000)) for b in bodies]


@pytest.mark.parametrize("scenario", ["hp", "phf", "sqs"])
def test_user_side_reuse_in_chunks_equals_the_plain_subgraph(model, scenario):
    ranker = model.subgraph(scenario)
    requests = _varied_requests(model.registry, scenario)
    cpu = torch.device("cpu")
    plain = TorchBackend(ranker, device=cpu, reuse_user_side=False).score(requests)
    chunked = TorchBackend(ranker, device=cpu, chunk_size=16).score(requests)
    for p, c, r in zip(plain, chunked, requests):
        assert p.shape == c.shape == (r.num_candidates, len(ranker.task_names))
        np.testing.assert_allclose(c, p, atol=1e-5)


def test_cached_user_sides_give_the_same_scores_and_are_reused(model):
    ranker = model.subgraph("phf")
    requests = _varied_requests(model.registry, "phf")
    plain = TorchBackend(ranker, device=torch.device("cpu"), reuse_user_side=False).score(requests)
    cache = UserSideCache(ttl_s=60, max_bytes=2**30)
    cached = TorchBackend(ranker, device=torch.device("cpu"), chunk_size=16, user_cache=cache)
    cached.score(requests[:2])
    scores = cached.score(requests[::-1])[::-1]  # two users from the cache, two encoded now
    assert (cache.hits, cache.misses) == (2, 4)
    for p, c in zip(plain, scores):
        np.testing.assert_allclose(c, p, atol=1e-5)


def test_user_side_cache_expires_and_stays_within_its_bytes(model):
    ranker = model.subgraph("hp")
    batch = ranker.collator()(pa.concat_tables([r.table for r in _varied_requests(model.registry, "hp")]))
    with torch.no_grad():
        sides = split_users(ranker.encode_users(batch))
    config = model.config
    per_row = config.num_layers * 2 * config.kv_heads * config.dim_per_head * 4 + 1 + 8  # float32 K, V; int8 kind, ts
    assert [user_side_bytes(side) for side in sides] == [len(side.kind) * per_row for side in sides]
    newest_two = user_side_bytes(sides[-1]) + user_side_bytes(sides[-2])
    cache = UserSideCache(ttl_s=60, max_bytes=newest_two)
    for i, side in enumerate(sides):
        cache.put(str(i), side)
    assert cache.bytes <= newest_two and cache.get("0") is None
    assert cache.get(str(len(sides) - 1)) is not None and cache.get(str(len(sides) - 2)) is not None
    # Least recently used goes first: a, b, then a read, then c evicts b.
    a, b, c = [side for side in sides if len(side.kind)][:3]
    lru = UserSideCache(ttl_s=60, max_bytes=user_side_bytes(a) + max(user_side_bytes(b), user_side_bytes(c)))
    lru.put("a", a)
    lru.put("b", b)
    assert lru.get("a") is a
    lru.put("c", c)
    assert lru.get("b") is None and lru.get("a") is a and lru.get("c") is c
    assert lru.bytes == (len(a.kind) + len(c.kind)) * per_row
    expired = UserSideCache(ttl_s=0, max_bytes=2**30)
    expired.put("a", sides[0])
    time.sleep(0.01)
    assert expired.get("a") is None and expired.bytes == 0


@pytest.mark.parametrize("scenario", ["hp", "phf"])
def test_graph_runner_reuses_its_static_buffers_and_gives_the_plain_scores(model, scenario):
    """On the CPU the runner runs its padded static buffers eagerly: the data path of a replay."""
    ranker = model.subgraph(scenario)
    requests = _varied_requests(model.registry, scenario)
    collate = ranker.collator()
    parser = RankRequestParser(model.registry, scenario, max_candidates=1000)
    sibling = parser.parse(example_request(model.registry, scenario, candidates=3, events=5, seed=1, user_id=11),
                           now_ms=int(time.time() * 1000))
    runner = CudaGraphRunner(ranker, torch.device("cpu"), max_graphs=3)
    plain = TorchBackend(ranker, device=torch.device("cpu"), reuse_user_side=False)
    # Request 0 and its sibling (other events, candidates and user) pad to the same shape, so the
    # sibling's call overwrites request 0's buffers: stale inputs would give request 0's scores.
    assert batch_shape(collate(sibling.table)) == batch_shape(collate(requests[0].table))
    for request in (requests[0], sibling, requests[1], requests[2], requests[0]):
        scores = runner.scores(collate(request.table))
        np.testing.assert_allclose(scores.numpy(), plain.score([request])[0], atol=1e-5)
    assert runner.captures == 3
    assert runner.scores(collate(requests[3].table)) is None  # a fourth shape: no room for another graph
    large = CudaGraphRunner(ranker, torch.device("cpu"), max_tokens=16)
    assert large.scores(collate(requests[1].table)) is None
    batch = collate(requests[1].table)
    padded = batch_shape(batch).num_tokens  # the limit counts the padded tokens
    assert CudaGraphRunner(ranker, torch.device("cpu"), max_tokens=padded).scores(batch) is not None
    assert CudaGraphRunner(ranker, torch.device("cpu"), max_tokens=padded - 1).scores(batch) is None


@pytest.mark.parametrize("scenario", ["hp", "phf"])
def test_graph_runner_user_side_programs_give_the_plain_scores_and_encoded_sides(model, scenario):
    """The two reuse programs on the CPU (static buffers run eagerly): the pass that also
    returns each request's user side gives the plain scores and, per request, the side that
    `encode_users` gives it alone; candidates against those cached sides give the plain scores,
    also when the graph's buffers last held another user's side (stale keys would move them)."""
    ranker = model.subgraph(scenario)
    requests = _varied_requests(model.registry, scenario)
    collate = ranker.collator()
    plain = TorchBackend(ranker, device=torch.device("cpu"), reuse_user_side=False)
    expected = plain.score(requests)
    runner = CudaGraphRunner(ranker, torch.device("cpu"))
    scores, sides = runner.scores_and_user_sides(collate(pa.concat_tables([r.table for r in requests])))
    bounds = collate(pa.concat_tables([r.table for r in requests])).target_offsets.tolist()
    for b, request in enumerate(requests):
        np.testing.assert_allclose(scores[bounds[b]:bounds[b + 1]].numpy(), expected[b], atol=1e-5)
        with torch.no_grad():
            alone = ranker.encode_users(collate(request.table))
        torch.testing.assert_close(sides[b].kv, alone.kv, atol=1e-5, rtol=1e-5)
        for field in ("offsets", "kind", "ts", "user_id"):
            assert torch.equal(getattr(sides[b], field), getattr(alone, field)), field
    assert sides[1].kind.shape == (0,) and sides[0].kind.shape[0] > 0
    # A sibling of request 0 (other user, events and candidates, same sizes) replays the same
    # candidates graph: each call must reload the static user side, or the other's keys score it.
    parser = RankRequestParser(model.registry, scenario, max_candidates=1000)
    sibling = parser.parse(example_request(model.registry, scenario, candidates=3, events=4, seed=99, user_id=12),
                           now_ms=int(time.time() * 1000))
    sibling_expected = plain.score([sibling])[0]
    sibling_side = runner.scores_and_user_sides(collate(sibling.table))[1][0]
    captured = runner.captures
    for request, side, want in [(requests[0], sides[0], expected[0]), (sibling, sibling_side, sibling_expected)] * 2:
        got = runner.scores_for_user_sides([side], collate(without_events(request.table, model.registry.sequences)))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert runner.captures == captured + 1
    assert not np.allclose(sibling_expected, expected[0], atol=1e-3)
    together = collate(without_events(pa.concat_tables([r.table for r in requests]), model.registry.sequences))
    got = runner.scores_for_user_sides(sides, together)
    np.testing.assert_allclose(got.numpy(), np.concatenate(expected), atol=1e-5)


def test_graphed_backend_caches_user_sides_and_scores_hits_from_candidates_alone(model):
    """The backend's routing with a graph runner (on the CPU: its static buffers run eagerly):
    a miss scores through the pass that also encodes and caches, a batch of hits through the
    candidates graph, a mixed batch through the former again, always with the plain scores."""
    ranker = model.subgraph("phf")
    requests = _varied_requests(model.registry, "phf")
    expected = TorchBackend(ranker, device=torch.device("cpu"), reuse_user_side=False).score(requests)
    cache = UserSideCache(ttl_s=60, max_bytes=2**30)
    backend = TorchBackend(ranker, device=torch.device("cpu"), user_cache=cache)
    backend.graphs = CudaGraphRunner(backend.ranker, torch.device("cpu"))
    graphs = backend.graphs.graphs
    for scores, want in zip(backend.score(requests[:2]), expected[:2]):  # two misses
        np.testing.assert_allclose(scores, want, atol=1e-5)
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 2, 2)
    assert [key[0] for key in graphs] == ["single pass with user sides"]
    for scores, want in zip(backend.score(requests[:2][::-1]), expected[:2][::-1]):  # two hits
        np.testing.assert_allclose(scores, want, atol=1e-5)
    assert (cache.hits, cache.misses) == (2, 2)
    assert sorted(key[0] for key in graphs) == ["candidates", "single pass with user sides"]
    for scores, want in zip(backend.score(requests), expected):  # two hits, two misses
        np.testing.assert_allclose(scores, want, atol=1e-5)
    assert (cache.hits, cache.misses, len(cache.entries)) == (4, 4, 4)


def test_scenario_replica_refuses_to_answer_with_scores_that_are_not_finite(checkpoint, model):
    """orjson would write NaN as null: the replica raises instead (a 500 over HTTP)."""
    import asyncio
    import dataclasses

    from mtfm.deployments.scenario import ScenarioDeployment
    from mtfm.platform.registry import ServingConfig

    replica = ScenarioDeployment.func_or_class("hp", str(checkpoint), dataclasses.asdict(ServingConfig()),
                                               chunk_size=64, user_cache_ttl_s=0, user_cache_mb=0)
    request = _varied_requests(model.registry, "hp")[0]
    assert np.isfinite([s for c in asyncio.run(replica.rank(request))["scores"] for s in c.values()]).all()
    with torch.no_grad():
        replica.backend.ranker.heads.parameters().__next__().fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        asyncio.run(replica.rank(request))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_backend_matches_the_float32_cpu_scores(model):
    ranker = model.subgraph("phf")
    requests = _varied_requests(model.registry, "phf")
    cpu = TorchBackend(ranker, device=torch.device("cpu"), reuse_user_side=False).score(requests)
    graphed = TorchBackend(model.subgraph("phf"), device=torch.device("cuda"), cuda_graphs=True)
    assert ranker.config.compute_dtype == "float32"  # tiny.yaml's: the kernels in IEEE float32, as below
    for _ in range(2):  # capture, then replay
        for request, expected in zip(requests, cpu):
            np.testing.assert_allclose(graphed.score([request])[0], expected, atol=1e-4)
    together = graphed.score(requests)
    for scores, expected in zip(together, cpu):
        np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert graphed.graphs.captures >= 2
    for compute_dtype in ("float32", "bfloat16"):
        ranker = model.subgraph("phf")
        ranker.config = ranker.config.replace(compute_dtype=compute_dtype)
        cache = UserSideCache(ttl_s=60, max_bytes=2**30)
        reusing = TorchBackend(ranker, device=torch.device("cuda"), cuda_graphs=True, user_cache=cache)
        tolerance = 2e-2 if compute_dtype == "bfloat16" else 1e-4
        for _ in range(3):  # misses (single pass with user sides, captured), hits (candidates, captured), replays
            for request, expected in zip(requests, cpu):
                np.testing.assert_allclose(reusing.score([request])[0], expected, atol=tolerance)
        assert cache.hits == 2 * len(requests)
        # Several users per batch: all cached, then two of them evicted (a mixed batch), then all again.
        for batch in (requests, requests[::-1]):
            for scores, expected in zip(reusing.score(batch), [cpu[requests.index(r)] for r in batch]):
                np.testing.assert_allclose(scores, expected, atol=tolerance)
        for request in requests[:2]:
            cache._drop(request.user_state)
        for _ in range(2):
            for scores, expected in zip(reusing.score(requests), cpu):
                np.testing.assert_allclose(scores, expected, atol=tolerance)
        assert {key[0] for key in reusing.graphs.graphs} == {"single pass with user sides", "candidates"}


@pytest.mark.parametrize("scenario", ["hp", "phf", "sqs"])
def test_onnx_backend_matches_pytorch(model, scenario):
    ranker = model.subgraph(scenario)
    requests = _varied_requests(model.registry, scenario)
    plain = TorchBackend(ranker, device=torch.device("cpu"), reuse_user_side=False).score(requests)
    onnx = create_backend("onnx", ranker, device=torch.device("cpu"), chunk_size=256).score(requests)
    for p, o in zip(plain, onnx):
        np.testing.assert_allclose(o, p, atol=1e-5)


@pytest.mark.parametrize("layout,kv_heads", [("(0:3)*1", 1), ("(1:2)*1", 2)])
def test_dense_export_form_matches_the_subgraph_with_full_layers(layout, kv_heads):
    """The export form (`DenseRequestRanker`) writes the layer math out again; configs/model/tiny.yaml runs
    only target layers (its top layer always does), so the ONNX test above never reaches its full-layer
    branch: checked here in PyTorch, with GQA and without."""
    from mtfm.deployments.onnx_export import DenseRequestRanker
    from mtfm.model import build_model, load_model_config

    registry = load_registry(REPO / "configs")
    config = load_model_config(REPO / "configs/model/tiny.yaml").replace(hta_layout=layout, num_kv_heads=kv_heads)
    torch.manual_seed(0)
    ranker = build_model(config, registry).eval().subgraph("hp")
    assert "full" in [layer.kind for layer in ranker.stack.layers]
    dense = DenseRequestRanker(ranker).eval()
    for request in _varied_requests(ranker.registry, "hp"):
        batch = ranker.collator()(request.table)
        with torch.no_grad():
            expected = ranker(batch)
            found = dense(*(torch.from_numpy(a) for a in dense.request_inputs(batch)))
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_without_the_package_is_a_clear_error_on_the_replica_not_in_the_builder(model, checkpoint):
    """The replica (`create_backend`, on its own node) refuses a backend it cannot run; the builder,
    on the Serve controller's node (a CPU head on a cluster), checks only that the name is known."""
    with pytest.raises(BackendUnavailable, match=r"scenario sqs: backend tensorrt needs the `tensorrt` package.*"
                                                  r"args\.scenarios\.sqs\.backend"):
        create_backend("tensorrt", model.subgraph("sqs"), device=torch.device("cpu"), chunk_size=256)
    overrides = AppArgs(scenarios={"sqs": {"backend": "tensorrt"}}).scenarios
    assert scenario_serving(load_registry(REPO / "configs"), overrides)["sqs"].backend == "tensorrt"
    build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs"), "scenarios": overrides})
    with pytest.raises(ServeConfigError, match=r"the serve config: args\.scenarios\.sqs\.backend: expected one of "
                                               r"torch, onnx, tensorrt, found 'tensorrtx'"):
        scenario_serving(load_registry(REPO / "configs"),
                         AppArgs(scenarios={"sqs": {"backend": "tensorrtx"}}).scenarios)


def test_the_committed_serve_yaml_is_the_generators_output():
    assert (REPO / "deployments/serve.yaml").read_text() == render_serve_config()


def test_serve_config_writes_every_path_so_that_it_reads_back_as_given():
    """A path YAML would read otherwise (a " #" starts a comment, "null" is no string) is quoted."""
    for path in ("/runs/v1 #retrained", "null", "yes", "a: b", "runs/x", "{x}", " lead", "'q'"):
        config = yaml.safe_load(render_serve_config(checkpoint=path, config_dir=path, host=path))
        args = config["applications"][0]["args"]
        assert (args["checkpoint"], args["config_dir"], config["http_options"]["host"]) == (path, path, path), path
    assert "      checkpoint: runs/x\n" in render_serve_config(checkpoint="runs/x")  # plain where plain reads back


def test_output_piped_into_head_ends_quietly():
    command = (f"{sys.executable} -m mtfm.platform.cli serve example-request --config-dir {REPO / 'configs'} "
               "--scenario hp --candidates 1000 | head -1")  # more than a pipe holds
    done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout == "{\n" and "BrokenPipeError" not in done.stderr and done.stderr == ""


def test_serve_config_out_writes_only_a_config_of_a_valid_registry(config_dir, tmp_path, capsys):
    """--out FILE holds what the command prints, and a registry error leaves FILE as it was (a shell's
    `> FILE` had emptied it before the command ran)."""
    assert main(["serve", "config", "--config-dir", str(config_dir)]) == 0
    printed = capsys.readouterr().out
    written = tmp_path / "serve.yaml"
    assert main(["serve", "config", "--config-dir", str(config_dir), "--out", str(written)]) == 0
    assert written.read_text() == printed and f"wrote {written}" in capsys.readouterr().err
    (config_dir / "scenarios" / "hp.yaml").write_text("name: hp\nnot_a_field: 1\n")
    assert main(["serve", "config", "--config-dir", str(config_dir), "--out", str(written)]) == 1
    assert "hp.yaml" in capsys.readouterr().err
    assert written.read_text() == printed and sorted(p.name for p in tmp_path.iterdir()) == ["configs", "serve.yaml"]
    (config_dir / "scenarios" / "hp.yaml").write_text((REPO / "configs" / "scenarios" / "hp.yaml").read_text())
    nowhere = tmp_path / "nowhere" / "serve.yaml"
    assert main(["serve", "config", "--config-dir", str(config_dir), "--out", str(nowhere)]) == 1
    assert f"error: --out {nowhere}: no folder" in capsys.readouterr().err
    assert main(["serve", "config", "--config-dir", str(config_dir), "--out", str(tmp_path)]) == 1
    assert f"error: --out {tmp_path}: a folder; expected a file" in capsys.readouterr().err
    # Replaced, it keeps its mode (others may need to read it) and a link to it stays a link.
    written.chmod(0o640)
    link = tmp_path / "served.yaml"
    link.symlink_to(written)
    assert main(["serve", "config", "--config-dir", str(config_dir), "--out", str(link)]) == 0
    assert link.is_symlink() and written.stat().st_mode & 0o777 == 0o640 and written.read_text() == printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "serve.yaml", "served.yaml"]


def test_serve_config_writes_a_revision_that_changes_with_the_checkpoint_and_the_registry(config_dir, tmp_path, capsys,
                                                                                         monkeypatch):
    """`serve deploy` leaves an app whose file is unchanged as it is: the file's revision changes when the run
    saved a newer checkpoint or the registry changed, and `serve check` says when a file's is stale."""
    registry = load_registry(config_dir)
    run, written = tmp_path / "run", tmp_path / "serve.yaml"
    write_tiny_checkpoint(registry, run / "checkpoint_00000003", step=3)

    def regenerated(*flags: str) -> str:
        assert main(["serve", "config", "--config-dir", str(config_dir), "--checkpoint", str(run),
                     "--out", str(written), *flags]) == 0
        return yaml.safe_load(written.read_text())["applications"][0]["args"]["revision"]

    def checked() -> str:
        assert main(["serve", "check", str(written)]) == 0
        return capsys.readouterr().err

    first = regenerated()
    assert regenerated() == first and "warning" not in checked()
    write_tiny_checkpoint(registry, run / "checkpoint_00000005", step=5)  # the run trained on
    assert (f"warning: {written} applications[0] (mtfm): args.revision {first} was written for another checkpoint "
            "or registry than the app finds now") in checked()
    second = regenerated()
    assert second != first and "warning" not in checked()
    hp = config_dir / "scenarios" / "hp.yaml"
    hp.write_text(hp.read_text().replace("replicas: 1", "replicas: 2", 1))  # a serving knob: also a rollout
    assert "args.revision" in checked() and regenerated() not in (first, second)
    third = regenerated()
    # --redeploy: the same digest, stamped with the time, so a file Serve has not seen; `serve check` reads the digest.
    redeployed = regenerated("--redeploy")
    assert re.fullmatch(rf"{third}\+redeploy-\d{{8}}T\d{{6}}\.\d{{6}}Z", redeployed), redeployed
    assert "warning" not in checked()
    again = regenerated("--redeploy")
    assert again != redeployed and again.startswith(f"{third}+redeploy-")
    write_tiny_checkpoint(registry, run / "checkpoint_00000006", step=6)
    assert f"args.revision {again} was written for another checkpoint or registry" in checked()
    monkeypatch.chdir(tmp_path)  # no runs/ here: no checkpoint found, no revision written
    assert main(["serve", "config", "--config-dir", str(config_dir)]) == 0
    assert "revision" not in capsys.readouterr().out
    assert main(["serve", "config", "--config-dir", str(config_dir), "--redeploy"]) == 0  # the stamp alone
    assert re.search(r"\n      revision: redeploy-\d{8}T\d{6}\.\d{6}Z\n", capsys.readouterr().out)


def test_serve_config_warns_of_a_checkpoint_path_without_a_checkpoint(tmp_path, capsys):
    """A warning, not a refusal: the path may be one of the cluster's, not this machine's."""
    assert main(["serve", "config", "--config-dir", str(REPO / "configs"), "--checkpoint", str(tmp_path / "nope")]) == 0
    out = capsys.readouterr()
    assert f"warning: {tmp_path / 'nope'}: not found" in out.err and f"checkpoint: {tmp_path / 'nope'}" in out.out
    assert "  host: 0.0.0.0\n" in out.out
    (tmp_path / "run").mkdir()  # a run folder here whose checkpoints are on the cluster: the same
    assert main(["serve", "config", "--config-dir", str(REPO / "configs"), "--checkpoint", str(tmp_path / "run")]) == 0
    assert f"warning: {tmp_path / 'run'}: no checkpoint_* folder" in capsys.readouterr().err
    assert main(["serve", "config", "--config-dir", str(REPO / "configs"), "--host", "127.0.0.1"]) == 0
    assert "  host: 127.0.0.1\n  port: 8000\n" in capsys.readouterr().out


def test_a_scenario_ingress_config_has_one_app_per_scenario_at_its_own_prefix(checkpoint):
    config = yaml.safe_load(render_serve_config(scenario_ingress=["hp", "sqs"]))
    apps = {a["name"]: a for a in config["applications"]}
    assert list(apps) == ["hp", "sqs"]
    assert {n: (a["route_prefix"], a["args"]["scenario_ingress"]) for n, a in apps.items()} == {
        "hp": ("/hp", "hp"), "sqs": ("/sqs", "sqs")}
    assert AppArgs.model_validate(apps["hp"]["args"]).scenario_ingress == "hp"  # what build_app accepts
    with pytest.raises(ServeConfigError, match="args.scenario_ingress: unknown scenario 'nope'"):
        build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs"),
                   "scenario_ingress": "nope"})


def test_serving_knobs_come_from_yaml_with_overrides_and_are_checked():
    registry = load_registry(REPO / "configs")
    serving = scenario_serving(registry, AppArgs(scenarios={"hp": {"replicas": 3, "cuda_graphs": False}}).scenarios)
    assert set(serving) == set(registry.scenarios)
    assert serving["hp"].replicas == 3 and serving["sqs"].max_candidates == registry.scenario("sqs").serving.max_candidates
    assert not serving["hp"].cuda_graphs and serving["phf"].cuda_graphs  # on unless turned off
    with pytest.raises(ServeConfigError, match="args.scenarios.nope: unknown scenario"):
        scenario_serving(registry, AppArgs(scenarios={"nope": {}}).scenarios)
    with pytest.raises(ServeConfigError, match="max_ongoing_requests 4 is below max_batch_requests 16"):
        scenario_serving(registry, AppArgs(scenarios={"hp": {"max_ongoing_requests": 4}}).scenarios)
    # Read as the scenario YAML's `serving:` is: no true for a count, no "3", no "yes" for a flag, no inf.
    for knob, value, expected in [("replicas", True, "expected an integer >= 1, found a boolean True"),
                                  ("replicas", "3", "expected an integer >= 1, found a string '3'"),
                                  ("cuda_graphs", "yes", "expected true or false, found a string 'yes'"),
                                  ("num_cpus", math.inf, "expected a number >= 0, finite, found inf"),
                                  ("replica", 2, "unknown key; expected one of: replicas, ")]:
        with pytest.raises(ServeConfigError, match=re.escape(f"the serve config: args.scenarios.hp.{knob}: {expected}")):
            scenario_serving(registry, AppArgs(scenarios={"hp": {knob: value}}).scenarios)
    for not_a_mapping in (3, [], "", False):
        with pytest.raises(ServeConfigError, match=re.escape("the serve config: args.scenarios.hp: expected a mapping")):
            scenario_serving(registry, AppArgs(scenarios={"hp": not_a_mapping}).scenarios)
    unset = scenario_serving(registry, AppArgs(scenarios={"hp": None}).scenarios)
    assert unset["hp"] == registry.scenario("hp").serving
    with pytest.raises(ValidationError, match="chunk_size"):
        AppArgs(chunk_size=True)
    with pytest.raises(ValidationError, match="user_cache_ttl_s"):
        AppArgs(user_cache_ttl_s=math.nan)


def test_serve_check_makes_the_builders_checks_on_each_application(checkpoint, config_dir, tmp_path, capsys,
                                                                    monkeypatch):
    """`mtfm serve check FILE` passes a config the builder accepts, naming what it serves, and refuses
    with the file, the application and the setting what the builder would refuse."""
    monkeypatch.delenv("MTFM_CHECKPOINT", raising=False)
    good = tmp_path / "good.yaml"
    assert main(["serve", "config", "--config-dir", str(config_dir), "--checkpoint", str(checkpoint), "--port", "8123",
                 "--out", str(good)]) == 0
    capsys.readouterr()
    assert main(["serve", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {good} applications[0] (mtfm) at /: {checkpoint.resolve()} (args.checkpoint)")
    assert out.rstrip().endswith("serves hp (1 x torch, 0 GPU), phf (1 x torch, 0 GPU), sqs (1 x torch, 0 GPU)")

    def check(edit) -> str:
        config = yaml.safe_load(good.read_text())
        edit(config["applications"][0]["args"])
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(config))
        assert main(["serve", "check", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad} applications[0] (mtfm)"), err
        return err

    assert "args.scenarios.hp.replica: unknown key; expected one of: replicas, " in check(
        lambda args: args.update(scenarios={"hp": {"replica": 2}}))
    assert ": args.checkpont: unknown setting; expected one of: checkpoint, config_dir, scenarios, " in check(
        lambda args: args.update(checkpont="x"))
    assert ": args.chunk_size: Input should be a valid integer, found True" in check(lambda args: args.update(
        chunk_size=True))
    assert f"a relative path is read from this folder ({Path.cwd()}), as a `serve run`" in check(
        lambda args: args.update(config_dir="no_such_configs"))
    assert f"{tmp_path / 'nope'}: not found" in check(lambda args: args.update(checkpoint=str(tmp_path / "nope")))
    text = (config_dir / "scenarios" / "sqs.yaml").read_text().replace("name: sqs", "name: coupon")
    (config_dir / "scenarios" / "coupon.yaml").write_text(text)
    assert "(args.checkpoint) was trained without scenarios ['coupon']" in check(lambda args: None)
    (config_dir / "scenarios" / "coupon.yaml").unlink()

    twice = yaml.safe_load(good.read_text())
    twice["applications"].append({**twice["applications"][0], "route_prefix": "/again"})
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(twice))
    assert main(["serve", "check", str(tmp_path / "twice.yaml")]) == 1
    assert 'applications: Value error, Found multiple configs for application "mtfm"' in capsys.readouterr().err
    twice["applications"] = twice["applications"][:1]
    twice["applications"][0]["args"] = None
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(twice))
    assert main(["serve", "check", str(tmp_path / "twice.yaml")]) == 1
    assert "applications.0.args: Input should be a valid dictionary (Serve's config schema)" in capsys.readouterr().err
    # Keys Serve's schema does not know, which it drops: a misspelt http_options would serve on 0.0.0.0:8000.
    misspelt = yaml.safe_load(good.read_text())
    misspelt["http_option"] = misspelt.pop("http_options")
    misspelt["applications"][0]["argz"] = misspelt["applications"][0].pop("args")
    misspelt["applications"][0]["deployments"] = [{"name": "ranker_hp", "num_replica": 2,
                                                   "ray_actor_options": {"num_cpu": 1, 8000: "a key YAML reads as "
                                                                                          "an integer"}}]
    (tmp_path / "misspelt.yaml").write_text(yaml.safe_dump(misspelt))
    assert main(["serve", "check", str(tmp_path / "misspelt.yaml")]) == 1
    said = capsys.readouterr().err.splitlines()
    assert [line.split(": unknown key")[0] for line in said] == [
        f"error: {tmp_path / 'misspelt.yaml'}: {key}" for key in (
            "http_option", "applications[0].argz", "applications[0].deployments[0].num_replica",
            "applications[0].deployments[0].ray_actor_options.num_cpu",
            "applications[0].deployments[0].ray_actor_options.8000")], said
    assert "did you mean num_cpus?" in said[3], said
    assert ("which Serve ignores (`serve run` would use the default instead); did you mean http_options? Expected "
            "one of: proxy_location, http_options, ") in said[0], said

    not_serve = tmp_path / "scenario.yaml"
    not_serve.write_text((config_dir / "scenarios" / "hp.yaml").read_text())
    assert main(["serve", "check", str(not_serve)]) == 1
    assert f"error: {not_serve}: expected a Serve config" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "json:dumps"}]}))
    assert main(["serve", "check", str(other)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"note: {other} applications[0] (x): import_path 'json:dumps' is not mtfm.deployments.app:build_app; "
        "not checked", f"error: {other}: no application builds with mtfm.deployments.app:build_app"]

    # What Serve's schema lets through and `serve run` then fails on: a route prefix, a builder that does not import.
    config = yaml.safe_load(good.read_text())
    config["applications"][0]["route_prefix"] = "hp"
    config["applications"].append({"name": "typo", "route_prefix": "/typo",
                                   "import_path": "mtfm.deployments.app:build_ap"})
    config["applications"].append({"name": "gone", "route_prefix": "/gone", "import_path": "no_such_module:app"})
    (tmp_path / "run_fails.yaml").write_text(yaml.safe_dump(config))
    assert main(["serve", "check", str(tmp_path / "run_fails.yaml")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [
        f"error: {tmp_path / 'run_fails.yaml'} applications[0] (mtfm): route_prefix 'hp': expected a path that starts "
        "with '/', e.g. /hp",
        f"error: {tmp_path / 'run_fails.yaml'} applications[1] (typo): import_path 'mtfm.deployments.app:build_ap': "
        "mtfm.deployments.app has no build_ap",
        f"error: {tmp_path / 'run_fails.yaml'} applications[2] (gone): import_path 'no_such_module:app': cannot import "
        "no_such_module (ModuleNotFoundError: No module named 'no_such_module')"]
    # What this machine cannot give a `serve run` that starts its Ray here: warned, as a cluster may have it.
    config = yaml.safe_load(good.read_text())
    config["applications"][0]["args"]["scenarios"] = {"hp": {"num_cpus": 64}}  # + 0.25 each for phf, sqs, router
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "check", str(tmp_path / "big.yaml")]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: {tmp_path / 'big.yaml'}: the replicas ask for 64.75 CPU in all, this machine has "
        f"{os.cpu_count():g}: a `serve run` here would wait for them (a cluster with more: RAY_ADDRESS)")
    assert main(["serve", "check", str(tmp_path / "missing.yaml")]) == 1
    assert f"error: {tmp_path / 'missing.yaml'}: cannot read it" in capsys.readouterr().err


def test_builder_refuses_a_checkpoint_without_a_registered_scenario(checkpoint, config_dir, monkeypatch):
    """The refusal says where the checkpoint came from: $MTFM_CHECKPOINT overrides args.checkpoint."""
    text = (config_dir / "scenarios" / "sqs.yaml").read_text().replace("name: sqs", "name: coupon")
    (config_dir / "scenarios" / "coupon.yaml").write_text(text)
    with pytest.raises(ServeConfigError, match=r"\(args\.checkpoint\) was trained without scenarios \['coupon'\]"):
        build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    monkeypatch.setenv("MTFM_CHECKPOINT", str(checkpoint))
    with pytest.raises(ServeConfigError, match=r"\(\$MTFM_CHECKPOINT\) was trained without scenarios \['coupon'\]"):
        build_app({"checkpoint": "elsewhere", "config_dir": str(config_dir)})
    for name in ("hp", "phf", "sqs"):  # a registry of none of its scenarios: no app of a subset serves
        (config_dir / "scenarios" / f"{name}.yaml").unlink()
    with pytest.raises(ServeConfigError, match=r"\(\$MTFM_CHECKPOINT\) was trained on \['hp', 'phf', 'sqs'\], none of "
                                               r"which .* registers: the wrong checkpoint, or the wrong config dir\?"):
        build_app({"checkpoint": "elsewhere", "config_dir": str(config_dir)})


def test_a_schema_changed_since_training_is_refused_by_the_builder_and_serve_config(checkpoint, config_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    """Replicas parse requests with the registry the checkpoint was trained with: a feature added to
    a served scenario's YAML since would be refused in every request built from the config dir, so
    the app and `mtfm serve config` refuse it by name (as `--resume` does); a sequence's max_len
    changed, or a feature newly required, is only noted (the replicas keep the trained schema)."""
    hp = config_dir / "scenarios" / "hp.yaml"
    trained_text = hp.read_text()
    hp.write_text(trained_text.replace("cross_features:\n", "cross_features:\n  - {name: promo, type: numeric}\n"))
    changed = r"scenarios\.hp\.cross_features: \['distance_km', 'user_poi_clicks_30d'\] -> \['promo', 'distance_km', "
    with pytest.raises(ServeConfigError, match=r"\(args\.checkpoint\) was trained with other features, tasks or "
                                               r"sequences than .* declares now: " + changed):
        build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    assert main(["serve", "config", "--checkpoint", str(checkpoint), "--config-dir", str(config_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and re.search(r"^error: checkpoint .* was trained with other features.*" + changed, err, re.M)
    assert f"(`mtfm scenarios export --checkpoint {checkpoint} --out DIR` writes it)" in err
    # What the message offers: the registry it was trained with, written out, serves it.
    assert main(["scenarios", "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "trained")]) == 0
    assert f"pass --config-dir {tmp_path / 'trained'} to serve" in capsys.readouterr().out
    build_app({"checkpoint": str(checkpoint), "config_dir": str(tmp_path / "trained")})
    # A feature no longer required: the replicas still refuse requests without it. A description: nothing.
    hp.write_text(trained_text.replace("{name: distance_km, type: numeric, transform: log1p, required: true}",
                                       "{name: distance_km, type: numeric, transform: log1p}"))
    with pytest.raises(ServeConfigError, match=r"scenarios\.hp\.cross_features\.distance_km\.required: true -> "
                                               r"false; its replicas take and score requests as it was trained"):
        build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    hp.write_text(trained_text.replace("description: restaurant id", "description: the restaurant's id"))
    capsys.readouterr()
    build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    assert "required" not in capsys.readouterr().err
    # A feature newly required: served as trained (requests without it taken), and said so.
    hp.write_text(trained_text.replace("{name: user_level, type: categorical, buckets: 8, dim: 4}",
                                       "{name: user_level, type: categorical, buckets: 8, dim: 4, required: true}"))
    build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    assert re.search(r"scenarios\.hp\.user_features\.user_level\.required: false -> true in .*; its replicas still "
                     r"take requests without it, as it was trained", capsys.readouterr().err)
    hp.write_text(trained_text.replace("cross_features:\n", "cross_features:\n  - {name: promo, type: numeric}\n"))
    # A snapshot that this version's checks refuse is written, and said to need an edit.
    old = tmp_path / "old" / checkpoint.name
    shutil.copytree(checkpoint, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["registry"]["scenarios"]["hp"]["serving"]["max_ongoing_requests"] = 4
    (old / "meta.json").write_text(json.dumps(meta))
    assert main(["scenarios", "export", "--checkpoint", str(old), "--out", str(tmp_path / "old_registry")]) == 1
    assert re.search(r"error: wrote .*old_registry, but it does not pass as a config dir: .*hp\.yaml: "
                     r"serving\.max_ongoing_requests: .*; edit that field", capsys.readouterr().err)
    # checkpoint: null names the checkpoint the app would pick now, and warns that it would be refused.
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "config", "--config-dir", str(config_dir)]) == 0
    assert "note: checkpoint: null serves the newest checkpoint under runs/ when the app is built; there is none" \
        in capsys.readouterr().err
    shutil.copytree(checkpoint, tmp_path / "runs" / "r" / checkpoint.name)
    assert main(["serve", "config", "--config-dir", str(config_dir)]) == 0
    assert re.search(r"warning: checkpoint: null serves .* now .*/runs/r/checkpoint_00000003, which the app would "
                     r"refuse: checkpoint .* was trained with other features", capsys.readouterr().err)
    hp.write_text(trained_text)
    sequences = config_dir / "sequences.yaml"
    sequences.write_text(sequences.read_text().replace("max_len: 32", "max_len: 16"))
    build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    assert "sequences.realtime.max_len: 32 -> 16 in" in capsys.readouterr().err
    assert main(["serve", "config", "--config-dir", str(config_dir)]) == 0
    assert f"note: checkpoint: null serves the newest checkpoint under runs/ when the app is built: now " \
        f"{(tmp_path / 'runs' / 'r' / checkpoint.name).resolve()}" in capsys.readouterr().err
    monkeypatch.setenv("MTFM_CHECKPOINT", str(tmp_path / "elsewhere"))  # what the app would serve, if set there too
    assert main(["serve", "config", "--config-dir", str(config_dir)]) == 0
    assert re.search(r"warning: checkpoint: null serves \$MTFM_CHECKPOINT where the app is built \(.*elsewhere here\): "
                     r"now .*elsewhere, which the app would refuse: .*elsewhere: not found", capsys.readouterr().err)


def test_a_renamed_scenario_is_one_the_checkpoint_lacks_and_the_rest_are_offered(checkpoint, config_dir, capsys):
    """sqs renamed coupons in the registry: the model has no coupons, and what it can serve is hp and phf.
    With sqs only retired, the app serves hp and phf and says that sqs is not served."""
    sqs = config_dir / "scenarios" / "sqs.yaml"
    text = sqs.read_text()
    sqs.unlink()
    assert main(["serve", "config", "--checkpoint", str(checkpoint), "--config-dir", str(config_dir)]) == 0
    assert (f"note: checkpoint {checkpoint} was also trained on ['sqs'], which {config_dir} does not register: not "
            "served") in capsys.readouterr().err
    sqs.write_text(text)
    (config_dir / "scenarios" / "coupons.yaml").write_text(sqs.read_text().replace("name: sqs", "name: coupons"))
    sqs.unlink()
    with pytest.raises(ServeConfigError, match=r"trained without scenarios \['coupons'\] .* \(it was trained on "
                                               r"\['hp', 'phf', 'sqs'\]\); .* a config dir that registers just "
                                               r"\['hp', 'phf'\], or one app per trained scenario"):
        build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})


def test_builder_refuses_a_single_scenario_checkpoint_for_the_scenarios_it_lacks(tmp_path, config_dir, capsys):
    """A model config's `scenarios: [hp]` (configs/model/single_scenario_hp.yaml) trains on hp alone,
    though the checkpoint saves the whole registry: only hp can be served from it."""
    checkpoint = write_tiny_checkpoint(load_registry(REPO / "configs"), tmp_path / "run-hp" / "checkpoint_00000004",
                                       scenarios=["hp"])
    with pytest.raises(ServeConfigError) as refused:
        build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs")})
    message = str(refused.value)
    assert f"checkpoint {checkpoint.resolve()} " in message
    assert "trained without scenarios ['phf', 'sqs']" in message and "trained on ['hp']" in message
    assert (f"a config dir that registers just ['hp'], or one app per trained scenario from `mtfm serve config "
            f"--scenario-ingress --checkpoint {checkpoint.resolve()} --config-dir "
            f"{load_registry(REPO / 'configs').config_dir}`") in message
    with pytest.raises(ServeConfigError, match=r"trained without scenarios \['sqs'\] that args\.scenario_ingress "):
        build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs"), "scenario_ingress": "sqs"})
    # What it can serve: hp alone, by its own app or from a registry of hp alone.
    build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs"), "scenario_ingress": "hp"})
    # The command the message names writes that app only, and says why; without --scenario-ingress it warns.

    from mtfm.platform.cli import main

    assert main(["serve", "config", "--scenario-ingress", "--checkpoint", str(checkpoint), "--config-dir",
                 str(REPO / "configs")]) == 0
    out, err = capsys.readouterr()
    assert [a["name"] for a in yaml.safe_load(out)["applications"]] == ["hp"]
    assert f"note: {checkpoint} was trained on ['hp'] only: no app for ['phf', 'sqs']" in err
    # Without --scenario-ingress the app builder would refuse the config: none is written, and an --out file
    # already there is left as it was.
    written = tmp_path / "serve.yaml"
    written.write_text("# the config served now\n")
    assert main(["serve", "config", "--checkpoint", str(checkpoint), "--config-dir", str(REPO / "configs"),
                 "--out", str(written)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and written.read_text() == "# the config served now\n"
    assert (f"error: checkpoint {checkpoint} was trained without scenarios ['phf', 'sqs'] that {REPO / 'configs'} "
            "registers (it was trained on ['hp']); train or warm-start a model with them, or serve only scenarios it "
            "has: a config dir that registers just ['hp'], or one app per trained scenario from `mtfm serve config "
            f"--scenario-ingress --checkpoint {checkpoint} --config-dir {REPO / 'configs'}`") in err
    assert main(["serve", "config", "--scenario-ingress", "--checkpoint", str(checkpoint), "--config-dir",
                 str(REPO / "configs"), "--out", str(written)]) == 0
    assert [a["name"] for a in yaml.safe_load(written.read_text())["applications"]] == ["hp"]
    assert capsys.readouterr().out == ""
    for name in ("phf", "sqs"):
        (config_dir / "scenarios" / f"{name}.yaml").unlink()
    build_app({"checkpoint": str(checkpoint), "config_dir": str(config_dir)})
    hp = config_dir / "scenarios" / "hp.yaml"  # a registry without the one scenario it has
    (config_dir / "scenarios" / "coupon.yaml").write_text(hp.read_text().replace("name: hp", "name: coupon"))
    hp.unlink()
    assert main(["serve", "config", "--scenario-ingress", "--checkpoint", str(checkpoint), "--config-dir",
                 str(config_dir)]) == 1
    assert "was trained on ['hp'], none of which" in capsys.readouterr().err


def test_builder_and_replica_refuse_a_checkpoint_cut_short_by_name(tmp_path, monkeypatch, capsys):
    from mtfm.deployments.scenario import load_scenario_ranker
    from mtfm.platform.checkpoint import CheckpointError

    checkpoint = write_tiny_checkpoint(load_registry(REPO / "configs"), tmp_path / "runs" / "a" / "checkpoint_00000002")
    model_file = checkpoint / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:4096])
    refusal = f"{model_file}: not a readable checkpoint (File is not a zip file; cut short or damaged"
    monkeypatch.delenv("MTFM_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # its runs/ holds the newest checkpoint, the default
    for args in ({"checkpoint": str(checkpoint)}, {}):
        with pytest.raises(CheckpointError) as refused:
            build_app({**args, "config_dir": str(REPO / "configs")})
        assert str(refused.value).startswith(refusal)
    with pytest.raises(CheckpointError) as refused:
        load_scenario_ranker(checkpoint, "hp")
    assert str(refused.value).startswith(refusal)
    # Found on this machine and refused: an error, as the app builder's would be, and nothing is written.
    assert main(["serve", "config", "--config-dir", str(REPO / "configs"), "--checkpoint", str(checkpoint)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"error: {refusal}" in err


@pytest.mark.parametrize("model_config, architecture", [("configs/model/dcnv2_tiny.yaml", "dcnv2"),
                                                         ("configs/model/dlrm_mmoe_tiny.yaml", "dlrm_mmoe")])
def test_builder_refuses_a_baseline_checkpoint(tmp_path, model_config, architecture, capsys):
    checkpoint = write_tiny_checkpoint(load_registry(REPO / "configs"), tmp_path / "run" / "checkpoint_00000002",
                                       model_config=model_config)
    for extra in ({}, {"scenario_ingress": "hp"}):
        with pytest.raises(ServeConfigError) as refused:
            build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs"), **extra})
        message = str(refused.value)
        assert f"checkpoint {checkpoint.resolve()} is a {architecture} model" in message
        assert "serve a checkpoint of an mtfm model (architecture: mtfm" in message
    # So does `mtfm serve config`, writing nothing, for the run folder as for the checkpoint.
    written = tmp_path / "serve.yaml"
    for path in (checkpoint, checkpoint.parent):
        for ingress in ([], ["--scenario-ingress"]):
            assert main(["serve", "config", "--config-dir", str(REPO / "configs"), "--checkpoint", str(path),
                         "--out", str(written), *ingress]) == 1
            err = capsys.readouterr().err
            assert f"error: checkpoint {checkpoint} is a {architecture} model" in err and not written.exists()


def test_serve_config_names_the_registry_it_validated(config_dir, monkeypatch, capsys, tmp_path, checkpoint):
    """$MTFM_CONFIG_DIR picks the registry: the config written names that one, not ./configs."""
    monkeypatch.setenv("MTFM_CONFIG_DIR", str(config_dir))
    assert main(["serve", "config"]) == 0
    apps = yaml.safe_load(capsys.readouterr().out)["applications"]
    assert [a["args"]["config_dir"] for a in apps] == [str(config_dir)]
    assert main(["serve", "config", "--scenario-ingress"]) == 0
    apps = yaml.safe_load(capsys.readouterr().out)["applications"]
    assert [a["args"]["config_dir"] for a in apps] == [str(config_dir)] * 3
    other = tmp_path / "other"
    config_dir.rename(other)  # --config-dir still wins over $MTFM_CONFIG_DIR
    assert main(["serve", "config", "--config-dir", str(other)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["config_dir"] == str(other)
    monkeypatch.delenv("MTFM_CONFIG_DIR")
    monkeypatch.chdir(REPO)
    assert main(["serve", "config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["config_dir"] == "configs"
    # Paths given relative are written absolute: the app is built where the cluster's `ray start` ran.
    monkeypatch.chdir(tmp_path)
    write_tiny_checkpoint(load_registry(other), tmp_path / "runs" / "r" / "checkpoint_00000001")
    assert main(["serve", "config", "--config-dir", "other", "--checkpoint", "runs/r"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert (args["config_dir"], args["checkpoint"]) == (str(other), str(tmp_path / "runs" / "r"))
    (tmp_path / "runs" / "latest").symlink_to("r")  # a moving link stays a link
    assert main(["serve", "config", "--config-dir", "other", "--checkpoint", "runs/latest"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["checkpoint"] == str(
        tmp_path / "runs" / "latest")
    with pytest.raises(ServeConfigError, match=r"the serve config: args.config_dir 'configs': no config directory at "
                                               rf"{tmp_path / 'configs'}: a relative path is read from the folder "
                                               rf"the app is built in \({tmp_path}, where"):
        build_app({"checkpoint": str(checkpoint), "config_dir": "configs"})


def test_checkpoint_resolution_env_then_argument_then_newest_run(tmp_path, monkeypatch, checkpoint):
    from mtfm.platform.checkpoint import CheckpointError

    registry = load_registry(REPO / "configs")
    old = write_tiny_checkpoint(registry, tmp_path / "runs" / "a-1" / "checkpoint_00000001")
    new = write_tiny_checkpoint(registry, tmp_path / "runs" / "b-2" / "checkpoint_00000002")
    monkeypatch.delenv("MTFM_CHECKPOINT", raising=False)
    os.utime(old / "meta.json", (1_000_000, 1_000_000))  # saved long before the other
    assert resolve_checkpoint(None, tmp_path / "runs") == new.resolve()
    (old.parent / "report").mkdir()  # a report written into the old run later: it must not take over
    os.utime(new.parent, (2_000_000, 2_000_000))
    assert resolve_checkpoint(None, tmp_path / "runs") == new.resolve()
    later = write_tiny_checkpoint(registry, tmp_path / "runs" / "c-3" / "checkpoint_00000003")
    for meta in (new / "meta.json", later / "meta.json"):  # saved in the same second: the later step
        os.utime(meta, (3_000_000, 3_000_000))
    assert resolve_checkpoint(None, tmp_path / "runs") == later.resolve()
    assert resolve_checkpoint(str(old.parent), tmp_path / "runs") == old.resolve()
    monkeypatch.setenv("MTFM_CHECKPOINT", str(checkpoint))
    assert resolve_checkpoint(str(old.parent), tmp_path / "runs") == checkpoint.resolve()
    # A path that is not there names where it came from: a variable left set, or serve.yaml.
    monkeypatch.setenv("MTFM_CHECKPOINT", str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'gone'}: not found .*\(the checkpoint to serve, from "
                                              r"\$MTFM_CHECKPOINT\)$"):
        resolve_checkpoint(str(old.parent), tmp_path / "runs")
    monkeypatch.delenv("MTFM_CHECKPOINT")
    with pytest.raises(CheckpointError, match=r"\(the checkpoint to serve, from the serve config's args.checkpoint\)$"):
        resolve_checkpoint(str(tmp_path / "gone"), tmp_path / "runs")


@pytest.mark.parametrize("scenario", ["hp", "phf", "sqs"])
def test_example_request_cli_prints_a_valid_request(scenario, capsys):
    assert main(["serve", "example-request", "--config-dir", str(REPO / "configs"), "--scenario", scenario,
                 "--candidates", "5"]) == 0
    body = json.loads(capsys.readouterr().out)
    registry = load_registry(REPO / "configs")
    request = RankRequestParser(registry, scenario, max_candidates=10).parse(body, now_ms=int(time.time() * 1000))
    assert request.num_candidates == 5


def test_example_request_cli_refuses_a_request_the_scenario_would_refuse(capsys):
    common = ["serve", "example-request", "--config-dir", str(REPO / "configs"), "--scenario", "hp"]
    most = load_registry(REPO / "configs").scenario("hp").serving.max_candidates
    assert main(common + ["--candidates", str(most + 1)]) == 1
    assert f"accepts at most {most} per request" in capsys.readouterr().err
    for flag, value in (("--candidates", "0"), ("--events", "-1")):
        with pytest.raises(SystemExit):
            main(common + [flag, value])
    assert main(common + ["--candidates", "1", "--indent", "0"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # compact
    assert main(common[:-1] + ["grocery"]) == 1  # a scenario of another config dir
    assert capsys.readouterr().err == (f"error: unknown scenario 'grocery'; registered in {REPO / 'configs'}: hp, phf, "
                                       "sqs (another config dir: --config-dir DIR or $MTFM_CONFIG_DIR)\n")


def test_a_served_checkpoint_is_pinned_against_its_runs_pruning(tmp_path, capsys):
    """A run that goes on training deletes its older checkpoints (keep_checkpoints): a replica that
    restarts later, or an app rebuilt from the same serve.yaml, loads the pinned hard links, which
    outlive the deleted folder; a checkpoint written again under that name gets a pin of its own."""
    import shutil

    from mtfm.deployments.scenario import load_scenario_ranker, model_version
    from mtfm.platform.checkpoint import find_checkpoint, pin_for_serving

    registry = load_registry(REPO / "configs")
    checkpoint = write_tiny_checkpoint(registry, tmp_path / "run" / "checkpoint_00000004", step=4)
    build_app({"checkpoint": str(checkpoint), "config_dir": str(REPO / "configs")})
    [pinned] = (tmp_path / "run" / ".serving").glob("*/checkpoint_00000004")
    assert f"[mtfm] replicas load {pinned} (pinned" in capsys.readouterr().err
    assert sorted(p.name for p in pinned.iterdir()) == ["meta.json", "model.pt"]  # not the optimizer state
    assert all(os.path.samefile(pinned / name, checkpoint / name) for name in ("meta.json", "model.pt"))  # links
    assert pin_for_serving(checkpoint) == pinned and pin_for_serving(pinned) == pinned
    assert find_checkpoint(tmp_path / "run") == checkpoint  # a pin is not one of the run's checkpoints
    expected = load_scenario_ranker(checkpoint, "hp")[0].state_dict()
    revision = serving_revision(checkpoint, registry)
    shutil.rmtree(checkpoint)  # pruned by the run
    assert serving_revision(pinned, registry) == revision  # the same weights: a regenerated file is unchanged
    ranker, meta = load_scenario_ranker(pinned, "hp")
    assert meta.step == 4 and all(torch.equal(t, expected[k]) for k, t in ranker.state_dict().items())
    assert model_version(pinned, meta.step) == "run/checkpoint_00000004@step4"  # named by its run, as before
    assert resolve_checkpoint(str(checkpoint)) == pinned.resolve()  # serve.yaml still naming the pruned folder
    assert "removed by its run since it was pinned for serving" in capsys.readouterr().err
    assert main(["serve", "config", "--checkpoint", str(checkpoint), "--config-dir", str(REPO / "configs")]) == 0
    assert f"note: {checkpoint}: removed by its run since it was pinned for serving; serving the pin {pinned}" in (
        capsys.readouterr().err)  # the config command says what the app will serve, not "not found"
    rewritten = write_tiny_checkpoint(registry, checkpoint, step=9, seed=1)  # a resume may write that name again
    again = pin_for_serving(rewritten)
    assert again != pinned and os.path.samefile(again / "model.pt", rewritten / "model.pt")
    assert load_scenario_ranker(pinned, "hp")[1].step == 4  # apps serving the first pin keep its weights
    os.utime(pinned / "meta.json", ns=(10**18, 10**18))  # pinned first, then `again`
    os.utime(again / "meta.json", ns=(2 * 10**18, 2 * 10**18))
    shutil.rmtree(rewritten)  # pruned again: the folder's newest pin is served
    assert resolve_checkpoint(str(checkpoint)) == again.resolve() and load_scenario_ranker(again, "hp")[1].step == 9


def test_a_pin_an_app_build_chooses_during_a_prune_is_not_removed(tmp_path):
    """A prune lists the pins, asks the apps (seconds), then removes: a pin a build chose meanwhile (a rollback
    to it) is kept, the others go; the newest pin is the one a build chose last, and one chosen in the last 10
    minutes is kept too (another Serve instance's rollout may be starting on it)."""
    from mtfm.deployments.pins import removable, remove_pins, run_pins
    from mtfm.platform.checkpoint import pin_for_serving

    registry = load_registry(REPO / "configs")
    pins = [pin_for_serving(write_tiny_checkpoint(registry, tmp_path / "run" / f"checkpoint_0000000{step}", step=step))
            for step in (1, 2, 3)]
    now = time.time()
    for age, pin in zip((3000, 100, 50), pins):
        os.utime(pin, (now - age, now - age))
    listed = run_pins(tmp_path / "run")
    assert [p.folder for p in listed] == pins[::-1]
    in_use = {pins[2].resolve()}  # the newest one serves
    assert [p.folder for p in removable(listed, in_use, now)] == [pins[0]]  # pins[1]: chosen 100 s ago, kept
    doomed = removable(listed, in_use, now + 1000)
    assert [p.folder for p in doomed] == [pins[1], pins[0]]
    assert pin_for_serving(pins[0]) == pins[0]  # a rollback builds on the oldest
    assert [p.folder for p in remove_pins(doomed)] == [pins[1]]
    assert not pins[1].exists() and pins[0].is_dir()
    assert [p.folder for p in run_pins(tmp_path / "run")] == [pins[0], pins[2]]
