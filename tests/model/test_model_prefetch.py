"""BatchPrefetcher: same batches in the same order as the plain iterator, errors reach the
consumer, a bounded lookahead, and no thread left behind when the consumer stops early."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from model_test_utils import REPO, random_table
from mtfm.model import BatchPrefetcher, Collator, token_budget_batches
from mtfm.platform.registry import load_registry

REGISTRY = load_registry(REPO / "configs")
COLLATOR = Collator(REGISTRY)


def _tables(count: int = 6, users: int = 5):
    return [random_table(REGISTRY, users, seed, first_user_id=100 * seed) for seed in range(count)]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mtfm-batch-prefetch"]


class _CountingSource:
    """An endless iterator of one batch that counts how many were taken from it."""

    def __init__(self, batch):
        self.batch, self.taken, self.closed = batch, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        self.taken += 1
        return self.batch

    def close(self):
        self.closed = True


def test_prefetched_batches_equal_the_plain_iterator_in_order():
    tables = _tables()
    expected = list(token_budget_batches(tables, COLLATOR, 150))
    assert len(expected) > 4
    with BatchPrefetcher(token_budget_batches(tables, COLLATOR, 150), "cpu") as prefetched:
        got = list(prefetched)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a.user_id.tolist() == b.user_id.tolist()
        for x, y in zip(a.tensors(), b.tensors()):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert next(prefetched, None) is None and not _prefetch_threads()


def test_a_source_error_reaches_the_consumer_after_the_batches_before_it():
    batch = COLLATOR(random_table(REGISTRY, 2, 0))

    def failing():
        yield batch
        yield batch
        raise ValueError("bad row in the shard")

    prefetched = BatchPrefetcher(failing(), "cpu")
    assert next(prefetched) is batch and next(prefetched) is batch
    with pytest.raises(ValueError, match="bad row in the shard"):
        next(prefetched)
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(prefetched)


def _wait_until(condition, deadline_s: float = 10.0) -> bool:
    """Poll `condition` until it holds or `deadline_s` passes (a slow, loaded machine only waits longer)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("depth", [1, 2])
def test_lookahead_is_bounded_by_depth(depth):
    """After `consumed` batches the producer takes exactly depth more (queued) plus one it holds while it
    waits for room, and no further."""
    source = _CountingSource(COLLATOR(random_table(REGISTRY, 2, 0)))
    with BatchPrefetcher(source, "cpu", depth=depth) as prefetched:
        for consumed in range(1, 4):
            next(prefetched)
            bound = consumed + depth + 1
            assert _wait_until(lambda: source.taken >= bound), f"producer took {source.taken}, expected {bound}"
            time.sleep(0.05)  # room for a producer that overruns the bound to do so (never fails a correct one)
            assert source.taken == bound


def test_closing_early_stops_the_thread_and_closes_the_source():
    finished = []

    def endless():
        batch = COLLATOR(random_table(REGISTRY, 2, 0))
        try:
            while True:
                yield batch
        finally:
            finished.append(True)

    with BatchPrefetcher(endless(), "cpu") as prefetched:
        next(prefetched)
        time.sleep(0.2)  # the producer is now blocked on the full queue
    assert not _prefetch_threads() and finished == [True]
    with pytest.raises(StopIteration):
        next(prefetched)

    source = _CountingSource(COLLATOR(random_table(REGISTRY, 2, 0)))
    BatchPrefetcher(source, "cpu").close()  # closed before anything was consumed
    assert not _prefetch_threads() and source.closed


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        BatchPrefetcher(iter([]), "cpu", depth=0)


def test_close_does_not_hang_on_a_source_that_blocks():
    release = threading.Event()
    batch = COLLATOR(random_table(REGISTRY, 2, 0))

    def blocking():
        yield batch
        release.wait()  # a data pipeline that will not produce until something else happens
        yield batch

    prefetched = BatchPrefetcher(blocking(), "cpu")
    assert next(prefetched) is batch
    with pytest.warns(RuntimeWarning, match="left to finish"):
        prefetched.close(timeout_s=0.2)
    release.set()
    for thread in _prefetch_threads():
        thread.join(5)
    assert not _prefetch_threads()
