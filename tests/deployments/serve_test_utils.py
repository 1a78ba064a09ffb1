"""Helpers shared by the serving tests: a checkpoint built without training, offline scores."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mtfm.model import build_model, load_model_config
from mtfm.platform.checkpoint import CheckpointMeta, load_model, write_checkpoint
from mtfm.platform.registry import Registry

REPO = Path(__file__).resolve().parents[2]


def write_tiny_checkpoint(registry: Registry, folder: Path, step: int = 7, seed: int = 0,
                          model_config: str = "configs/model/tiny.yaml", scenarios: list[str] | None = None) -> Path:
    """`model_config` (default configs/model/tiny.yaml) on `registry`, restricted to `scenarios`
    when given (as a model config's `scenarios:`), randomly initialised, saved as a checkpoint."""
    config = load_model_config(REPO / model_config)
    if scenarios is not None:
        config = dataclasses.replace(config, scenarios=tuple(scenarios))
    torch.manual_seed(seed)
    model = build_model(config, registry)
    meta = CheckpointMeta(step, 0, 0, registry.to_dict(), config.to_dict(), {})
    return write_checkpoint(folder, model, {}, meta)


class OfflineScorer:
    """The checkpoint's scenario subgraphs run in-process: the scores serving must reproduce."""

    def __init__(self, checkpoint: Path):
        self.model, self.meta = load_model(checkpoint)
        self.rankers = {}

    @torch.no_grad()
    def scores(self, scenario: str, table: pa.Table) -> np.ndarray:
        if scenario not in self.rankers:
            self.rankers[scenario] = self.model.subgraph(scenario)
        ranker = self.rankers[scenario]
        return ranker(ranker.collator()(table)).numpy()
