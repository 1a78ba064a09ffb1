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

        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, AuthenticationError) as exc:  # Ray's own is a long traceback, the cause inside
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({first}){_auth_hint()}") \
                from exc
    else:
        # address="local": a Ray of its own, even when a `ray start` cluster runs on this machine (a
        # plain ray.init() would join that one, and refuse num_cpus there).
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=log_to_driver,
                 runtime_env={"worker_process_setup_hook": _quiet_placement_group_cleaner})
    return ray


def _auth_hint() -> str:
    """Ray 2.60's `ray start` turns token authentication on once ~/.ray/auth_token exists, and a
    client sends the token only with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE") == "token" or not os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        return ""
    return ("; if the cluster uses token authentication (Ray 2.60 turns it on where ~/.ray/auth_token exists, as "
            "here), set RAY_AUTH_MODE=token")


def _quiet_placement_group_cleaner() -> None:
    """Ray Train's placement-group cleaner asks the State API, which needs the dashboard that the
    embedded Ray leaves out, whether the run's controller lives, and warns each second it cannot
    (35 lines a short run); its errors still show. It finds the cluster by RAY_ADDRESS, else by
    looking for one on this machine, which fails with a traceback when another Ray runs here too
    (a test session, another embedded run): so each worker is told this cluster's address (and a
    process a task starts, such as another `mtfm` command, joins this cluster too)."""
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Each ray.train.report is logged at INFO with the whole metrics dict (every task's AUC, GAUC and
    # counts on one line): the [mtfm] lines and the table say it shorter. Its logger is named by its
    # file's path.
    execution = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution")
    logging.getLogger(os.path.join(execution, "context.py")).setLevel(logging.WARNING)


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
