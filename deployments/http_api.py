"""The ranking HTTP API, answered by the router or by a scenario replica that takes HTTP itself.

    POST /<scenario>/rank   a request (rank_request.py) -> {"scenario", "model_version",
                            "tasks", "scores": [{task: probability} per candidate], "batch"}
    POST /rank              the same, where the app serves one scenario (`scenario_ingress`,
                            whose app's route prefix is then /<scenario>: the same URL)
    GET  /healthz           every served scenario's model version, checkpoint, backend, device and knobs; 503
                            when no scenario answers (HEAD: the status alone)

Paths are below the application's route prefix. A scored response carries a `Server-Timing`
header (`server_timing`): where its time went on the server, in ms.

Requests are validated against the checkpoint's registry snapshot (the features the model was
trained with) before any scoring. Every refusal is a 4xx JSON body {"error": {"kind", "field",
"message"}}; a scenario replica that dies mid-request gives a 503 `replica_unavailable` the client
may retry (Serve starts a new replica), and one whose deployment failed to deploy a 503
`deployment_failed` (router.py) that only a redeploy clears; a scoring failure gives a 500. A rank
request whose client disconnects before its answer, or that Serve's request timeout cancels, is
counted in the metrics as error kind `cancelled` (latency status 4xx).

Bodies are decoded and responses encoded with orjson: decoding and checking a request of 1000
events takes 0.76-0.84x the time it took with the standard library's json (bench/RESULTS.md,
"Runs 12-14"). A body orjson refuses is read again by the standard library, which accepts NaN,
Infinity and numbers beyond float's range, so that such a value gets the parser's 422 naming its
field, not a 400 for the whole body (orjson itself reads an integer beyond 64 bits as a float,
which the parser refuses where an integer is expected).
"""
from __future__ import annotations

import asyncio
import codecs
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ray.exceptions import RayActorError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .metrics import RequestMetrics
from .rank_request import RankRequest, RankRequestParser, RequestError

# Tag used for requests whose path names no served scenario (bounded metric cardinality).
NO_SCENARIO = "-"
# The status a request whose client went away before its answer (or that Serve's request timeout
# cancelled) is counted under, nginx's "client closed request": latency's 4xx class, error kind
# `cancelled`. Nothing reaches the client.
CLIENT_CLOSED_REQUEST = 499

Rank = Callable[[str, RankRequest], Awaitable[dict]]


class MethodNotAllowed(RequestError):
    """A 405; `allowed` is its Allow header."""

    def __init__(self, allowed: str, found: str):
        super().__init__(405, "method_not_allowed", "method", f"expected {allowed}, found {found}")
        self.allowed = allowed


