"""The replica's BatchQueue: what arrives while a batch scores forms the next batch, within the
cost limit and in order; errors reach exactly the requests of the failing batch."""
from __future__ import annotations

import asyncio
import threading

import pytest

from mtfm.deployments.batch_queue import BatchQueue


class RecordingScorer:
    """Scores item -> 10 * item; the first batch blocks until `release` is set."""

    def __init__(self, fail_on=None):
        self.batches: list[list[int]] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.started.set()
            assert self.release.wait(10)
        if self.fail_on in items:
            raise RuntimeError(f"bad item {self.fail_on}")
        return [10 * i for i in items]


async def _submit_while_first_batch_scores(queue: BatchQueue, scorer: RecordingScorer, later: list[tuple[int, int]],
                                           cancel: tuple[int, ...] = ()):
    """Item 0, then the `later` (item, cost) while it scores; those at the indices `cancel` are cancelled while
    they wait (their clients went away)."""
    first = asyncio.create_task(queue.submit(0, 1))
    await asyncio.to_thread(scorer.started.wait, 10)
    rest = [asyncio.create_task(queue.submit(item, cost)) for item, cost in later]
    await asyncio.sleep(0.05)  # every later request is waiting now
    for index in cancel:
        rest[index].cancel()
    await asyncio.sleep(0)
    scorer.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_requests_that_arrive_during_a_batch_form_the_next_batch():
    scorer = RecordingScorer()
    queue = BatchQueue(scorer, max_cost=100)
    results = asyncio.run(_submit_while_first_batch_scores(queue, scorer, [(1, 1), (2, 1), (3, 1), (4, 1)]))
    assert results == [0, 10, 20, 30, 40]
    assert scorer.batches == [[0], [1, 2, 3, 4]]


def test_batches_keep_within_the_cost_limit_in_arrival_order():
    scorer = RecordingScorer()
    queue = BatchQueue(scorer, max_cost=5)
    results = asyncio.run(_submit_while_first_batch_scores(queue, scorer, [(1, 2), (2, 2), (3, 2), (4, 5), (5, 1)]))
    assert results == [0, 10, 20, 30, 40, 50]
    assert scorer.batches == [[0], [1, 2], [3], [4], [5]]


def test_a_failing_batch_fails_only_its_requests():
    scorer = RecordingScorer(fail_on=2)
    queue = BatchQueue(scorer, max_cost=2)
    results = asyncio.run(_submit_while_first_batch_scores(queue, scorer, [(1, 1), (2, 1), (3, 1)]))
    assert results[0] == 0 and results[3] == 30
    assert all(isinstance(r, RuntimeError) and "bad item 2" in str(r) for r in results[1:3])
    assert scorer.batches == [[0], [1, 2], [3]]


def test_a_request_above_the_limit_is_refused():
    queue = BatchQueue(lambda items: items, max_cost=4)
    with pytest.raises(ValueError, match="cost 5 exceeds the batch limit 4"):
        asyncio.run(queue.submit(1, 5))
    with pytest.raises(ValueError, match="max_cost"):
        BatchQueue(lambda items: items, max_cost=0)


def test_the_wait_collects_requests_that_arrive_within_it():
    scorer = RecordingScorer()
    scorer.release.set()
    queue = BatchQueue(scorer, max_cost=100, wait_s=0.2)

    async def spaced():
        tasks = []
        for item in range(3):
            tasks.append(asyncio.create_task(queue.submit(item, 1)))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*tasks)

    assert asyncio.run(spaced()) == [0, 10, 20]
    assert scorer.batches == [[0, 1, 2]]


def test_a_cancelled_consumer_cancels_the_requests_of_the_batch_it_was_scoring():
    """The loop shutting down cancels the consumer task mid-batch: its requests end, not hang."""
    scorer = RecordingScorer()
    queue = BatchQueue(scorer, max_cost=100)

    async def cancel_mid_batch():
        request = asyncio.create_task(queue.submit(1, 1))
        await asyncio.to_thread(scorer.started.wait, 10)
        queue.consumer.cancel()
        try:
            return await asyncio.wait_for(request, 5)
        finally:
            scorer.release.set()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancel_mid_batch())


def test_a_request_cancelled_while_it_waits_is_not_scored_and_its_cost_is_not_counted():
    """A client that went away while its request waited (its task cancelled) takes no room in the next batch."""
    scorer = RecordingScorer()
    queue = BatchQueue(scorer, max_cost=2)
    results = asyncio.run(_submit_while_first_batch_scores(queue, scorer, [(1, 1), (2, 1), (3, 1)], cancel=(1,)))
    assert results[:2] == [0, 10] and isinstance(results[2], asyncio.CancelledError) and results[3] == 30
    assert scorer.batches == [[0], [1, 3]]  # 1 and 3 fit the limit of 2 together: 2 counted nothing
