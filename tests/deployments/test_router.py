"""The router's answer for a scenario whose deployment failed: which deployments count as failed
(Serve's status), Serve's reason in one line, one controller call shared by concurrent askers,
and a rank request held by a handle answered 503 once its deployment is known to have failed.
Serve's handle is stood in for here; test_serve_http.py fails a real deployment over HTTP."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve.exceptions import DeploymentUnavailableError

from mtfm.deployments import router
from mtfm.deployments.rank_request import RequestError

TRACEBACK = ("The deployment failed to start 3 times in a row. This may be due to a problem. Error:\n"
             "\x1b[36mray::ServeReplica:app:ranker_sqs.initialize()\x1b[39m (pid=1)\n"
             '  File "replica.py", line 1, in initialize\n    raise RuntimeError(traceback.format_exc())\n'
             "RuntimeError: Traceback (most recent call last):\n  File \"backends.py\", line 86\n"
             "mtfm.deployments.backends.BackendUnavailable: scenario sqs: backend tensorrt needs the `tensorrt` package")


class _Status(str):
    """As Serve's DeploymentStatus: a str enum."""

    @property
    def value(self) -> str:
        return str(self)


def _overview(status: str, running: int, message: str = TRACEBACK):
    """As Serve's DeploymentStatusOverview."""
    return SimpleNamespace(status=_Status(status), replica_states={"RUNNING": running} if running else {},
                           message=message)


def test_a_deployment_counts_as_failed_only_with_no_replica_left_running():
    deployments = {"ranker_sqs": _overview("DEPLOY_FAILED", 0),
                   "ranker_hp": _overview("DEPLOY_FAILED", 2),  # a failed rolling update: the old replicas serve
                   "ranker_phf": _overview("UPDATING", 0, ""),
                   "ranker_new": _overview("DEPLOY_FAILED", 0, "")}
    assert router.failed_without_replicas(deployments) == {
        "ranker_sqs": "The deployment failed to start 3 times in a row: mtfm.deployments.backends.BackendUnavailable: "
                      "scenario sqs: backend tensorrt needs the `tensorrt` package",
        "ranker_new": "DEPLOY_FAILED"}
    assert router._condensed("one line, no traceback.") == "one line, no traceback."
    assert router._condensed("") == ""


def test_concurrent_askers_share_one_controller_call_per_ttl(monkeypatch):
    calls = []

    async def app_status():
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"ranker_sqs": _overview("DEPLOY_FAILED", 0, "broken")}

    monkeypatch.setattr(router, "_app_status", app_status)

    async def main():
        failures = router.FailedDeployments()
        answers = await asyncio.gather(*(failures.get() for _ in range(20)))
        again = await failures.get()  # within the TTL: no call
        return answers, again

    answers, again = asyncio.run(main())
    assert len(calls) == 1 and all(a == {"ranker_sqs": "broken"} for a in answers) and again == answers[0]

    async def unreachable():
        raise TimeoutError

    monkeypatch.setattr(router, "_app_status", unreachable)
    assert asyncio.run(router.FailedDeployments().get()) == {}  # no status: no claim of a failure


class _Response:
    """A handle's response that answers after `delay` s (never, for None), or raises `error`."""

    def __init__(self, delay: float | None, error: Exception | None = None):
        self.delay, self.error, self.cancelled = delay, error, False

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        if self.error is not None:
            raise self.error
        await asyncio.sleep(3600 if self.delay is None else self.delay)
        return {"scores": []}

    def cancel(self):
        self.cancelled = True


def _router(response: _Response, failed: dict[str, str]):
    handle = SimpleNamespace(deployment_name="ranker_sqs", rank=SimpleNamespace(remote=lambda request: response))

    class Failures:
        asked = 0

        async def get(self):
            Failures.asked += 1
            return failed

    return SimpleNamespace(rankers={"sqs": handle}, failures=Failures()), Failures


def test_a_held_request_is_answered_once_its_deployment_is_known_to_have_failed(monkeypatch):
    monkeypatch.setattr(router, "FAILURE_CHECK_EVERY_S", 0.02)
    rank = router.RankRouter.func_or_class._rank

    held = _Response(None)
    this, failures = _router(held, {"ranker_sqs": "the reason"})
    with pytest.raises(RequestError) as refused:
        asyncio.run(rank(this, "sqs", object()))
    assert (refused.value.status, refused.value.kind) == (503, "deployment_failed")
    assert refused.value.message.endswith("retrying will not help: the reason") and held.cancelled

    slow = _Response(0.1)  # slower than a check, its deployment fine: waited for, not cancelled
    this, failures = _router(slow, {})
    assert asyncio.run(rank(this, "sqs", object())) == {"scores": []}
    assert failures.asked >= 2 and not slow.cancelled

    unavailable = _Response(0, DeploymentUnavailableError(None))
    this, _ = _router(unavailable, {})  # not confirmed failed (deleted by a redeploy?): Serve's error, to retry
    with pytest.raises(DeploymentUnavailableError):
        asyncio.run(rank(this, "sqs", object()))
    this, _ = _router(_Response(0, DeploymentUnavailableError(None)), {"ranker_sqs": "the reason"})
    with pytest.raises(RequestError, match="retrying will not help: the reason"):
        asyncio.run(rank(this, "sqs", object()))
