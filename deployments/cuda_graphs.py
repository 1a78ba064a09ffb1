"""The scenario subgraph replayed from CUDA graphs, one graph per program and bucketed batch shape.

Serving one request of the large model launches ~370 kernels whose GPU time is ~2 ms, while
the host spends ~20 ms issuing them (bench/RESULTS.md, "Serving on GPU"). A CUDA graph records
the launches once and replays them with one call. A graph needs fixed buffers, so a batch is
padded to its bucketed shape (`mtfm.model.padding`), packed into one pinned byte buffer, copied
into the graph's static input with one host-to-device copy, and replayed; the real candidates'
rows of the static output are copied back. Three programs:

    runner = CudaGraphRunner(ranker, device)
    runner.scores(batch)                      # the single pass: (NT, num_tasks) float32 on the CPU
    runner.scores_and_user_sides(batch)       # the same scores, and each request's encoded user
                                              # side (keys and values per layer) to cache
    runner.scores_for_user_sides(sides, candidates)
                                              # candidates only, against cached user sides

The last serves a batch whose users are all in the replica's `UserSideCache`: its graph holds
the candidates' T-tokens alone, and each user's cached keys and values are copied into the
graph's static user side on the device (one copy per user and field), so neither the user's
events nor their H-token layers are processed again. Each such graph owns its static user side
(its bucketed context rows' keys and values in every layer: about 46 MB per 1000 rows for the
large config), beside the cache's own budget.

A shape is captured on first sight (two warm-up passes, then the capture: about 3 plain
passes); each call returns None (the caller runs the model eagerly) when the padded batch has
more than `max_tokens` tokens or `max_graphs` graphs exist. All graphs share one memory pool:
they are replayed one at a time (a lock), and each output is copied out before the next replay.

On a CPU device nothing is captured: the same padded static buffers are run eagerly, which lets
the CPU tests check the padding and buffer reuse that the GPU replays rely on.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.kernels.mask import TokenKind
from mtfm.model import ScenarioRanker, TokenBatch, UserSide
from mtfm.model.padding import batch_shape, bucket, pad_batch

DEFAULT_MAX_GRAPHS = 32
DEFAULT_MAX_TOKENS = 32768
WARMUP_PASSES = 2


@dataclass
class _Graph:
    """One graph's static buffers: pinned host staging and its device copy (the static input),
    the padded batch viewing it, the static user side of a candidates graph, and the outputs."""

    staging: Tensor
    static_input: Tensor
    batch: TokenBatch
    user: UserSide | None = None
    outputs: tuple[Tensor, ...] = ()
    graph: "torch.cuda.CUDAGraph | None" = None


class CudaGraphRunner:
    """The subgraph's programs on padded batches, replayed from one CUDA graph per program and shape."""

    def __init__(self, ranker: ScenarioRanker, device: torch.device, *, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 max_tokens: int = DEFAULT_MAX_TOKENS):
        self.ranker, self.device = ranker, device
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.lock = threading.Lock()

    @property
    def captures(self) -> int:
        return len(self.graphs)

    @torch.no_grad()
    def scores(self, batch: TokenBatch) -> Tensor | None:
        """Probabilities (NT, num_tasks) of the CPU batch's T-tokens, float32 on the CPU; None
        when the batch's shape is not graphed (too large, or no room for another graph)."""
        shape = batch_shape(batch)
        key = ("single pass", shape)
        if not self._admits(key, shape.num_tokens):
            return None
        with self.lock:
            entry = self._replay(key, pad_batch(batch, shape), self._single_pass)
            return entry.outputs[0][:batch.num_targets].cpu()

    @torch.no_grad()
    def scores_and_user_sides(self, batch: TokenBatch) -> tuple[Tensor, list[UserSide]] | None:
        """`scores(batch)`, and per request its user side on the device (`ScenarioRanker.encode_users`
        of that request alone, copied out of the graph's buffers), from one pass
        (`ScenarioRanker.forward_with_user_sides`); None when not graphed."""
        shape = batch_shape(batch)
        key = ("single pass with user sides", shape)
        if not self._admits(key, shape.num_tokens):
            return None
        with self.lock:
            entry = self._replay(key, pad_batch(batch, shape), self._single_pass_with_user_sides)
            scores = entry.outputs[0][:batch.num_targets].cpu()  # also waits for the replay
            kv, kind, ts = entry.outputs[1:]
            bounds = (batch.offsets - batch.target_offsets).tolist()  # context rows: the real users' come first
            sides = [UserSide(entry.batch.user_id[b:b + 1].clone(), _one_user_offsets(end - start, self.device),
                              kind[start:end].clone(), ts[start:end].clone(), kv[:, :, start:end].clone())
                     for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))]
            return scores, sides

    @torch.no_grad()
    def scores_for_user_sides(self, sides: list[UserSide], candidates: TokenBatch) -> Tensor | None:
        """Probabilities (NT, num_tasks) of the CPU batch `candidates` (its requests' candidates;
        any H and R tokens are ignored) against the user sides of the same users, in order, as
        `ScenarioRanker.score_candidates` gives them; None when not graphed."""
        counts = [s.kind.shape[0] for s in sides]
        shape = batch_shape(candidates)
        context_size = bucket(sum(counts))
        key = ("candidates", shape, context_size)
        if not self._admits(key, shape.num_tokens + context_size):
            return None
        # The user side's layout: real users, then empty ones, then the padding user owning the
        # padding rows. Those rows keep whatever an earlier replay left there (valid kinds and times):
        # the padding user's scores are discarded, and attention never crosses users.
        ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        offsets = torch.cat([ends.new_zeros(1), ends, ends.new_full((shape.num_users - len(sides) - 1,), int(ends[-1])),
                             ends.new_tensor([context_size])])

        def load(user: UserSide) -> None:
            start = 0
            for side, n in zip(sides, counts):
                rows = slice(start, start + n)
                user.kind[rows].copy_(side.kind)
                user.ts[rows].copy_(side.ts)
                user.kv[:, :, rows].copy_(side.kv)
                start += n

        def static_user(offsets: Tensor, batch: TokenBatch) -> UserSide:
            kv = sides[0].kv
            return UserSide(batch.user_id, offsets, torch.full((context_size,), int(TokenKind.H), dtype=torch.int8,
                                                                device=self.device),
                            torch.zeros(context_size, dtype=torch.int64, device=self.device),
                            kv.new_zeros(kv.shape[:2] + (context_size,) + kv.shape[3:]))

        with self.lock:
            entry = self._replay(key, pad_batch(candidates, shape), self._candidates, prefix=offsets,
                                 static_user=static_user, load=load)
            return entry.outputs[0][:candidates.num_targets].cpu()

    def _admits(self, key: tuple, tokens: int) -> bool:
        return tokens <= self.max_tokens and (key in self.graphs or len(self.graphs) < self.max_graphs)

    def _replay(self, key: tuple, padded: TokenBatch, program: Callable[[_Graph], tuple[Tensor, ...]], *,
                prefix: Tensor | None = None, static_user: Callable[[Tensor, TokenBatch], UserSide] | None = None,
                load: Callable[[UserSide], None] | None = None) -> _Graph:
        """Loads the inputs into `key`'s graph (captured now if new) and replays it. The static
        input is `prefix` (int64, e.g. offsets) then the padded batch, in one buffer and one copy;
        `load` fills the static user side (made by `static_user`) from device tensors."""
        prefix_bytes = 0 if prefix is None else prefix.numel() * prefix.element_size()
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._new_graph(padded, prefix, static_user)
            self._capture(entry, program)  # on the new buffers as made (a static user side of zeros)
        if prefix is not None:
            entry.staging[:prefix_bytes].copy_(prefix.view(torch.uint8))
        padded.pack(out=entry.staging[prefix_bytes:])
        entry.static_input.copy_(entry.staging, non_blocking=True)
        if load is not None:
            load(entry.user)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.outputs = program(entry)
        return entry

    def _new_graph(self, padded: TokenBatch, prefix: Tensor | None,
                   static_user: Callable[[Tensor, TokenBatch], UserSide] | None) -> _Graph:
        pieces = ([] if prefix is None else [prefix.view(torch.uint8)]) + [padded.pack()]
        flat = torch.cat(pieces)
        staging = flat.pin_memory() if self.device.type == "cuda" else flat.clone()
        static_input = flat.to(self.device)
        prefix_bytes = flat.numel() - pieces[-1].numel()
        batch = padded.unpack(static_input[prefix_bytes:])
        user = None
        if static_user is not None:
            user = static_user(static_input[:prefix_bytes].view(torch.int64), batch)
        return _Graph(staging, static_input, batch, user)

    def _capture(self, entry: _Graph, program: Callable[[_Graph], tuple[Tensor, ...]]) -> None:
        if self.device.type != "cuda":
            return
        # Warm-up on a side stream (Triton compiles and autotunes, cuBLAS picks its kernels), as
        # capture must see no first-time work.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                program(entry)
        torch.cuda.current_stream(self.device).wait_stream(side)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, pool=self.pool, capture_error_mode="thread_local"):
            entry.outputs = program(entry)

    def _autocast(self) -> contextlib.AbstractContextManager:
        # The autocast cache would keep casts made during capture; the served weights are
        # already in the compute dtype, so it has nothing to save anyway.
        return self.ranker.autocast(self.device.type, cache=False)

    def _single_pass(self, entry: _Graph) -> tuple[Tensor, ...]:
        with self._autocast():
            return (self.ranker(entry.batch),)

    def _single_pass_with_user_sides(self, entry: _Graph) -> tuple[Tensor, ...]:
        with self._autocast():
            scores, user = self.ranker.forward_with_user_sides(entry.batch)
        return scores, user.kv, user.kind, user.ts

    def _candidates(self, entry: _Graph) -> tuple[Tensor, ...]:
        with self._autocast():
            return (self.ranker.score_candidates(entry.user, entry.batch, check_users=False),)


def _one_user_offsets(rows: int, device: torch.device) -> Tensor:
    """[0, rows] on the device, made there: a small host-to-device copy would wait for the stream."""
    return torch.arange(2, dtype=torch.int64, device=device) * rows
