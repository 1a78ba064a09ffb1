"""The HTTP ingress of the app: answers the ranking API (http_api.py) for every scenario and
hands each validated request to that scenario's deployment, so a bad request costs a replica
nothing. A scenario with no replica running is answered with Serve's reason (a 503, and in
/healthz): `deployment_failed` where its deployment failed to deploy, which only a redeploy clears;
`replica_unavailable` where its replicas fail to start after it served, which Serve keeps retrying
(a request would otherwise wait for a replica that may never come)."""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time

from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtfm.platform.checkpoint import read_meta
from mtfm.platform.registry import Registry

from .http_api import RankEndpoint
from .rank_request import RankRequest, RankRequestParser, RequestError

# How long /healthz waits for a scenario's replica: one that is (re)starting, or whose deployment
# failed, is reported unavailable rather than holding the probe until Serve gives up on it.
HEALTH_TIMEOUT_S = 5.0
# The controller's status of the app's deployments: how long a fetch may take, how long one is
# reused, and how often a rank request still unanswered asks whether its deployment failed.
STATUS_TIMEOUT_S = 2.0
STATUS_TTL_S = 2.0
FAILURE_CHECK_EVERY_S = 3.0
# A deployment whose replicas fail to start counts as down only after this long with none running: Serve keeps
# an earlier count of failed starts, so a replica replaced after a crash may show so for the seconds it starts.
RESTART_GRACE_S = 10.0


@serve.deployment
class RankRouter:
    def __init__(self, rankers: dict[str, DeploymentHandle], checkpoint: str, max_candidates: dict[str, int],
                 max_body_bytes: int):
        registry = Registry.from_dict(read_meta(checkpoint).registry)
        self.rankers = rankers
        self.endpoint = RankEndpoint({s: RankRequestParser(registry, s, max_candidates[s]) for s in rankers},
                                     max_body_bytes)
        self.status = AppStatus()

    async def __call__(self, http: Request) -> JSONResponse:
        return await self.endpoint.answer(http, self._rank, self._health)

    async def _rank(self, scenario: str, request: RankRequest) -> dict:
        handle = self.rankers[scenario]
        response = handle.rank.remote(request)
        answer = asyncio.ensure_future(_awaited(response))
        try:
            # A request that reached the handle before its deployment failed, or while its replicas fail
            # to start, waits for a replica that may never come (Serve fails only requests made later to
            # a failed deployment, DeploymentUnavailableError): one still unanswered asks every few
            # seconds whether that is why.
            while True:
                done, _ = await asyncio.wait({answer}, timeout=FAILURE_CHECK_EVERY_S)
                if done:
                    return answer.result()
                down = (await self.status.get()).down.get(handle.deployment_name)
                if down is not None:
                    raise down.error(scenario)
        except DeploymentUnavailableError:  # failed to deploy, or deleted by a redeploy: the controller says which
            down = (await self.status.get()).down.get(handle.deployment_name)
            if down is None:
                raise  # answered as a replica unavailable: retry
            raise down.error(scenario) from None
        finally:
            if not answer.done():  # refused, or the client went away: the replica need not score it
                response.cancel()
                answer.cancel()
            # The handle turns its cancellation into RequestCancelledError, and an answer may fail while the status
            # is asked: retrieved here, else asyncio logs "Task exception was never retrieved" with a traceback
            answer.add_done_callback(_retrieved)

    async def _health(self) -> dict:
        """Every scenario's info, or {"status": "unavailable", "error"} for one whose replica did
        not answer, or that has no replica running (`Down`: Serve's reason, at once); the app is
        "ok" when all answered, "degraded" when some, else "unavailable". `update_failed`: Serve's
        reason, where the app's last deploy failed and this, its earlier version, serves on."""
        known = await self.status.get()
        infos = dict(zip(self.rankers, await asyncio.gather(
            *(_info(h, known.down.get(h.deployment_name), known.running.get(h.deployment_name, 0))
              for h in self.rankers.values()))))
        down = sum(info.get("status") == "unavailable" for info in infos.values())
        status = "ok" if not down else "unavailable" if down == len(infos) else "degraded"
        return {"status": status, "scenarios": infos} | (
            {"update_failed": known.update_failed} if known.update_failed else {})


@dataclasses.dataclass(frozen=True)
class Down:
    """A deployment with no replica running, and Serve's reason: `failed` (DEPLOY_FAILED: only a
    redeploy clears it), else its replicas fail to start after it served (UNHEALTHY): Serve goes
    on starting new ones, which may yet come up (a file put back, a node back)."""

    failed: bool
    reason: str

    def error(self, scenario: str) -> RequestError:
        if self.failed:
            return RequestError(503, "deployment_failed", "", f"scenario {scenario}: its deployment failed to deploy "
                                f"and serves again only once redeployed; retrying will not help: {self.reason}")
        return RequestError(503, "replica_unavailable", "", f"scenario {scenario}: no replica running, as its replicas "
                            f"fail to start (Serve keeps starting new ones; retry later): {self.reason}")

    def health(self) -> str:
        if self.failed:
            return f"failed to deploy (redeploy once fixed): {self.reason}"
        return f"no replica running: its replicas fail to start (Serve keeps starting new ones): {self.reason}"


