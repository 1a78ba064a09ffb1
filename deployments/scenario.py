"""The per-scenario deployment: one scenario's subgraph, scoring batched requests.

It is called by the router (`rank`, a validated request), or, as the ingress of an app of its
own (`build_app` with `scenario_ingress`), takes the HTTP API itself (http_api.py), which saves
the router's hop.

Each replica loads only the scenario's subgraph of the checkpoint (`load_scenario_ranker`) and
scores with the scenario's configured backend. Concurrent requests are merged by a `BatchQueue`
(batch_queue.py: those that arrive while a batch scores form the next one) into one jagged
batch, bounded in tokens (`max_batch_tokens`) and in requests (`max_batch_requests`): a request
costs max(its tokens capped at max_batch_tokens, max_batch_tokens / max_batch_requests), so a full
batch of costs never holds more of either (a request larger than max_batch_tokens scores alone).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtfm.model import ScenarioRanker
from mtfm.platform.checkpoint import (CheckpointError, CheckpointMeta, find_checkpoint, is_pinned, load_weights,
                                      read_meta, trained_model_config, trained_registry)
from mtfm.platform.registry import ServingConfig

from .backends import create_backend
from .batch_queue import BatchQueue
from .http_api import RankEndpoint
from .metrics import BatchMetrics
from .rank_request import RankRequest, RankRequestParser
from .user_cache import UserSideCache

# Serve replaces a replica whose health check fails; a few internal errors in a row (not
# refused requests: those never reach a replica) mean its model or device is broken.
UNHEALTHY_AFTER_FAILED_BATCHES = 3


@dataclass(frozen=True)
class QueuedRequest:
    """A request waiting in the batch queue, with its cost in the token budget and when it came."""

    request: RankRequest
    cost: int
    arrived: float


@dataclass(frozen=True)
class ScoredRequest:
    scores: np.ndarray
    batch_requests: int
    batch_tokens: int
    queued_ms: float
    score_ms: float


def model_version(checkpoint: str | Path, step: int) -> str:
    """`<run>/<checkpoint>@step<N>`: names the weights a response was scored with (a checkpoint
    pinned for serving, RUN/.serving/<key>/<checkpoint>, by its run's name)."""
    path = Path(checkpoint)
    run = path.parents[2] if is_pinned(path) else path.parent
    return f"{run.name}/{path.name}@step{step}"


def load_scenario_ranker(checkpoint: str | Path, scenario: str) -> tuple[ScenarioRanker, CheckpointMeta]:
    """Only `scenario`'s subgraph of a checkpoint: the model rebuilt from the checkpoint's own
    registry and config, restricted to the scenario, with just its weights read (memory-mapped,
    so the other scenarios' tensors are never paged in)."""
    folder = find_checkpoint(checkpoint)
    meta = read_meta(folder)
    config = trained_model_config(folder, meta)
    if config.architecture != "mtfm":
        raise CheckpointError(f"{folder}: a {config.architecture} model has no scenario subgraph to serve; "
                              "expected an mtfm checkpoint")
    if config.scenarios is not None and scenario not in config.scenarios:  # build_app refuses this before
        raise CheckpointError(f"{folder}: the model was trained on scenarios {list(config.scenarios)} only (its model "
                              f"config's `scenarios`), not {scenario}")
    ranker = ScenarioRanker(config, trained_registry(meta, str(folder)), scenario)
    load_weights(ranker, folder, mmap=True, subgraph=True)
    return ranker.eval(), meta


@serve.deployment
class ScenarioDeployment:
    def __init__(self, scenario: str, checkpoint: str, serving: dict, chunk_size: int, user_cache_ttl_s: float,
                 user_cache_mb: int, http_max_body_bytes: int | None = None):
        """`http_max_body_bytes`: set when this deployment is its app's HTTP ingress."""
        self.scenario = scenario
        self.serving = ServingConfig(**serving)
        use_gpu = self.serving.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        ranker, meta = load_scenario_ranker(checkpoint, scenario)
        self.tasks = list(ranker.task_names)
        self.version = model_version(checkpoint, meta.step)
        self.checkpoint = str(Path(checkpoint).resolve())  # its pin: `mtfm serve pins` keeps what apps report
        threads = max(1, round(self.serving.num_cpus))
        cache = UserSideCache(user_cache_ttl_s, user_cache_mb * 2**20) if user_cache_ttl_s > 0 else None
        self.backend = create_backend(self.serving.backend, ranker, device=self.device, chunk_size=chunk_size,
                                      threads=threads, user_cache=cache, cuda_graphs=self.serving.cuda_graphs)
        self.metrics = BatchMetrics(scenario)
        self.user_cache = getattr(self.backend, "user_cache", None)  # the backends that keep one (torch)
        self.cache_counts = (0, 0)  # its hits and misses when the last batch's were recorded
        self.slot_tokens = math.ceil(self.serving.max_batch_tokens / self.serving.max_batch_requests)
        self.failed_batches = 0
        self.queue = BatchQueue(self.score_batch, max_cost=self.serving.max_batch_tokens,
                                wait_s=self.serving.batch_wait_timeout_s)
        self.endpoint = None
        if http_max_body_bytes is not None:
            parser = RankRequestParser(ranker.registry, scenario, self.serving.max_candidates)
            self.endpoint = RankEndpoint({scenario: parser}, http_max_body_bytes, bare_rank=True)

    async def __call__(self, http: Request) -> JSONResponse:
        """The HTTP API for this scenario, when this deployment is its app's ingress."""
        if self.endpoint is None:
            raise RuntimeError(f"ranker_{self.scenario} was deployed behind a router; it takes no HTTP itself")
        return await self.endpoint.answer(http, lambda _, request: self.rank(request), self._health)

    async def _health(self) -> dict:
        return {"status": "ok", "scenarios": {self.scenario: self.info()}}

    async def rank(self, request: RankRequest) -> dict:
        """Scores one validated request: {"scenario", "model_version", "tasks", "scores": one
        {task: probability} per candidate, "batch": {"requests", "tokens"} it was scored in, and
        "queued_ms" (in this replica before its batch started: the batch wait and earlier batches)
        and "score_ms" (the batch's scoring)}."""
        cost = max(min(request.num_tokens, self.serving.max_batch_tokens), self.slot_tokens)
        scored = await self.queue.submit(QueuedRequest(request, cost, time.perf_counter()), cost)
        if not np.isfinite(scored.scores).all():
            raise RuntimeError(f"scenario {self.scenario}: the model gave scores that are not finite")
        return {
            "scenario": self.scenario,
            "model_version": self.version,
            "tasks": self.tasks,
            "scores": [dict(zip(self.tasks, row)) for row in scored.scores.tolist()],
            "batch": {"requests": scored.batch_requests, "tokens": scored.batch_tokens,
                      "queued_ms": round(scored.queued_ms, 3), "score_ms": round(scored.score_ms, 3)},
        }

    def score_batch(self, queued: list[QueuedRequest]) -> list[ScoredRequest]:
        """Runs in the queue's worker thread: the event loop keeps queueing the next batch."""
        requests = [q.request for q in queued]
        tokens = sum(r.num_tokens for r in requests)
        start = time.perf_counter()
        try:
            scores = self.backend.score(requests)
        except Exception:
            self.failed_batches += 1
            raise
        finally:  # a failed batch's lookups count too
            self._record_user_cache()
        self.failed_batches = 0
        score_ms = (time.perf_counter() - start) * 1000
        self.metrics.batch(len(requests), tokens, score_ms)
        return [ScoredRequest(s, len(requests), tokens, (start - q.arrived) * 1000, score_ms)
                for s, q in zip(scores, queued)]

    def _record_user_cache(self) -> None:
        """The cache's lookups since the last batch's, and its size now, into the metrics."""
        if self.user_cache is not None:
            hits, misses = self.user_cache.hits, self.user_cache.misses
            self.metrics.user_cache(hits - self.cache_counts[0], misses - self.cache_counts[1], self.user_cache.bytes)
            self.cache_counts = (hits, misses)

    def info(self) -> dict:
        """What /healthz reports for this scenario: the checkpoint folder it loaded (a pin), device (where it
        scores, "cuda" or "cpu") and cuda_graphs as in effect; serving as configured (its cuda_graphs applies on a
        GPU only); the user-side cache's entries (expired ones until they are dropped), bytes, hits and misses since
        the replica started (null without one)."""
        cache = self.user_cache
        return {"model_version": self.version, "checkpoint": self.checkpoint, "backend": self.backend.name,
                "device": self.device.type, "cuda_graphs": self.backend.cuda_graphs,
                "serving": dataclasses.asdict(self.serving),
                "user_cache": None if cache is None else {"users": len(cache.entries), "bytes": cache.bytes,
                                                          "hits": cache.hits, "misses": cache.misses}}

    def check_health(self) -> None:
        if self.failed_batches >= UNHEALTHY_AFTER_FAILED_BATCHES:
            raise RuntimeError(f"scenario {self.scenario}: the last {self.failed_batches} batches failed")
