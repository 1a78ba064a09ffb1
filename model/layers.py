"""Group LayerNorm, the HSTU layer with GQA (full or target attention) and the HTA stack.

HSTU layer on the packed tokens X (N, d_model), per token group g (GLN group):
    Q, U = silu(W_qu GLN_1(X))         Q, U: (N, Hq, dh)
    K, V = silu(W_kv GLN_1(X))         K, V: (N, Hkv, dh), query head h reads kv head h // (Hq/Hkv)
    A[i] = sum_j silu(alpha <Q_i, K_j>) * M_ij / n * V_j      (mtfm.kernels.hstu_attention)
    Y    = X + W_o dropout(GLN_2(A * U))
M is the dynamic mask (H visible to all, R to later tokens, each token to itself) and n the
constant `max_seq_len`. A target-attention layer computes Y only for the T rows (queries =
T-tokens, keys = every token) and passes the other rows through unchanged; it equals the T
rows of a full layer with the same weights (no token attends to a T-token other than itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtfm.kernels.group_layer_norm import group_layer_norm, group_layer_norm_residual
from mtfm.kernels.hstu_attention import hstu_attention, hstu_split_target_attention
from mtfm.kernels.linear_silu import linear, linear_silu

from .batch import TokenBatch
from .column_blocks import column_blocks
from .context_kv import context_keys_values
from .token_split import SplitKeys, TokenSplit

LAYER_KINDS = ("full", "target")


@dataclass(frozen=True)
class JaggedContext:
    """What every layer needs about the token axis, built once per forward from a TokenBatch.

    group: (N,) int64 index into `group_names`, which lists only the groups that HAVE tokens in
    the batch, so the GLN parameters of absent groups take no part (and get no gradient).
    target_group: (NT,) the T-tokens' groups (target_index order) as indices into
    `target_group_names` (the scenarios present).
    """

    offsets: Tensor
    target_offsets: Tensor
    kind: Tensor
    ts: Tensor
    target_index: Tensor
    group: Tensor
    group_names: tuple[str, ...]
    target_group: Tensor
    target_group_names: tuple[str, ...]

    @classmethod
    def from_batch(cls, batch: TokenBatch) -> "JaggedContext":
        present = tuple(name for name in batch.group_names if batch.features[name].num_tokens)
        targets = tuple(name for name in batch.scenarios if batch.features[name].num_tokens)
        num_groups = len(batch.group_names)
        return cls(batch.offsets, batch.target_offsets, batch.kind, batch.ts, batch.target_index,
                   compact_groups(batch.group, num_groups), present,
                   compact_groups(batch.group[batch.target_index], num_groups), targets)


def compact_groups(group: Tensor, num_groups: int) -> Tensor:
    """Group ids in [0, num_groups) -> their rank among the ids that occur in `group`, i.e. indices
    into the names of the groups present, in order. On the tensor's device, no host sync."""
    present = torch.zeros(num_groups, dtype=torch.int64, device=group.device).index_fill_(0, group, 1)
    return (torch.cumsum(present, 0) - 1)[group]


