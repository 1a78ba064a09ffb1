"""A replica's request batching: requests that arrive while a batch scores form the next batch.

    queue = BatchQueue(score, max_cost=65536, wait_s=0.0, poll_s=0.0)  # score(list of items) -> list of results
    result = await queue.submit(item, cost)                            # from any number of concurrent requests

One consumer task takes the first waiting request, then every other waiting one while their
costs fit `max_cost` (in arrival order; the first that does not fit starts the next batch),
optionally waiting up to `wait_s` for more, and scores the batch in a worker thread. It forms
the next batch only when this one is scored. So an idle replica scores a lone request at once,
and a loaded one scores in batches as large as its backlog allows.

`poll_s` > 0 keeps the queue's two threads awake around each batch: the event loop polls while
the batch scores and for `poll_s` after it, and the queue's own scoring thread polls for the next
batch for `poll_s` before it blocks. On a virtual machine a thread that blocks lets its vCPU halt,
and the hypervisor wakes it late: 1.5-4.5 ms at p99 on the GPU hosts measured (bench/RESULTS.md,
"Run 22"), against a K=200 request scored in about 4 ms. Each poll naps `nap_s` (50 us) with the GIL
released: a thread that spins through `time.sleep(0)` takes the GIL back before a waiting thread
wakes, and the scoring thread, which needs the GIL for its Python work, then waits for CPython's
5 ms switch interval (3x slower scoring on the CPU box).

Why not `@serve.batch`: Ray Serve's batcher forms the next batch as soon as the previous one is
handed to its concurrency semaphore, not when it finishes, so under load the batches queued
behind a running one hold one request each unless every batch waits its full timeout
(bench/RESULTS.md, "Serving on GPU": 16 clients gave batches of 1.0-1.2 requests).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Waiting:
    item: Any
    cost: int
    future: asyncio.Future


class BatchQueue:
    """Batches submitted items for `score`, a blocking function run in a thread (see module doc)."""

    def __init__(self, score: Callable[[list], list], *, max_cost: int, wait_s: float = 0.0, poll_s: float = 0.0,
                 nap_s: float = 50e-6):
        if max_cost < 1 or wait_s < 0 or poll_s < 0 or nap_s < 0:
            raise ValueError(f"BatchQueue: max_cost must be >= 1, wait_s, poll_s and nap_s >= 0, found {max_cost}, "
                             f"{wait_s}, {poll_s}, {nap_s}")
        self.score, self.max_cost, self.wait_s, self.poll_s, self.nap_s = score, max_cost, wait_s, poll_s, nap_s
        self.waiting: deque[_Waiting] = deque()
        self.arrived: asyncio.Event | None = None
        self.consumer: asyncio.Task | None = None
        self.scorer = PollingScorer(score, poll_s, nap_s) if poll_s > 0 else None

    def close(self) -> None:
        """Ends the polling scoring thread, if any (a queue without one needs no closing)."""
        if self.scorer is not None:
            self.scorer.close()

    async def submit(self, item: Any, cost: int) -> Any:
        """Score `item` in some batch and return its result (or raise the batch's error)."""
        if cost > self.max_cost:
            raise ValueError(f"a request of cost {cost} exceeds the batch limit {self.max_cost}")
        if self.consumer is None or self.consumer.done():
            self.arrived = asyncio.Event()
            self.consumer = asyncio.get_running_loop().create_task(self._consume())
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(item, cost, future))
        self.arrived.set()
        return await future

    def _take_batch(self) -> list[_Waiting]:
        batch, total = [], 0
        while self.waiting and total + self.waiting[0].cost <= self.max_cost:
            entry = self.waiting.popleft()
            if not entry.future.cancelled():
                batch.append(entry)
                total += entry.cost
        return batch

    async def _next_arrival(self) -> None:
        deadline = time.perf_counter() + self.poll_s
        while not self.waiting and time.perf_counter() < deadline:
            await self._nap()
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()

    async def _scored(self, items: list) -> list:
        if self.scorer is None:
            return await asyncio.to_thread(self.score, items)
        future = self.scorer.submit(items)
        while not future.done():
            await self._nap()
        return future.result()

    async def _nap(self) -> None:
        """Lets the loop run what is ready, then sleeps `nap_s` outside it: the GIL is free, and
        the thread is not parked as asyncio would park it (its timers sleep at least 1 ms)."""
        await asyncio.sleep(0)
        time.sleep(self.nap_s)

    async def _consume(self) -> None:
        while True:
            await self._next_arrival()
            if self.wait_s > 0 and sum(w.cost for w in self.waiting) < self.max_cost:
                await asyncio.sleep(self.wait_s)
            batch = self._take_batch()
            if not batch:
                continue
            try:
                results = await self._scored([w.item for w in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"scoring a batch of {len(batch)} returned {len(results)} results")
            except Exception as error:  # every request of the batch gets the error; the queue goes on
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(error)
                continue
            for w, result in zip(batch, results):
                if not w.future.done():
                    w.future.set_result(result)


class PollingScorer:
    """One thread that scores the batches handed to it and, for `poll_s` after each, polls for the
    next one (napping `nap_s` between looks, the GIL released) before it blocks."""

    def __init__(self, score: Callable[[list], list], poll_s: float, nap_s: float):
        self.score, self.poll_s, self.nap_s = score, poll_s, nap_s
        self.jobs: deque = deque()
        self.job_ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="BatchQueue-scorer", daemon=True)
        self.thread.start()

    def submit(self, items: list) -> asyncio.Future:
        """The future of `score(items)`, settled on the calling event loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.append((items, loop, future))
        self.job_ready.set()
        return future

    def close(self) -> None:
        self.jobs.append(None)
        self.job_ready.set()
        self.thread.join()

    def _next_job(self):
        deadline = time.perf_counter() + self.poll_s
        while not self.jobs and time.perf_counter() < deadline:
            time.sleep(self.nap_s)
        while not self.jobs:
            self.job_ready.clear()  # cleared before the check: a job appended after it sets the event again
            if not self.jobs:
                self.job_ready.wait()
        return self.jobs.popleft()

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            items, loop, future = job
            try:
                settle, value = future.set_result, self.score(items)
            except Exception as error:  # the batch's requests get it; the thread goes on
                settle, value = future.set_exception, error
            try:
                loop.call_soon_threadsafe(_settle, future, settle, value)
            except RuntimeError:  # the loop closed while the batch scored: nobody waits for it
                pass


def _settle(future: asyncio.Future, settle: Callable, value: Any) -> None:
    if not future.done():
        settle(value)
