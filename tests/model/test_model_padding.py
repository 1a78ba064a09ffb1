"""Padding a batch to its bucketed shape (model/padding.py) leaves every real token's output
unchanged, and the sizes are the bucket's; plus the byte packing that the padded copies use."""
from __future__ import annotations

import pytest
import torch

from model_test_utils import REPO, random_table, tiny_config
from mtfm.kernels.mask import TokenKind
from mtfm.model import Collator, build_model
from mtfm.model.padding import BatchShape, batch_shape, bucket, pad_batch, user_bucket
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


def test_pack_and_unpack_round_trip_every_tensor():
    batch = Collator(REGISTRY)(random_table(REGISTRY, 4, 3))
    flat = batch.pack()
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for t in batch.tensors())
    for a, b in zip(batch.tensors(), batch.unpack(flat.clone()).tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="bytes"):
        batch.unpack(flat[1:])
