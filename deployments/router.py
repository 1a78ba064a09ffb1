"""The HTTP ingress of the app: answers the ranking API (http_api.py) for every scenario and
hands each validated request to that scenario's deployment, so a bad request costs a replica
nothing."""
from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtfm.platform.checkpoint import read_meta
from mtfm.platform.registry import Registry

from .http_api import RankEndpoint
from .rank_request import RankRequest, RankRequestParser

# How long /healthz waits for a scenario's replica: one that is (re)starting, or whose deployment
# failed, is reported unavailable rather than holding the probe until Serve gives up on it.
HEALTH_TIMEOUT_S = 5.0


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
        return await self.rankers[scenario].rank.remote(request)

    async def _health(self) -> dict:
        """Every scenario's info, or {"status": "unavailable", "error"} for one whose replica did
        not answer; the app is "ok" when all answered, "degraded" when some, else "unavailable"."""
        infos = dict(zip(self.rankers, await asyncio.gather(*(_info(h) for h in self.rankers.values()))))
        down = sum(info.get("status") == "unavailable" for info in infos.values())
        status = "ok" if not down else "unavailable" if down == len(infos) else "degraded"
        return {"status": status, "scenarios": infos}


async def _info(handle: DeploymentHandle) -> dict:
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
