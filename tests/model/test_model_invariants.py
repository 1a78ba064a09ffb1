"""The model invariants of DESIGN.md, each on random inputs drawn fresh per test example."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model_test_utils import (REPO, assert_same_scores, exposures, random_table, rows_of, scores_by_request, table_of,
                              tiny_config)
from mtfm.kernels.mask import TokenKind, build_dynamic_mask
from mtfm.model import Collator, build_model
from mtfm.platform.registry import events_column, exposures_column, load_registry

REGISTRY = load_registry(REPO / "configs")
SEEDS = st.integers(0, 2**31 - 1)
EXAMPLES = settings(max_examples=6, deadline=None)


def tiny_model(layout="(1:1)*1", seed=0, **changes):
    torch.manual_seed(seed)
    return build_model(tiny_config(hta_layout=layout, **changes), REGISTRY).eval()


MODEL = tiny_model()
# The top layer always runs as target attention, so MODEL's (1:1)*1 has no full layer; these do, and a
# full layer is where H and R rows change (and where a later realtime event could leak into them).
WITH_FULL_LAYERS = {"(1:1)*1": MODEL, "(0:2)*1": tiny_model("(0:2)*1"), "(1:1)*2": tiny_model("(1:1)*2")}
LAYOUTS = pytest.mark.parametrize("layout", sorted(WITH_FULL_LAYERS))


@LAYOUTS
@EXAMPLES
@given(seed=SEEDS)
def test_candidate_independence(layout, seed):
    """Permuting, adding or removing candidates and other scenarios' exposures changes no score."""
    model = WITH_FULL_LAYERS[layout]
    rng = torch.Generator().manual_seed(seed)
    table = random_table(REGISTRY, 3, seed, lengths={"hp": (1, 6), "phf": (1, 6), "sqs": (1, 6)})
    before = scores_by_request(model, table)
    rows = rows_of(table)
    for row in rows:
        hp = exposures(row, "hp")
        perm = torch.randperm(len(hp), generator=rng).tolist()
        kept = [hp[i] for i in perm[: max(1, len(hp) - 2)]]  # reordered, some removed
        extra = copy.deepcopy(kept[0])
        extra["request_id"], extra["poi_id"] = -7, extra["poi_id"] + 1  # a new candidate
        row[exposures_column("hp")] = kept + [extra]
        row[exposures_column("phf")] = []  # another scenario's exposures removed
        row[exposures_column("sqs")] = exposures(row, "sqs")[::-1][:-1]
    after = scores_by_request(model, table_of(rows, REGISTRY))
    kept_keys = [k for k in after if k[2] != -7]
    assert kept_keys and all(k in before for k in kept_keys)
    assert_same_scores(before, after, kept_keys)


@LAYOUTS
@EXAMPLES
@given(seed=SEEDS, scenario=st.sampled_from(sorted(REGISTRY.scenarios)))
def test_subgraph_scores_equal_the_full_model(layout, seed, scenario):
    model = WITH_FULL_LAYERS[layout]
    table = random_table(REGISTRY, 4, seed, null_fraction=0.2)
    full = model(Collator(REGISTRY)(table)).probabilities()
    ranker = model.subgraph(scenario)
    assert torch.allclose(ranker(ranker.collator()(table)), full[scenario], atol=1e-6)


def test_subgraph_holds_only_its_scenario():
    ranker = MODEL.subgraph("phf")
    names = [n for n, _ in ranker.named_parameters()]
    for other in ("hp", "sqs"):
        assert not any(f".{other}." in f".{n}." for n in names), other
    assert not any(n.startswith(("tokenizer.tables.package_id",)) for n in names)
    assert any(".phf." in n for n in names) and any("tables.dish_id" in n for n in names)
    assert set(names) < {n for n, _ in MODEL.named_parameters()}


