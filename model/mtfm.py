"""The MTFM model (tokenizer -> HTA stack -> MMoE heads) and its per-scenario subgraph.

    x       = HeterogeneousTokenizer(batch)                     (N, d_model)
    x_t     = HTAStack(x, dynamic mask from kind/ts)            (NT, d_model): the T rows
    z_s     = GLN_final(x_t[T-tokens of scenario s], group s)   (n_s, d_model)
    logits  = MMoE_s(z_s)                                       (n_s, num_tasks_s)

`MTFM.subgraph(s)` is a `ScenarioRanker` (ranker.py): the same classes built on the registry restricted
to scenario s (shared sequences + s), loaded with the full model's weights by parameter name.
Since every module is keyed by group/scenario/task name, its parameter names are a subset of
the full model's, and it gives exactly the full model's scores for s (invariant 2).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mtfm.platform.registry import Registry

from .batch import TokenBatch
from .config import COMPUTE_DTYPES, ModelConfig
from .heads import MMoEHeads
from .layers import AttentionParams, GroupLayerNorm, HTAStack, JaggedContext
from .tokenizer import HeterogeneousTokenizer, group_features

if TYPE_CHECKING:
    from .ranker import ScenarioRanker

TORCH_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


@dataclass
class ModelOutput:
    """What every architecture returns (MTFM and the baselines), consumed by the loss.

    logits[s]: (n_s, num_tasks_s) float logits of scenario s's T-tokens, row r belonging to
    batch.features[s] row r (same order as its labels), tasks in registry order. Scenarios with
    no T-token in the batch are absent.
    """

    logits: dict[str, Tensor]

    def probabilities(self) -> dict[str, Tensor]:
        return {s: torch.sigmoid(v.float()) for s, v in self.logits.items()}


class RecommenderBase(nn.Module):
    """What the training loop relies on: `registry` (collate with it), `config`, forward(batch)
    -> ModelOutput, and `autocast(device_type)` for the config's compute dtype."""

    def __init__(self, config: ModelConfig, registry: Registry):
        super().__init__()
        self.config, self.registry = config, registry

    @property
    def compute_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.config.compute_dtype]

    def autocast(self, device_type: str, cache: bool = True) -> contextlib.AbstractContextManager:
        """torch.autocast to the config's compute dtype on CUDA; a no-op on CPU or for float32.
        cache=False for CUDA graph capture: cached casts of the weights would outlive the capture."""
        if device_type != "cuda" or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype, cache_enabled=cache)


class MTFM(RecommenderBase):
    """The multi-scenario foundation model. `registry` decides the groups, tokenizers and heads."""

    def __init__(self, config: ModelConfig, registry: Registry):
        super().__init__(config, registry)
        group_names = tuple(group_features(registry))
        attn = AttentionParams(config.num_heads, config.kv_heads, config.dim_per_head, config.attention_alpha,
                               float(config.max_seq_len), config.attention_impl)
        self.tokenizer = HeterogeneousTokenizer(registry, config.d_model, config.mlp_hidden_dim)
        self.stack = HTAStack(config.run_layer_kinds, group_names, tuple(registry.scenarios), config.d_model, attn,
                              config.dropout, config.norm_impl, config.recompute_target_context)
        self.final_norm = GroupLayerNorm(tuple(registry.scenarios), config.d_model, impl=config.norm_impl)
        mmoe = config.mmoe
        self.heads = MMoEHeads(registry, config.d_model, mmoe.num_experts, mmoe.expert_dim, mmoe.tower_dim)

    def forward(self, batch: TokenBatch) -> ModelOutput:
        ctx = JaggedContext.from_batch(batch)
        x_t = self.stack(self.tokenizer(batch), ctx)
        # Both index lists increase, so a scenario's T-tokens are found in target_index by search.
        rows = {s: torch.searchsorted(batch.target_index, batch.features[s].index)
                for s in batch.scenarios if batch.features[s].num_tokens}
        return ModelOutput({s: self.score_targets(x_t[r], s) for s, r in rows.items()})

    def score_targets(self, x_s: Tensor, scenario: str) -> Tensor:
        """Logits (n_s, num_tasks) from the stack's output rows x_s (n_s, d_model) of one scenario's T-tokens."""
        group = torch.zeros(x_s.shape[0], dtype=torch.int64, device=x_s.device)
        return self.heads(self.final_norm(x_s, group, (scenario,)), scenario)

    def subgraph(self, scenario: str) -> "ScenarioRanker":
        """A standalone module for one scenario, holding a copy of the weights it needs:
        the shared sequence tokenizers and embedding tables, the scenario's tokenizer, the
        layers with only its GLN groups, its final norm, the shared experts and its gates and
        towers. Same device and train/eval mode as this model."""
        from .ranker import ScenarioRanker

        ranker = ScenarioRanker(self.config, self.registry, scenario)
        state = self.state_dict()
        ranker.load_state_dict({name: state[name] for name in ranker.state_dict()})
        device = next(self.parameters()).device
        return ranker.to(device).train(self.training)
