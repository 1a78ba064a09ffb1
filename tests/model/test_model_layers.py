"""HSTU layer: target == full layer's T rows; GQA (and Hkv == Hq multi-head) against an
independent dense implementation written from DESIGN.md's formulas."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from model_test_utils import REPO, random_table
from mtfm.model import Collator
from mtfm.model.layers import AttentionParams, HSTULayer, JaggedContext
from mtfm.platform.registry import load_registry

REGISTRY = load_registry(REPO / "configs")
GROUPS = ("history", "realtime", "hp", "phf", "sqs")
SCENARIOS = ("hp", "phf", "sqs")
D_MODEL = 16


def make_layer(kind, heads, kv_heads, head_dim, seed):
    torch.manual_seed(seed)
    attn = AttentionParams(heads, kv_heads, head_dim, alpha=1 / math.sqrt(head_dim), norm=64.0, impl="reference")
    layer = HSTULayer(kind, GROUPS, SCENARIOS, D_MODEL, attn, norm_impl="reference").double()
    with torch.no_grad():  # non-trivial GLN parameters, so a wrong group would show
        for p in layer.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return layer.eval()


def batch_and_input(seed, users=3):
    table = random_table(REGISTRY, users, seed, lengths={"history": (0, 6), "realtime": (0, 5), "hp": (0, 3),
                                                         "phf": (0, 3), "sqs": (0, 2)})
    batch = Collator(REGISTRY)(table)
    x = torch.randn(batch.num_tokens, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return batch, x


def dense_layer(layer, batch, x):
    """The HSTU layer, token by token and head by head, with the mask from its definition."""
    a = layer.attn
    kinds, ts, groups = batch.kind.tolist(), batch.ts.tolist(), batch.group.tolist()
    bounds = batch.offsets.tolist()

    def gln(norm, v, i):
        name = batch.group_names[groups[i]]
        return F.layer_norm(v, v.shape, norm.weight[name], norm.bias[name], eps=norm.eps)

    h = torch.stack([gln(layer.input_norm, x[i], i) for i in range(len(x))])
    qu = F.silu(h @ layer.query_gate.weight.T + layer.query_gate.bias)
    kv = F.silu(h @ layer.key_value.weight.T + layer.key_value.bias)
    q, u = qu[:, : a.num_heads * a.head_dim], qu[:, a.num_heads * a.head_dim:]
    k, v = kv[:, : a.num_kv_heads * a.head_dim], kv[:, a.num_kv_heads * a.head_dim:]
    out = x.clone()
    for b in range(len(bounds) - 1):
        for i in range(bounds[b], bounds[b + 1]):
            if layer.kind == "target" and kinds[i] != 2:
                continue
            heads = []
            for hq in range(a.num_heads):
                g = hq // (a.num_heads // a.num_kv_heads)
                qi = q[i, hq * a.head_dim:(hq + 1) * a.head_dim]
                acc = torch.zeros(a.head_dim, dtype=x.dtype)
                for j in range(bounds[b], bounds[b + 1]):
                    if kinds[j] == 0 or (kinds[j] == 1 and ts[j] < ts[i]) or i == j:
                        kj = k[j, g * a.head_dim:(g + 1) * a.head_dim]
                        vj = v[j, g * a.head_dim:(g + 1) * a.head_dim]
                        acc = acc + F.silu(a.alpha * qi @ kj) / a.norm * vj
                heads.append(acc * u[i, hq * a.head_dim:(hq + 1) * a.head_dim])
            gated = torch.cat(heads)
            out[i] = x[i] + layer.output(gln(layer.output_norm, gated, i))
    return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(2, 2, 4), (3, 3, 2), (4, 2, 3), (4, 1, 4)]))
def test_full_layer_matches_dense_multi_head_and_gqa(seed, shape):
    heads, kv_heads, head_dim = shape
    layer = make_layer("full", heads, kv_heads, head_dim, seed)
    batch, x = batch_and_input(seed)
    torch.testing.assert_close(layer(x, JaggedContext.from_batch(batch)), dense_layer(layer, batch, x))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(2, 2, 4), (4, 2, 3), (2, 1, 4)]))
def test_target_layer_equals_full_layer_on_t_rows_and_passes_others_through(seed, shape):
    full = make_layer("full", *shape, seed)
    target = make_layer("target", *shape, seed + 1)
    target.load_state_dict(full.state_dict(), strict=False)  # a target layer has no sequence output GLN
    batch, x = batch_and_input(seed, users=4)
    ctx = JaggedContext.from_batch(batch)
    y_full, y_target = full(x, ctx), target(x, ctx)
    t = batch.target_index
    torch.testing.assert_close(y_target[t], y_full[t])
    others = torch.ones(batch.num_tokens, dtype=torch.bool)
    others[t] = False
    assert torch.equal(y_target[others], x[others])
    torch.testing.assert_close(y_target, dense_layer(target, batch, x))


def test_gqa_with_kv_heads_equal_to_heads_is_plain_multi_head():
    """Hkv == Hq: every query head has its own key/value head (g = h)."""
    layer = make_layer("full", 3, 3, 4, seed=5)
    batch, x = batch_and_input(5)
    torch.testing.assert_close(layer(x, JaggedContext.from_batch(batch)), dense_layer(layer, batch, x))
