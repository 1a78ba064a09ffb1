"""The pins of a run (RUN/.serving/<key>/<checkpoint>, `pin_for_serving`): which of them live apps load, and
pruning the rest (`mtfm serve pins`).

A pin is never removed by training or serving, so that a replica restarted later still finds the weights its app
was built with. Once the run has pruned the original checkpoint, a pin holds the only copy of its files, and pins
of past rollouts pile up. Only the apps know which pins they load: each replica reports its pin in /healthz. A
prune asks every app of a Serve instance (its proxy's /-/routes), removes nothing unless every scenario of every
mtfm app answered, and keeps the pins newer than every pin an app loads and those an app build chose in the last
10 minutes: a rollout may be starting on them. A pin's time is when an app build last chose it (`pin_for_serving`
sets it again on a rollback to an older pin), and a pin chosen again while a prune asked the apps is not removed.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mtfm.platform.checkpoint import META_FILE, SERVING_PINS, read_meta

# How long one GET (/-/routes, an app's /healthz) may take: an app's /healthz waits for its scenarios' replicas
# (router.HEALTH_TIMEOUT_S, 5 s) and for Serve's status (router.STATUS_TIMEOUT_S), in parallel; this leaves room.
PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Pin:
    folder: Path        # RUN/.serving/<key>/<checkpoint>
    step: int
    chosen_at: float    # the folder's mtime: when an app build last chose it
    unshared_bytes: int  # of its files no other link holds (the run pruned the original): what removing it frees


def run_pins(run_dir: str | Path) -> list[Pin]:
    """Every pin under RUN/.serving, newest first."""
    root = Path(run_dir) / SERVING_PINS
    pins = []
    for folder in root.glob("*/*") if root.is_dir() else ():
        if not (folder / META_FILE).is_file():
            continue  # a build's staging folder, or one it left behind
        files = [f.stat() for f in folder.iterdir() if f.is_file()]
        pins.append(Pin(folder, read_meta(folder).step, folder.stat().st_mtime,
                        sum(s.st_size for s in files if s.st_nlink == 1)))
    return sorted(pins, key=lambda p: p.chosen_at, reverse=True)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:  # a 503 /healthz still lists the scenarios that answered
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"{url}: no answer ({getattr(exc, 'reason', exc)}); is Serve's HTTP proxy there?") from exc


def checkpoints_served(serve_url: str, not_mtfm: list[str] | None = None) -> dict[str, dict[str, str | None]]:
    """{app name: {scenario: the checkpoint folder its replica loads, None where it did not answer}} for every
    mtfm app of the Serve instance whose HTTP proxy is at `serve_url` (its /-/routes lists the apps). An app that
    has no /healthz (404) is not one; nor is one whose /healthz answers a JSON object without `scenarios` (2xx: up,
    and not an mtfm app, whose report always names them), named in `not_mtfm` where given. One that answers anything
    else (a 503 in plain text: failed or deploying?) is refused, as it may be an mtfm app."""
    parts = urllib.parse.urlsplit(serve_url if "://" in serve_url else f"http://{serve_url}")
    base = f"{parts.scheme}://{parts.netloc}"
    status, body = _get(f"{base}/-/routes")
    try:
        routes = json.loads(body)
    except ValueError:
        routes = None
    if status != 200 or not isinstance(routes, dict):
        raise ValueError(f"{base}/-/routes: not Serve's route table (HTTP {status}: {body[:120]!r})")
    served = {}
    for prefix, app in routes.items():
        url = f"{base}{prefix.rstrip('/')}/healthz"
        status, body = _get(url)
        if status == 404:
            continue  # another kind of app
        try:
            report = json.loads(body)
        except ValueError:
            report = None
        scenarios = report.get("scenarios") if isinstance(report, dict) else None
        if isinstance(scenarios, dict) and all(isinstance(info, dict) for info in scenarios.values()):
            served[app] = {name: info.get("checkpoint") for name, info in scenarios.items()}
        elif 200 <= status < 300 and isinstance(report, dict) and "scenarios" not in report:
            # An app that answers its own /healthz (an mtfm app's always names its scenarios, even when they are
            # down): another kind of app, not one to ask
            if not_mtfm is not None:
                not_mtfm.append(f"{app} (its {url} answered HTTP {status} naming no scenarios)")
        else:
            raise ValueError(f"{url}: app {app} answered HTTP {status} {body[:120]!r}, not an mtfm app's report "
                             "(failed or deploying?)")
    return served


RECENT_S = 600.0  # a pin an app build chose this recently may be what its replicas are starting on


def removable(pins: list[Pin], in_use: set[Path], now: float) -> list[Pin]:
    """The pins no app loads that are older than the newest pin one does and were not chosen by an app build in the
    last RECENT_S: a rollout may be starting replicas on those (one on another Serve instance, say, while an app
    here was rebuilt on the pin it loads)."""
    loaded = [pin.chosen_at for pin in pins if pin.folder.resolve() in in_use]
    return [pin for pin in pins if loaded and pin.folder.resolve() not in in_use and pin.chosen_at < max(loaded)
            and now - pin.chosen_at > RECENT_S]


def remove_pins(pins: list[Pin]) -> list[Pin]:
    """Removes `pins`, but not one an app build chose since it was listed (a rollback to it); returns those removed."""
    removed = []
    for pin in pins:
        try:
            if pin.folder.stat().st_mtime != pin.chosen_at:
                continue
        except FileNotFoundError:  # removed meanwhile (another prune)
            continue
        shutil.rmtree(pin.folder)
        if not any(pin.folder.parent.iterdir()):
            pin.folder.parent.rmdir()
        removed.append(pin)
    return removed
