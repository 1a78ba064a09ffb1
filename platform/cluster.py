"""Connects to the Ray cluster: `RAY_ADDRESS` if set, else an embedded local Ray (quietly).

The driver-side entry points (data aggregation, training, evaluation, the quickstart) call `init_ray()` so
that the same command runs on a laptop and, under `ray job submit`, on a cluster; serving starts
Ray through `serve run`.
"""
from __future__ import annotations

import logging
import os
import re
import sys


def init_ray(num_cpus: int | None = None, log_to_driver: bool = False):
    """Return the `ray` module, initialised once; a no-op if Ray is already up (tests, jobs).

    log_to_driver: forward the workers' output (training's progress lines come from rank 0)."""
    import ray

    if ray.is_initialized():
        return ray
    plain_prefixes_off_a_terminal()
    _drop_harmless_worker_lines()
    _quiet_interrupts_while_exiting()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        from ray.exceptions import AuthenticationError

        _refuse_an_address_nothing_answers(address)
        # The hook by name: the cluster's workers import it from the mtfm that `ray up` installed. Ray
        # merges this into a `ray job submit`'s runtime env, and refuses a second hook: a job's own wins.
        runtime_env = {} if _job_has_a_setup_hook() else {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"}
        try:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        except (ConnectionError, AuthenticationError) as exc:  # Ray's own is a long traceback, the cause inside
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({first}){_auth_hint()}") \
                from exc
    else:
        # address="local": a Ray of its own, even when a `ray start` cluster runs on this machine (a
        # plain ray.init() would join that one, and refuse num_cpus there). Without a dashboard Ray still
        # advertises one at dashboard_port, 8265 by default, where another Ray on this machine may serve
        # its own: Ray Train's placement-group cleaner asked that one whether this run's controller lived,
        # was told no, and removed the run's workers (a restart, counted against max_failures). A port
        # nothing listens on makes its question fail instead, which it takes as "ask again".
        _quiet_the_token_notice()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 dashboard_port=unused_port(), logging_level=logging.WARNING, log_to_driver=log_to_driver,
                 runtime_env={"worker_process_setup_hook": quiet_worker_logs})
    return ray


_RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_the_token_notice() -> None:
    """Ray warns that the cluster it starts takes tokens, which `ray start` clusters do on this machine
    once ~/.ray/auth_token exists: nothing for a user of the embedded Ray to do."""
    logger = logging.getLogger(_RAY_TOKEN_LOGGER)
    if _not_the_token_notice not in logger.filters:
        logger.addFilter(_not_the_token_notice)


def _not_the_token_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled" not in record.getMessage()


# Lines the cluster's processes print that ask nothing of the user, dropped from what the driver
# forwards (the session's log files keep them); a line goes when it holds every part of one entry:
HARMLESS_WORKER_LINES = (
    # Ray Train's own PreemptionWatcher actor, logged at ERROR by Ray's core (ray-project/ray#53727)
    ("'PreemptionWatcher'", "has constructor arguments in the object store and max_restarts > 0"),
    # DDP runs with find_unused_parameters=True because a batch without a scenario's T-tokens leaves that
    # scenario's modules unused; torch warns, once per worker, on a first batch that has them all
    ("find_unused_parameters=True was specified in DDP constructor, but did not find any unused parameters",),
)
# And on the embedded Ray, where nothing else runs: the raylet's count of workers started at once on a
# machine of few CPUs (Ray Train's and Ray Data's together), and the GCS's report that it could not kill an actor
# whose worker had exited already (a Ctrl-C stops the command's whole process group at once). On a cluster
# either may be a fault (a leak, a lost node): they show.
HARMLESS_ON_THE_EMBEDDED_RAY = (("PYTHON worker processes have been started on node",),
                                ("Failed to kill actor", "Socket closed"))


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _drop_harmless_worker_lines() -> None:
    """Wrap the driver's printer of forwarded output (Ray 2.60's `print_to_stdstream`: the workers'
    lines and the raylet's messages) so that it leaves out HARMLESS_WORKER_LINES, and off a terminal
    colour codes. Before ray.init, which hands the printer to its log thread; a Ray whose internals
    differ is left as it is."""
    try:
        from ray._private import worker as ray_worker

        ray_print = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    if getattr(ray_print, "drops_harmless_lines", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool = False) -> None:
        harmless = HARMLESS_WORKER_LINES + (HARMLESS_ON_THE_EMBEDDED_RAY if is_embedded() else ())
        lines = [line for line in data.get("lines", ())
                 if not any(all(part in line for part in parts) for parts in harmless)]
        if os.environ.get("RAY_COLOR_PREFIX") == "0":  # off a terminal: also the colour Ray gives "[repeated 2x ...]"
            lines = [ANSI_COLOUR.sub("", line) for line in lines]
        if lines:
            ray_print(data | {"lines": lines}, ignore_prefix=ignore_prefix)

    print_to_stdstream.drops_harmless_lines = True
    ray_worker.print_to_stdstream = print_to_stdstream


