"""Scoring backends of a scenario replica: how a batch of validated requests becomes scores.

    torch      the PyTorch subgraph; user side once per request, candidates in chunks against
               it (`ScenarioRanker.encode_users` / `score_candidates`); on a GPU, weights cast
               once to the config's compute dtype (bf16), autocast, the Triton kernels, and
               (cuda_graphs) the single pass replayed from a CUDA graph per bucketed batch
               shape (cuda_graphs.py), the other paths serving batches too large for a graph
    onnx       the subgraph exported once to ONNX with every token count dynamic
               (onnx_export.py), run with onnxruntime on CPU
    tensorrt   the same ONNX graph run by onnxruntime's TensorRT execution provider, which
               builds a TensorRT engine from it (needs the `tensorrt` package and a GPU)

`backend_unavailable_reason(name)` says why a backend cannot run here (None when it can), so a
replica refuses a scenario's configured backend with a clear error at start-up instead of
failing on the first request. It is checked where the replica runs (`create_backend`): the app
builder runs on the Serve controller's node (a CPU head on a cluster), which says nothing about
the GPU node a replica lands on, so the builder checks only that the name is known (the
registry's reader of `serving:` knobs, for the YAML and serve.yaml's overrides alike).
"""
from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mtfm.model import ScenarioRanker, UserSide
from mtfm.platform.registry import SERVING_BACKENDS, events_column, exposures_column

from .cuda_graphs import CudaGraphRunner
from .rank_request import RankRequest
from .user_cache import UserSideCache, merge_users, split_users


class BackendUnavailable(RuntimeError):
    """A configured backend cannot run on this machine; the message says what is missing."""


