"""MMoE heads over the final T-token embeddings: shared experts, one gate and tower per
(scenario, task).

    e_k(x) = silu(W_k x + b_k)                      k = 1..E experts, (expert_dim,)
    g_{s,t}(x) = softmax(G_{s,t} x)                 (E,)
    logit_{s,t}(x) = tower_{s,t}(sum_k g_{s,t,k}(x) e_k(x))   tower = Linear -> SiLU -> Linear(1)
Gates and towers are keyed by scenario then task name; a scenario with no T-tokens in a batch
runs none of its gates or towers, so they get no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mtfm.platform.registry import Registry


class MMoEHeads(nn.Module):
    def __init__(self, registry: Registry, d_model: int, num_experts: int, expert_dim: int, tower_dim: int):
        super().__init__()
        self.num_experts, self.expert_dim = num_experts, expert_dim
        self.experts = nn.Sequential(nn.Linear(d_model, num_experts * expert_dim), nn.SiLU())
        self.gates = nn.ModuleDict({
            s.name: nn.ModuleDict({t: nn.Linear(d_model, num_experts) for t in s.task_names})
            for s in registry.scenarios.values()
        })
        self.towers = nn.ModuleDict({
            s.name: nn.ModuleDict({t: nn.Sequential(nn.Linear(expert_dim, tower_dim), nn.SiLU(), nn.Linear(tower_dim, 1))
                                   for t in s.task_names})
            for s in registry.scenarios.values()
        })

    def forward(self, x: Tensor, scenario: str) -> Tensor:
        """x (n, d_model): T-tokens of one scenario -> logits (n, num_tasks), tasks in registry order."""
        experts = self.experts(x).view(-1, self.num_experts, self.expert_dim)
        logits = []
        for task, gate in self.gates[scenario].items():
            # A weighted sum, not an einsum: that one is a batched matmul of n (1 x E) @ (E x d) products,
            # whose backward (n outer products) took 0.17 ms per call at 14K T rows on the H200.
            weights = torch.softmax(gate(x), dim=-1).to(experts.dtype)
            mixed = (weights.unsqueeze(-1) * experts).sum(1)
            logits.append(self.towers[scenario][task](mixed))
        return torch.cat(logits, dim=1)
