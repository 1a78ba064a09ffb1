"""The serving metrics, per scenario, through Ray Serve's metrics API (`ray.serve.metrics`).

Ray exports them in Prometheus format on each node's metrics export port
(`ray.nodes()[i]["MetricsExportPort"]`), prefixed `ray_` and tagged with the deployment,
replica and application besides `scenario`:

    ray_mtfm_request_latency_ms            histogram, end to end in the HTTP ingress (the router, or a
                                           scenario replica serving HTTP itself), by status class
    ray_mtfm_request_errors_total          counter, refused or failed requests by `kind`
    ray_mtfm_candidates_per_request        histogram
    ray_mtfm_batch_requests                histogram, requests merged into one scored batch
    ray_mtfm_batch_tokens                  histogram, tokens of one scored batch
    ray_mtfm_batch_latency_ms              histogram, scoring time of one batch
    ray_mtfm_candidates_total              counter, candidates of accepted requests
    ray_mtfm_scored_requests_total         counter, requests scored (over all batches)
    ray_mtfm_scored_tokens_total           counter, tokens scored
    ray_mtfm_user_cache_lookups_total      counter, user-side cache lookups by `result` (hit, miss): one per
                                           request scored, where the replica keeps a cache
    ray_mtfm_user_cache_bytes              gauge, the cached user sides' tensors, after each batch

Ray 2.60 exports a histogram's bucket counts exactly but its `_sum` from the buckets' midpoints (a
batch of one request adds 0.5 to `ray_mtfm_batch_requests_sum`), so means come from the counters:
mean batch size = `ray_mtfm_scored_requests_total / ray_mtfm_batch_requests_count`, mean candidates
per request = `ray_mtfm_candidates_total / ray_mtfm_candidates_per_request_count`.
"""
from __future__ import annotations

from ray.serve import metrics

LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
CANDIDATE_BUCKETS = [1, 10, 50, 100, 200, 500, 1000, 2000]
BATCH_REQUEST_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
BATCH_TOKEN_BUCKETS = [64, 256, 1024, 4096, 16384, 65536, 262144]


class RequestMetrics:
    """What the HTTP ingress (http_api.py: the router, or a scenario replica) records per request."""

    def __init__(self):
        self.latency_ms = metrics.Histogram(
            "mtfm_request_latency_ms", description="End-to-end latency of POST /<scenario>/rank, ms.",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=("scenario", "status"))
        self.errors = metrics.Counter(
            "mtfm_request_errors_total", description="Refused or failed rank requests by error kind.",
            tag_keys=("scenario", "kind"))
        self.candidates = metrics.Histogram(
            "mtfm_candidates_per_request", description="Candidates per accepted rank request.",
            boundaries=CANDIDATE_BUCKETS, tag_keys=("scenario",))
        self.candidates_total = metrics.Counter(
            "mtfm_candidates_total", description="Candidates of accepted rank requests.", tag_keys=("scenario",))

    def accepted(self, scenario: str, num_candidates: int) -> None:
        self.candidates.observe(num_candidates, tags={"scenario": scenario})
        self.candidates_total.inc(num_candidates, tags={"scenario": scenario})

    def request(self, scenario: str, status: int, latency_ms: float) -> None:
        self.latency_ms.observe(latency_ms, tags={"scenario": scenario, "status": f"{status // 100}xx"})

    def error(self, scenario: str, kind: str) -> None:
        self.errors.inc(tags={"scenario": scenario, "kind": kind})


class BatchMetrics:
    """What a scenario replica records per scored batch."""

    def __init__(self, scenario: str):
        self.tags = {"scenario": scenario}
        self.requests = metrics.Histogram(
            "mtfm_batch_requests", description="Requests merged into one scored batch.",
            boundaries=BATCH_REQUEST_BUCKETS, tag_keys=("scenario",))
        self.tokens = metrics.Histogram(
            "mtfm_batch_tokens", description="Tokens (events kept + candidates) in one scored batch.",
            boundaries=BATCH_TOKEN_BUCKETS, tag_keys=("scenario",))
        self.latency_ms = metrics.Histogram(
            "mtfm_batch_latency_ms", description="Scoring time of one batch, ms.",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=("scenario",))
        self.requests_total = metrics.Counter(
            "mtfm_scored_requests_total", description="Requests scored, over all batches.", tag_keys=("scenario",))
        self.tokens_total = metrics.Counter(
            "mtfm_scored_tokens_total", description="Tokens scored, over all batches.", tag_keys=("scenario",))
        self.cache_lookups = metrics.Counter(
            "mtfm_user_cache_lookups_total", description="User-side cache lookups, by result (hit or miss).",
            tag_keys=("scenario", "result"))
        self.cache_bytes = metrics.Gauge(
            "mtfm_user_cache_bytes", description="Bytes of the cached user sides' tensors.", tag_keys=("scenario",))

    def batch(self, num_requests: int, num_tokens: int, latency_ms: float) -> None:
        self.requests.observe(num_requests, tags=self.tags)
        self.tokens.observe(num_tokens, tags=self.tags)
        self.latency_ms.observe(latency_ms, tags=self.tags)
        self.requests_total.inc(num_requests, tags=self.tags)
        self.tokens_total.inc(num_tokens, tags=self.tags)

    def user_cache(self, hits: int, misses: int, cached_bytes: int) -> None:
        """A batch's cache lookups (hits, misses) and the cache's size after it."""
        for result, count in (("hit", hits), ("miss", misses)):
            if count:
                self.cache_lookups.inc(count, tags=self.tags | {"result": result})
        self.cache_bytes.set(cached_bytes, tags=self.tags)
