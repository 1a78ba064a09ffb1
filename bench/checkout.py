"""`import mtfm` from a bare checkout, for bench scripts run on a machine where the project is not
installed (the GPU machine). Installed: nothing to do. Otherwise a link `mtfm` -> the repository root
goes first on sys.path and on PYTHONPATH, which subprocesses and the workers of a Ray cluster started
afterwards inherit: `mtfm` is then a namespace package whose subpackages are ./platform, ./model,
./kernels and ./deployments, as pyproject.toml maps them."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_mtfm_importable() -> None:
    if importlib.util.find_spec("mtfm") is not None:
        return
    link_dir = Path(tempfile.mkdtemp(prefix="mtfm-import-"))
    atexit.register(shutil.rmtree, link_dir, ignore_errors=True)  # removes the link, not the checkout
    (link_dir / "mtfm").symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))
