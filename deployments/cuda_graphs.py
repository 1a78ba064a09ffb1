"""The scenario subgraph's single pass replayed from CUDA graphs, one graph per bucketed batch shape.

Serving one request of the large model launches ~370 kernels whose GPU time is ~2 ms, while
the host spends ~20 ms issuing them (bench/RESULTS.md, "Serving on GPU"). A CUDA graph records
the launches once and replays them with one call. A graph needs fixed buffers, so a batch is
padded to its bucketed shape (`mtfm.model.padding`), packed into one pinned byte buffer, copied
into the graph's static input with one host-to-device copy, and replayed; the real candidates'
rows of the static output are copied back.

    runner = CudaGraphRunner(ranker, device)
    scores = runner(cpu_batch)        # (NT, num_tasks) float32 on the CPU, or None: not graphed

A new shape is captured on first sight (two warm-up passes, then the capture: about 3 plain
passes); `None` (the caller runs the model eagerly) when the padded batch has more than
`max_tokens` tokens or `max_graphs` graphs exist. All graphs share one memory pool: they are
replayed one at a time (a lock), and each output is copied out before the next replay.

On a CPU device nothing is captured: the same padded static buffers are run eagerly, which lets
the CPU tests check the padding and buffer reuse that the GPU replays rely on.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.model import ScenarioRanker, TokenBatch
from mtfm.model.padding import BatchShape, batch_shape, pad_batch

DEFAULT_MAX_GRAPHS = 32
DEFAULT_MAX_TOKENS = 32768
WARMUP_PASSES = 2


@dataclass
class _Graph:
    """One shape's static buffers: pinned host staging, device input, the batch viewing it, output."""

    staging: Tensor
    static_input: Tensor
    static_batch: TokenBatch
    output: Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


class CudaGraphRunner:
    """`ScenarioRanker.forward` on padded batches, replayed from one CUDA graph per `BatchShape`."""

    def __init__(self, ranker: ScenarioRanker, device: torch.device, *, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 max_tokens: int = DEFAULT_MAX_TOKENS):
        self.ranker, self.device = ranker, device
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self.graphs: dict[BatchShape, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.lock = threading.Lock()

    @property
    def captures(self) -> int:
        return len(self.graphs)

    @torch.no_grad()
    def __call__(self, batch: TokenBatch) -> Tensor | None:
        """Probabilities (NT, num_tasks) of the CPU batch's T-tokens, float32 on the CPU; None
        when the batch's shape is not graphed (too large, or no room for another graph)."""
        shape = batch_shape(batch)
        if shape.num_tokens > self.max_tokens or (shape not in self.graphs and len(self.graphs) >= self.max_graphs):
            return None
        padded = pad_batch(batch, shape)
        with self.lock:
            entry = self.graphs.get(shape)
            if entry is None:
                entry = self.graphs[shape] = self._capture(padded)
            padded.pack(out=entry.staging)
            entry.static_input.copy_(entry.staging, non_blocking=True)
            if entry.graph is not None:
                entry.graph.replay()
            else:
                entry.output = self._forward(entry.static_batch)
            return entry.output[:batch.num_targets].cpu()

    def _autocast(self) -> contextlib.AbstractContextManager:
        # The autocast cache would keep casts made during capture; the served weights are
        # already in the compute dtype, so it has nothing to save anyway.
        if self.device.type != "cuda" or self.ranker.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.ranker.compute_dtype, cache_enabled=False)

    def _forward(self, batch: TokenBatch) -> Tensor:
        with self._autocast():
            return self.ranker(batch)

    def _capture(self, padded: TokenBatch) -> _Graph:
        flat = padded.pack()
        staging = flat.pin_memory() if self.device.type == "cuda" else flat.clone()
        static_input = flat.to(self.device)
        entry = _Graph(staging, static_input, padded.unpack(static_input))
        if self.device.type != "cuda":
            return entry
        # Warm-up on a side stream (Triton compiles and autotunes, cuBLAS picks its kernels), as
        # capture must see no first-time work.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                self._forward(entry.static_batch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, pool=self.pool, capture_error_mode="thread_local"):
            entry.output = self._forward(entry.static_batch)
        return entry
