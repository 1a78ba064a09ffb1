"""Files as runs write and record them: a file written whole (a reader, a `serve run` or another worker,
never meets half of it), and the paths a run records for a later command (`recorded_path`)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Replaces `path` with `text` at once (a reader never meets half a file), keeping its mode, or for
    a new file the mode the umask gives."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as fh:
        try:
            fh.write(text)
        except BaseException:
            os.unlink(fh.name)
            raise
    try:
        os.chmod(fh.name, mode)
        os.replace(fh.name, path)
    except BaseException:
        os.unlink(fh.name)
        raise


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def recorded_path(path: Path) -> str:
    """An absolute `path` as a run records it for a later command: as it is, so that a resume from another folder
    finds it; but inside the copy of the working directory that Ray makes for a job (`ray job submit --working-dir
    .`: a folder `_ray_pkg_<hash>`, deleted with the job), relative to that copy, which the next job's copy resolves."""
    cwd = Path.cwd().resolve()
    if "_ray_pkg_" in cwd.name and path.resolve().is_relative_to(cwd):
        return str(path.resolve().relative_to(cwd))
    return str(path)
