"""Padding a batch to its bucketed shape (model/padding.py) leaves every real token's output
unchanged, and the sizes are the bucket's; the training shape that grows to hold its batches,
padding users of bounded length, and a padded batch's loss and gradients against the unpadded
batch's; plus the byte packing that the padded copies use."""
from __future__ import annotations

import pytest
import torch

from model_test_utils import REPO, random_table, tiny_config
from mtfm.kernels.mask import TokenKind
from mtfm.model import Collator, build_model, multitask_bce_loss
from mtfm.model.padding import BatchShape, GrowingShape, batch_shape, bucket, pad_batch, user_bucket
from mtfm.platform.registry import load_registry

REGISTRY = load_registry(REPO / "configs")


def test_buckets_by_hand():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 1000, 1024, 1200)] == \
        [0, 2, 3, 4, 6, 6, 8, 8, 12, 12, 16, 1024, 1536, 1536]
    assert [user_bucket(b) for b in (1, 2, 3, 4, 7, 8)] == [2, 4, 4, 8, 8, 16]


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_batch_gives_every_real_token_the_same_output(seed):
    torch.manual_seed(seed)
    model = build_model(tiny_config(hta_layout="(1:1)*1"), REGISTRY).eval()
    # Users with no events and users with no candidates of some scenario; phf's dish_tags is a list feature.
    table = random_table(REGISTRY, 5, seed, lengths={"history": (0, 30), "realtime": (0, 9), "hp": (0, 7),
                                                     "phf": (0, 5), "sqs": (0, 3)})
    batch = Collator(REGISTRY)(table)
    shape = batch_shape(batch)
    padded = pad_batch(batch, shape)

    assert padded.num_users == shape.num_users and padded.num_tokens == shape.num_tokens
    assert torch.equal(padded.offsets[:batch.num_users + 1], batch.offsets)
    assert torch.equal(padded.kind[:batch.num_tokens], batch.kind)
    for name, size in zip(batch.group_names, shape.group_tokens):
        feats = padded.features[name]
        assert feats.num_tokens == size
        assert torch.equal(padded.group[feats.index], torch.full((size,), batch.group_names.index(name)))
    # The padding user's tokens: H, then R (ts sorted: all 0), then T, as the kernels need.
    last = padded.kind[padded.offsets[-2]:].tolist()
    assert last == sorted(last) and last[-1] == TokenKind.T
    assert torch.equal(padded.target_index, torch.nonzero(padded.kind == TokenKind.T).squeeze(1))

    with torch.no_grad():
        expected, actual = model(batch).logits, model(padded).logits
    for s, logits in expected.items():
        assert actual[s].shape[0] == padded.features[s].num_tokens > logits.shape[0]
        torch.testing.assert_close(actual[s][:logits.shape[0]], logits, atol=1e-6, rtol=1e-5)


MIXED = {"history": (0, 30), "realtime": (0, 9), "hp": (0, 7), "phf": (0, 5), "sqs": (0, 3)}


def assert_padding_users_well_formed(padded, real_users: int, max_rows: int | None):
    """Users past the real ones: empty ones, then padding users of at most max_rows rows, each H, R, then T,
    its T rows counted by target_offsets."""
    counts = (padded.offsets[1:] - padded.offsets[:-1]).tolist()[real_users:]
    target_counts = (padded.target_offsets[1:] - padded.target_offsets[:-1]).tolist()[real_users:]
    first = next(u for u, n in enumerate(counts) if n)
    assert all(n for n in counts[first:]) and not any(counts[:first])
    for u, (n, nt) in enumerate(zip(counts, target_counts)):
        start = int(padded.offsets[real_users + u])
        kinds = padded.kind[start:start + n].tolist()
        assert kinds == sorted(kinds) and kinds.count(TokenKind.T) == nt
        assert max_rows is None or n <= max_rows
    assert torch.equal(padded.target_index, torch.nonzero(padded.kind == TokenKind.T).squeeze(1))


