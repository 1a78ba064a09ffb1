"""One driver per output folder: a second `mtfm train` of a run still training is refused, and so is a
second `mtfm data aggregate` into an --out another one writes.

Two training drivers on one folder would each run a Ray Train of their own there: each prunes
checkpoints the other is about to restore, and both append to its metrics. Two aggregations would
write their users' samples into one shuffle and one samples folder. A driver takes `FOLDER/.driver.json`
(host, pid, start time, a token of its own) by creating it exclusively, before Ray starts, keeps it
fresh every HEARTBEAT_S while it runs, and removes it at the end if it is still its own. Another
driver finding it refuses, unless it is stale: not touched for STALE_S, or, after 2 x HEARTBEAT_S,
written by a pid that is gone on this host (a pid alone is not trusted: a container may share the
host name but not its pids). A stale file is replaced under an exclusive lock of `.driver.lock`, so
that of two drivers finding it at once only one takes the run.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

DRIVER_FILE = ".driver.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


_DEFAULT_CLASH = "two drivers would prune each other's checkpoints"


class DriverLock:
    """`with DriverLock(run_dir):` holds `run_dir` for this driver, or raises ValueError naming the
    live driver that holds it. Folders it had to create are removed again if left empty. `driver`
    says what holds the folder in the refusal, `clash` what two of them would do."""

    def __init__(self, run_dir: Path, driver: str = "training driver", clash: str | None = None):
        self.run_dir = run_dir
        self.driver, self.clash = driver, clash or _DEFAULT_CLASH
        self.path = run_dir / DRIVER_FILE
        self.token = uuid.uuid4().hex
        self._created: list[Path] = []  # the folders __enter__ made, deepest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mtfm-driver-heartbeat", daemon=True)

    def __enter__(self) -> DriverLock:
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            created = self._create()
        except OSError as exc:  # a read-only or foreign folder: said in one line, not a traceback
            self._undo_dir()
            raise ValueError(f"{self.run_dir}: cannot write {DRIVER_FILE} there ({exc.strerror or exc})") from exc
        if not created:
            try:
                self._take_over()
            except ValueError:
                self._undo_dir()
                raise
            except OSError as exc:  # a file system without flock, say
                self._undo_dir()
                raise ValueError(f"{self.run_dir}: cannot take over {DRIVER_FILE} there ({exc.strerror or exc})") \
                    from exc
        self._thread.start()
        return self

    def _take_over(self) -> None:
        """Takes a dead driver's file, or raises naming the live one. Under an exclusive lock of a
        side file, so that of two drivers finding the same stale file only one replaces it."""
        import fcntl

        with open(self.run_dir / ".driver.lock", "a") as side:
            fcntl.flock(side, fcntl.LOCK_EX)
            holder, age, exists = _read(self.path)
            if exists and not _stale(holder, age):
                raise ValueError(f"{self.run_dir}: {_who(holder, age, self.driver)}; {_clash(holder, self)}")
            self.path.unlink(missing_ok=True)
            if not self._create():  # another driver created it between our read and now
                raise ValueError(f"{self.run_dir}: another {self.driver} started on it just now")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        holder, _, _ = _read(self.path)
        if holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._undo_dir()

    def _create(self) -> bool:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "token": self.token, "driver": self.driver, "clash": self.clash}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record))
        self._record = record
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # removed under us: written again, as ours
                try:
                    self.path.write_text(json.dumps(self._record))
                except OSError:
                    pass
            except OSError:  # a passing network file system error: try again next beat
                pass

    def _undo_dir(self) -> None:
        for folder in self._created:  # each only if nothing was written into it
            try:
                folder.rmdir()
            except OSError:
                return


def _read(path: Path) -> tuple[dict, float, bool]:
    """The driver file's record ({} while it is being written, or unreadable), its age in seconds,
    and whether it exists."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return {}, 0.0, False
    try:
        holder = json.loads(path.read_text())
    except (ValueError, OSError):
        holder = {}
    return holder if isinstance(holder, dict) else {}, age, True


def live_holder(folder: Path) -> dict | None:
    """The record of the live driver holding `folder`, or None (no driver file, or a stale one)."""
    holder, age, exists = _read(folder / DRIVER_FILE)
    return holder if exists and not _stale(holder, age) else None


def refuse_a_folder_a_live_driver_holds(folder: Path) -> None:
    """The refusal `DriverLock(folder)` would give, up front: a resume of a run still training is
    refused as such, not for what the run has not written yet (its first checkpoint)."""
    holder, age, exists = _read(folder / DRIVER_FILE)
    if exists and not _stale(holder, age):
        raise ValueError(f"{folder}: {_who(holder, age, 'training driver')}; {holder.get('clash') or _DEFAULT_CLASH}")


def _clash(holder: dict, me: DriverLock) -> str:
    """What two drivers on one folder would do: the holder's words where it wrote them."""
    return str(holder.get("clash") or me.clash)


def _who(holder: dict, age: float, what: str) -> str:
    """Who holds the folder (the kind of driver the holder wrote, else `what`), and what to do, for a refusal."""
    what = str(holder.get("driver") or what)
    driver = f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        wait = max(2 * HEARTBEAT_S - age, 0.0)
        return (f"the {what} that held it ({driver}) exited without releasing {DRIVER_FILE} (killed?); "
                f"it is released {2 * HEARTBEAT_S:.0f} s after that driver's last heartbeat: retry in {wait:.0f} s")
    wait = max(STALE_S - age, 0.0)
    article = "an" if what[0] in "aeiou" else "a"
    return (f"{article} {what} still runs it ({driver}; last heartbeat {age:.0f} s ago): stop it first (Ctrl-C, or "
            f"`ray job stop` of its job), or wait for it; if that driver died, {DRIVER_FILE} is released once "
            f"{STALE_S:.0f} s old (in {wait:.0f} s)")


def _stale(holder: dict, age: float) -> bool:
    if age > STALE_S:
        return True
    gone = holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))
    return gone and age > 2 * HEARTBEAT_S


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
