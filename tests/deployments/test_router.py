"""The router's answer for a scenario with no replica running: which deployments count as down
(Serve's status: failed to deploy, or unhealthy as its replicas fail to start), Serve's reason in
one line, one controller call shared by concurrent askers, and a rank request held by a handle
answered 503 once its deployment is known to be down. Serve's handle is stood in for here;
test_serve_http.py fails a real deployment over HTTP."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

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


def _overview(status: str, running: int, message: str = TRACEBACK, trigger: str = "REPLICA_STARTUP_FAILED"):
    """As Serve's DeploymentStatusOverview."""
    return SimpleNamespace(status=_Status(status), replica_states={"RUNNING": running} if running else {},
                           message=message, status_trigger=_Status(trigger))


def _app(status: str, deployments: dict, message: str = ""):
    """As Serve's ApplicationStatusOverview."""
    return SimpleNamespace(status=_Status(status), message=message, deployments=deployments)


def test_a_failed_update_of_a_serving_app_is_told_apart_from_a_deployment_down():
    """A new config whose build was refused: Serve marks the app DEPLOY_FAILED while its earlier version serves."""
    serving = {"ranker_hp": _overview("HEALTHY", 1, "")}
    refused = _app("DEPLOY_FAILED", serving, "Deploying the app failed.\n  File x\nServeConfigError: no checkpoint")
    assert router.status_snapshot(refused) == router.StatusSnapshot({}, "Deploying the app failed: ServeConfigError: "
                                                                        "no checkpoint", {"ranker_hp": 1})
    assert router.status_snapshot(_app("RUNNING", serving)) == router.StatusSnapshot(running={"ranker_hp": 1})
    refused = _app("DEPLOY_FAILED", serving, "Deploying app 'mtfm' failed with exception:\n  File x\nCheckpointError: y")
    assert router.status_snapshot(refused).update_failed == ("Deploying app 'mtfm' failed with exception: "
                                                             "CheckpointError: y")
    down = _app("DEPLOY_FAILED", {"ranker_sqs": _overview("DEPLOY_FAILED", 0, "broken")}, "broken")
    assert router.status_snapshot(down) == router.StatusSnapshot({"ranker_sqs": router.Down(True, "broken")})


def test_a_deployment_counts_as_down_only_with_no_replica_left_running():
    reason = ("The deployment failed to start 3 times in a row: mtfm.deployments.backends.BackendUnavailable: "
              "scenario sqs: backend tensorrt needs the `tensorrt` package")
    deployments = {"ranker_sqs": _overview("DEPLOY_FAILED", 0),
                   "ranker_hp": _overview("DEPLOY_FAILED", 2),  # a failed rolling update: the old replicas serve
                   "ranker_phf": _overview("UPDATING", 0, ""),
                   "ranker_new": _overview("DEPLOY_FAILED", 0, ""),
                   # served, then its replicas failed to start (a pinned checkpoint moved away): Serve retries
                   "ranker_restarting": _overview("UNHEALTHY", 0),
                   "ranker_flaky": _overview("UNHEALTHY", 1),
                   "ranker_probe": _overview("UNHEALTHY", 0, "", trigger="HEALTH_CHECK_FAILED")}
    assert router.deployments_down(deployments) == {
        "ranker_sqs": router.Down(True, reason), "ranker_new": router.Down(True, "DEPLOY_FAILED"),
        "ranker_restarting": router.Down(False, reason)}
    assert router.Down(False, "why").error("sqs").to_json()["error"] == {
        "kind": "replica_unavailable", "field": "",
        "message": "scenario sqs: no replica running, as its replicas fail to start (Serve keeps starting new ones; "
                   "retry later): why"}
    assert router._condensed("one line, no traceback.") == "one line, no traceback."
    assert router._condensed("") == ""


