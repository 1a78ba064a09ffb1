"""The pins of a run (RUN/.serving/<key>/<checkpoint>, `pin_for_serving`): which of them live apps load, and
pruning the rest (`mtfm serve pins`).

A pin is never removed by training or serving, so that a replica restarted later still finds the weights its app
was built with. Once the run has pruned the original checkpoint, a pin holds the only copy of its files, and pins
of past rollouts pile up. Only the apps know which pins they load: each replica reports its pin in /healthz, so a
prune asks every app serving from the run and removes nothing unless each of their scenarios answered.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mtfm.platform.checkpoint import META_FILE, SERVING_PINS, read_meta

HEALTH_TIMEOUT_S = 15.0  # an app's /healthz waits up to 5 s for each scenario's replica


@dataclass(frozen=True)
class Pin:
    folder: Path        # RUN/.serving/<key>/<checkpoint>
    step: int
    pinned_at: float    # the folder's mtime: when the app build made it
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
    return sorted(pins, key=lambda p: p.pinned_at, reverse=True)


def checkpoints_served(app_url: str) -> dict[str, str | None]:
    """{scenario: the checkpoint folder its replica loads} from an app's /healthz (`app_url` is the app's base,
    route prefix included, e.g. http://127.0.0.1:8000 or http://127.0.0.1:8000/hp); None for a scenario whose
    replica did not answer."""
    url = app_url.rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 while a scenario is down: the body still lists the others
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"{url}: no answer ({getattr(exc, 'reason', exc)}); is the app running there?") from exc
    try:
        scenarios = json.loads(body)["scenarios"]
        return {name: info.get("checkpoint") for name, info in scenarios.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{url}: not an mtfm app's /healthz (found {body[:120]!r})") from exc


def prune_pins(pins: list[Pin], in_use: set[Path]) -> list[Pin]:
    """Removes the pins not in `in_use` (resolved folders); returns those removed."""
    removed = [pin for pin in pins if pin.folder.resolve() not in in_use]
    for pin in removed:
        shutil.rmtree(pin.folder)
        if not any(pin.folder.parent.iterdir()):
            pin.folder.parent.rmdir()
    return removed
