"""One training driver per run folder: a second `mtfm train --resume` of a run still training is refused.

Two drivers on one folder would each run a Ray Train of their own there: each prunes checkpoints the
other is about to restore, and both append to its metrics. The driver writes `RUN_DIR/.driver.json`
(host, pid, start time) and touches it every HEARTBEAT_S while it trains; another driver finding it
fresh refuses before Ray starts. A file left by a driver that died is stale: its pid is gone (same
host), or it has not been touched for STALE_S (another host, or `ray job submit` on the head node).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

DRIVER_FILE = ".driver.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


def refuse_a_run_being_trained(run_dir: Path) -> None:
    """Raises ValueError naming the live driver of `run_dir`, if one holds it."""
    path = run_dir / DRIVER_FILE
    try:
        holder = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, ValueError, OSError):
        return
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return
    if age > STALE_S:
        return
    raise ValueError(f"{run_dir}: a training driver still runs it (host {holder.get('host')}, pid {holder.get('pid')}, "
                     f"started {holder.get('started')}, alive {age:.0f} s ago): stop it first (Ctrl-C, or `ray job "
                     f"stop` of its job), or wait for it; two drivers would prune each other's checkpoints. A "
                     f"driver that died leaves {DRIVER_FILE} behind, ignored after {STALE_S:.0f} s")


class DriverLock:
    """Held while this driver trains `run_dir`: writes the driver file and keeps it fresh."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / DRIVER_FILE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mtfm-driver-heartbeat", daemon=True)

    def __enter__(self) -> DriverLock:
        self.path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the folder was removed under us: nothing left to guard
                return


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
