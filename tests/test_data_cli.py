"""The `mtfm data` subcommands: help, and synth -> aggregate through the CLI."""
from __future__ import annotations

import json
import shutil

import pytest

from repo_paths import REPO_ROOT
from mtfm.platform.cli import main


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "synth", "--help"], ["data", "aggregate", "--help"],
                                  ["data", "movielens", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--config-dir" in text or argv == ["data", "--help"]
    assert {"data": "synth", "synth": "--users", "aggregate": "--window", "movielens": "recbole"}[argv[-2]] in text


@pytest.mark.parametrize("argv, words", [
    (["data", "synth", "--out", "x", "--seed", "-1"], "argument --seed: expected an integer >= 0, found '-1'"),
    (["model", "summary", "--config", "configs/model/tiny.yaml", "--targets", "-4"],
     "argument --targets: expected an integer >= 0, found '-4'"),
    (["serve", "config", "--port", "70000"], "argument --port: expected a TCP port, 1-65535, found '70000'"),
    (["serve", "config", "--host", ""], "argument --host: expected an interface address or host name, e.g. "
                                        "127.0.0.1, found ''"),
])
def test_numbers_out_of_range_are_refused_by_argument(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_synth_then_aggregate(ray_cluster, config_dir, tmp_path, capsys):
    raw, agg = tmp_path / "raw", tmp_path / "agg"
    assert main(["data", "synth", "--config-dir", str(config_dir), "--out", str(raw), "--users", "20", "--days", "2"]) == 0
    assert "exposures/sqs:" in capsys.readouterr().out
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg),
                 "--window", "12h"]) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "user samples out" in out
    summary = json.loads((agg / "_summary.json").read_text())
    assert summary["window_ms"] == 43_200_000 and summary["exposures_in"] == summary["exposures_out"] > 0
    # A second run into the same folder is refused with a clear message, not a traceback.
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg)]) == 1
    err = capsys.readouterr().err
    assert f"already holds {summary['samples_out']:,} aggregated user samples of {raw}" in err and "--overwrite" in err
    assert main(["data", "synth", "--config-dir", str(config_dir), "--out", str(raw)]) == 1
    # Every row quarantined (all later than --max-ts): the samples are written, empty, and the command fails.
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg),
                 "--max-ts", "0", "--overwrite"]) == 1
    assert "no user samples from" in capsys.readouterr().err
    assert json.loads((agg / "_summary.json").read_text())["samples_out"] == 0
    # That empty output is replaced without --overwrite only by a run of the same logs (another
    # folder's logs would take away the quarantine of these).
    other = tmp_path / "raw2"
    shutil.copytree(raw, other)
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(other), "--out", str(agg)]) == 1
    assert f"already holds 0 aggregated user samples of {raw}" in capsys.readouterr().err
    # Nothing to lose for the same logs: the corrected command reruns without --overwrite.
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg),
                 "--window", "12h"]) == 0
    assert "wrote no user samples" in capsys.readouterr().out
    assert json.loads((agg / "_summary.json").read_text())["samples_out"] == summary["samples_out"] > 0
    # An aggregation that died before its summary, or one whose summary is unreadable, is not replaced silently.
    (agg / "_summary.json").write_text("{")
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg)]) == 1
    assert "_summary.json cannot be read" in capsys.readouterr().err
    (agg / "_summary.json").unlink()
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(raw), "--out", str(agg)]) == 1
    assert "did not finish" in capsys.readouterr().err


