"""What the non-sequential baselines share: the MTFM tokenizer, target-attention pooling of
the behaviour sequences for each T-token, an interaction network, and MMoE heads.

    x        = HeterogeneousTokenizer(batch)                                      (N, d)
    pooled_t = sum_j silu(alpha <W_q x_t, W_k x_j>) * M_tj / n * W_v x_j         (NT, d), heads
               over the keys j the dynamic mask lets T-token t see (H, earlier R, itself)
    z_t      = interaction(concat(x_t, pooled_t))                                 (NT, out_dim)
    logits   = MMoE_s(z_t) for the T-tokens of scenario s
It reads the same `TokenBatch` and returns the same `ModelOutput` as MTFM, so the same loop
trains it. Subclasses define `interaction` and its `out_dim`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtfm.kernels.hstu_attention import hstu_target_attention
from mtfm.platform.registry import Registry

from ..batch import TokenBatch
from ..config import ModelConfig
from ..heads import MMoEHeads
from ..mtfm import ModelOutput, RecommenderBase
from ..tokenizer import HeterogeneousTokenizer


class TargetAttentionPooling(nn.Module):
    """Pools each T-token's visible behaviour tokens with HSTU target attention (no leakage:
    the dynamic mask hides realtime events at or after the target's ts)."""

    def __init__(self, d_model: int, num_heads: int, norm: float, impl: str):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} must be a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim, self.norm, self.impl = num_heads, d_model // num_heads, norm, impl
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)

    def forward(self, x: Tensor, batch: TokenBatch) -> Tensor:
        """x (N, d) -> (NT, d) in target_index order."""
        q = self.query(x[batch.target_index]).view(-1, self.num_heads, self.head_dim)
        k, v = self.key_value(x).view(-1, 2 * self.num_heads, self.head_dim).chunk(2, dim=1)
        out = hstu_target_attention(q.contiguous(), k.contiguous(), v.contiguous(), batch.offsets, batch.kind,
                                    batch.ts, batch.target_offsets, alpha=1 / math.sqrt(self.head_dim),
                                    norm=self.norm, impl=self.impl)
        return out.flatten(1)


class PooledBaseline(RecommenderBase):
    """The shared skeleton; a subclass sets `out_dim`, builds its interaction, then calls
    `build_heads()`."""

    out_dim: int

    def __init__(self, config: ModelConfig, registry: Registry):
        super().__init__(config, registry)
        d = config.d_model
        self.tokenizer = HeterogeneousTokenizer(registry, d, config.mlp_hidden_dim)
        self.pooling = TargetAttentionPooling(d, config.num_heads, float(config.max_seq_len), config.attention_impl)
        self.dropout = nn.Dropout(config.dropout)

    def build_heads(self) -> None:
        m = self.config.mmoe
        self.heads = MMoEHeads(self.registry, self.out_dim, m.num_experts, m.expert_dim, m.tower_dim)

    def interaction(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: TokenBatch) -> ModelOutput:
        present = [s for s in batch.scenarios if batch.features[s].num_tokens]
        if not present:
            return ModelOutput({})
        x = self.tokenizer(batch)
        z = self.dropout(self.interaction(torch.cat([x[batch.target_index], self.pooling(x, batch)], dim=1)))
        logits = {}
        for s in present:
            rows = torch.searchsorted(batch.target_index, batch.features[s].index)
            logits[s] = self.heads(z[rows], s)
        return ModelOutput(logits)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim), nn.SiLU())

