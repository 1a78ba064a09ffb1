"""A replica's request batching: requests that arrive while a batch scores form the next batch.

    queue = BatchQueue(score, max_cost=65536, wait_s=0.0)   # score(list of items) -> list of results
    result = await queue.submit(item, cost)                 # from any number of concurrent requests

One consumer task takes the first waiting request, then every other waiting one while their
costs fit `max_cost` (in arrival order; the first that does not fit starts the next batch),
optionally waiting up to `wait_s` for more, and scores the batch in a worker thread. It forms
the next batch only when this one is scored. So an idle replica scores a lone request at once,
and a loaded one scores in batches as large as its backlog allows.

Why not `@serve.batch`: Ray Serve's batcher forms the next batch as soon as the previous one is
handed to its concurrency semaphore, not when it finishes, so under load the batches queued
behind a running one hold one request each unless every batch waits its full timeout
(bench/RESULTS.md, "Serving on GPU": 16 clients gave batches of 1.0-1.2 requests).
"""
from __future__ import annotations

import asyncio
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

    def __init__(self, score: Callable[[list], list], *, max_cost: int, wait_s: float = 0.0):
        if max_cost < 1 or wait_s < 0:
            raise ValueError(f"BatchQueue: max_cost must be >= 1 and wait_s >= 0, found {max_cost}, {wait_s}")
        self.score, self.max_cost, self.wait_s = score, max_cost, wait_s
        self.waiting: deque[_Waiting] = deque()
        self.arrived: asyncio.Event | None = None
        self.consumer: asyncio.Task | None = None

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

    async def _consume(self) -> None:
        batch: list[_Waiting] = []
        try:
            while True:
                while not self.waiting:
                    self.arrived.clear()
                    await self.arrived.wait()
                if self.wait_s > 0 and sum(w.cost for w in self.waiting) < self.max_cost:
                    await asyncio.sleep(self.wait_s)
                batch = self._take_batch()
                if not batch:
                    continue
                try:
                    results = await asyncio.to_thread(self.score, [w.item for w in batch])
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
        finally:  # reached only when this task is cancelled: its batch's requests would wait forever
            for w in batch:
                w.future.cancel()