@dataclass(frozen=True)
class AttentionParams:
    """The HSTU attention hyper-parameters shared by every layer of a stack."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    alpha: float
    norm: float
    impl: str = "auto"


class GroupLayerNorm(nn.Module):
    """LayerNorm with per-group affine parameters, keyed by group name.

    The (G, D) weight and bias handed to the kernel are stacked at forward time from the
    groups present in the batch, so checkpoints keep loading when groups are added.
    """

    def __init__(self, group_names: tuple[str, ...], dim: int, eps: float = 1e-5, impl: str = "auto"):
        super().__init__()
        self.weight = nn.ParameterDict({g: nn.Parameter(torch.ones(dim)) for g in group_names})
        self.bias = nn.ParameterDict({g: nn.Parameter(torch.zeros(dim)) for g in group_names})
        self.eps, self.impl = eps, impl

    def forward(self, x: Tensor, group: Tensor, group_names: tuple[str, ...]) -> Tensor:
        """x (N, D), group (N,) indices into group_names -> (N, D)."""
        if not group_names:  # no group present means no rows
            return x
        return self.with_affine(x, group, self.affine(group_names))

    def with_affine(self, x: Tensor, group: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
        """The same with the groups' (G, D) weight and bias given (stacked by the caller)."""
        return group_layer_norm(x, group, *affine, eps=self.eps, impl=self.impl)

    def residual(self, x: Tensor, group: Tensor, group_names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """(x, self(x, group, group_names)) at the head of a residual branch x + f(GLN(x)), the first
        to be the residual add's operand: x's two gradients are then summed in the GLN's backward
        (`group_layer_norm_residual`)."""
        if not group_names:
            return x, x
        return self.with_affine_residual(x, group, self.affine(group_names))

    def with_affine_residual(self, x: Tensor, group: Tensor, affine: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """`residual` with the groups' (G, D) weight and bias given."""
        return group_layer_norm_residual(x, group, *affine, eps=self.eps, impl=self.impl)

    def affine(self, group_names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """The (G, D) weight and bias of `group_names`, in the parameters' dtype (the op takes them in
        any float dtype beside a low-precision x, so autocast costs no casts here): one stack."""
        affine = torch.stack([self.weight[g] for g in group_names] + [self.bias[g] for g in group_names])
        return affine.split(len(group_names))


class HSTULayer(nn.Module):
    """One HSTU layer with GQA; `kind` 'full' (every token a query) or 'target' (T-tokens only).

    recompute_context: a target layer keeps, per H/R row, only K and V for backward (see
    `run_context_keys_values`)."""

    def __init__(self, kind: str, group_names: tuple[str, ...], target_group_names: tuple[str, ...], d_model: int,
                 attn: AttentionParams, dropout: float = 0.0, norm_impl: str = "auto", recompute_context: bool = True):
        super().__init__()
        if kind not in LAYER_KINDS:
            raise ValueError(f"layer kind must be one of {LAYER_KINDS}, found {kind!r}")
        self.kind, self.attn, self.recompute_context = kind, attn, recompute_context
        q_width, kv_width = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        self.input_norm = GroupLayerNorm(group_names, d_model, impl=norm_impl)
        self.query_gate = nn.Linear(d_model, 2 * q_width)
        self.key_value = nn.Linear(d_model, 2 * kv_width)
        # A target layer normalises only T rows: it has GLN parameters for the scenarios only.
        output_groups = target_group_names if kind == "target" else group_names
        self.output_norm = GroupLayerNorm(output_groups, q_width, impl=norm_impl)
        self.output = nn.Linear(q_width, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: JaggedContext) -> Tensor:
        """x (N, d_model) -> (N, d_model)."""
        if self.kind == "target" and ctx.target_group_names:
            split = TokenSplit.of(ctx, self.input_norm.impl)
            x_context, x_t = split.split(x)
            (affine, k_context, v_context), = run_context_keys_values([self], x_context, split, ctx.group_names)
            return x.index_copy(0, ctx.target_index, self.forward_target_rows(x_t, affine, k_context, v_context,
                                                                             split, ctx))
        return self.forward_with_kv(x, ctx)[0]

    def forward_with_kv(self, x: Tensor, ctx: JaggedContext) -> tuple[Tensor, Tensor, Tensor]:
        """(Y, K, V): the layer's output and the keys/values it computed for every token, for a
        full layer or a batch without T-tokens (a target layer then passes x through)."""
        if self.kind == "full":
            x, h = self.input_norm.residual(x, ctx.group, ctx.group_names)
            q, u, k, v = self.projections(h)
            return x + self.gated_output(self.attention(q, k, v, u, ctx), ctx.group, ctx.group_names), k, v
        if ctx.target_group_names:
            raise ValueError("forward_with_kv: a target layer on a batch with T-tokens; call forward")
        return x, *self.keys_values(self.input_norm(x, ctx.group, ctx.group_names))

    def forward_target_rows(self, x_t: Tensor, affine: tuple[Tensor, Tensor], k_context: Tensor, v_context: Tensor,
                            split: TokenSplit, ctx: JaggedContext) -> Tensor:
        """A target layer on the T rows x_t (NT, d_model), as `split` orders them, against the H and R
        rows' keys and values (`run_context_keys_values`): returns the new x_t. affine: the input
        GLN's (G, D) weight and bias of ctx.group_names.

        A target layer leaves the H and R rows as they are, so the stack hands every layer of a
        run of target layers the same H and R rows and carries only x_t: no full-size residual
        update per layer, and autograd keeps one copy of the H and R rows for the whole run. The
        keys and values stay in the two halves too (split target attention): nothing is merged."""
        x_t, h_t = self.input_norm.with_affine_residual(x_t, split.target_group, affine)
        return self.target_rows_update(x_t, h_t, k_context, v_context, split.keys, ctx.target_group,
                                       ctx.target_group_names)

    def forward_targets(self, x_t: Tensor, k_context: Tensor, v_context: Tensor, keys: SplitKeys,
                        target_group: Tensor, target_group_names: tuple[str, ...]) -> Tensor:
        """T rows only, against keys/values of H and R tokens computed earlier (`forward_with_kv`
        on the same users without T-tokens): x_t (NT, d_model) -> (NT, d_model). Equal to the T
        rows of `forward` (either kind) on the batch holding both, since H and R never see T.
        target_group (NT,) indexes target_group_names, the scenarios: groups of both GLNs."""
        h_t = self.input_norm(x_t, target_group, target_group_names)
        return self.target_rows_update(x_t, h_t, k_context, v_context, keys, target_group, target_group_names)

    def target_rows_update(self, x_t: Tensor, h_t: Tensor, k_context: Tensor, v_context: Tensor, keys: SplitKeys,
                           target_group: Tensor, target_group_names: tuple[str, ...]) -> Tensor:
        """x_t plus the layer's update of the T rows, from their normalised input h_t and the H and
        R rows' keys and values: the T rows' own keys and values are computed here and kept apart.
        target_group (NT,) indexes target_group_names, the output GLN's groups (the scenarios)."""
        q, u, k_t, v_t = self.projections(h_t)
        a = self.attn
        gated = hstu_split_target_attention(q, k_context, v_context, k_t, v_t, keys.context_offsets,
                                            keys.target_offsets, keys.context_kind, keys.context_ts, keys.target_ts,
                                            alpha=a.alpha, norm=a.norm, impl=a.impl, gate=u)
        # float32 x_t plus the bf16 update is float32 already: the cast is a no-op then (no cast kernel each way)
        return (x_t + self.gated_output(gated, target_group, target_group_names)).to(x_t.dtype)

    def keys_values(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """K, V (N, Hkv, dh) from the normalised input h (N, d_model)."""
        return self.heads_of_keys_values(linear_silu(h, self.key_value.weight, self.key_value.bias,
                                                     impl=self.input_norm.impl))

    def heads_of_keys_values(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """K, V (N, Hkv, dh) from the projection's activations kv (N, 2 * Hkv * dh): views into kv
        (the attention kernels read rows of any stride; a copy would cost a kernel each)."""
        a = self.attn
        k, v = column_blocks(kv, [(a.num_kv_heads, a.head_dim)] * 2)
        return k, v

    def projections(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Q, U (N, Hq, dh) and K, V (N, Hkv, dh) from the normalised input h (N, d_model): both
        projections in one matmul, views into its activations. One matmul, one silu and one bias
        sum where two projections took two of each (and their backwards): the target-heavy steps
        are host-bound; silu's backward also sums the bias gradient (`linear_silu`). The attention
        takes U as its gate, so the four blocks' gradients come back as one buffer (`column_blocks`)."""
        a = self.attn
        weight = torch.cat([self.query_gate.weight, self.key_value.weight])
        bias = torch.cat([self.query_gate.bias, self.key_value.bias])
        q, u, k, v = column_blocks(linear_silu(h, weight, bias, impl=self.input_norm.impl),
                                   [(a.num_heads, a.head_dim)] * 2 + [(a.num_kv_heads, a.head_dim)] * 2)
        return q, u, k, v

    def attention(self, q: Tensor, k: Tensor, v: Tensor, u: Tensor, ctx: JaggedContext) -> Tensor:
        """A * U (N, Hq, dh): full attention, every token a query, gated by U."""
        a = self.attn
        return hstu_attention(q, k, v, ctx.offsets, ctx.kind, ctx.ts, alpha=a.alpha, norm=a.norm, impl=a.impl, gate=u)

    def gated_output(self, gated: Tensor, group: Tensor, group_names: tuple[str, ...]) -> Tensor:
        """W_o dropout(GLN_2(A * U)) for the queries' gated attention A * U (Nq, Hq, dh), the
        queries' output-GLN groups `group` indexing group_names."""
        normed = self.dropout(self.output_norm(gated.flatten(1), group, group_names))
        return linear(normed, self.output.weight, self.output.bias, impl=self.input_norm.impl)


def run_context_keys_values(layers, x_context: Tensor, split: TokenSplit,
                            group_names: tuple[str, ...]) -> list[tuple[tuple[Tensor, Tensor], Tensor, Tensor]]:
    """For a run of target layers on the same H and R rows x_context (N - NT, d_model), per layer:
    its input GLN's (G, D) weight and bias of group_names (stacked once for the run, for the T rows
    too) and the H and R rows' keys and values K, V (N - NT, Hkv, dh).

    The run's keys and values come from `context_keys_values`: each row normalised once for the
    whole run, the projections into one buffer; with `recompute_context` (the layers' setting) only
    K and V are kept per H/R row for backward. Under torch.compile each layer runs its own GLN and
    projection (compile traces the plain path: the Function calls the GLN implementation, not the
    op that compile knows)."""
    first = layers[0]
    norm, num_layers, num_groups = first.input_norm, len(layers), len(group_names)
    stacked = torch.stack([layer.input_norm.weight[g] for layer in layers for g in group_names]
                          + [layer.input_norm.bias[g] for layer in layers for g in group_names])
    norm_weight, norm_bias = stacked.view(2, num_layers, num_groups, -1)
    affines = list(zip(norm_weight.unbind(0), norm_bias.unbind(0)))
    if not torch.compiler.is_compiling():
        weight = torch.stack([layer.key_value.weight for layer in layers])
        bias = torch.stack([layer.key_value.bias for layer in layers])
        kvs = context_keys_values(x_context, split.context_group, norm_weight, norm_bias, weight, bias, eps=norm.eps,
                                  impl=norm.impl, recompute=first.recompute_context)
    else:
        kvs = [F.silu(layer.key_value(layer.input_norm.with_affine(x_context, split.context_group, affine)))
               for layer, affine in zip(layers, affines)]
    return [(affine, *layer.heads_of_keys_values(kv)) for layer, affine, kv in zip(layers, affines, kvs)]


class HTAStack(nn.Module):
    """Hybrid target attention: the layers bottom to top, each 'target' or 'full' as given
    (`ModelConfig.run_layer_kinds`: the top one is always target)."""

    def __init__(self, layer_kinds: tuple[str, ...], group_names: tuple[str, ...],
                 target_group_names: tuple[str, ...], d_model: int, attn: AttentionParams,
                 dropout: float = 0.0, norm_impl: str = "auto", recompute_context: bool = True):
        super().__init__()
        if layer_kinds[-1] != "target":
            raise ValueError(f"HTAStack: the top layer runs as target attention, found {layer_kinds}")
        self.layers = nn.ModuleList(
            HSTULayer(kind, group_names, target_group_names, d_model, attn, dropout, norm_impl, recompute_context)
            for kind in layer_kinds)
        # run_end[i]: one past the last layer of the run of target layers that layer i is in.
        n = len(layer_kinds)
        self.run_end = [next((j for j in range(i, n) if layer_kinds[j] == "full"), n) for i in range(n)]

    def forward(self, x: Tensor, ctx: JaggedContext, context_kv: Tensor | None = None) -> Tensor:
        """x (N, d_model) -> the T rows after the top layer, (NT, d_model) in target_index order.

        A run of target layers works on x split into its H and R rows (left as they are) and its
        T rows (`HSTULayer.forward_target_rows`), the run's keys and values of the H and R rows
        computed at its start (`run_context_keys_values`); the halves are merged again before a
        full layer. context_kv: if given, (num_layers, 2, N - NT, Hkv, dh), receives every layer's
        keys and values of the H and R rows (a serving pass that also fills the user-side cache)."""
        if not ctx.target_group_names:
            return x[:0]
        split = TokenSplit.of(ctx, self.layers[0].input_norm.impl)
        x_context = x_t = None  # x's two halves while a run of target layers goes on (x is then stale)
        for i, layer in enumerate(self.layers):
            layer_kv = None if context_kv is None else context_kv[i]
            if layer.kind == "full":
                if x_t is not None:
                    x, x_context, x_t = split.merge(x_context, x_t), None, None
                if layer_kv is None:
                    x = layer(x, ctx)
                else:
                    x, k, v = layer.forward_with_kv(x, ctx)
                    _keep_context_rows(layer_kv, k, v, split)
            else:
                if x_t is None:
                    x_context, x_t = split.split(x)
                    run = iter(run_context_keys_values(self.layers[i:self.run_end[i]], x_context, split,
                                                       ctx.group_names))
                affine, k_context, v_context = next(run)
                if layer_kv is not None:
                    layer_kv[0].copy_(k_context)
                    layer_kv[1].copy_(v_context)
                x_t = layer.forward_target_rows(x_t, affine, k_context, v_context, split, ctx)
        return x_t


def _keep_context_rows(context_kv: Tensor, k: Tensor, v: Tensor, split: TokenSplit) -> None:
    """The H and R rows of a layer's keys and values k, v (N, Hkv, dh) into context_kv (2, N - NT, Hkv, dh)."""
    torch.index_select(k, 0, split.context_index, out=context_kv[0])
    torch.index_select(v, 0, split.context_index, out=context_kv[1])
