"""Parameter and forward-FLOP counts of an MTFM config on a registry (`mtfm model summary`).

FLOP convention (DESIGN.md, as the HSTU anchors): a multiply-add is 2 FLOPs; attention is
4 * Hq * head_dim per visible (query, key) pair (Q K^T and P V); element-wise ops, norms and
embedding lookups are not counted. Per layer, on N tokens of which NT are targets:
    full:   2 N d (2 Hq dh + 2 Hkv dh) + 2 N Hq dh d + 4 Hq dh * pairs(all queries)
    target: 2 N d (2 Hkv dh) + 2 NT d (2 Hq dh) + 2 NT Hq dh d + 4 Hq dh * pairs(T queries)
(the top layer always runs as target attention, see HTAStack). Backward is 2x forward for the
linear layers and 2.5x for attention (`training_flops`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from mtfm.kernels.mask import TokenKind, build_dynamic_mask
from mtfm.platform.registry import Registry

from .batch import TokenBatch
from .config import ModelConfig
from .tokenizer import group_features


@dataclass(frozen=True)
class TokenMix:
    """Tokens per sample by group, and visible (query, key) pairs per sample."""

    tokens: dict[str, float]
    full_pairs: float
    target_pairs: float
    scenarios: tuple[str, ...]

    @property
    def num_tokens(self) -> float:
        return sum(self.tokens.values())

    @property
    def num_targets(self) -> float:
        return sum(self.tokens[s] for s in self.scenarios)

    @classmethod
    def typical(cls, registry: Registry, targets: int) -> "TokenMix":
        """Every sequence at its max_len and `targets` T-tokens spread evenly over the scenarios,
        realtime events and targets interleaved uniformly in time (a target sees half the R)."""
        tokens = {s.name: float(s.max_len) for s in registry.sequences.values()}
        tokens.update((s, targets / len(registry.scenarios)) for s in registry.scenarios)
        n_h = sum(s.max_len for s in registry.history_sequences)
        n_r = sum(s.max_len for s in registry.realtime_sequences)
        target_pairs = targets * (n_h + n_r / 2 + 1)
        full_pairs = n_h * n_h + n_r * n_h + n_r * (n_r + 1) / 2 + target_pairs
        return cls(tokens, full_pairs, target_pairs, tuple(registry.scenarios))

    @classmethod
    def from_batch(cls, batch: TokenBatch) -> "TokenMix":
        """Exact averages over a batch's users (dense masks: for benchmarks, not training)."""
        counts = torch.bincount(batch.group.cpu(), minlength=len(batch.group_names)).tolist()
        masks = build_dynamic_mask(batch.offsets.cpu(), batch.kind.cpu(), batch.ts.cpu())
        kind = batch.kind.cpu()
        full = sum(int(m.sum()) for m in masks)
        rows = [kind[s:e] == TokenKind.T for s, e in zip(batch.offsets.tolist()[:-1], batch.offsets.tolist()[1:])]
        target = sum(int(m[r].sum()) for m, r in zip(masks, rows))
        b = max(batch.num_users, 1)
        return cls({n: c / b for n, c in zip(batch.group_names, counts)}, full / b, target / b, batch.scenarios)


def forward_flops(config: ModelConfig, registry: Registry, mix: TokenMix) -> dict[str, float]:
    """Forward FLOPs per sample of an MTFM config, by part, and their `total`."""
    d, hq, hkv, dh = config.d_model, config.num_heads, config.kv_heads, config.dim_per_head
    hidden = config.mlp_hidden_dim
    flops: dict[str, float] = defaultdict(float)
    for name, feats in group_features(registry).items():
        in_dim = sum(f.dim if f.is_categorical else 1 for f in feats)
        flops["tokenizer"] += mix.tokens.get(name, 0.0) * 2 * (in_dim * hidden + hidden * d)
    n, nt = mix.num_tokens, mix.num_targets
    for kind in config.run_layer_kinds:
        queries, pairs = (n, mix.full_pairs) if kind == "full" else (nt, mix.target_pairs)
        flops["layer_linear"] += 2 * n * d * 2 * hkv * dh + 2 * queries * d * 2 * hq * dh + 2 * queries * hq * dh * d
        flops["attention"] += 4 * hq * dh * pairs
    m = config.mmoe
    for s in mix.scenarios:
        tasks = len(registry.scenario(s).tasks)
        per_token = 2 * d * m.num_experts * m.expert_dim + tasks * (
            2 * d * m.num_experts + 2 * m.num_experts * m.expert_dim + 2 * (m.expert_dim * m.tower_dim + m.tower_dim))
        flops["heads"] += mix.tokens.get(s, 0.0) * per_token
    flops["total"] = sum(flops.values())
    return dict(flops)


def training_flops(forward: dict[str, float]) -> float:
    """Forward + backward FLOPs of one training pass from `forward_flops`' parts: 3x forward for
    the linear layers and 3.5x for attention (backward 2x and 2.5x, DESIGN.md's convention)."""
    return 3 * forward["total"] + 0.5 * forward.get("attention", 0.0)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by part (embedding tables, tokenizer MLPs, layers, heads) and `total`."""
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if name.startswith("tokenizer.tables."):
            part = "embedding_tables"
        elif name.startswith("tokenizer."):
            part = "tokenizer_mlps"
        elif name.startswith("stack."):
            part = "layers"
        else:
            part = name.split(".")[0]
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return dict(counts)
