"""Connects to the Ray cluster: `RAY_ADDRESS` if set, else an embedded local Ray (quietly).

The driver-side entry points (data aggregation, training, evaluation, the quickstart) call `init_ray()` so
that the same command runs on a laptop and, under `ray job submit`, on a cluster; serving starts
Ray through `serve run`.
"""
from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, log_to_driver: bool = False):
    """Return the `ray` module, initialised once; a no-op if Ray is already up (tests, jobs).

    log_to_driver: forward the workers' output (training's progress lines come from rank 0)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        from ray.exceptions import AuthenticationError

        _refuse_an_address_nothing_answers(address)
        try:
            # The hook by name: the cluster's workers import it from the mtfm that `ray up` installed.
            ray.init(address=address, logging_level=logging.WARNING,
                     runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"})
        except (ConnectionError, AuthenticationError) as exc:  # Ray's own is a long traceback, the cause inside
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({first}){_auth_hint()}") \
                from exc
    else:
        # The embedded Ray's processes inherit this environment. DDP warns once per worker, in C++, that
        # find_unused_parameters found none unused in a batch holding every scenario; other batches need it.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        # address="local": a Ray of its own, even when a `ray start` cluster runs on this machine (a
        # plain ray.init() would join that one, and refuse num_cpus there). Without a dashboard Ray still
        # advertises one at dashboard_port, 8265 by default, where another Ray on this machine may serve
        # its own: Ray Train's placement-group cleaner asked that one whether this run's controller lived,
        # was told no, and removed the run's workers (a restart, counted against max_failures). A port
        # nothing listens on makes its question fail instead, which it takes as "ask again".
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
                 dashboard_port=unused_port(), logging_level=logging.WARNING, log_to_driver=log_to_driver,
                 runtime_env={"worker_process_setup_hook": quiet_worker_logs})
    return ray


def _refuse_an_address_nothing_answers(address: str, timeout_s: float = 10.0) -> None:
    """Ray retries a GCS address where nothing listens for minutes, printing a timeout a second; a
    HOST:PORT that takes no TCP connection is refused at once. Other forms (auto, ray://) go to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise ValueError(f"RAY_ADDRESS={address}: cannot connect to the Ray cluster (nothing answers there: "
                         f"{reason}); start it (`ray start --head`, `ray up ray_cluster.yaml`), or unset RAY_ADDRESS "
                         "to run on an embedded local Ray") from None


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _auth_hint() -> str:
    """Ray 2.60's `ray start` turns token authentication on once ~/.ray/auth_token exists, and a
    client sends the token only with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE") == "token" or not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        return ""
    return ("; if the cluster uses token authentication (Ray 2.60 turns it on where ~/.ray/auth_token exists, as "
            "here), set RAY_AUTH_MODE=token")


def forget_the_progress_bar_hint() -> None:
    """Ray Data warns once per process, where its progress bars are off, how to turn them on: counted
    as said (training turns them off: it prints its own progress)."""
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


def quiet_worker_logs() -> None:
    """Run in each worker process (`worker_process_setup_hook`): what training prints is its own
    progress, not Ray's INFO lines (they stay in the session's log files).

    - Ray Data's console lines from the actors that feed training (each epoch's execution plan and
      "finished" lines, and the hint that progress bars are off); the session's ray-data.log keeps
      them. The driver's own, aggregation's progress, are kept.
    - Each `ray.train.report`'s INFO line with the whole metrics dict.
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
    import ray.data  # configures the "ray.data" logger, whose console handler is quieted here

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Its logger is named by its file's path.
    execution = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution")
    logging.getLogger(os.path.join(execution, "context.py")).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
    forget_the_progress_bar_hint()
    default_hook = threading.excepthook

    def hook(args):
        if not (args.exc_type is InterruptedError and "completion-signaler" in getattr(args.thread, "name", "")):
            default_hook(args)

    threading.excepthook = hook


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