@dataclasses.dataclass(frozen=True)
class StatusSnapshot:
    """What Serve's controller said of this app: its deployments with no replica running (`Down`), and
    Serve's reason where the app's last deploy failed while an earlier version of it still serves; `running`:
    each deployment's replicas in state RUNNING."""

    down: dict[str, Down] = dataclasses.field(default_factory=dict)
    update_failed: str | None = None
    running: dict[str, int] = dataclasses.field(default_factory=dict)


class AppStatus:
    """This app's `StatusSnapshot`s (after a failed rolling update Serve keeps routing to the old replicas
    that still run: those serve). One controller call per STATUS_TTL_S at most, shared by concurrent
    callers; an empty snapshot where the controller does not answer within STATUS_TIMEOUT_S."""

    def __init__(self):
        self._value = StatusSnapshot()
        self._fetched = -float("inf")
        self._pending: asyncio.Future | None = None
        self._restarting_since: dict[str, float] = {}  # deployment -> when first seen failing to start

    async def get(self) -> StatusSnapshot:
        if time.monotonic() - self._fetched < STATUS_TTL_S:
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(self._pending)

    async def _fetch(self) -> StatusSnapshot:
        try:
            snapshot = status_snapshot(await _app_status())
            now = time.monotonic()
            self._restarting_since = {name: self._restarting_since.get(name, now)
                                      for name, down in snapshot.down.items() if not down.failed}
            self._value = dataclasses.replace(snapshot, down={
                name: down for name, down in snapshot.down.items()
                if down.failed or now - self._restarting_since[name] >= RESTART_GRACE_S})
        except Exception:  # noqa: BLE001 - a status is a nicety: callers answer without it
            self._value = StatusSnapshot()
        finally:
            self._fetched, self._pending = time.monotonic(), None
        return self._value


async def _app_status():
    """Serve's status of this app (an ApplicationStatusOverview: status, message, deployments)."""
    app = serve.get_replica_context().app_name
    status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
    return status.applications[app]


def status_snapshot(app) -> StatusSnapshot:
    """The snapshot of Serve's `ApplicationStatusOverview` of this app: a failed deploy with every deployment
    still running is a failed update (its build refused, say), which the deployments' states do not show."""
    down = deployments_down(app.deployments)
    failed = app.status == "DEPLOY_FAILED" and not down
    running = {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}
    return StatusSnapshot(down, (_condensed(app.message) or app.status.value) if failed else None,
                          {name: n for name, n in running.items() if n})


def deployments_down(deployments: dict) -> dict[str, Down]:
    """{name: Down} of the deployments (Serve's `DeploymentStatusOverview`s) with no replica running
    that failed to deploy, or that are unhealthy because their replicas fail to start."""
    down = {}
    for name, d in deployments.items():
        if d.replica_states.get("RUNNING", 0):
            continue
        if d.status == "DEPLOY_FAILED":
            down[name] = Down(True, _condensed(d.message) or d.status.value)
        elif d.status == "UNHEALTHY" and getattr(d, "status_trigger", None) == "REPLICA_STARTUP_FAILED":
            down[name] = Down(False, _condensed(d.message) or d.status.value)
    return down


async def _awaited(response):
    return await response


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _condensed(message: str) -> str:
    """Serve's failure message in one line: its first sentence and, where it holds a traceback, the
    exception that ended it (the lines after the last indented one), without terminal colours."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", message).splitlines() if line.strip()]
    if not lines:
        return ""
    indented = [i for i, line in enumerate(lines) if line[:1].isspace()]
    if not indented or indented[-1] == len(lines) - 1:
        return " ".join(line.strip() for line in lines)
    return f"{lines[0].split('. ')[0].rstrip('.:')}: {' '.join(lines[indented[-1] + 1:])}"


async def _info(handle: DeploymentHandle, down: Down | None = None, running: int = 0) -> dict:
    """The scenario's info from one of its replicas; `down`: Serve's reason it has none running; `running`: its
    replicas Serve reports RUNNING, which tells a replica that is busy from one that is (re)starting."""
    if down is not None:
        return {"status": "unavailable", "error": down.health()}

    async def ask() -> dict:
        return await handle.info.remote()

    try:
        return await asyncio.wait_for(ask(), HEALTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        if running:  # it serves: its replicas' slots (max_ongoing_requests) are taken by rank requests, queued ahead
            return {"status": "busy", "note": f"no replica answered within {HEALTH_TIMEOUT_S:g} s, while Serve reports "
                                              f"{running} running: every one at its max_ongoing_requests, requests "
                                              "queue (or a replica hangs: Serve's health check replaces it)"}
        return {"status": "unavailable", "error": f"no replica answered within {HEALTH_TIMEOUT_S:g} s (starting, "
                                                  "restarting or failed: see `serve status`)"}
    except Exception as exc:  # the deployment failed, or its replica died while answering
        said = str(exc).splitlines()[0] if str(exc) else ""
        return {"status": "unavailable", "error": f"{type(exc).__name__}: {said}" if said else type(exc).__name__}
