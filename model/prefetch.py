"""Background batch prefetch: collate the next batches in a thread and copy them to the device
while the current step computes.

    with BatchPrefetcher(token_budget_batches(reads, collator, max_tokens), device) as batches:
        for batch in batches:          # already on `device`, in the source's order
            ...

A producer thread pulls from the source iterator (so the collation of `token_budget_batches`,
and the Arrow reads behind it, run off the training loop), packs each batch into one pinned host
buffer and, on CUDA, issues its host-to-device copy on a side stream (`TokenBatch.to`). At most
`depth` finished batches wait in a bounded queue. Handing a batch over makes the consumer's
current stream wait for that batch's copy (an event, not a host sync) and marks the batch's
memory as used by that stream (`record_stream`), so the caching allocator does not reuse it
while the step's kernels still read it. The copy of batch i+1 thus overlaps the compute of
batch i.

Order is the source's, exactly (one producer, one FIFO queue). An exception raised by the
source (or by the copy) is raised by the consumer's `next()` once the batches before it are
consumed. `close()` (or leaving the `with` block) stops the thread, closes the source
(a generator's `finally` runs) and waits for the thread to end (bounded: see `close`).
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .batch import TokenBatch

_POLL_S = 0.05  # how often a producer blocked on a full queue checks whether the consumer closed


@dataclass
class _Ready:
    batch: TokenBatch
    copied: torch.cuda.Event | None  # recorded on the side stream after the batch's copy (CUDA only)


@dataclass
class _Failed:
    error: BaseException


_END = object()


class BatchPrefetcher(Iterator[TokenBatch]):
    """Iterates `batches` (CPU `TokenBatch`es) `depth` ahead in a thread, yielding them on `device`."""

    def __init__(self, batches: Iterable[TokenBatch], device: torch.device | str, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, found {depth}")
        self.device = torch.device(device)
        self._source = iter(batches)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._produce, name="mtfm-batch-prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> TokenBatch:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        if item.copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(item.copied)
            for t in item.batch.tensors():
                if t.numel():
                    t.record_stream(compute)
        return item.batch

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the producer and wait for it; batches not yet consumed are dropped.

        A producer inside the source's `next()` stops once that returns. If it has not within
        `timeout_s` (a source that blocks, e.g. on a data pipeline no other consumer drains), it is
        left to finish on its own (a daemon thread) rather than hang the caller.
        """
        self._finished = True
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._drain()  # unblocks a producer waiting on a full queue
            self._thread.join(_POLL_S)
        self._drain()
        if self._thread.is_alive():
            warnings.warn(f"BatchPrefetcher: the source did not yield within {timeout_s:.0f} s of close(); "
                          "its thread is left to finish in the background", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._source, _END)
                item = _END if batch is _END else self._transfer(batch)
                if not self._put(item) or item is _END:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failed(exc))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _transfer(self, batch: TokenBatch) -> _Ready:
        if self._copy_stream is None:
            return _Ready(batch.to(self.device), None)
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return _Ready(moved, copied)

    def _put(self, item) -> bool:
        """Queue `item` unless the consumer closed first; False when it did."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