def _job_has_a_setup_hook() -> bool:
    """Whether this driver runs under `ray job submit` with a worker_process_setup_hook of its own."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("worker_process_setup_hook"))


def _refuse_an_address_nothing_answers(address: str, wait_s: float = 10.0) -> None:
    """Ray retries a GCS address where nothing listens for minutes, printing a timeout a second; a
    HOST:PORT that takes no TCP connection within wait_s (a head still starting gets that long) is
    refused in one line. Other forms (auto, ray://) go to Ray."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=wait_s).close()
            return
        except socket.gaierror as exc:
            reason = f"cannot resolve {host}: {exc.strerror or exc}"
            break
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
            if isinstance(exc, TimeoutError) or time.monotonic() + 1 > deadline:
                reason = f"nothing answers there: {reason}"
                break
            time.sleep(1)
    raise ValueError(f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({reason}); start it (`ray start "
                     "--head`, `ray up ray_cluster.yaml`), or unset RAY_ADDRESS to run on an embedded local Ray")


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plain_prefixes_off_a_terminal() -> None:
    """Ray colours the `(RayTrainWorker pid=...)` prefix of every forwarded line, also into a file or a
    pipe, where the colour codes show as `[36m`. Off a terminal (stdout or stderr redirected, a job's
    log) they are turned off, unless RAY_COLOR_PREFIX is set; Ray reads it for every line it prints."""
    on_a_terminal = all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))
    if "RAY_COLOR_PREFIX" not in os.environ and not on_a_terminal:
        os.environ["RAY_COLOR_PREFIX"] = "0"


TOKEN_FILE = "~/.ray/auth_token"


def send_the_token_where_one_exists() -> None:
    """Ray 2.60's `ray start` turns token authentication on where ~/.ray/auth_token exists, and a client
    sends the token only with RAY_AUTH_MODE=token, which Ray reads when it is imported. A command
    pointed by RAY_ADDRESS at a cluster on this machine, with the variable unset where the file exists,
    sets it (Ray not yet imported): that cluster's `ray start` found the same file. Without it Ray
    retried for 20 s, a log line a second, and was refused. A cluster on another machine is not sent
    this machine's token unasked (nor does Ray send it to an address given explicitly): the refusal
    names the variable instead (`_auth_hint`)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if ("RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules and _on_this_machine(address)
            and os.path.exists(os.path.expanduser(TOKEN_FILE))):
        os.environ["RAY_AUTH_MODE"] = "token"


def _on_this_machine(address: str) -> bool:
    """Whether a RAY_ADDRESS of the form HOST:PORT names this machine: a loopback name or address, its
    host name, or an address of one of its interfaces."""
    import socket

    import psutil

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if "://" in address or not host or not port.isdigit():
        return False
    if host in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        return True
    return any(a.address.split("%")[0] == host for addrs in psutil.net_if_addrs().values() for a in addrs)


def _auth_hint() -> str:
    """Ray 2.60's `ray start` turns token authentication on once ~/.ray/auth_token exists, and a
    client sends the token only with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE") == "token" or not os.path.exists(os.path.expanduser(TOKEN_FILE)):
        return ""
    return ("; if the cluster uses token authentication (Ray 2.60 turns it on where ~/.ray/auth_token exists, as "
            "here), set RAY_AUTH_MODE=token")


