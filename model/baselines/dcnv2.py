"""DCNv2 baseline (Wang et al. 2021, stacked): explicit feature crosses, then a deep MLP,
over the T-token features and its target-attention-pooled sequences, into MMoE heads.

    z_0 = concat(x_t, p_t)                                   (2d)
    z_{l+1} = z_0 * (W_l z_l + b_l) + z_l                    l < cross_layers (full-rank W_l)
    out = MLP(z_L)                                           (d)
"""
from __future__ import annotations

from torch import Tensor, nn

from mtfm.platform.registry import Registry

from ..config import ModelConfig
from .pooled import PooledBaseline, mlp


class DCNv2(PooledBaseline):
    def __init__(self, config: ModelConfig, registry: Registry):
        super().__init__(config, registry)
        d = config.d_model
        self.out_dim = d
        self.cross = nn.ModuleList(nn.Linear(2 * d, 2 * d) for _ in range(config.cross_layers))
        self.deep = mlp(2 * d, config.mlp_hidden_dim, d)
        self.build_heads()

    def interaction(self, z: Tensor) -> Tensor:
        z0 = z
        for layer in self.cross:
            z = z0 * layer(z) + z
        return self.deep(z)
