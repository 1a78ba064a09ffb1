"""Which apps of a Serve instance `mtfm serve pins --url` asks for the pins they load: over real HTTP, a stand-in
for Serve's proxy (its /-/routes and each app's /healthz), no Ray needed."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mtfm.deployments.pins import checkpoints_served

MTFM_REPORT = {"status": "ok", "scenarios": {"hp": {"model_version": "run/checkpoint_1@step1",
                                                    "checkpoint": "/runs/run/.serving/k/checkpoint_1"}}}


def _proxy(answers: dict[str, tuple[int, bytes]]):
    """A local HTTP server answering each path of `answers` with (status, body), else 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            status, body = answers.get(self.path, (404, b"Path not found."))
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def proxy():
    servers = []

    def start(answers):
        servers.append(_proxy(answers))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_app_with_a_healthz_of_its_own_is_skipped_not_refused(proxy):
    routes = {"/": "mtfm", "/other": "other", "/static": "static"}
    url = proxy({"/-/routes": (200, json.dumps(routes).encode()), "/healthz": (200, json.dumps(MTFM_REPORT).encode()),
                 "/other/healthz": (200, b'{"status": "ok"}')})
    others: list[str] = []
    assert checkpoints_served(url, others) == {"mtfm": {"hp": "/runs/run/.serving/k/checkpoint_1"}}
    assert len(others) == 1 and others[0].startswith("other (its ") and "HTTP 200" in others[0]


def test_an_app_that_may_be_a_failing_mtfm_app_is_still_refused(proxy):
    """A 503 in plain text (an app deploying, or its ingress down) may be an mtfm app whose pins are in use."""
    routes = {"/": "mtfm", "/other": "other"}
    url = proxy({"/-/routes": (200, json.dumps(routes).encode()), "/healthz": (200, json.dumps(MTFM_REPORT).encode()),
                 "/other/healthz": (503, b"Service Unavailable")})
    with pytest.raises(ValueError, match="app other answered HTTP 503"):
        checkpoints_served(url)
    down = {"status": "unavailable", "scenarios": {"hp": {"status": "unavailable", "error": "why"}}}
    url = proxy({"/-/routes": (200, b'{"/": "mtfm"}'), "/healthz": (503, json.dumps(down).encode())})
    assert checkpoints_served(url) == {"mtfm": {"hp": None}}  # reported: --prune then removes nothing
