"""platform/cluster.py: what every command does around Ray (the job's setup hook, the lines forwarded from
workers, interrupts while exiting, the token sent to a cluster on this machine, colour off a terminal)."""
from __future__ import annotations

import shutil

import pytest


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
    gcs = ("[2026-12-07 08:02:11,120 E 4711 4711] gcs_actor_scheduler.cc:538: Failed to kill actor NIL_ID, "
           "status: RpcError: RPC Error message: Socket closed; RPC Error details: rpc_code: 14")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    wrapped({"pid": 7, "is_err": True, "lines": [watcher, "[mtfm] step 10", ddp, theirs]}, ignore_prefix=True)
    wrapped({"pid": "raylet", "is_err": False, "lines": [raylet]}, ignore_prefix=False)
    wrapped({"pid": "gcs_server", "is_err": True, "lines": [gcs]}, ignore_prefix=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # on a cluster these may be faults
    wrapped({"pid": "raylet", "is_err": False, "lines": [raylet]}, ignore_prefix=False)
    wrapped({"pid": "gcs_server", "is_err": True, "lines": [gcs]}, ignore_prefix=False)
    assert printed == [({"pid": 7, "is_err": True, "lines": ["[mtfm] step 10", theirs]}, True),
                       ({"pid": "raylet", "is_err": False, "lines": [raylet]}, False),
                       ({"pid": "gcs_server", "is_err": True, "lines": [gcs]}, False)]
    # Off a terminal, the colour Ray gives a deduplicated line's count goes too.
    printed.clear()
    repeated = "RuntimeError: injected failure at step 12\x1b[32m [repeated 2x across cluster]\x1b[0m"
    for colour in ("0", "1"):
        monkeypatch.setenv("RAY_COLOR_PREFIX", colour)
        wrapped({"pid": 7, "is_err": True, "lines": [repeated]}, ignore_prefix=False)
    assert [lines for (data, _) in printed for lines in data["lines"]] == [
        "RuntimeError: injected failure at step 12 [repeated 2x across cluster]", repeated]

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
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # records the variable's state for teardown: the function sets it itself
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