def test_an_output_folder_that_is_a_file_is_refused_by_name(ray_cluster, config_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    raw = tmp_path / "raw"
    config = ["--config-dir", str(config_dir)]
    assert main(["data", "synth", *config, "--out", str(raw), "--users", "5", "--days", "1"]) == 0
    capsys.readouterr()
    tiny = str(REPO_ROOT / "configs/train/tiny.yaml")
    for argv, given in [
        (["data", "synth", *config, "--out", str(afile)], f"--out {afile}"),
        (["data", "synth", *config, "--out", str(afile / "sub")], f"--out {afile / 'sub'}"),
        (["data", "aggregate", *config, "--raw", str(raw), "--out", str(afile)], f"--out {afile}"),
        (["train", *config, "--config", tiny, "--out", str(afile)], f"--out {afile}"),
        (["quickstart", *config, "--train-config", tiny, "--out", str(afile)], f"--out {afile}"),
        (["quickstart", *config, "--train-config", tiny, "--out", str(tmp_path / "q"), "--run-dir", str(afile / "run")],
         f"--run-dir {afile / 'run'}"),
        (["eval", "--checkpoint", str(tmp_path), "--json", str(afile / "eval.json")], f"--json {afile / 'eval.json'}"),
    ]:
        assert main(argv) == 1, argv
        assert capsys.readouterr().err == f"error: {given}: {afile} is a file, not a folder\n"
    assert afile.read_text() == "not a folder" and not (tmp_path / "q").exists()


def test_missing_input_folders_are_named_before_ray_starts(config_dir, tmp_path, monkeypatch, capsys):
    """A typo'd --raw or --data is refused at once, not after Ray's start-up (seconds on a small box)."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a missing input folder")

    monkeypatch.setattr("mtfm.platform.cluster.init_ray", no_ray)
    missing = tmp_path / "typo"
    assert main(["data", "aggregate", "--config-dir", str(config_dir), "--raw", str(missing),
                 "--out", str(tmp_path / "agg")]) == 1
    assert f"{missing}: raw log folder not found" in capsys.readouterr().err
    assert main(["train", "--config-dir", str(config_dir), "--config", str(REPO_ROOT / "configs/train/tiny.yaml"),
                 "--data", str(missing), "--out", str(tmp_path / "run")]) == 1
    assert f"{missing}: no aggregated samples here" in capsys.readouterr().err


def test_a_ray_address_where_nothing_listens_is_refused_at_once(config_dir, tmp_path):
    """Ray retries such an address for minutes (a timeout line a second); the command says so in one line."""
    import os
    import subprocess
    import sys
    import time

    from mtfm.platform.cluster import unused_port

    raw = tmp_path / "raw"
    assert main(["data", "synth", "--config-dir", str(config_dir), "--out", str(raw), "--users", "10", "--days",
                 "2"]) == 0
    address = f"127.0.0.1:{unused_port()}"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mtfm.platform.cli", "data", "aggregate", "--config-dir",
                           str(config_dir), "--raw", str(raw), "--out", str(tmp_path / "agg")],
                          env=os.environ | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - start < 60, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        f"error: RAY_ADDRESS={address}: cannot connect to the Ray cluster (nothing answers there: connection "
        "refused); start it (`ray start --head`, `ray up ray_cluster.yaml`), or unset RAY_ADDRESS to run on an "
        "embedded local Ray")
    assert "Traceback" not in done.stderr and not any((tmp_path / "agg").rglob("*"))  # nothing written


def test_a_jobs_own_setup_hook_is_left_to_it(monkeypatch):
    """Ray merges a `ray job submit`'s runtime env into the driver's ray.init one and refuses two
    worker_process_setup_hooks: init_ray adds its own only where the job has none."""
    import json

    from mtfm.platform.cluster import _job_has_a_setup_hook

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not _job_has_a_setup_hook()  # not under a job
    for runtime_env, has in (({"working_dir": "gcs://_ray_pkg_x.zip"}, False),
                             ({"working_dir": "gcs://_ray_pkg_x.zip", "worker_process_setup_hook": "theirs.hook"}, True)):
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": runtime_env}))
        assert _job_has_a_setup_hook() is has


def test_the_driver_leaves_out_forwarded_lines_that_ask_nothing_of_the_user(monkeypatch):
    """Ray's printer of the workers' and raylet's output, wrapped once: the harmless lines are left
    out (the raylet's worker count on the embedded Ray only), every other line reaches it as Ray
    gave it. The embedded Ray's token notice is filtered from its logger."""
    import logging

    from ray._private import worker as ray_worker

    from mtfm.platform.cluster import _RAY_TOKEN_LOGGER, _drop_harmless_worker_lines, _quiet_the_token_notice

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append((data, ignore_prefix)))
    _drop_harmless_worker_lines()
    wrapped = ray_worker.print_to_stdstream
    _drop_harmless_worker_lines()
    assert ray_worker.print_to_stdstream is wrapped
    watcher = "[2026-12-06 14:31:20,301 E 27589 27623] core_worker.cc:2465: Actor with class name: " \
              "'PreemptionWatcher' and ID: '7c59' has constructor arguments in the object store and max_restarts > 0."
    theirs = watcher.replace("'PreemptionWatcher'", "'MyActor'")  # a user's actor: shown
    ddp = "[rank0]:[W1206 14:31:32.563669693 reducer.cpp:1529] Warning: find_unused_parameters=True was specified " \
          "in DDP constructor, but did not find any unused parameters in the forward pass. This flag results ..."
    raylet = "WARNING: 8 PYTHON worker processes have been started on node: d7 with address: 192.0.2.2"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    wrapped({"pid": 7, "is_err": True, "lines": [watcher, "[mtfm] step 10", ddp, theirs]}, ignore_prefix=True)
    wrapped({"pid": "raylet", "is_err": False, "lines": [raylet]}, ignore_prefix=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # on a cluster the raylet's count may be a leak
    wrapped({"pid": "raylet", "is_err": False, "lines": [raylet]}, ignore_prefix=False)
    assert printed == [({"pid": 7, "is_err": True, "lines": ["[mtfm] step 10", theirs]}, True),
                       ({"pid": "raylet", "is_err": False, "lines": [raylet]}, False)]

    logger = logging.getLogger(_RAY_TOKEN_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    _quiet_the_token_notice()
    _quiet_the_token_notice()
    assert len(logger.filters) == 1
    notice = logger.makeRecord(_RAY_TOKEN_LOGGER, logging.WARNING, __file__, 1, "Token authentication is enabled "
                               "for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.", (), None)
    other = logger.makeRecord(_RAY_TOKEN_LOGGER, logging.WARNING, __file__, 1, "Token authentication is disabled",
                              (), None)
    assert (logger.filter(notice), bool(logger.filter(other))) == (False, True)


def test_the_worker_hook_never_takes_its_worker_down(monkeypatch, capsys):
    """A worker_process_setup_hook that raises ends its worker: quieting logs is not worth that."""
    import ray.data._internal.logging as ray_data_logging

    from mtfm.platform.cluster import quiet_worker_logs

    monkeypatch.setattr(ray_data_logging, "DEFAULT_CONFIG", {"handlers": {}})  # a Ray Data laid out otherwise
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # not asked of Ray, which is not initialised here
    quiet_worker_logs()
    assert "[mtfm] note: Ray's worker logs left as they are (KeyError: 'console')" in capsys.readouterr().err


def test_an_interrupted_synth_says_its_output_is_partial(tmp_path, monkeypatch, capsys):
    import mtfm.platform.synth as synth

    real = synth.synthesize

    def interrupted_at_the_end(registry, out, **kwargs):  # as Ctrl-C would, once tables are written
        real(registry, out, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", interrupted_at_the_end)
    out = tmp_path / "raw"
    assert main(["data", "synth", "--out", str(out), "--users", "5", "--days", "1"]) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted: {out} holds only part of the logs; run the command "
                                               "again with --overwrite")


@pytest.mark.parametrize("raised, shown", [("SystemExit(0)", False), ("KeyboardInterrupt()", False),
                                           ("ValueError('a real failure')", True)])
def test_an_interrupt_while_the_process_exits_prints_no_traceback(raised, shown):
    """A Ctrl-C pressed as the command exits lands in an atexit callback (Ray's shutdown), where Ray
    Train's SIGINT handler raises SystemExit: Python printed "Exception ignored in atexit callback" and
    a traceback after the command's last line. Interrupts are dropped there; a real failure still shows."""
    import subprocess
    import sys

    program = ("import atexit\nfrom mtfm.platform.cluster import _quiet_interrupts_while_exiting\n"
               "_quiet_interrupts_while_exiting()\n_quiet_interrupts_while_exiting()\n"
               f"def callback():\n    raise {raised}\natexit.register(callback)\nprint('last line')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.stdout == "last line\n"
    assert ("Exception ignored in atexit callback" in done.stderr) == shown, done.stderr
    assert ("a real failure" in done.stderr) == shown


def test_a_command_pointed_at_a_cluster_sends_the_token_where_one_exists(monkeypatch, tmp_path):
    """RAY_AUTH_MODE=token is set only with RAY_ADDRESS naming this machine, the variable unset,
    ~/.ray/auth_token present and Ray not yet imported (Ray reads the variable when imported): another
    machine's cluster is not sent this machine's token. The end-to-end case, a `ray start` cluster
    taking such a command, is test_train.py::test_ray_job_submit."""
    import os
    import socket
    import sys

    from mtfm.platform.cluster import send_the_token_where_one_exists

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "ray", raising=False)

    def mode(address: str | None, auth: str | None, token: bool) -> str | None:
        for name, value in (("RAY_ADDRESS", address), ("RAY_AUTH_MODE", auth)):
            monkeypatch.setenv(name, value) if value is not None else monkeypatch.delenv(name, raising=False)
        shutil.rmtree(tmp_path / ".ray", ignore_errors=True)
        if token:
            (tmp_path / ".ray").mkdir()
            (tmp_path / ".ray" / "auth_token").write_text("secret")
        send_the_token_where_one_exists()
        return os.environ.get("RAY_AUTH_MODE")

    assert mode("127.0.0.1:6379", None, token=True) == "token"
    assert mode(f"{socket.gethostname()}:6379", None, token=True) == "token"
    assert mode("127.0.0.1:6379", "disabled", token=True) == "disabled"
    assert mode("127.0.0.1:6379", None, token=False) is None
    assert mode(None, None, token=True) is None
    assert mode("203.0.113.7:6379", None, token=True) is None  # TEST-NET-3: no interface of this machine
    assert mode("ray://127.0.0.1:10001", None, token=True) is None
    monkeypatch.setitem(sys.modules, "ray", object())  # imported already: too late to take effect
    assert mode("127.0.0.1:6379", None, token=True) is None


def test_worker_lines_are_not_coloured_off_a_terminal(monkeypatch):
    import io
    import os
    import sys

    from mtfm.platform.cluster import plain_prefixes_off_a_terminal

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    cases = [(Terminal(), Terminal(), None, None), (io.StringIO(), Terminal(), None, "0"),
             (Terminal(), io.StringIO(), None, "0"), (io.StringIO(), io.StringIO(), "1", "1")]
    for stdout, stderr, preset, expected in cases:
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(sys, "stderr", stderr)
        if preset is None:
            monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
        else:
            monkeypatch.setenv("RAY_COLOR_PREFIX", preset)
        plain_prefixes_off_a_terminal()
        assert os.environ.get("RAY_COLOR_PREFIX") == expected
