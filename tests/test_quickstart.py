"""The README's first command: `mtfm quickstart` runs the main job end to end on its own embedded Ray."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from repo_paths import REPO_ROOT
from mtfm.platform.cluster import HARMLESS_ON_THE_EMBEDDED_RAY, HARMLESS_WORKER_LINES


def _process_at(port: int) -> str:
    """The process whose TCP connection has this local port: the one that asked."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return f"pid {conn.pid}: {' '.join(psutil.Process(conn.pid).cmdline())[:300]}"
            except psutil.Error:
                return f"pid {conn.pid}"
    return "an unknown process"


@pytest.fixture()
def another_rays_dashboard():
    """A stand-in for another Ray's dashboard on this machine, at Ray's default port 8265: its State
    API knows none of the embedded Ray's actors. Yields the requests it was sent, each with the process
    that sent it. (If the port is taken, something else is there already: the run meets that instead,
    with a warning that nothing is recorded.)"""
    asked: list[str] = []

    class NoSuchActor(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(f"{self.path} from {_process_at(self.client_address[1])}")
            body = json.dumps({"result": True, "msg": "", "data": {"result": {"result": [], "total": 0}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", 8265), NoSuchActor)
    except OSError as exc:
        warnings.warn(f"port 8265 is taken ({exc}): the run meets what is there, and no request is recorded")
        yield asked
        return
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, another_rays_dashboard):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "mtfm.platform.cli", "quickstart", "--users", "240", "--days", "3",
           "--max-steps", "10", "--out", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-6000:]
    # Another Ray's dashboard was not asked about this run's actors (Ray Train's placement-group cleaner
    # once took its "no such actor" for a dead controller and removed the run's workers).
    assert another_rays_dashboard == [], another_rays_dashboard[:3]
    assert "placement group" not in done.stdout
    # Training's output is its own: Ray Train's narrating and Ray Data's INFO lines, Ray Data's deprecation
    # warning and its interrupted reader thread (max_steps stops mid-epoch) stay out.
    training = done.stdout.split("[3/3] Ray Train", 1)[1]
    for noise in ("Wrapping provided model", "Execution plan of Dataset", "Progress bars disabled",
                  "exclude_resources", "InterruptedError", "Checkpoint successfully", "Started training worker group"):
        assert noise not in training, noise
    # Nor the lines of Ray's processes that ask nothing of the user (Ray Train's PreemptionWatcher, DDP's
    # unused-parameters notice, the raylet's worker count).
    for parts in HARMLESS_WORKER_LINES + HARMLESS_ON_THE_EMBEDDED_RAY:
        assert parts[-1] not in done.stdout, parts
    summary = json.loads((tmp_path / "data" / "agg" / "_summary.json").read_text())
    assert summary["exposures_in"] == summary["exposures_out"] > 0 and summary["quarantined_rows"] == 0
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["checkpoint"] == "checkpoint_00000010"
    assert "hp/click" in evaluation["eval"] and "hp/click" in done.stdout
    # rank 0's progress (log_every 10) reaches the terminal, out of the steps and epochs to run
    assert re.search(r"\[mtfm\] step     10/10  epoch \d/\d  loss \d", done.stdout), done.stdout[-3000:]
    assert "Failed to query Ray Train Controller" not in done.stdout  # Ray Train's cleaner, quieted
    assert "mtfm eval --checkpoint" in done.stdout and "mtfm report" in done.stdout  # what to do next
    # the next steps it prints work as printed
    evaluated = subprocess.run([sys.executable, "-m", "mtfm.platform.cli", "eval", "--checkpoint", str(tmp_path / "run"),
                                "--data", str(tmp_path / "data" / "agg"), "--json", str(tmp_path / "eval.json")],
                               cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test windows starting 2026-01-03 00:00 UTC" in evaluated.stdout and "hp/click" in evaluated.stdout
    # Without --data: the data the run trained on, with the same figures.
    again = subprocess.run([sys.executable, "-m", "mtfm.platform.cli", "eval", "--checkpoint", str(tmp_path / "run"),
                            "--json", str(tmp_path / "eval_again.json")], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (json.loads((tmp_path / "eval_again.json").read_text())["eval"] ==
            json.loads((tmp_path / "eval.json").read_text())["eval"])
    reported = subprocess.run([sys.executable, "-m", "mtfm.platform.cli", "report", str(tmp_path / "run")],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == ["attention.png", "eval.png", "loss.png"]


def test_quickstart_refuses_as_many_days_as_it_holds_out(tmp_path):
    cmd = [sys.executable, "-m", "mtfm.platform.cli", "quickstart", "--days", "1", "--out", str(tmp_path / "data")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "holds out the last 1 day(s) for evaluation" in done.stderr
    assert not (tmp_path / "data").exists()


def test_quickstart_refuses_workers_this_machine_cannot_hold_before_the_data_steps(tmp_path):
    """As train would, but before a minute of synthesis and aggregation (e.g. configs/train/gpu.yaml
    on a machine without a GPU): here 64 workers of half a CPU each."""
    config = tmp_path / "wide.yaml"
    config.write_text((REPO_ROOT / "configs/train/tiny.yaml").read_text().replace("num_workers: 2", "num_workers: 64"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "mtfm.platform.cli", "quickstart", "--train-config", str(config), "--out",
           str(tmp_path / "data")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "num_workers: 64 worker(s) of 0.5 CPU each" in done.stderr and "room for" in done.stderr, done.stderr
    assert "lower them (a --train-config of fewer workers;" in done.stderr and "--num-workers" not in done.stderr
    assert "[1/3]" not in done.stdout and not (tmp_path / "data" / "raw").exists()


def test_quickstart_refuses_a_folder_it_did_not_write(tmp_path):
    """It replaces raw/ and agg/ in --out: another dataset's folder (here MovieLens-like) is refused, untouched."""
    data = tmp_path / "ml"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "ratings.parquet").write_bytes(b"theirs")
    cmd = [sys.executable, "-m", "mtfm.platform.cli", "quickstart", "--out", str(data)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == (f"error: --out {data}: holds files that `mtfm quickstart` did not write (raw), and it "
                           "replaces raw/ and agg/ in its folder; pass a new or empty folder (or remove that one)\n")
    assert (data / "raw" / "ratings.parquet").read_bytes() == b"theirs"


def test_quickstart_takes_its_default_folder_as_an_earlier_version_left_it(tmp_path, monkeypatch):
    """data/quickstart holding raw/ and agg/ without the mark (written before it) is still its own;
    the mark makes any other --out folder its own too. Stopped at the first data step here."""
    from mtfm.platform.cli import main

    def reached(*args, **kwargs):
        raise RuntimeError("synthesize reached")

    monkeypatch.setattr("mtfm.platform.synth.synthesize", reached)
    monkeypatch.chdir(tmp_path)
    config = ["--config-dir", str(REPO_ROOT / "configs"), "--train-config", str(REPO_ROOT / "configs/train/tiny.yaml")]
    for folder in ("data/quickstart/raw", "data/quickstart/agg", "mine/raw"):
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="synthesize reached"):
        main(["quickstart", *config])
    assert (tmp_path / "data/quickstart/.mtfm-quickstart").is_file()
    assert main(["quickstart", *config, "--out", "mine"]) == 1  # not its own: no mark
    (tmp_path / "mine/.mtfm-quickstart").write_text("")
    with pytest.raises(RuntimeError, match="synthesize reached"):
        main(["quickstart", *config, "--out", "mine"])