class ScoringBackend(Protocol):
    name: str
    cuda_graphs: bool  # whether batches are replayed from CUDA graphs (in effect, not as configured)

    def score(self, requests: list[RankRequest]) -> list[np.ndarray]:
        """Per request, (K, num_tasks) float32 probabilities in candidate order."""


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine (None when it can)."""
    if name not in SERVING_BACKENDS:
        return f"unknown backend {name!r}; expected one of {', '.join(SERVING_BACKENDS)}"
    if name == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return "backend onnx needs the onnx and onnxruntime packages (pip install 'mtfm[onnx]')"
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return ("backend tensorrt needs the `tensorrt` package and an NVIDIA GPU (pip install 'mtfm[tensorrt]' "
                    "onnxruntime-gpu); choose serving.backend torch or onnx on this machine")
        import onnxruntime

        if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
            return ("backend tensorrt needs onnxruntime's TensorrtExecutionProvider (install onnxruntime-gpu built "
                    f"with TensorRT); this onnxruntime has {onnxruntime.get_available_providers()}")
    return None


def create_backend(name: str, ranker: ScenarioRanker, *, device: torch.device, chunk_size: int,
                   threads: int | None = None, user_cache: UserSideCache | None = None,
                   cuda_graphs: bool = False) -> ScoringBackend:
    """threads: CPU threads for the model's operators (None: the library's default, all cores);
    a replica passes its CPU share so that co-located replicas do not oversubscribe the cores.
    user_cache: encoded user sides kept across requests; cuda_graphs: replay the single pass
    from CUDA graphs on a GPU (both PyTorch only)."""
    reason = backend_unavailable_reason(name)
    if reason is not None:  # on a replica: name the node, and where the backend is chosen
        raise BackendUnavailable(f"scenario {ranker.scenario}: {reason} (on node {socket.gethostname()}, where this "
                                 "replica runs; the backend is set by the scenario YAML's serving.backend or "
                                 f"serve.yaml args.scenarios.{ranker.scenario}.backend)")
    if name == "torch":
        if threads is not None:
            torch.set_num_threads(threads)
        return TorchBackend(ranker, device=device, chunk_size=chunk_size, user_cache=user_cache,
                            cuda_graphs=cuda_graphs)
    from .onnx_export import OnnxBackend

    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if name == "tensorrt" else ["CPUExecutionProvider"]
    return OnnxBackend(ranker, providers=providers, name=name, threads=threads)


class TorchBackend:
    """The PyTorch subgraph. One collate for the whole batch; on a GPU with `cuda_graphs`, a
    batch that fits a graph (`CudaGraphRunner`) is scored by replaying one. Otherwise the user
    side of every request is encoded once (or taken from `user_cache`), then candidates are
    scored in chunks of `chunk_size` per request. `reuse_user_side=False` scores everything in
    one plain pass (the tests' reference scorer and the benchmarks' baseline).

    With graphs and a `user_cache`: a batch whose users are all cached replays a graph of its
    candidates alone against their cached user sides; any other batch replays the single pass
    that also gives each request's user side, and caches the new ones."""

    name = "torch"

    def __init__(self, ranker: ScenarioRanker, *, device: torch.device, chunk_size: int = 256,
                 reuse_user_side: bool = True, user_cache: UserSideCache | None = None, cuda_graphs: bool = False):
        if device.type == "cuda" and ranker.compute_dtype != torch.float32:
            # Serving needs no float32 master weights. Casting them once (in place) spares autocast's
            # per-request weight casts: 531 -> 367 kernels per large-config request (bench/RESULTS.md).
            ranker = ranker.to(ranker.compute_dtype)
        self.ranker = ranker.to(device).eval()
        self.collator = ranker.collator()
        self.device, self.chunk_size, self.reuse_user_side = device, chunk_size, reuse_user_side
        self.user_cache = user_cache if reuse_user_side else None
        self.scenario = ranker.scenario
        self.graphs = CudaGraphRunner(self.ranker, device) if cuda_graphs and device.type == "cuda" else None
        self.cuda_graphs = self.graphs is not None

    @torch.no_grad()
    def score(self, requests: list[RankRequest]) -> list[np.ndarray]:
        table = pa.concat_tables([r.table for r in requests])
        # Looked up once per batch, so each request counts once as a hit or a miss. A graphed batch
        # that mixes hits and misses replays the single pass for all of it: its hits are recomputed.
        sides = [self.user_cache.get(r.user_state) for r in requests] if self.user_cache is not None else None
        collated = None  # the whole batch collated on the host, when a path needs it
        if self.graphs is not None:
            if sides is not None and all(side is not None for side in sides):
                candidates = self.collator(self._candidates_only(table))
                scores = self.graphs.scores_for_user_sides(sides, candidates)
                if scores is not None:
                    return _split(scores, candidates.target_offsets)
            collated = self.collator(table)
            if sides is None:
                scores = self.graphs.scores(collated)
            else:
                graphed = self.graphs.scores_and_user_sides(collated)
                scores = None if graphed is None else graphed[0]
                if graphed is not None:
                    for request, side, encoded in zip(requests, sides, graphed[1]):
                        if side is None:
                            self.user_cache.put(request.user_state, encoded)
            if scores is not None:
                return _split(scores, collated.target_offsets)
        with self.ranker.autocast(self.device.type):
            if not self.reuse_user_side:
                batch = (collated if collated is not None else self.collator(table)).to(self.device)
                return _split(self.ranker(batch), batch.target_offsets)
            if sides is not None:
                user = self._cached_user_sides(requests, sides, table)
            else:
                batch = (collated if collated is not None else self.collator(table)).to(self.device)
                user = self.ranker.encode_users(batch)
                if max(r.num_candidates for r in requests) <= self.chunk_size:
                    return _split(self.ranker.score_candidates(user, batch), batch.target_offsets)
            candidates = self._candidates_only(table)
            parts: list[list[np.ndarray]] = [[] for _ in requests]
            for start in range(0, max(r.num_candidates for r in requests), self.chunk_size):
                chunk = self.collator(_candidate_slice(candidates, self.scenario, start, self.chunk_size))
                for b, scores in enumerate(_split(self.ranker.score_candidates(user, chunk.to(self.device)),
                                                  chunk.target_offsets)):
                    parts[b].append(scores)
            return [np.concatenate(p) for p in parts]

    def _cached_user_sides(self, requests: list[RankRequest], sides: list[UserSide | None],
                           table: pa.Table) -> UserSide:
        """The batch's user side: cached users as they are, the others encoded together and cached."""
        sides = list(sides)
        missing = [i for i, side in enumerate(sides) if side is None]
        if missing:
            batch = self.collator(table.take(missing)).to(self.device)
            for i, side in zip(missing, split_users(self.ranker.encode_users(batch))):
                sides[i] = side
                self.user_cache.put(requests[i].user_state, side)
        return merge_users(sides)

    def _candidates_only(self, table: pa.Table) -> pa.Table:
        return without_events(table, self.ranker.registry.sequences)


def without_events(table: pa.Table, sequences: Iterable[str]) -> pa.Table:
    """The requests of `table` with no events in `sequences` (their user side already holds them)."""
    for name in sequences:
        index = table.schema.get_field_index(events_column(name))
        empty = pa.array([[]] * table.num_rows, type=table.schema.field(index).type)
        table = table.set_column(index, events_column(name), empty)
    return table


def _candidate_slice(table: pa.Table, scenario: str, start: int, size: int) -> pa.Table:
    """The requests with their candidates start:start+size only."""
    column = exposures_column(scenario)
    index = table.schema.get_field_index(column)
    return table.set_column(index, column, pc.list_slice(table.column(column), start, start + size))


def _split(scores: torch.Tensor, target_offsets: torch.Tensor) -> list[np.ndarray]:
    values = scores.float().cpu().numpy()
    bounds = target_offsets.tolist()
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