@LAYOUTS
@EXAMPLES
@given(seed=SEEDS)
def test_no_leakage_from_later_realtime_events(layout, seed):
    """Changing a realtime event with ts >= ts_t leaves target t unchanged (equal ts included);
    changing an earlier one changes it."""
    model = WITH_FULL_LAYERS[layout]
    rows = rows_of(random_table(REGISTRY, 2, seed, lengths={"realtime": (4, 8), "hp": (3, 5)}))
    row = rows[0]
    pivot = row[events_column("realtime")][len(row[events_column("realtime")]) // 2]
    targets = exposures(row, "hp")
    targets[0]["ts"] = pivot["ts"]  # a target at exactly the event's ts must not see it
    before = scores_by_request(model, table_of(rows, REGISTRY))
    pivot["poi_id"], pivot["category"], pivot["action"] = pivot["poi_id"] + 12345, 63, 7
    after = scores_by_request(model, table_of(rows, REGISTRY))
    user = row["user_id"]
    later = [("hp", user, t["request_id"]) for t in targets if t["ts"] <= pivot["ts"]]
    earlier = [("hp", user, t["request_id"]) for t in targets if t["ts"] > pivot["ts"]]
    assert later
    # A randomly initialised model barely reacts to one event (a visible change moves a probability by
    # 1e-6 to 1e-4), while the token count, and so every matmul's shape, is unchanged here: unaffected scores
    # come out bit for bit the same, so the tolerance is a float32 ulp, not the usual 1e-5.
    assert_same_scores(before, after, later, atol=1e-7, rtol=0)
    for key in earlier:
        assert not torch.equal(before[key], after[key]), key
    assert_same_scores(before, after, [k for k in before if k[1] != user], atol=1e-7, rtol=0)


def test_mask_of_a_collated_batch_hand_worked():
    """MTGR's figure: 2 history tokens, 2 realtime, 3 targets with interleaved timestamps."""
    rows = rows_of(random_table(REGISTRY, 1, 0, lengths={"history": (2, 2), "realtime": (2, 2), "hp": (2, 2),
                                                         "phf": (1, 1), "sqs": (0, 0)}))
    row = rows[0]
    for e, ts in zip(row[events_column("history")], (1, 2)):
        e["ts"] = ts
    for e, ts in zip(row[events_column("realtime")], (10, 30)):
        e["ts"] = ts
    for e, ts in zip(exposures(row, "hp"), (20, 5)):  # unsorted on purpose: collate sorts by ts
        e["ts"] = ts
    exposures(row, "phf")[0]["ts"] = 40
    batch = Collator(REGISTRY)(table_of(rows, REGISTRY))
    H, R, T = TokenKind.H, TokenKind.R, TokenKind.T
    assert batch.kind.tolist() == [H, H, R, R, T, T, T]
    assert batch.ts.tolist() == [1, 2, 10, 30, 5, 20, 40]
    #            h1 h2 r10 r30 t5 t20 t40
    expected = [[1, 1, 0, 0, 0, 0, 0],   # h1
                [1, 1, 0, 0, 0, 0, 0],   # h2
                [1, 1, 1, 0, 0, 0, 0],   # r10
                [1, 1, 1, 1, 0, 0, 0],   # r30
                [1, 1, 0, 0, 1, 0, 0],   # t5: no realtime event before it
                [1, 1, 1, 0, 0, 1, 0],   # t20: sees r10
                [1, 1, 1, 1, 0, 0, 1]]   # t40: sees both
    (mask,) = build_dynamic_mask(batch.offsets, batch.kind, batch.ts)
    assert mask.int().tolist() == expected


def test_gradients_reach_every_parameter_and_skip_absent_scenarios():
    from mtfm.model import multitask_bce_loss

    model = tiny_model(seed=1).train()
    table = random_table(REGISTRY, 4, 11, lengths={"hp": (2, 4), "phf": (2, 4), "sqs": (2, 4)})
    loss, _ = multitask_bce_loss(model(Collator(REGISTRY)(table)), Collator(REGISTRY)(table))
    loss.backward()
    untouched = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not untouched

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.step()
    optimizer.zero_grad()
    rows = rows_of(table)
    for row in rows:
        row[exposures_column("phf")] = []
    batch = Collator(REGISTRY)(table_of(rows, REGISTRY))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, terms = multitask_bce_loss(model(batch), batch)
    assert not any(k.startswith("phf/") for k in terms)
    loss.backward()
    phf_only = ("heads.gates.phf.", "heads.towers.phf.", "tokenizer.groups.phf.", "final_norm.weight.phf",
                "final_norm.bias.phf", "tokenizer.tables.dish_id", "tokenizer.tables.dish_tags")
    for name, p in model.named_parameters():
        if name.startswith(phf_only) or ".phf" in name:
            assert p.grad is None, name
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith(phf_only) or name.endswith(".phf"):
            assert torch.equal(p, before[name]), f"{name} moved though phf was absent"


def test_loss_ignores_any_logit_of_a_row_without_a_label():
    """An unlabelled row's logit, even inf or NaN, adds nothing to the loss or its gradient."""
    import numpy as np

    from mtfm.model import ModelOutput, multitask_bce_loss

    batch = Collator(REGISTRY)(random_table(REGISTRY, 6, 21, lengths={"hp": (2, 5), "phf": (0, 0), "sqs": (0, 0)}))
    feats = batch.features["hp"]
    feats.label_mask[0, :] = False
    logits = torch.randn(feats.labels.shape, generator=torch.Generator().manual_seed(0))
    poisoned = logits.clone()
    poisoned[0, 0], poisoned[0, -1] = float("inf"), float("nan")
    poisoned.requires_grad_()
    loss, _ = multitask_bce_loss(ModelOutput({"hp": poisoned}), batch)
    loss.backward()
    assert torch.isfinite(poisoned.grad).all() and (poisoned.grad[0] == 0).all()
    x, y, m = logits.double().numpy(), feats.labels.double().numpy(), feats.label_mask.numpy()
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))  # independent BCE with logits
    per_task = [(bce[m[:, t], t]).mean() for t in range(m.shape[1]) if m[:, t].any()]
    assert loss.item() == pytest.approx(np.mean(per_task), rel=1e-5)
    # A task with no label in the batch is absent: the mean is over the other tasks (not a zero term).
    feats.label_mask[:, 1] = False
    poisoned.grad = None
    loss, terms = multitask_bce_loss(ModelOutput({"hp": poisoned}), batch)
    loss.backward()
    m = feats.label_mask.numpy()
    assert m[:, 0].any()
    expected = np.mean([(bce[m[:, t], t]).mean() for t in range(m.shape[1]) if t != 1])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert math.isnan(terms[f"hp/{batch.scenario_tasks['hp'][1]}"]) and (poisoned.grad[:, 1] == 0).all()