def test_concurrent_askers_share_one_controller_call_per_ttl(monkeypatch):
    calls = []

    async def app_status():
        calls.append(1)
        await asyncio.sleep(0.05)
        return _app("DEPLOY_FAILED", {"ranker_sqs": _overview("DEPLOY_FAILED", 0, "broken")})

    monkeypatch.setattr(router, "_app_status", app_status)

    async def main():
        status = router.AppStatus()
        answers = await asyncio.gather(*(status.get() for _ in range(20)))
        again = await status.get()  # within the TTL: no call
        return answers, again

    answers, again = asyncio.run(main())
    assert len(calls) == 1 and all(a == router.StatusSnapshot({"ranker_sqs": router.Down(True, "broken")})
                                   for a in answers)
    assert again == answers[0]

    async def unreachable():
        raise TimeoutError

    monkeypatch.setattr(router, "_app_status", unreachable)
    assert asyncio.run(router.AppStatus().get()) == router.StatusSnapshot()  # no status: no claim of a failure


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


def test_replicas_failing_to_start_count_as_down_after_a_grace(monkeypatch):
    """Serve keeps its count of failed starts: a replica replaced after a crash may be reported so while it
    starts. Such a deployment counts as down once it has had no replica for RESTART_GRACE_S; a failed one at once."""
    monkeypatch.setattr(router, "STATUS_TTL_S", 0.0)
    monkeypatch.setattr(router, "RESTART_GRACE_S", 0.2)
    deployments = {"ranker_sqs": _overview("UNHEALTHY", 0, "slow"), "ranker_phf": _overview("DEPLOY_FAILED", 0, "no")}

    async def app_status():
        return _app("UNHEALTHY", deployments)

    monkeypatch.setattr(router, "_app_status", app_status)

    async def main():
        status = router.AppStatus()
        first = await status.get()
        await asyncio.sleep(0.3)
        later = await status.get()
        deployments["ranker_sqs"] = _overview("HEALTHY", 1, "")  # started: forgotten, the grace starts anew
        await status.get()
        deployments["ranker_sqs"] = _overview("UNHEALTHY", 0, "slow")
        return first, later, await status.get()

    first, later, again = asyncio.run(main())
    assert first.down == again.down == {"ranker_phf": router.Down(True, "no")}
    assert later.down == {"ranker_phf": router.Down(True, "no"), "ranker_sqs": router.Down(False, "slow")}


def _router(response: _Response, down: dict[str, router.Down], update_failed: str | None = None,
            running: dict[str, int] | None = None):
    handle = SimpleNamespace(deployment_name="ranker_sqs", rank=SimpleNamespace(remote=lambda request: response))

    class Status:
        asked = 0

        async def get(self):
            Status.asked += 1
            return router.StatusSnapshot(down, update_failed, running or {})

    return SimpleNamespace(rankers={"sqs": handle}, status=Status()), Status


def test_a_held_request_is_answered_once_its_deployment_is_known_to_be_down(monkeypatch):
    monkeypatch.setattr(router, "FAILURE_CHECK_EVERY_S", 0.02)
    rank = router.RankRouter.func_or_class._rank

    held = _Response(None)
    this, _ = _router(held, {"ranker_sqs": router.Down(True, "the reason")})
    with pytest.raises(RequestError) as refused:
        asyncio.run(rank(this, "sqs", object()))
    assert (refused.value.status, refused.value.kind) == (503, "deployment_failed")
    assert refused.value.message.endswith("retrying will not help: the reason") and held.cancelled

    held = _Response(None)  # its replicas fail to start: Serve retries, and so may the client
    this, _ = _router(held, {"ranker_sqs": router.Down(False, "the reason")})
    with pytest.raises(RequestError) as refused:
        asyncio.run(rank(this, "sqs", object()))
    assert (refused.value.status, refused.value.kind) == (503, "replica_unavailable")
    assert refused.value.message.endswith("retry later): the reason") and held.cancelled

    slow = _Response(0.1)  # slower than a check, its deployment fine: waited for, not cancelled
    this, down = _router(slow, {})
    assert asyncio.run(rank(this, "sqs", object())) == {"scores": []}
    assert down.asked >= 2 and not slow.cancelled

    unavailable = _Response(0, DeploymentUnavailableError(None))
    this, _ = _router(unavailable, {})  # not confirmed failed (deleted by a redeploy?): Serve's error, to retry
    with pytest.raises(DeploymentUnavailableError):
        asyncio.run(rank(this, "sqs", object()))
    this, _ = _router(_Response(0, DeploymentUnavailableError(None)), {"ranker_sqs": router.Down(True, "the reason")})
    with pytest.raises(RequestError, match="retrying will not help: the reason"):
        asyncio.run(rank(this, "sqs", object()))


