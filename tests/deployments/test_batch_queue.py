"""The replica's BatchQueue: what arrives while a batch scores forms the next batch, within the
cost limit and in order; errors reach exactly the requests of the failing batch. Each of these
holds with the scoring in asyncio's worker threads (poll_s 0) and in the queue's polling thread."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mtfm.deployments.batch_queue import BatchQueue

POLLS = pytest.mark.parametrize("poll_s", [0.0, 0.005], ids=["blocking", "polling"])


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


async def _submit_while_first_batch_scores(queue: BatchQueue, scorer: RecordingScorer, later: list[tuple[int, int]]):
    first = asyncio.create_task(queue.submit(0, 1))
    await asyncio.to_thread(scorer.started.wait, 10)
    rest = [asyncio.create_task(queue.submit(item, cost)) for item, cost in later]
    await asyncio.sleep(0.05)  # every later request is waiting now
    scorer.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


@POLLS
def test_requests_that_arrive_during_a_batch_form_the_next_batch(poll_s):
    scorer = RecordingScorer()
    queue = BatchQueue(scorer, max_cost=100, poll_s=poll_s)
    results = asyncio.run(_submit_while_first_batch_scores(queue, scorer, [(1, 1), (2, 1), (3, 1), (4, 1)]))
    assert results == [0, 10, 20, 30, 40]
    assert scorer.batches == [[0], [1, 2, 3, 4]]


@POLLS
def test_batches_keep_within_the_cost_limit_in_arrival_order(poll_s):
    scorer = RecordingScorer()
    queue = BatchQueue(scorer, max_cost=5, poll_s=poll_s)
    results = asyncio.run(_submit_while_first_batch_scores(queue, scorer, [(1, 2), (2, 2), (3, 2), (4, 5), (5, 1)]))
    assert results == [0, 10, 20, 30, 40, 50]
    assert scorer.batches == [[0], [1, 2], [3], [4], [5]]


@POLLS
def test_a_failing_batch_fails_only_its_requests(poll_s):
    scorer = RecordingScorer(fail_on=2)
    queue = BatchQueue(scorer, max_cost=2, poll_s=poll_s)
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


@POLLS
def test_the_wait_collects_requests_that_arrive_within_it(poll_s):
    scorer = RecordingScorer()
    scorer.release.set()
    queue = BatchQueue(scorer, max_cost=100, wait_s=0.2, poll_s=poll_s)

    async def spaced():
        tasks = []
        for item in range(3):
            tasks.append(asyncio.create_task(queue.submit(item, 1)))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*tasks)

    assert asyncio.run(spaced()) == [0, 10, 20]
    assert scorer.batches == [[0, 1, 2]]


def test_the_polling_thread_scores_every_batch_and_sleeps_once_its_window_ends():
    names = []

    def score(items):
        names.append(threading.current_thread().name)
        return [10 * i for i in items]

    queue = BatchQueue(score, max_cost=100, poll_s=0.02)

    async def requests():
        first = await queue.submit(1, 1)
        await asyncio.sleep(0.1)  # past the window: the thread blocks, the next batch must wake it
        second = await queue.submit(2, 1)
        idle_cpu = time.process_time()
        await asyncio.sleep(0.3)  # no request: the event loop and the thread should both sleep
        idle_cpu = time.process_time() - idle_cpu
        third = await queue.submit(3, 1)
        return [first, second, third], idle_cpu

    results, idle_cpu = asyncio.run(requests())
    queue.close()
    assert results == [10, 20, 30]
    assert names == ["BatchQueue-scorer"] * 3
    assert not queue.scorer.thread.is_alive()
    # The two 0.02 s windows of polling after the last batch, not the 0.3 s of idleness.
    assert idle_cpu < 0.15, f"{idle_cpu:.3f} s of CPU while idle for 0.3 s: something keeps polling"


def test_a_polling_queue_refuses_a_negative_window():
    with pytest.raises(ValueError, match="poll_s"):
        BatchQueue(lambda items: items, max_cost=4, poll_s=-1)