def test_yaml_added_scenario_builds_scores_and_warm_starts(config_dir):
    (config_dir / "scenarios" / "grocery.yaml").write_text(
        "name: grocery\n"
        "user_features:\n  - {name: user_city, type: categorical, buckets: 64, dim: 8, required: true}\n"
        "item_features:\n  - {name: sku_id, type: categorical, buckets: 999, dim: 8, required: true}\n"
        "  - {name: poi_id, type: categorical, buckets: 20000, dim: 32, required: true}\n"
        "  - {name: sku_price, type: numeric, transform: symlog}\n"
        "tasks:\n  - {name: click, kind: ctr}\n  - {name: add_to_cart, kind: binary, depends_on: click}\n")
    registry = load_registry(config_dir)
    model = build_model(tiny_config(), registry).eval()
    table = random_table(registry, 3, 5, lengths={"grocery": (1, 4)})
    missing, unexpected = model.load_state_dict(MODEL.state_dict(), strict=False)
    assert not unexpected
    assert missing and all("grocery" in k or "sku_id" in k for k in missing), missing
    out = model(Collator(registry)(table))
    assert out.logits["grocery"].shape == (sum(len(r["grocery__exposures"]) for r in rows_of(table)), 2)
    ranker = model.subgraph("grocery")
    assert torch.allclose(ranker(ranker.collator()(table)), out.probabilities()["grocery"], atol=1e-6)


@pytest.mark.parametrize("layout", ["(0:2)*1", "(2:0)*1", "(1:1)*2"])
def test_every_layout_keeps_candidate_independence_and_subgraphs(layout):
    model = tiny_model(layout, num_kv_heads=2)
    table = random_table(REGISTRY, 3, 9)
    full = scores_by_request(model, table)
    rows = rows_of(table)
    for row in rows:
        row[exposures_column("sqs")] = []
    assert_same_scores(full, scores_by_request(model, table_of(rows, REGISTRY)),
                       [k for k in full if k[0] != "sqs"])
    probabilities = model(Collator(REGISTRY)(table)).probabilities()
    for scenario in REGISTRY.scenarios:
        ranker = model.subgraph(scenario)
        assert torch.allclose(ranker(ranker.collator()(table)), probabilities[scenario], atol=1e-6), scenario


