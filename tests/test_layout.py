"""The package layout: `platform/` is `mtfm.platform` and never shadows the standard library."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from repo_paths import REPO_ROOT

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def _is_stdlib_platform(path: str) -> bool:
    return Path(path).resolve().parent == STDLIB and Path(path).name == "platform.py"


def test_no_init_in_platform_folder():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()
    assert not (REPO_ROOT / "platform.py").exists()


def test_stdlib_platform_under_pytest():
    import platform

    assert _is_stdlib_platform(platform.__file__), platform.__file__
    assert platform.system()  # the real module, not a namespace package


def test_stdlib_platform_from_repo_root():
    code = ("import platform, sys; import mtfm.platform.registry as r; "
            "print(platform.__file__); print(r.__file__); print(platform.python_version())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    std_file, registry_file, version = out.stdout.split()
    assert _is_stdlib_platform(std_file)
    assert Path(registry_file).resolve() == (REPO_ROOT / "platform" / "registry.py").resolve()
    assert version == ".".join(map(str, sys.version_info[:3]))


RAY_PROBE = """
import json, os, platform, sys
import ray

ray.init(address=sys.argv[1], runtime_env={"working_dir": sys.argv[2],
         "excludes": [".git", ".venv", "runs", "data", "*.parquet"]}, log_to_driver=False)

@ray.remote(num_cpus=0.1)
def probe():
    import platform
    import mtfm.platform.registry as registry
    return [platform.__file__, platform.machine(), os.getcwd(), sorted(registry.load_registry("configs").scenarios)]

print(json.dumps(ray.get(probe.remote())))
"""


def test_stdlib_platform_in_ray_task_with_working_dir(ray_cluster, tmp_path):
    """A driver started elsewhere ships the repo as the job's working_dir, as `ray job submit` does."""
    address = ray_cluster.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-c", RAY_PROBE, address, str(REPO_ROOT)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    std_file, machine, cwd, scenarios = json.loads(out.stdout.strip().splitlines()[-1])
    assert _is_stdlib_platform(std_file), std_file
    assert machine
    assert Path(cwd).resolve() != REPO_ROOT.resolve()  # the task ran in the uploaded copy of the repo
    assert {"hp", "phf", "sqs"} <= set(scenarios)


def test_the_installed_mtfm_command_lists_its_subcommands(tmp_path):
    """The `mtfm` entry point of pyproject.toml, as the README's commands run it, from any folder."""
    script = Path(sys.executable).parent / "mtfm"
    assert script.is_file(), f"{script}: the console script is not installed (pip install -e .)"
    out = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: mtfm [-h] COMMAND ...")
    listed = re.findall(r"^    (\w+)", out.stdout, re.MULTILINE)
    assert listed == ["scenarios", "data", "model", "quickstart", "train", "eval", "report", "serve"]


def test_ray_cluster_yaml_is_a_valid_launcher_config():
    """ray_cluster.yaml validates against the schema of the installed Ray's cluster launcher."""
    import jsonschema
    import ray
    import yaml

    config = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "/home/ubuntu/mtfm" in setup and config["file_mounts"]["/home/ubuntu/mtfm"] == "."
    # Nodes the autoscaler adds later must run the head's Ray (and torch): pinned.
    assert re.search(r'"ray\[train,data,serve\]==2\.\d+\.\d+"', setup) and re.search(r"torch==\d", setup)
    # ... the Ray that pyproject.toml pins, the one the tests ran
    pinned = re.search(r'"ray\[train,data,serve\]==(2\.\d+)\.\*"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pinned and f'"ray[train,data,serve]=={pinned.group(1)}.' in setup and ray.__version__.startswith(
        pinned.group(1) + ".")
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("--metrics-export-port=8080" in c for c in starts if " start " in c)  # the README's scrape port
    assert not any("--dashboard-host=0.0.0.0" in c for c in starts)  # the job API stays on localhost


def test_ray_cluster_yaml_setup_adds_the_venv_to_bashrc_once(tmp_path):
    """`ray up` runs the setup commands again on every call (the README says to re-run it after a change)."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    [line] = [c for c in config["setup_commands"] if ".bashrc" in c]
    (tmp_path / ".bashrc").write_text("# theirs\n")
    for _ in range(3):
        subprocess.run(["bash", "-c", line], env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]}, check=True)
    assert (tmp_path / ".bashrc").read_text() == "# theirs\nsource ~/mtfm-venv/bin/activate\n"
