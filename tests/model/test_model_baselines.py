"""Baselines: same batch in, same output and loss out; their scores equal a NumPy forward written
here; they keep candidate independence too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model_test_utils import REPO, assert_same_scores, random_table, rows_of, scores_by_request, table_of
from mtfm.model import Collator, build_model, load_model_config, multitask_bce_loss
from mtfm.model.baselines import DCNv2, DLRMMMoE
from mtfm.platform.registry import exposures_column, load_registry

REGISTRY = load_registry(REPO / "configs")


def baseline(name):
    torch.manual_seed(0)
    cfg = load_model_config(REPO / f"configs/model/{name}.yaml").replace(attention_impl="reference")
    return build_model(cfg, REGISTRY)


# A small batch (3 users) whose realtime events fall both before and after its targets, so that the
# dynamic mask hides some R keys from some T queries and shows others.
SMALL = {"history": (2, 4), "realtime": (2, 4), "hp": (1, 3), "phf": (0, 2), "sqs": (1, 2)}
H, R, T = 0, 1, 2  # token kinds (DESIGN.md)


def _np(t):
    return t.detach().double().numpy()


def _linear(layer, a):
    return a @ _np(layer.weight).T + _np(layer.bias)


def _silu(a):
    return a / (1 + np.exp(-a))


def _numpy_tokens(model, batch):
    """(N, d): token = Linear(SiLU(Linear(concat(embeddings, mean-pooled list embeddings, transformed
    numerics)))) per group, features in registry order (T-tokens: user, item, cross)."""
    reg = model.registry
    groups = {s.name: s.features for s in reg.sequences.values()}
    groups.update((s.name, s.user_features + s.item_features + s.cross_features) for s in reg.scenarios.values())
    x = np.zeros((batch.num_tokens, model.config.d_model))
    for name, feats in groups.items():
        g = batch.features[name]
        if not g.num_tokens:
            continue
        parts = []
        for f in feats:
            if f.type == "categorical":
                parts.append(_np(model.tokenizer.tables[f.name].weight)[g.categorical[f.name].numpy()])
            elif f.type == "categorical_list":
                table, values = _np(model.tokenizer.tables[f.name].weight), g.list_values[f.name].numpy()
                bounds = g.list_offsets[f.name].numpy()
                parts.append(np.stack([table[values[a:b]].mean(0) if b > a else np.zeros(f.dim)
                                       for a, b in zip(bounds[:-1], bounds[1:])]))
            else:
                v = g.numeric[f.name].double().numpy()
                v = {"none": v, "log1p": np.log1p(np.maximum(v, 0)), "symlog": np.sign(v) * np.log1p(np.abs(v))}[
                    f.transform]
                parts.append(v[:, None])
        mlp = model.tokenizer.groups[name].mlp
        x[g.index.numpy()] = _linear(mlp[2], _silu(_linear(mlp[0], np.concatenate(parts, axis=1))))
    return x


def _numpy_pooling(model, batch, x):
    """{T position i: pooled_i (d,)}: per head h, sum over visible keys j of
    silu(<q_ih, k_jh> / sqrt(dh)) / max_seq_len * v_jh; j visible iff H, or R with ts_j < ts_i, or j == i."""
    heads, d = model.config.num_heads, model.config.d_model
    dh, norm = d // heads, float(model.config.max_seq_len)
    pool = model.pooling
    kv = _linear(pool.key_value, x)
    k, v = kv[:, :d].reshape(-1, heads, dh), kv[:, d:].reshape(-1, heads, dh)
    kind, ts, bounds = batch.kind.tolist(), batch.ts.tolist(), batch.offsets.tolist()
    pooled = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            if kind[i] != T:
                continue
            q = _linear(pool.query, x[i]).reshape(heads, dh)
            out = np.zeros((heads, dh))
            for j in range(start, end):
                if kind[j] == H or (kind[j] == R and ts[j] < ts[i]) or j == i:
                    out += (_silu((q * k[j]).sum(1) / np.sqrt(dh)) / norm)[:, None] * v[j]
            pooled[i] = out.reshape(d)
    return pooled


def _numpy_mlp(seq, a):
    """Linear -> SiLU -> Linear -> SiLU."""
    return _silu(_linear(seq[2], _silu(_linear(seq[0], a))))


def _numpy_interaction(model, x_t, p_t):
    if isinstance(model, DLRMMMoE):  # top MLP over (x, p, x * p)
        return _numpy_mlp(model.top_mlp, np.concatenate([x_t, p_t, x_t * p_t]))
    z0 = z = np.concatenate([x_t, p_t])  # DCNv2: z_{l+1} = z0 * (W_l z_l + b_l) + z_l, then the deep MLP
    for layer in model.cross:
        z = z0 * _linear(layer, z) + z
    return _numpy_mlp(model.deep, z)


def _numpy_heads(heads, z, scenario):
    """MMoE: logit_t = tower_t(sum_k softmax(G_t z)_k silu(W_k z + b_k))."""
    experts = _silu(_linear(heads.experts[0], z)).reshape(len(z), heads.num_experts, heads.expert_dim)
    logits = []
    for task, gate in heads.gates[scenario].items():
        g = np.exp(_linear(gate, z))
        g /= g.sum(1, keepdims=True)
        tower = heads.towers[scenario][task]
        logits.append(_linear(tower[2], _silu(_linear(tower[0], np.einsum("ne,ned->nd", g, experts)))))
    return np.concatenate(logits, axis=1)


def _assert_close(got, expected, what):
    """float32 against float64, within 1e-5 of the reference's own scale (the pooled sequences are
    about 1e-3 at init, as the attention normaliser is max_seq_len = 512)."""
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=what)


@pytest.mark.parametrize("name,cls", [("dlrm_mmoe_tiny", DLRMMMoE), ("dcnv2_tiny", DCNv2)])
def test_baseline_scores_equal_a_numpy_forward(name, cls):
    """Tokens, pooled sequences, the interaction's output (the heads' input) and the logits, each
    against the NumPy forward above on the module's own weights. Each stage is checked on its own:
    at init the pooled sequences move the logits by about 1e-7, below any float32 tolerance."""
    model = baseline(name).eval()
    assert isinstance(model, cls)
    batch = Collator(model.registry)(random_table(REGISTRY, 3, 11, lengths=SMALL))
    kind, ts = batch.kind.tolist(), batch.ts.tolist()
    bounds = batch.offsets.tolist()
    r_seen = [ts[j] < ts[i] for s, e in zip(bounds[:-1], bounds[1:]) for i in range(s, e) for j in range(s, e)
              if kind[i] == T and kind[j] == R]
    assert any(r_seen) and not all(r_seen)  # the batch exercises both sides of the realtime rule
    seen = {}
    hooks = [model.tokenizer.register_forward_hook(lambda m, a, out: seen.__setitem__("tokens", out)),
             model.pooling.register_forward_hook(lambda m, a, out: seen.__setitem__("pooled", out)),
             model.heads.register_forward_pre_hook(lambda m, a: seen.__setitem__(("z", a[1]), a[0]))]
    with torch.no_grad():
        got = {s: v.numpy() for s, v in model(batch).logits.items()}
    for hook in hooks:
        hook.remove()

    x = _numpy_tokens(model, batch)
    _assert_close(seen["tokens"].numpy(), x, "tokens")
    pooled = _numpy_pooling(model, batch, x)
    _assert_close(seen["pooled"].numpy(), np.stack([pooled[i] for i in batch.target_index.tolist()]), "pooled")
    assert set(got) == set(REGISTRY.scenarios)
    for s in REGISTRY.scenarios:
        rows = batch.features[s].index.tolist()
        z = np.stack([_numpy_interaction(model, x[i], pooled[i]) for i in rows])
        _assert_close(seen[("z", s)].numpy(), z, f"{s}: interaction")
        assert got[s].shape == (len(rows), len(REGISTRY.scenario(s).tasks))
        _assert_close(got[s], _numpy_heads(model.heads, z, s), f"{s}: logits")


@pytest.mark.parametrize("name,cls", [("dlrm_mmoe_tiny", DLRMMMoE), ("dcnv2_tiny", DCNv2)])
def test_baseline_trains_on_the_same_batches(name, cls):
    model = baseline(name)
    assert isinstance(model, cls)
    table = random_table(REGISTRY, 4, 3, lengths={"hp": (1, 3), "phf": (1, 3), "sqs": (1, 3)})
    batch = Collator(model.registry)(table)
    out = model(batch)
    assert {s: v.shape for s, v in out.logits.items()} == {
        s: (batch.features[s].num_tokens, len(REGISTRY.scenario(s).tasks)) for s in REGISTRY.scenarios}
    loss, _ = multitask_bce_loss(out, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    before = loss.item()
    torch.optim.SGD(model.parameters(), lr=0.05).step()  # one step down the gradient, on the same batch
    with torch.no_grad():
        after, _ = multitask_bce_loss(model(batch), batch)
    assert after.item() < before


@pytest.mark.parametrize("name", ["dlrm_mmoe_tiny", "dcnv2_tiny"])
def test_baseline_scores_do_not_depend_on_other_candidates(name):
    model = baseline(name).eval()
    table = random_table(REGISTRY, 3, 8)
    before = scores_by_request(model, table)
    rows = rows_of(table)
    for row in rows:
        row[exposures_column("hp")] = row[exposures_column("hp")][::-1][:-1]
        row[exposures_column("sqs")] = []
    after = scores_by_request(model, table_of(rows, REGISTRY))
    assert_same_scores(before, after, [k for k in after])


def test_single_scenario_mtfm_is_a_registry_restriction():
    cfg = load_model_config(REPO / "configs/model/single_scenario_hp.yaml").replace(
        d_model=16, tokenizer_hidden_dim=16, attention_impl="reference", norm_impl="reference")
    model = build_model(cfg, REGISTRY)
    assert tuple(model.registry.scenarios) == ("hp",)
    batch = Collator(model.registry)(random_table(REGISTRY, 3, 1))
    assert batch.scenarios == ("hp",) and set(model(batch).logits) <= {"hp"}
    assert not any(".phf" in n or ".sqs" in n for n, _ in model.named_parameters())