def forget_the_progress_bar_hint() -> None:
    """Ray Data warns once per process, where its progress bars are off, how to turn them on: counted
    as said (training turns them off: it prints its own progress)."""
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


def quiet_ray_data() -> None:
    """Training, evaluation and aggregation report their own progress; Ray Data's per-dataset bars and
    INFO lines are noise there (this process's Ray Data settings change)."""
    import logging
    import warnings

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    forget_the_progress_bar_hint()
    # Ray Train's own DataConfig sets the option that Ray Data deprecates.
    warnings.filterwarnings("ignore", message=".*ExecutionOptions.exclude_resources.* is deprecated")


_RAY_TRAIN_CTRL_C_LOGGER = "ray.train.v2.api.data_parallel_trainer"


def _quiet_interrupts_while_exiting() -> None:
    """A Ctrl-C pressed while the process exits (Ray shutting down in an atexit callback) raises
    there, in Ray Train's SIGINT handler (SystemExit) or Python's (KeyboardInterrupt), and Python
    prints it as "Exception ignored in atexit callback" with a traceback after the command's own
    last line. Such an exception is the interrupt the user asked for, not an error: it is dropped;
    any other goes to the hook that was there before."""
    if getattr(sys.unraisablehook, "drops_interrupts", False):
        return
    before = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, (SystemExit, KeyboardInterrupt)):
            before(unraisable)

    hook.drops_interrupts = True
    sys.unraisablehook = hook


def say_when_ray_train_stops_for_ctrl_c() -> None:
    """Ray Train's driver takes Ctrl-C itself: the first asks the run's controller to abort, which
    returns once the workers have stopped (10-40 s on a 2-CPU machine), the third exits at once. It says
    so at INFO, which `init_ray`'s WARNING level hides, so a Ctrl-C looked ignored: its lines are printed
    instead, in this platform's words."""
    logger = logging.getLogger(_RAY_TRAIN_CTRL_C_LOGGER)
    logger.setLevel(logging.INFO)
    _ctrl_c_in_our_words.presses = 0
    if _ctrl_c_in_our_words not in logger.filters:
        logger.addFilter(_ctrl_c_in_our_words)


def _ctrl_c_in_our_words(record: logging.LogRecord) -> bool:
    """Ray Train logs "Received SIGINT. Gracefully ..." at each press, and after it, at the third,
    "Received SIGINT at least 3 times ..."."""
    message = record.getMessage()
    if message.startswith("Received SIGINT at least 3 times"):
        said = "[mtfm] Ctrl-C a third time: stopping now, without waiting for the workers"
    elif message.startswith("Received SIGINT"):
        _ctrl_c_in_our_words.presses += 1
        said = {1: "[mtfm] Ctrl-C: stopping the run once Ray Train has stopped its workers (up to a minute); "
                   "Ctrl-C twice more stops at once",
                2: "[mtfm] Ctrl-C again: once more stops at once, without waiting for the workers"}.get(
            _ctrl_c_in_our_words.presses)
    else:
        return True
    if said:
        print(said, file=sys.stderr, flush=True)
    return False


_ctrl_c_in_our_words.presses = 0


# Ray Train's INFO lines that only narrate (the worker group's start, the process group, the DDP wrap,
# each checkpoint's upload, each report with its whole metrics dict): the [mtfm] lines say what matters.
# The others, its failure policy's retries among them, still show.
_NARRATING_RAY_TRAIN_LOGGERS = (
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy",
    "ray.train.v2._internal.execution.worker_group.worker_group",
    "ray.train.v2._internal.execution.storage",
    # on a resume, "a run snapshot was found ... delete the existing folder" (advice that would lose the run)
    "ray.train.v2._internal.execution.checkpoint.checkpoint_manager",
    "ray.train.v2.torch.train_loop_utils",
    "ray.train.torch.train_loop_utils",
    "ray.train.torch.config",
)


