"""Shared test fixtures: one real local Ray cluster per test session, and small config dirs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from repo_paths import CONFIGS


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs, no GPU even on a GPU host, small object store), started once and
    shared by every test."""
    import ray

    if not ray.is_initialized():
        from mtfm.platform.cluster import unused_port

        # dashboard_port: not the default 8265, where another Ray's dashboard on this machine would answer
        # Ray Train's questions about this cluster's actors (see init_ray).
        ray.init(num_cpus=2, num_gpus=0, object_store_memory=600 * 1024**2, include_dashboard=False,
                 dashboard_port=unused_port(), log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    yield ray
    # Serve tests may have started Serve on this cluster; shut everything down once at the end.
    ray.shutdown()


@pytest.fixture()
def config_dir(tmp_path: Path) -> Path:
    """A private copy of the seed configs that a test may edit (add or break a scenario)."""
    dst = tmp_path / "configs"
    shutil.copytree(CONFIGS, dst, ignore=shutil.ignore_patterns("movielens"))
    return dst


@pytest.fixture(autouse=True)
def _no_ambient_config_dir(monkeypatch):
    monkeypatch.delenv("MTFM_CONFIG_DIR", raising=False)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_samples(ray_cluster, tmp_path_factory) -> Path:
    """Aggregated samples of a small synthetic world (160 users x 3 days), made once per session."""
    from mtfm.platform.aggregate import aggregate
    from mtfm.platform.registry import load_registry
    from mtfm.platform.synth import synthesize

    root = tmp_path_factory.mktemp("tiny-world")
    registry = load_registry(CONFIGS)
    synthesize(registry, root / "raw", users=160, days=3, seed=7, log=lambda *a, **k: None)
    aggregate(registry, root / "raw", root / "agg", log=lambda *a, **k: None)
    return root / "agg"
