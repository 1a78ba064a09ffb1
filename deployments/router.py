"""The HTTP ingress of the app: answers the ranking API (http_api.py) for every scenario and
hands each validated request to that scenario's deployment, so a bad request costs a replica
nothing. A scenario whose deployment failed to deploy is answered with Serve's reason (503
`deployment_failed`, and in /healthz), which only a redeploy clears."""
from __future__ import annotations

import asyncio
import re

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
# How long an answer waits for the controller's status of the app's deployments, and how long a
# rank request waits before asking it whether its scenario's deployment failed.
STATUS_TIMEOUT_S = 2.0
FAILURE_CHECK_AFTER_S = 3.0


@serve.deployment
class RankRouter:
    def __init__(self, rankers: dict[str, DeploymentHandle], checkpoint: str, max_candidates: dict[str, int],
                 max_body_bytes: int):
        registry = Registry.from_dict(read_meta(checkpoint).registry)
        self.rankers = rankers
        self.endpoint = RankEndpoint({s: RankRequestParser(registry, s, max_candidates[s]) for s in rankers},
                                     max_body_bytes)

    async def __call__(self, http: Request) -> JSONResponse:
        return await self.endpoint.answer(http, self._rank, self._health)

    async def _rank(self, scenario: str, request: RankRequest) -> dict:
        handle = self.rankers[scenario]
        answer = asyncio.ensure_future(_awaited(handle.rank.remote(request)))
        try:
            # A handle new to a deployment that failed to deploy holds its first request until the
            # client gives up (later ones raise DeploymentUnavailableError): one slow to answer asks
            # the controller whether that is why.
            done, _ = await asyncio.wait({answer}, timeout=FAILURE_CHECK_AFTER_S)
            if not done and handle.deployment_name in (failed := await _failed_deployments()):
                raise _deployment_failed(scenario, failed[handle.deployment_name])
            return await answer
        except DeploymentUnavailableError:  # Serve's word for a deployment that failed to deploy
            reason = (await _failed_deployments()).get(handle.deployment_name, "see `serve status`")
            raise _deployment_failed(scenario, reason) from None
        finally:
            answer.cancel()  # a no-op once answered; else the request is not left running

    async def _health(self) -> dict:
        """Every scenario's info, or {"status": "unavailable", "error"} for one whose replica did
        not answer or whose deployment failed (Serve's reason, without waiting for a replica); the
        app is "ok" when all answered, "degraded" when some, else "unavailable"."""
        failed = await _failed_deployments()
        infos = dict(zip(self.rankers, await asyncio.gather(
            *(_info(h, failed.get(h.deployment_name)) for h in self.rankers.values()))))
        down = sum(info.get("status") == "unavailable" for info in infos.values())
        status = "ok" if not down else "unavailable" if down == len(infos) else "degraded"
        return {"status": status, "scenarios": infos}


async def _awaited(response):
    return await response


def _deployment_failed(scenario: str, reason: str) -> RequestError:
    return RequestError(503, "deployment_failed", "", f"scenario {scenario}: its deployment failed to deploy and "
                        f"serves again only once redeployed; retrying will not help: {reason}")


async def _failed_deployments() -> dict[str, str]:
    """{deployment name: Serve's message} for this app's deployments that failed to deploy; {}
    where the controller does not answer within STATUS_TIMEOUT_S."""
    try:
        app = serve.get_replica_context().app_name
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
        deployments = status.applications[app].deployments
    except Exception:  # noqa: BLE001 - a status is a nicety: the caller answers without it
        return {}
    return {name: _condensed(d.message) or d.status for name, d in deployments.items() if d.status == "DEPLOY_FAILED"}


def _condensed(message: str) -> str:
    """Serve's failure message in one line: its first sentence and, where it holds a traceback, the
    exception that ended it (the lines after the last indented one), without terminal colours."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", message).splitlines() if line.strip()]
    if not lines:
        return ""
    indented = [i for i, line in enumerate(lines) if line[:1].isspace()]
    if not indented or indented[-1] == len(lines) - 1:
        return " ".join(line.strip() for line in lines)
    return f"{lines[0].split('. ')[0].rstrip('.')}: {' '.join(lines[indented[-1] + 1:])}"


async def _info(handle: DeploymentHandle, failure: str | None = None) -> dict:
    if failure is not None:
        return {"status": "unavailable", "error": f"failed to deploy (redeploy once fixed): {failure}"}

    async def ask() -> dict:
        return await handle.info.remote()

    try:
        return await asyncio.wait_for(ask(), HEALTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        return {"status": "unavailable", "error": f"no replica answered within {HEALTH_TIMEOUT_S:g} s (starting, "
                                                  "restarting or failed: see `serve status`)"}
    except Exception as exc:  # the deployment failed, or its replica died while answering
        said = str(exc).splitlines()[0] if str(exc) else ""
        return {"status": "unavailable", "error": f"{type(exc).__name__}: {said}" if said else type(exc).__name__}
