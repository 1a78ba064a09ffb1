"""DLRM-style MMoE baseline: T-token features and target-attention-pooled sequences,
concatenated with their element-wise product (DLRM's feature interaction), through a top MLP,
into MMoE heads.

    z_t = MLP(concat(x_t, p_t, x_t * p_t))      x_t: T-token (d), p_t: pooled sequences (d)
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtfm.platform.registry import Registry

from ..config import ModelConfig
from .pooled import PooledBaseline, mlp


class DLRMMMoE(PooledBaseline):
    def __init__(self, config: ModelConfig, registry: Registry):
        super().__init__(config, registry)
        d = config.d_model
        self.out_dim = d
        self.top_mlp = mlp(3 * d, config.mlp_hidden_dim, d)
        self.build_heads()

    def interaction(self, z: Tensor) -> Tensor:
        x, pooled = z.chunk(2, dim=1)
        return self.top_mlp(torch.cat([x, pooled, x * pooled], dim=1))