def test_health_names_each_scenario_down_and_the_apps_status():
    """All down: "unavailable"; some: "degraded"; none: "ok" (the replicas' info stood in for); a failed update
    is named while the earlier version serves."""
    health = router.RankRouter.func_or_class._health

    def handle(name: str):
        async def info():
            return {"model_version": name}
        return SimpleNamespace(deployment_name=f"ranker_{name}", info=SimpleNamespace(remote=info))

    def app(down: dict, update_failed: str | None = None):
        this, _ = _router(_Response(0), down, update_failed)
        this.rankers = {"hp": handle("hp"), "sqs": handle("sqs")}
        return this

    assert asyncio.run(health(app({}))) == {"status": "ok", "scenarios": {"hp": {"model_version": "hp"},
                                                                          "sqs": {"model_version": "sqs"}}}
    some = asyncio.run(health(app({"ranker_sqs": router.Down(False, "why")})))
    assert some == {"status": "degraded", "scenarios": {"hp": {"model_version": "hp"}, "sqs": {
        "status": "unavailable", "error": "no replica running: its replicas fail to start (Serve keeps starting new "
                                         "ones): why"}}}
    every = asyncio.run(health(app({"ranker_hp": router.Down(True, "why"), "ranker_sqs": router.Down(False, "why")})))
    assert every["status"] == "unavailable"
    assert every["scenarios"]["hp"] == {"status": "unavailable", "error": "failed to deploy (redeploy once fixed): why"}
    refused = asyncio.run(health(app({}, "Deploying the app failed: ServeConfigError: no checkpoint")))
    assert refused == {"status": "ok", "scenarios": {"hp": {"model_version": "hp"}, "sqs": {"model_version": "sqs"}},
                       "update_failed": "Deploying the app failed: ServeConfigError: no checkpoint"}


def test_health_tells_a_busy_scenario_from_one_with_no_replica_answering(monkeypatch):
    """A scenario whose replicas' slots are all taken by rank requests answers /healthz's question only after them:
    with a replica Serve reports running it is "busy", still serving, and the app "ok"; with none, "unavailable"."""
    monkeypatch.setattr(router, "HEALTH_TIMEOUT_S", 0.05)
    health = router.RankRouter.func_or_class._health

    def handle(name: str, seconds: float):
        async def info():
            await asyncio.sleep(seconds)
            return {"model_version": name}
        return SimpleNamespace(deployment_name=f"ranker_{name}", info=SimpleNamespace(remote=info))

    def app(running: dict[str, int]):
        this, _ = _router(_Response(0), {}, running=running)
        this.rankers = {"hp": handle("hp", 0), "sqs": handle("sqs", 1.0)}
        return this

    busy = asyncio.run(health(app({"ranker_hp": 1, "ranker_sqs": 2})))
    assert busy["status"] == "ok" and busy["scenarios"]["hp"] == {"model_version": "hp"}
    assert busy["scenarios"]["sqs"]["status"] == "busy"
    assert "Serve reports 2 running: every one at its max_ongoing_requests" in busy["scenarios"]["sqs"]["note"]
    starting = asyncio.run(health(app({"ranker_hp": 1})))
    assert starting["status"] == "degraded" and starting["scenarios"]["sqs"] == {
        "status": "unavailable", "error": "no replica answered within 0.05 s (starting, restarting or failed: see "
                                          "`serve status`)"}


def test_a_request_whose_client_goes_away_leaves_no_unretrieved_error_to_log():
    """Serve cancels the router's handler when the client goes away; the handle's response then raises
    RequestCancelledError, which must not reach asyncio's "Task exception was never retrieved" log (a traceback
    per disconnected client)."""
    import gc

    rank = router.RankRouter.func_or_class._rank

    class Cancelling(_Response):  # as Serve's handle: its cancellation is raised as RequestCancelledError
        async def _wait(self):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RequestCancelledError("the-request") from None

    logged = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context["message"]))
        response = Cancelling(None)
        this, _ = _router(response, {})
        handler = asyncio.ensure_future(rank(this, "sqs", object()))
        await asyncio.sleep(0.05)
        handler.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.sleep(0.05)
        del handler
        gc.collect()
        return response.cancelled

    assert asyncio.run(main())
    gc.collect()
    assert logged == []
