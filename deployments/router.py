"""The HTTP ingress: routes `POST /<scenario>/rank` to that scenario's deployment.

    POST /<scenario>/rank   a request (rank_request.py) -> {"scenario", "model_version",
                            "tasks", "scores": [{task: probability} per candidate], "batch"}
    GET  /healthz           every scenario's model version, backend, device and serving knobs

Requests are validated here, against the checkpoint's registry snapshot (the features the
model was trained with), so a bad request costs a replica nothing. Every refusal is a 4xx JSON
body {"error": {"kind", "field", "message"}}; a scenario replica that dies mid-request gives
a 503 the client may retry (Serve starts a new replica).
"""
from __future__ import annotations

import json
import time

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtfm.platform.checkpoint import read_meta
from mtfm.platform.registry import Registry

from .metrics import RouterMetrics
from .rank_request import RankRequestParser, RequestError

# Tag used for requests whose path names no registered scenario (bounded metric cardinality).
NO_SCENARIO = "-"


@serve.deployment
class RankRouter:
    def __init__(self, rankers: dict[str, DeploymentHandle], checkpoint: str, max_candidates: dict[str, int],
                 max_body_bytes: int):
        registry = Registry.from_dict(read_meta(checkpoint).registry)
        self.rankers = rankers
        self.parsers = {s: RankRequestParser(registry, s, max_candidates[s]) for s in rankers}
        self.max_body_bytes = max_body_bytes
        self.metrics = RouterMetrics()

    async def __call__(self, http: Request) -> JSONResponse:
        start = time.perf_counter()
        scenario = NO_SCENARIO
        try:
            parts = [p for p in http.url.path.split("/") if p]
            if parts == ["healthz"] and http.method == "GET":
                return JSONResponse(await self._health())
            if len(parts) != 2 or parts[1] != "rank":
                raise RequestError(404, "not_found", "path", f"no route {http.url.path!r}; expected POST /<scenario>/rank "
                                   f"with scenario one of {', '.join(self.rankers)}, or GET /healthz")
            if parts[0] not in self.rankers:
                raise RequestError(404, "unknown_scenario", "path", f"unknown scenario {parts[0]!r}; "
                                   f"served: {', '.join(self.rankers)}")
            scenario = parts[0]
            if http.method != "POST":
                raise RequestError(405, "method_not_allowed", "method", f"expected POST, found {http.method}")
            body = await self._json_body(http)
            request = self.parsers[scenario].parse(body, now_ms=int(time.time() * 1000))
            self.metrics.candidates.observe(request.num_candidates, tags={"scenario": scenario})
            result = await self.rankers[scenario].rank.remote(request)
            response = JSONResponse(result)
        except RequestError as exc:
            self.metrics.error(scenario, exc.kind)
            response = JSONResponse(exc.to_json(), status_code=exc.status)
        except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                RequestCancelledError) as exc:
            self.metrics.error(scenario, "replica_unavailable")
            response = JSONResponse(RequestError(503, "replica_unavailable", "", f"scenario {scenario}: no replica "
                                                 f"could answer ({type(exc).__name__}); retry").to_json(), 503)
        except Exception as exc:  # a scoring failure must answer, not hang the client
            self.metrics.error(scenario, "internal")
            response = JSONResponse(RequestError(500, "internal", "", f"scenario {scenario}: scoring failed: "
                                                 f"{type(exc).__name__}: {exc}").to_json(), 500)
        self.metrics.request(scenario, response.status_code, (time.perf_counter() - start) * 1000)
        return response

    async def _json_body(self, http: Request):
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(int(declared), self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(size, self.max_body_bytes)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, "invalid_json", "body", f"not valid JSON: {exc}") from exc

    async def _health(self) -> dict:
        infos = {s: await handle.info.remote() for s, handle in self.rankers.items()}
        return {"status": "ok", "scenarios": infos}


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, "body_too_large", "body", f"{size} bytes or more; expected at most {limit} bytes")