@EXAMPLES
@given(seed=SEEDS, chunks=st.integers(1, 3), layout=st.sampled_from(["(1:1)*1", "(0:2)*1", "(1:1)*2"]))
def test_user_side_once_then_candidate_chunks_equals_one_pass(seed, chunks, layout):
    """Serving's split: encode H and R once, score candidates chunk by chunk, same scores."""

    model = MODEL if layout == "(1:1)*1" else tiny_model(layout)
    ranker = model.subgraph("hp")
    collate = ranker.collator()
    table = random_table(REGISTRY, 3, seed, lengths={"hp": (1, 7)})
    one_pass = ranker(collate(table))
    rows = rows_of(table)
    for row in rows:  # the exposures' order of a collated batch: by ts
        row[exposures_column("hp")].sort(key=lambda e: e["ts"])
    user = ranker.encode_users(collate(table_of([r | {exposures_column("hp"): []} for r in rows], REGISTRY)))
    scored = [[] for _ in rows]
    for c in range(chunks):
        chunk_rows = [{**r, events_column("history"): [], events_column("realtime"): [],
                       exposures_column("hp"): [e for i, e in enumerate(r[exposures_column("hp")]) if i % chunks == c]}
                      for r in rows]
        batch = collate(table_of(chunk_rows, REGISTRY))
        probs = ranker.score_candidates(user, batch)
        bounds = batch.target_offsets.tolist()
        for b in range(len(rows)):
            scored[b] += [(i, p) for i, p in zip(range(c, 10**6, chunks), probs[bounds[b]:bounds[b + 1]])]
    split = torch.stack([p for user_scores in scored for _, p in sorted(user_scores, key=lambda ip: ip[0])])
    torch.testing.assert_close(split, one_pass, atol=1e-6, rtol=1e-5)
    whole = collate(table)  # a chunk may also be the full request batch: its H and R are ignored
    torch.testing.assert_close(ranker.score_candidates(ranker.encode_users(whole), whole), one_pass,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["(1:1)*1", "(0:2)*1", "(2:0)*1", "(1:1)*2"])
def test_single_pass_with_user_sides_equals_forward_and_encode_users(layout):
    """The serving pass that fills the user-side cache: its scores are the single pass's and its
    user side is `encode_users`'s (keys and values of every layer, kind, ts), for
    layouts that start or end with a run of target layers or alternate."""
    model = MODEL if layout == "(1:1)*1" else tiny_model(layout, num_kv_heads=2)
    ranker = model.subgraph("hp")
    batch = ranker.collator()(random_table(REGISTRY, 4, 5, lengths={"hp": (1, 7)}))
    with torch.no_grad():
        probs, user = ranker.forward_with_user_sides(batch)
        alone = ranker.encode_users(batch)
        torch.testing.assert_close(probs, ranker(batch), atol=1e-6, rtol=1e-5)
    assert user.kv.shape == alone.kv.shape
    torch.testing.assert_close(user.kv, alone.kv, atol=1e-6, rtol=1e-5)
    for field in ("user_id", "offsets", "kind", "ts"):
        assert torch.equal(getattr(user, field), getattr(alone, field)), field


def test_user_side_keys_and_values_take_the_autocast_dtype():
    """Under autocast (bf16 on the CPU here, as serving on a GPU) both paths keep the keys and
    values in the autocast dtype, with the same values."""
    ranker = tiny_model("(1:1)*2", num_kv_heads=2).subgraph("hp")
    batch = ranker.collator()(random_table(REGISTRY, 3, 6, lengths={"hp": (1, 7)}))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs, user = ranker.forward_with_user_sides(batch)
        alone = ranker.encode_users(batch)
        one_pass = ranker(batch)
    assert user.kv.dtype == alone.kv.dtype == torch.bfloat16
    torch.testing.assert_close(user.kv, alone.kv, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(probs, one_pass, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("lengths", [{"history": (0, 0), "realtime": (0, 0)}, {"hp": (0, 0)},
                                     {"history": (0, 0), "realtime": (0, 0), "hp": (0, 0)}])
def test_cold_start_users_and_requests_without_candidates(lengths):
    """No behaviour yet, or nothing to rank: every path still scores (or returns no rows)."""
    ranker = MODEL.subgraph("hp")
    table = random_table(REGISTRY, 3, 4, lengths=lengths)
    batch = ranker.collator()(table)
    with torch.no_grad():
        one_pass = ranker(batch)
        split = ranker.score_candidates(ranker.encode_users(batch), batch)
        full = MODEL(Collator(REGISTRY)(table)).probabilities()
    assert one_pass.shape == split.shape == (batch.num_targets, 2)
    torch.testing.assert_close(split, one_pass)
    if batch.num_targets:
        torch.testing.assert_close(full["hp"], one_pass)