@pytest.mark.parametrize("max_user_tokens", [None, 7])
def test_padding_rows_split_between_padding_users_of_bounded_length(max_user_tokens):
    torch.manual_seed(3)
    model = build_model(tiny_config(hta_layout="(1:1)*1"), REGISTRY).eval()
    batch = Collator(REGISTRY)(random_table(REGISTRY, 6, 4, lengths=MIXED))
    base = batch_shape(batch)
    shape = BatchShape(batch.num_users + 16, tuple(n + 11 for n in base.group_tokens), base.list_values)
    padded = pad_batch(batch, shape, max_user_tokens=max_user_tokens)
    assert (padded.num_users, padded.num_tokens) == (shape.num_users, shape.num_tokens)
    assert padded.unpadded.num_users == batch.num_users and padded.unpadded.num_tokens == batch.num_tokens
    # each scenario's real exposures (training counts them per epoch), not its padded rows
    real = {s: int(padded.features[s].label_mask.any(1).sum()) for s in batch.scenarios}
    assert padded.targets_per_scenario() == batch.targets_per_scenario() == real
    assert all(padded.features[s].index.shape[0] > n for s, n in real.items())
    assert_padding_users_well_formed(padded, batch.num_users, max_user_tokens)
    pad_rows = shape.num_tokens - batch.num_tokens
    assert int((padded.offsets[1:] > padded.offsets[:-1]).sum()) - int((batch.offsets[1:] > batch.offsets[:-1]).sum()) \
        == (1 if max_user_tokens is None else -(-pad_rows // max_user_tokens))
    with torch.no_grad():
        expected, actual = model(batch).logits, model(padded).logits
    for s, logits in expected.items():
        torch.testing.assert_close(actual[s][:logits.shape[0]], logits, atol=1e-6, rtol=1e-5)


def test_growing_shape_grows_only_for_a_batch_that_does_not_fit():
    shapes = GrowingShape(headroom=0.5, granule=4, max_user_tokens=16)
    first = Collator(REGISTRY)(random_table(REGISTRY, 6, 5, lengths=MIXED))
    padded = shapes.pad(first)
    shape = shapes.shape
    for n, size in zip((first.features[g].num_tokens for g in first.group_names), shape.group_tokens):
        assert size % 4 == 0 and size >= (-(-int(n * 1.5) // 1) + 1 if n else 0) and (n == 0 or size > n)
    assert padded.num_tokens == shape.num_tokens and shapes.grown == 1
    assert_padding_users_well_formed(padded, first.num_users, 16)
    # A smaller batch, one scenario (sqs) absent: same shape, and sqs's padding rows are T-tokens.
    rows = random_table(REGISTRY, 3, 6, lengths={**MIXED, "history": (0, 5), "sqs": (0, 0)})
    smaller = Collator(REGISTRY)(rows)
    assert smaller.features["sqs"].num_tokens == 0 and shape.group_tokens[first.group_names.index("sqs")] > 0
    padded = shapes.pad(smaller)
    assert shapes.shape == shape and shapes.grown == 1 and padded.num_tokens == shape.num_tokens
    assert (padded.kind[padded.features["sqs"].index] == TokenKind.T).all()
    assert_padding_users_well_formed(padded, smaller.num_users, 16)
    # A batch with fewer tokens needs more padding users: the shape has room for them.
    shapes.pad(Collator(REGISTRY)(random_table(REGISTRY, 1, 9, lengths={**MIXED, "history": (0, 2)})))
    assert shapes.shape == shape and shapes.grown == 1
    # A batch larger in some group grows the shape there and keeps the other sizes.
    larger = Collator(REGISTRY)(random_table(REGISTRY, 12, 7, lengths={**MIXED, "history": (40, 60)}))
    shapes.pad(larger)
    h = first.group_names.index("history")
    assert shapes.grown == 2 and shapes.shape.group_tokens[h] > larger.features["history"].num_tokens
    assert all(new >= old for new, old in zip(shapes.shape.group_tokens, shape.group_tokens))


def test_padded_batch_gives_the_same_loss_and_gradients():
    """What a CUDA-graphed training step relies on: the padding rows' labels are masked out, so the
    loss and every parameter's gradient are the unpadded batch's."""
    torch.manual_seed(5)
    model = build_model(tiny_config(hta_layout="(1:1)*2"), REGISTRY).double().train()
    batch = Collator(REGISTRY)(random_table(REGISTRY, 7, 8, lengths=MIXED))
    padded = GrowingShape(headroom=0.3, granule=8, max_user_tokens=10).pad(batch)
    results = []
    for b in (batch, padded):
        model.zero_grad(set_to_none=True)
        loss, _ = multitask_bce_loss(model(b), b)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (padded_loss, padded_grads) = results
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=0)  # the BCE is float32
    assert grads.keys() == padded_grads.keys() and len(grads) > 10
    for name, grad in grads.items():  # the loss's BCE is float32: sums over more rows round differently
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_a_shape_too_small_is_refused():
    batch = Collator(REGISTRY)(random_table(REGISTRY, 3, 2))
    shape = batch_shape(batch)
    with pytest.raises(ValueError, match="does not hold a batch of 3 users"):
        pad_batch(batch, BatchShape(3, shape.group_tokens, shape.list_values))
    smaller = tuple(max(0, n - 1) for n in shape.group_tokens)
    with pytest.raises(ValueError, match="group sizes"):
        pad_batch(batch, BatchShape(shape.num_users, smaller, shape.list_values))
    with pytest.raises(ValueError, match="list sizes"):
        pad_batch(batch, BatchShape(shape.num_users, shape.group_tokens, tuple(0 for _ in shape.list_values)))
    with pytest.raises(ValueError, match="list features"):
        pad_batch(batch, BatchShape(shape.num_users, shape.group_tokens, ()))


def test_pack_and_unpack_round_trip_every_tensor():
    batch = Collator(REGISTRY)(random_table(REGISTRY, 4, 3))
    flat = batch.pack()
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for t in batch.tensors())
    for a, b in zip(batch.tensors(), batch.unpack(flat.clone()).tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="bytes"):
        batch.unpack(flat[1:])


def test_padding_rows_have_no_request_id():
    """A padding T row belongs to no request: its request_id is -1 (the documented "none"), never a
    real id such as 0, so nothing keyed by request (scores, GAUC groups) can pick it up."""
    batch = Collator(REGISTRY)(random_table(REGISTRY, 4, 11, lengths=MIXED))
    padded = pad_batch(batch, batch_shape(batch))
    for s in batch.scenarios:
        real, ids = batch.features[s].request_id, padded.features[s].request_id
        assert ids.shape[0] > real.shape[0] and torch.equal(ids[:real.shape[0]], real)
        assert (ids[real.shape[0]:] == -1).all(), f"{s}: {ids[real.shape[0]:].tolist()}"


def test_growing_shape_keeps_a_shape_that_fits_exactly():
    """A shape holding each group's tokens plus the one padding row it needs, each list's values and the
    users plus padding users, exactly: fit() keeps it (no growth, no new CUDA graph)."""
    batch = Collator(REGISTRY)(random_table(REGISTRY, 5, 12, lengths=MIXED))
    shapes = GrowingShape(headroom=0.02, granule=64, max_user_tokens=16)
    counts = [batch.features[g].num_tokens for g in batch.group_names]
    group_tokens = tuple(n + 1 if n else 0 for n in counts)
    lists = tuple(v.shape[0] for g in batch.group_names for v in batch.features[g].list_values.values())
    users = batch.num_users + -(-sum(group_tokens) // 16)
    assert all(n % 64 for n in group_tokens if n) and users % 64  # a grown size would differ (granule 64)
    exact = BatchShape(users, group_tokens, lists)
    shapes.shape = exact
    assert shapes.fit(batch) == exact and shapes.grown == 0
    padded = shapes.pad(batch)
    assert shapes.shape == exact and shapes.grown == 0 and padded.num_tokens == exact.num_tokens