def quiet_worker_logs() -> None:
    """Run in each worker process (`worker_process_setup_hook`): what training prints is its own
    progress and Ray's warnings, not Ray's narration. A hook that raises takes its worker down, so
    nothing here may: what fails is left as Ray has it."""
    try:
        _quiet_worker_logs()
    except Exception as exc:  # noqa: BLE001
        print(f"[mtfm] note: Ray's worker logs left as they are ({type(exc).__name__}: {exc})", file=sys.stderr)


def _quiet_worker_logs() -> None:
    """- Ray Train's narrating INFO lines (`_NARRATING_RAY_TRAIN_LOGGERS`); the session's
      logs/train files keep the system ones.
    - Ray Data's console below WARNING (each epoch's execution plan and "finished" lines from the
      actors that feed training, and the hint that progress bars are off); the session's ray-data.log
      keeps them. Ray Data rebuilds its handlers from RAY_DATA_LOGGING_CONFIG whenever a dataset's
      logger changes, so that variable names a config with the console at WARNING (one file per node).
      The driver's own lines, aggregation's progress, are kept.
    - Ray Data's thread that signals a finished read raises InterruptedError when training stops
      mid-epoch (`max_steps`) and the iterator is dropped; nothing is lost, the traceback is noise.
    - Ray Train's placement-group cleaner asks the State API whether the run's controller lives; on
      the embedded Ray, which has no dashboard, it warns each second that it cannot (35 lines a short
      run); its errors still show. It finds the cluster by RAY_ADDRESS, else by looking for one on this
      machine, which fails with a traceback when another Ray runs here too (a test session, another
      embedded run): so each worker is told this cluster's address (and a process a task starts, such
      as another `mtfm` command, joins this cluster too)."""
    import threading

    import ray
    from ray.data._internal import logging as ray_data_logging

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    for name in _NARRATING_RAY_TRAIN_LOGGERS:  # a filter: Ray Train's dictConfig resets its loggers' levels
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)
    # Its logger is named by its file's path.
    execution = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution")
    logging.getLogger(os.path.join(execution, "context.py")).setLevel(logging.WARNING)
    if not os.environ.get("RAY_DATA_LOGGING_CONFIG"):  # a user's own config wins
        os.environ["RAY_DATA_LOGGING_CONFIG"] = _ray_data_logging_config(ray_data_logging.DEFAULT_CONFIG)
        ray_data_logging.configure_logging()
    forget_the_progress_bar_hint()
    default_hook = threading.excepthook

    def hook(args):
        if not (args.exc_type is InterruptedError and "completion-signaler" in getattr(args.thread, "name", "")):
            default_hook(args)

    threading.excepthook = hook


def _ray_data_logging_config(default: dict) -> str:
    """A file holding Ray Data's default logging config with the console at WARNING: one per content
    on this node, written whole (other workers may read it meanwhile)."""
    import copy
    import hashlib
    import tempfile
    from pathlib import Path

    import yaml

    from mtfm.platform.files import write_whole

    config = copy.deepcopy(default)
    config["handlers"]["console"]["level"] = "WARNING"
    text = yaml.safe_dump(config)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"mtfm-ray-data-logging-{digest}.yaml"
    if not path.is_file():
        write_whole(path, text)
    return str(path)


def bundles_that_fit(bundle: dict[str, float]) -> tuple[int, str]:
    """How many copies of `bundle` (e.g. {"CPU": 1, "GPU": 1}) the cluster's live nodes could hold
    at once, each copy on one node, counting every node's total resources (busy or not); and the
    cluster's resources in words, for an error. A necessary condition only: other work (Ray Data's
    reads) needs CPUs too."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    fit = sum(min(int(resources.get(key, 0.0) / need + 1e-9) if need > 0 else 10**9 for key, need in bundle.items())
              for resources in nodes)
    words = ", ".join(f"{sum(r.get(key, 0.0) for r in nodes):g} {key}" for key in bundle)
    return fit, f"{words} on {len(nodes)} node(s)"


def is_embedded() -> bool:
    """Whether this process runs the embedded local Ray (no `RAY_ADDRESS`): no node will join it."""
    return not os.environ.get("RAY_ADDRESS")
