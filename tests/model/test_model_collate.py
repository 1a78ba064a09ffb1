"""Jagged collate and token-budget batching against an independent per-user Python computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from model_test_utils import REPO, random_table, rows_of, table_of
from mtfm.kernels.mask import TokenKind
from mtfm.model import Collator, split_by_token_budget, token_budget_batches
from mtfm.model.config import restrict_registry
from mtfm.model.hashing import hash_to_buckets
from mtfm.platform.registry import events_column, exposures_column, load_registry, user_column

REGISTRY = load_registry(REPO / "configs")


def expected_tokens(registry, row: dict, limits: dict) -> list[dict]:
    """One user's tokens in DESIGN.md order, computed row by row from the Python objects."""
    history, realtime, targets = [], [], []
    for seq in registry.sequences.values():
        events = sorted(row[events_column(seq.name)] or [], key=lambda e: e["ts"])
        limit = limits.get(seq.name, seq.max_len)
        kept = events[len(events) - limit:] if len(events) > limit else events
        tokens = [dict(group=seq.name, kind=TokenKind.H if seq.kind == "history" else TokenKind.R,
                       ts=e["ts"], values=e) for e in kept]
        (history if seq.kind == "history" else realtime).extend(tokens)
    for name, scn in registry.scenarios.items():
        exposures = sorted(row[exposures_column(name)] or [], key=lambda e: e["ts"])
        if name in limits and len(exposures) > limits[name]:
            exposures = exposures[len(exposures) - limits[name]:]
        user = row[user_column(name)] or {}
        targets += [dict(group=name, kind=TokenKind.T, ts=e["ts"], values={**e, **user}) for e in exposures]
    return (sorted(history, key=lambda t: t["ts"]) + sorted(realtime, key=lambda t: t["ts"]) + targets)


def expected_feature(feature, value):
    if feature.type == "numeric":
        return 0.0 if value is None else value
    if feature.type == "categorical":
        return 0 if value is None else int(hash_to_buckets(np.array([value]), feature.buckets)[0])
    values = [v for v in (value or [])[: feature.max_len]]
    return [0 if v is None else int(hash_to_buckets(np.array([v]), feature.buckets)[0]) for v in values]


def check_batch(batch, registry, rows, limits):
    expected = [expected_tokens(registry, row, limits) for row in rows]
    assert batch.offsets.tolist() == np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
    assert batch.target_offsets.tolist() == np.concatenate(
        [[0], np.cumsum([sum(t["kind"] == TokenKind.T for t in e) for e in expected])]).tolist()
    assert batch.user_id.tolist() == [row["user_id"] for row in rows]
    flat = [t for e in expected for t in e]
    assert batch.kind.tolist() == [int(t["kind"]) for t in flat]
    assert [batch.group_names[g] for g in batch.group.tolist()] == [t["group"] for t in flat]
    assert batch.ts.tolist() == [t["ts"] for t in flat]
    assert batch.target_index.tolist() == [i for i, t in enumerate(flat) if t["kind"] == TokenKind.T]
    features = {s.name: s.features for s in registry.sequences.values()}
    features.update((s.name, s.user_features + s.exposure_features) for s in registry.scenarios.values())
    for name, feats in features.items():
        g = batch.features[name]
        positions = [i for i, t in enumerate(flat) if t["group"] == name]
        assert g.index.tolist() == positions
        for f in feats:
            want = [expected_feature(f, flat[i]["values"].get(f.name)) for i in positions]
            if f.type == "numeric":
                np.testing.assert_allclose(g.numeric[f.name].numpy(), np.array(want, dtype=np.float32))
            elif f.type == "categorical":
                assert g.categorical[f.name].tolist() == want
            else:
                assert g.list_values[f.name].tolist() == [v for w in want for v in w]
                assert g.list_offsets[f.name].tolist() == np.concatenate([[0], np.cumsum([len(w) for w in want])]).tolist()
        if name in registry.scenarios:
            tasks = registry.scenario(name).task_names
            labels = [[flat[i]["values"][t] for t in tasks] for i in positions]
            assert g.label_mask.tolist() == [[v is not None for v in row] for row in labels]
            assert g.labels.tolist() == [[float(v or 0) for v in row] for row in labels]
            assert g.request_id.tolist() == [flat[i]["values"]["request_id"] for i in positions]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), history_limit=st.integers(1, 30), target_limit=st.none() | st.integers(1, 5))
def test_collate_matches_per_user_computation(seed, history_limit, target_limit):
    limits = {"history": history_limit} | ({"phf": target_limit} if target_limit else {})
    table = random_table(REGISTRY, 5, seed, null_fraction=0.3, label_null_fraction=0.3)
    check_batch(Collator(REGISTRY, max_len=limits)(table), REGISTRY, rows_of(table), limits)


def test_collate_keeps_the_registry_max_len_and_merges_chunks():
    import pyarrow as pa

    table = random_table(REGISTRY, 6, 1, lengths={"history": (260, 300), "realtime": (30, 40)})
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    batch = Collator(REGISTRY)(chunked)
    check_batch(batch, REGISTRY, rows_of(table), {})
    counts = torch.bincount(batch.group, minlength=len(batch.group_names))
    assert counts[batch.group_names.index("history")] == 6 * REGISTRY.sequence("history").max_len


