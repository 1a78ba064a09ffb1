"""`ScenarioRanker`: one scenario's subgraph of MTFM, scoring requests for serving.

A request is one user (sequences + the scenario's user features) and K candidates; a batch
holds B requests. Two ways to score, with the same result (to float tolerance):

    probs = ranker(batch)                                  # one pass over H, R and T tokens
    user = ranker.encode_users(batch)                      # H and R tokens once ...
    probs = ranker.score_candidates(user, chunk_batch)     # ... then candidates, chunk by chunk

The split is exact because H and R tokens never attend to T-tokens: each layer's keys and
values of H and R depend on the user alone, and a T-token's update in every layer (full or
target) is its target-attention row over those keys plus its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.platform.registry import Registry

from .batch import TokenBatch
from .config import ModelConfig, restrict_registry
from .layers import JaggedContext, compact_groups
from .mtfm import MTFM
from .token_split import SplitKeys, context_rows


@dataclass
class UserSide:
    """The user side of B requests: the keys and values of every H and R token in every layer,
    kv (num_layers, 2, Nc, Hkv, dh) (kv[l, 0] the keys, kv[l, 1] the values), with what split
    target attention needs of their layout: offsets (B+1,), kind and ts (Nc,)."""

    user_id: Tensor
    offsets: Tensor
    kind: Tensor
    ts: Tensor
    kv: Tensor


class ScenarioRanker(MTFM):
    """MTFM restricted to one scenario: scores requests with exactly the full model's scores.

    Collate requests with `ranker.collator()` (its registry has only this scenario). Output rows
    are the batch's T-tokens in order (per request by ts, ties in request order), so request
    b's candidates are rows batch.target_offsets[b]:batch.target_offsets[b+1].
    """

    def __init__(self, config: ModelConfig, registry: Registry, scenario: str):
        super().__init__(config, restrict_registry(registry, [scenario]))
        self.scenario = scenario
        self.task_names = registry.scenario(scenario).task_names

    def collator(self, **kwargs):
        """A `Collator` for this scenario's requests (kwargs: max_len)."""
        from .collate import Collator

        return Collator(self.registry, **kwargs)

    def forward(self, batch: TokenBatch) -> Tensor:
        """Per candidate per task probabilities (NT, num_tasks), float32."""
        self._check(batch)
        ctx = JaggedContext.from_batch(batch)
        return self._probabilities(self.stack(self.tokenizer(batch), ctx), batch)

    def forward_with_user_sides(self, batch: TokenBatch) -> tuple[Tensor, UserSide]:
        """`forward(batch)` and the batch's user side, equal to `encode_users(batch)`, from the same
        pass: each layer's keys and values of the H and R rows are copied out as it computes them
        (H and R never attend to T, so they are those of the user alone)."""
        self._check(batch)
        if not batch.num_targets:
            return self(batch), self.encode_users(batch)
        ctx = JaggedContext.from_batch(batch)
        context = context_rows(batch.num_tokens, batch.target_index)
        kv = self._context_kv(context.shape[0], batch.device)
        probs = self._probabilities(self.stack(self.tokenizer(batch), ctx, kv), batch)
        user = UserSide(batch.user_id, batch.offsets - batch.target_offsets, batch.kind[context], batch.ts[context], kv)
        return probs, user

    def encode_users(self, batch: TokenBatch) -> UserSide:
        """The user side of the batch's requests (its T-tokens, if any, are ignored, not tokenized)."""
        self._check(batch)
        context = context_rows(batch.num_tokens, batch.target_index)
        offsets = batch.offsets - batch.target_offsets  # T-tokens are the last of each user
        names = self.context_group_names(batch)
        group = compact_groups(batch.group[context], len(batch.group_names))
        empty = context[:0]
        ctx = JaggedContext(offsets, torch.zeros_like(offsets), batch.kind[context], batch.ts[context], empty,
                            group, names, empty, ())
        x = self.tokenizer(batch, groups=names)[context]
        kv = self._context_kv(context.shape[0], batch.device)
        for i, layer in enumerate(self.stack.layers):
            x, kv[i, 0], kv[i, 1] = layer.forward_with_kv(x, ctx)
        return UserSide(batch.user_id, offsets, ctx.kind, ctx.ts, kv)

    def _context_kv(self, rows: int, device: torch.device) -> Tensor:
        """An empty (num_layers, 2, rows, Hkv, dh) buffer for a user side's keys and values, in the
        dtype the layers' key/value projections give: autocast's when it is on, else their weights'."""
        first = self.stack.layers[0]
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else first.key_value.weight.dtype
        return torch.empty(len(self.stack.layers), 2, rows, first.attn.num_kv_heads, first.attn.head_dim,
                           dtype=dtype, device=device)

    @staticmethod
    def context_group_names(batch: TokenBatch) -> tuple[str, ...]:
        """The groups of the batch's H and R tokens, present in it: those of its user side."""
        return tuple(n for n in batch.group_names if n not in batch.scenarios and batch.features[n].num_tokens)

    def score_candidates(self, user: UserSide, batch: TokenBatch, *, check_users: bool = True) -> Tensor:
        """Probabilities (NT, num_tasks) of the batch's T-tokens against `user` (same users, same
        order). The batch's own H and R tokens, if any, are ignored (not even tokenized), so a
        chunk may be collated from the full request table or from one with empty sequences.
        check_users=False skips comparing the user ids, a host sync (CUDA graph capture)."""
        self._check(batch)
        if check_users and not torch.equal(batch.user_id, user.user_id):
            raise ValueError("score_candidates: the batch's users differ from those of the encoded user side")
        if not batch.num_targets:
            return torch.zeros(0, len(self.task_names), device=batch.device)
        keys = SplitKeys(user.offsets, user.kind, user.ts, batch.target_offsets, batch.ts[batch.target_index])
        target_group = torch.zeros_like(batch.target_index)  # one scenario
        x_t = self.tokenizer.group_tokens(batch, self.scenario)  # one scenario: its rows are target_index
        for layer, kv in zip(self.stack.layers, user.kv):
            x_t = layer.forward_targets(x_t, kv[0], kv[1], keys, target_group, (self.scenario,))
        return self._probabilities(x_t, batch)

    def _probabilities(self, x_t: Tensor, batch: TokenBatch) -> Tensor:
        if not batch.num_targets:
            return x_t.new_zeros(0, len(self.task_names), dtype=torch.float32)
        return torch.sigmoid(self.score_targets(x_t, self.scenario).float())

    def _check(self, batch: TokenBatch) -> None:
        if batch.scenarios != (self.scenario,):
            raise ValueError(f"ScenarioRanker({self.scenario!r}) got a batch with scenarios {batch.scenarios}; "
                             "collate with ranker.collator()")
