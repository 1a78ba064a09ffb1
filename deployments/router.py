"""The HTTP ingress of the app: answers the ranking API (http_api.py) for every scenario and
hands each validated request to that scenario's deployment, so a bad request costs a replica
nothing."""
from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtfm.platform.checkpoint import read_meta
from mtfm.platform.registry import Registry

from .http_api import RankEndpoint
from .rank_request import RankRequest, RankRequestParser


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
        infos = {s: await handle.info.remote() for s, handle in self.rankers.items()}
        return {"status": "ok", "scenarios": infos}
