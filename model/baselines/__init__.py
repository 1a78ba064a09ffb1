"""Baselines trained by the same loop as MTFM (same TokenBatch in, same ModelOutput out):
DLRM-style MMoE (`dlrm_mmoe`), DCNv2 (`dcnv2`). The single-scenario MTFM is not a class: it is
`architecture: mtfm` with `scenarios: [<one>]` (see configs/model/single_scenario_hp.yaml).
Build them with `mtfm.model.build_model`."""
from .dcnv2 import DCNv2
from .dlrm_mmoe import DLRMMMoE

__all__ = ["DCNv2", "DLRMMMoE"]
