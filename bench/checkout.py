"""What a bench script needs from the checkout it runs in.

`ensure_mtfm_importable()`: `import mtfm` from a bare checkout, for bench scripts run on a machine
where the project is not installed (the GPU machine). Installed: nothing to do. Otherwise a link
`mtfm` -> the repository root goes first on sys.path and on PYTHONPATH, which subprocesses and the
workers of a Ray cluster started afterwards inherit: `mtfm` is then a namespace package whose
subpackages are ./platform, ./model, ./kernels and ./deployments, as pyproject.toml maps them.

`default_out(name)`: where a script writes its JSON when `--out` is not given: `$OUT/name` where OUT
is set (the GPU machine's folder that comes back), else `bench/out/name` (git-ignored), so that a run
of one's own never overwrites the recorded results in `bench/results/`.

`random_checkpoint(config, registry, folder)`: a checkpoint of a freshly initialised model (seed 0),
for the serving benches, whose cost does not depend on the weights."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_out(name: str) -> str:
    return os.path.join(os.environ.get("OUT") or str(ROOT / "bench" / "out"), name)


def ensure_mtfm_importable() -> None:
    if importlib.util.find_spec("mtfm") is not None:
        return
    link_dir = Path(tempfile.mkdtemp(prefix="mtfm-import-"))
    atexit.register(shutil.rmtree, link_dir, ignore_errors=True)  # removes the link, not the checkout
    (link_dir / "mtfm").symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))


def random_checkpoint(config, registry, folder: Path) -> Path:
    """`folder` holding model config `config` (a ModelConfig) built on `registry` with seed 0, untrained."""
    import torch

    from mtfm.model import build_model
    from mtfm.platform.checkpoint import CheckpointMeta, write_checkpoint

    torch.manual_seed(0)
    model = build_model(config, registry)
    return write_checkpoint(folder, model, {}, CheckpointMeta(0, 0, 0, registry.to_dict(), config.to_dict(), {}))