class FastJSONResponse(JSONResponse):
    """A JSON response encoded by orjson: compact JSON like Starlette's, faster; numbers may be
    spelled differently (1e-05 as 0.00001), and NaN is written as null (the scenario refuses to
    answer with a score that is not finite)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RankEndpoint:
    """Answers one HTTP request of the API: `rank(scenario, request)` scores a validated request,
    `health()` gives /healthz's {"status": "ok" | "degraded" | "unavailable", "scenarios"}. `bare_rank`: also POST /rank, for the app
    of one scenario."""

    def __init__(self, parsers: dict[str, RankRequestParser], max_body_bytes: int, *, bare_rank: bool = False):
        if bare_rank and len(parsers) != 1:
            raise ValueError(f"bare_rank: POST /rank needs exactly one scenario, found {list(parsers)}")
        self.parsers, self.max_body_bytes, self.bare_rank = parsers, max_body_bytes, bare_rank
        self.metrics = RequestMetrics()

    async def answer(self, http: Request, rank: Rank, health: Callable[[], Awaitable[dict]]) -> JSONResponse:
        start = time.perf_counter()
        scenario = NO_SCENARIO
        served = ", ".join(self.parsers)
        try:
            parts = [p for p in _path_in_app(http).split("/") if p]
            if parts == ["healthz"]:
                if http.method not in ("GET", "HEAD"):
                    raise MethodNotAllowed("GET, HEAD", http.method)
                report = await health()
                status = 503 if report["status"] == "unavailable" else 200
                if http.method == "HEAD":  # a load balancer's probe: the status alone
                    return Response(status_code=status, headers={"content-type": "application/json"})
                return FastJSONResponse(report, status_code=status)
            if parts == ["rank"] and self.bare_rank:
                parts = [*self.parsers, "rank"]
            if len(parts) != 2 or parts[1] != "rank":
                prefix = http.scope.get("root_path", "").rstrip("/")
                routes = (f"POST {prefix}/rank" if self.bare_rank
                          else f"POST {prefix}/<scenario>/rank with scenario one of {served}")
                raise RequestError(404, "not_found", "path", f"no route {http.url.path!r}; expected {routes}, or "
                                   f"GET {prefix}/healthz")
            if parts[0] not in self.parsers:
                raise RequestError(404, "unknown_scenario", "path", f"unknown scenario {parts[0]!r}; served: {served}")
            scenario = parts[0]
            if http.method != "POST":
                raise MethodNotAllowed("POST", http.method)
            body = await self._json_body(http)
            request = self.parsers[scenario].parse(body, now_ms=int(time.time() * 1000))
            parsed = time.perf_counter()
            self.metrics.accepted(scenario, request.num_candidates)
            result = await rank(scenario, request)
            response = FastJSONResponse(result)
            response.headers["server-timing"] = server_timing(parsed - start, result.get("batch"),
                                                              time.perf_counter() - start)
        except asyncio.CancelledError:  # Serve cancelled this handler: the client went away, or a request timeout
            if scenario != NO_SCENARIO:  # a rank request, not a health probe
                self.metrics.error(scenario, "cancelled")
                self.metrics.request(scenario, CLIENT_CLOSED_REQUEST, (time.perf_counter() - start) * 1000)
            raise
        except ClientDisconnect:  # the client went away while its body was being read
            self.metrics.error(scenario, "cancelled")
            response = Response(status_code=CLIENT_CLOSED_REQUEST)
        except RequestError as exc:
            self.metrics.error(scenario, exc.kind)
            response = FastJSONResponse(exc.to_json(), status_code=exc.status)
            if isinstance(exc, MethodNotAllowed):
                response.headers["allow"] = exc.allowed
        except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                RequestCancelledError) as exc:
            self.metrics.error(scenario, "replica_unavailable")
            response = FastJSONResponse(RequestError(503, "replica_unavailable", "", f"scenario {scenario}: no replica "
                                                 f"could answer ({type(exc).__name__}); retry").to_json(), 503)
        except Exception as exc:  # a scoring failure must answer, not hang the client
            self.metrics.error(scenario, "internal")
            response = FastJSONResponse(RequestError(500, "internal", "", f"scenario {scenario}: scoring failed: "
                                                 f"{type(exc).__name__}: {exc}").to_json(), 500)
        self.metrics.request(scenario, response.status_code, (time.perf_counter() - start) * 1000)
        return response

    async def _json_body(self, http: Request):
        encoding = http.headers.get("content-encoding", "").strip()
        if encoding and encoding.lower() != "identity":
            raise RequestError(415, "unsupported_encoding", "body",
                               f"Content-Encoding {encoding[:40]} is not accepted; send the JSON body uncompressed")
        limit = self.max_body_bytes
        length = http.headers.get("content-length", "")
        declared = int(length) if length.isascii() and length.isdigit() else 0
        if declared > limit + DRAIN_BYTES:  # more than is worth reading: refused at once
            raise _too_large(declared, limit)
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if max(size, declared) <= limit:
                chunks.append(chunk)
            elif size > limit + DRAIN_BYTES:
                break
        if max(size, declared) > limit:
            raise _too_large(max(size, declared), limit)
        body = b"".join(chunks)
        if not body or body.isspace():
            raise RequestError(400, "invalid_json", "body", "empty body; expected a JSON object (a rank request)")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        bom = len(codecs.BOM_UTF8) if body.startswith(codecs.BOM_UTF8) else 0
        try:
            text = body[bom:].decode("utf-8")  # json.loads(bytes) would guess UTF-16 or UTF-32 from the first bytes
        except UnicodeDecodeError as exc:
            at = bom + exc.start
            raise RequestError(400, "invalid_json", "body", f"not UTF-8 JSON (byte 0x{body[at]:02x} at offset {at}); "
                               "expected a JSON object encoded in UTF-8") from exc
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(400, "invalid_json", "body", f"not valid JSON: {exc}") from exc
        except ValueError as exc:  # Python's limit on the digits of an integer it converts
            raise RequestError(400, "invalid_json", "body", "a number with more digits than any field takes (over "
                               f"{sys.get_int_max_str_digits()}); expected numbers of at most 64 bits") from exc
        except RecursionError as exc:
            raise RequestError(400, "invalid_json", "body", "not valid JSON: nested too deeply") from exc


def server_timing(parse_s: float, batch: dict | None, total_s: float) -> str:
    """The Server-Timing header of a scored request, in ms: `parse` (reading, decoding and checking
    the body), `queue` and `score` (in the replica, from the response's `batch`: before its batch
    started, and the batch's scoring) and `total` (from this handler's start to the response, in
    this process). What a client measures beyond `total` is the transport: the HTTP server, Serve
    and the network."""
    parts = [("parse", parse_s * 1000)]
    if isinstance(batch, dict):
        parts += [("queue", batch.get("queued_ms")), ("score", batch.get("score_ms"))]
    parts.append(("total", total_s * 1000))
    # Never an error: a part that is not a number is left out (the request was scored).
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in parts
                     if isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms))


def _path_in_app(http: Request) -> str:
    """The request path below the application's route prefix (Serve's `root_path`)."""
    path, prefix = http.url.path, http.scope.get("root_path", "").rstrip("/")
    return path[len(prefix):] if prefix and path.startswith(prefix + "/") else path


# A body over the limit is still read, and thrown away, up to this many bytes past the limit
# before the 413 goes out: a client that sends its whole body before it reads the answer (Python's
# urllib) otherwise finds the connection reset under it instead of the 413.
DRAIN_BYTES = 64 * 1024 * 1024


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, "body_too_large", "body", f"{size} bytes or more; expected at most {limit} bytes")