def test_numbers_that_are_not_finite_become_zero():
    table = random_table(REGISTRY, 3, 5, lengths={"history": (4, 6)})
    rows, expected = rows_of(table), rows_of(table)
    for i, bad in enumerate((float("nan"), float("inf"), float("-inf"))):
        rows[i][events_column("history")][1]["price"] = bad
        expected[i][events_column("history")][1]["price"] = None  # collated as a missing number: 0
    check_batch(Collator(REGISTRY)(table_of(rows, REGISTRY)), REGISTRY, expected, {})


def test_collate_of_one_scenario_ignores_the_others():
    table = random_table(REGISTRY, 4, 2)
    batch = Collator(restrict_registry(REGISTRY, ["sqs"]))(table)
    assert batch.group_names == ("history", "realtime", "sqs")
    assert batch.scenarios == ("sqs",)
    assert batch.num_targets == sum(len(r[exposures_column("sqs")]) for r in rows_of(table))


def test_collate_of_an_empty_user():
    table = random_table(REGISTRY, 3, 3, lengths={"history": (0, 0), "realtime": (0, 0), "hp": (0, 0),
                                                   "phf": (0, 0), "sqs": (0, 0)})
    batch = Collator(REGISTRY)(table)
    assert batch.offsets.tolist() == [0, 0, 0, 0] and batch.num_tokens == 0


def test_a_group_without_tokens_has_the_features_of_one_with_tokens_empty():
    """Sequences with no events (as serving collates candidates alone) keep every feature name
    and dtype that the same sequences with events give, with no rows and list offsets [0]."""
    collate = Collator(REGISTRY)
    with_events = collate(random_table(REGISTRY, 3, 5))
    without = collate(random_table(REGISTRY, 3, 5, lengths={"history": (0, 0), "realtime": (0, 0)}))
    for name in ("history", "realtime"):
        full, empty = with_events.features[name], without.features[name]
        assert full.num_tokens > 0 and empty.num_tokens == 0
        for kind in ("categorical", "numeric", "list_values"):
            a, b = getattr(full, kind), getattr(empty, kind)
            assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}, (name, kind)
            assert all(v.shape == (0,) for v in b.values())
        assert {k: v.tolist() for k, v in empty.list_offsets.items()} == {k: [0] for k in full.list_offsets}
        assert empty.index.dtype == full.index.dtype and (empty.labels, empty.request_id) == (None, None)


def test_samples_of_another_registry_are_refused_by_their_missing_column():
    table = random_table(REGISTRY, 3, 0).drop_columns(["phf__exposures"])
    with pytest.raises(ValueError, match="no column 'phf__exposures': aggregated with another registry"):
        Collator(REGISTRY)(table)


def test_unknown_max_len_group_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        Collator(REGISTRY, max_len={"nope": 3})


@pytest.mark.parametrize("lengths", [None, {"sqs": (0, 0), "realtime": (0, 0)}])
def test_to_device_round_trip_keeps_every_tensor(lengths):
    """Also with empty groups, whose tensors cannot be viewed as bytes (found on CUDA by serving)."""
    batch = Collator(REGISTRY)(random_table(REGISTRY, 3, 4, lengths=lengths))
    moved = batch.to("meta")
    for a, b in zip(batch.tensors(), moved.tensors()):
        assert (a.shape, a.dtype) == (b.shape, b.dtype) and b.device.type == "meta"
    assert batch.to("cpu") is batch


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=0, max_size=30), budget=st.integers(1, 60))
def test_split_by_token_budget_is_greedy_and_within_budget(counts, budget):
    cuts = split_by_token_budget(np.array(counts, dtype=np.int64), budget)
    assert cuts[0] == 0 and cuts[-1] == len(counts) and all(a <= b for a, b in zip(cuts, cuts[1:]))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        total = sum(counts[lo:hi])
        assert total <= budget or hi - lo == 1 or not counts
        if hi < len(counts):  # greedy: the next row would not have fit
            assert total + counts[hi] > budget


def test_token_budget_batches_cover_every_user_once_in_order():
    tables = [random_table(REGISTRY, n, seed, first_user_id=100 * seed) for seed, n in enumerate([5, 1, 7, 3])]
    collator = Collator(REGISTRY)
    budget = 120
    batches = list(token_budget_batches(tables, collator, budget))
    users = [u for b in batches for u in b.user_id.tolist()]
    assert users == [u for t in tables for u in t.column("user_id").to_pylist()]
    for b in batches:
        assert b.num_tokens <= budget or b.num_users == 1
    reference = collator(tables[2])
    first = next(b for b in batches if 200 in b.user_id.tolist())
    row = first.user_id.tolist().index(200)
    assert (first.offsets[row + 1] - first.offsets[row]) == reference.offsets[1]


def test_hash_is_splitmix64_with_its_published_outputs():
    """Embedding rows must not move between releases (checkpoints and serving depend on them): the
    first three outputs of the splitmix64 generator seeded with 0 are the hashes of the states it
    passes through (0, the golden ratio constant, twice it)."""
    from mtfm.model.hashing import splitmix64

    golden = 0x9E3779B97F4A7C15
    states = np.array([0, golden - 2**64, 2 * golden - 2**64], dtype=np.int64)  # as int64, two's complement
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert splitmix64(states).tolist() == published
    # bucket = 1 + hash mod (buckets - 1); a null id gets row 0
    rows = hash_to_buckets(states, 1000, valid=np.array([True, True, False]))
    assert rows.tolist() == [1 + published[0] % 999, 1 + published[1] % 999, 0]
