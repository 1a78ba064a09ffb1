"""`build_model`: the one place that turns a model config and a registry into a model."""
from __future__ import annotations

from mtfm.platform.registry import Registry

from .config import ModelConfig, restrict_registry
from .mtfm import RecommenderBase


def build_model(config: ModelConfig, registry: Registry) -> RecommenderBase:
    """The model named by `config.architecture` (mtfm | dlrm_mmoe | dcnv2) on `registry`,
    restricted to `config.scenarios` when set (the single-scenario MTFM is `architecture: mtfm`
    with `scenarios: [hp]`). Collate its batches with `Collator(model.registry)`."""
    registry = restrict_registry(registry, config.scenarios, config.source)
    if config.architecture == "mtfm":
        from .mtfm import MTFM

        return MTFM(config, registry)
    if config.architecture == "dlrm_mmoe":
        from .baselines.dlrm_mmoe import DLRMMMoE

        return DLRMMMoE(config, registry)
    from .baselines.dcnv2 import DCNv2

    return DCNv2(config, registry)
