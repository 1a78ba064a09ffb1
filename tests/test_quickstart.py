"""The README's first command: `mtfm quickstart` runs the main job end to end on its own embedded Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repo_paths import REPO_ROOT


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "mtfm.platform.cli", "quickstart", "--users", "120", "--days", "3",
           "--max-steps", "6", "--out", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "data" / "agg" / "_summary.json").read_text())
    assert summary["exposures_in"] == summary["exposures_out"] > 0 and summary["quarantined_rows"] == 0
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["checkpoint"] == "checkpoint_00000006"
    assert "hp/click" in evaluation["eval"] and "hp/click" in done.stdout
    assert "mtfm eval --checkpoint" in done.stdout  # it tells the user what to do next
