"""Synthetic raw logs (`mtfm data synth`): exposures and behaviours for every registered scenario.

Writes the raw-log contract of DESIGN.md (`exposures/<scenario>/<date>.parquet` with exactly
`Registry.exposure_schema`, `behaviors/<sequence>/<date>.parquet` with `behavior_schema`), driven
only by the YAML: a scenario or feature the generator has never seen gets values by its type.

The generative model (deterministic per seed; every step is vectorised numpy):

- World. `N_ITEMS` latent items, each in one of `N_CLUSTERS` latent clusters, with a quality
  `q_i ~ N(0, 1)` and a Zipf-like popularity. Each user has an interest vector
  `theta_u ~ Dirichlet(0.2)` over clusters (shared by all scenarios and sequences) and a bias
  `b_u ~ N(0, 0.5)`. Day d covers [EPOCH + d days, EPOCH + d + 1 days), EPOCH = 2026-01-01 UTC.
- Feature values, by the feature's declaration (so the same name gives the same value in every
  table, and a target meets the same ids in the sequences):
  categorical item/event feature: `hash(name, item) % buckets` if buckets >= 1000 (an id such as
  poi_id), else `hash(name, cluster) % buckets` (a coarse attribute such as category);
  categorical user feature: `hash(name, top cluster of u)` for half of the users, else
  `hash(name, u)`; categorical cross feature: `hash(name, u, cluster)`;
  categorical_list: 1..max_len ids, the first from the fine key (item, user), the rest from the
  coarse one (cluster, the user's top cluster);
  numeric: a latent x (item: `sign * q_i + noise`; user: from `b_u` plus static noise; cross: its
  own `z ~ N(0, 1)` per exposure) mapped by the transform: none -> sigmoid(x) in (0, 1),
  log1p -> exp(x + 1) > 0, symlog -> x. `sign` is -1 for names containing distance, price or cost.
- Behaviour sequences. Each sequence has spontaneous events (Poisson `events_per_user_day` per
  user and day; history ones also in a 7-day warm-up before day 0), items drawn 85% from the
  user's interests; every click of every scenario is echoed into every sequence 1-60 s later
  (a real-time log of clicks; a mask that lets a target see the future would see its own click).
- Exposures. Active users (`active_user_fraction`, per scenario) get Poisson
  `exposures_per_user_day` exposures a day, in requests of up to 5 sharing one ts; items drawn
  50% from the user's interests, 50% by popularity. Root task (click) logit:
  `0.8 log(K theta_u[c] + 0.05) + b_u + 0.4 q_i + sum_f 0.5 sign_f z_f + 1.2 rt`, where rt = 1
  iff a spontaneous event of the first realtime sequence on the same cluster happened earlier
  that day (so R-tokens help); a dependent task (order depends_on click) is drawn only where its
  parent is 1, with logit `0.5 log(K theta_u[c] + 0.05) + 0.5 b_u + 0.3 q_i`. Each task's
  intercept is solved so its rate (conditional on the parent) matches `label_rates`
  (default 0.1 root, 0.3 dependent). A small scenario (sqs) learns from the same theta_u.
"""
from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm.platform.rawlog import prepare_raw_out
from mtfm.platform.registry import Feature, Registry, Scenario, Sequence

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: windows are day-aligned
DAY_MS = 86_400_000
N_CLUSTERS = 32
N_ITEMS = 20_000
ITEM_LEVEL_BUCKETS = 1000
HISTORY_WARMUP_DAYS = 7
REQUEST_SIZE = 5
RT_BOOST = 1.2
DEFAULT_RATE = {True: 0.1, False: 0.3}  # keyed by "is a root task"

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic is the point)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _name_seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def _hash(name: str, *keys: np.ndarray) -> np.ndarray:
    h = np.uint64(_name_seed(name))
    for k in keys:
        h = _mix(h ^ np.asarray(k).astype(np.uint64))
    return h


def _sign(name: str) -> float:
    return -1.0 if any(w in name for w in ("distance", "price", "cost")) else 1.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _numeric(f: Feature, x: np.ndarray) -> pa.Array:
    value = {"none": _sigmoid, "log1p": lambda v: np.exp(v + 1.0), "symlog": lambda v: v}[f.transform](x)
    return pa.array(value.astype(np.float32))


def _intercept(logit: np.ndarray, rate: float) -> float:
    """The a with mean(sigmoid(a + logit)) == rate (bisection; the mean is monotone in a)."""
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(mid + logit).mean() < rate else (lo, mid)
    return (lo + hi) / 2


@dataclass
class World:
    """The latent state every table is drawn from."""

    n_users: int
    days: int
    item_cluster: np.ndarray
    item_quality: np.ndarray
    cluster_items: np.ndarray      # item ids sorted by cluster
    cluster_cum: np.ndarray        # cumulative popularity in that order
    cluster_bounds: np.ndarray     # (K + 1,) positions of each cluster in cluster_items
    theta: np.ndarray              # (users, K)
    theta_cum: np.ndarray          # row-wise cumsum plus the row index, flattened: searchable
    user_bias: np.ndarray
    top_cluster: np.ndarray
    seed: int

    @classmethod
    def draw(cls, n_users: int, days: int, seed: int) -> "World":
        rng = np.random.default_rng([seed, 0])
        item_cluster = rng.integers(N_CLUSTERS, size=N_ITEMS)
        popularity = 1.0 / (rng.permutation(N_ITEMS) + 10.0) ** 0.8
        order = np.argsort(item_cluster, kind="stable")
        theta = rng.dirichlet(np.full(N_CLUSTERS, 0.2), size=n_users)
        theta_cum = np.cumsum(theta, axis=1)
        theta_cum[:, -1] = 1.0
        return cls(
            n_users=n_users, days=days, item_cluster=item_cluster, item_quality=rng.standard_normal(N_ITEMS),
            cluster_items=order, cluster_cum=np.cumsum(popularity[order]),
            cluster_bounds=np.searchsorted(item_cluster[order], np.arange(N_CLUSTERS + 1)),
            theta=theta, theta_cum=(theta_cum + np.arange(n_users)[:, None]).ravel(),
            user_bias=rng.normal(0.0, 0.5, n_users), top_cluster=theta.argmax(axis=1), seed=seed,
        )

    def interest(self, users: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        return np.log(N_CLUSTERS * self.theta[users, clusters] + 0.05)

    def draw_items(self, rng: np.random.Generator, users: np.ndarray, p_interest: float) -> np.ndarray:
        """One item per user: its cluster from theta_u with prob p_interest, else uniform; the item by popularity."""
        from_interest = np.searchsorted(self.theta_cum, users + rng.random(len(users))) - users * N_CLUSTERS
        cluster = np.where(rng.random(len(users)) < p_interest, np.minimum(from_interest, N_CLUSTERS - 1),
                           rng.integers(N_CLUSTERS, size=len(users)))
        lo, hi = self.cluster_bounds[cluster], self.cluster_bounds[cluster + 1]
        cum0 = np.where(lo > 0, self.cluster_cum[np.maximum(lo - 1, 0)], 0.0)
        x = cum0 + rng.random(len(users)) * (self.cluster_cum[hi - 1] - cum0)
        pos = np.clip(np.searchsorted(self.cluster_cum, x), lo, hi - 1)
        return self.cluster_items[pos]


@dataclass
class Draws:
    """Rows of one table before features: who, what, when (and the cross latents of exposures)."""

    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray
    cross: dict[str, np.ndarray]

    def take(self, idx: np.ndarray) -> "Draws":
        return Draws(self.users[idx], self.items[idx], self.ts[idx], {k: v[idx] for k, v in self.cross.items()})


def feature_column(world: World, f: Feature, section: str, rows: Draws, rng: np.random.Generator) -> pa.Array:
    """A feature's values by its type and section (user, item, cross; sequence features are item)."""
    cluster = world.item_cluster[rows.items]
    n = len(rows.users)
    if f.type == "numeric":
        if section == "user":
            # A user's features are static: the noise comes from a generator keyed by the name.
            static = np.random.default_rng([world.seed, _name_seed("user", f.name)])
            x = world.user_bias / 0.5 * 0.8 + 0.6 * static.standard_normal(world.n_users)
            return _numeric(f, x[rows.users])
        if section == "cross":
            return _numeric(f, rows.cross[f.name])
        return _numeric(f, _sign(f.name) * world.item_quality[rows.items] + 0.5 * rng.standard_normal(n))
    # Categorical ids come from a fine key (the user, the user-cluster pair, the item) or a coarse
    # one (the user's top cluster, the item's cluster).
    if section == "user":
        fine, coarse = rows.users + N_CLUSTERS, world.top_cluster[rows.users]
        key = np.where(_hash("half", rows.users) % np.uint64(2) == 0, coarse, fine)
    elif section == "cross":
        fine, coarse = rows.users * N_CLUSTERS + cluster, cluster
        key = fine
    else:
        fine, coarse = rows.items, cluster
        key = fine if f.buckets >= ITEM_LEVEL_BUCKETS else coarse
    buckets = np.uint64(f.buckets)
    if f.type == "categorical":
        return pa.array((_hash(f.name, key) % buckets).astype(np.int64))
    slots = np.arange(f.max_len)
    ids = _hash(f.name, coarse[:, None], slots[None, :]) % buckets
    ids[:, 0] = _hash(f.name, fine) % buckets
    lengths = 1 + (_hash(f.name + "/len", fine) % np.uint64(f.max_len)).astype(np.int64)
    values = ids.astype(np.int64)[slots[None, :] < lengths[:, None]]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=pa.list_(pa.int64()))


def _poisson_days(rng: np.random.Generator, users: np.ndarray, days: np.ndarray, rate: float):
    """Per (user, day) Poisson counts, expanded to one row each: (users, days, position in the user-day)."""
    counts = rng.poisson(rate, size=(len(users), len(days)))
    flat = counts.ravel()
    u = np.repeat(np.repeat(users, len(days)), flat)
    d = np.repeat(np.tile(days, len(users)), flat)
    starts = np.repeat(np.cumsum(flat) - flat, flat)
    return u, d, np.arange(flat.sum()) - starts, flat


def _spontaneous_events(world: World, seq: Sequence, rng: np.random.Generator) -> Draws:
    first = -HISTORY_WARMUP_DAYS if seq.kind == "history" else 0
    u, d, _, _ = _poisson_days(rng, np.arange(world.n_users), np.arange(first, world.days), seq.events_per_user_day)
    ts = EPOCH_MS + d * DAY_MS + rng.integers(DAY_MS, size=len(u))
    return Draws(u, world.draw_items(rng, u, 0.85), ts, {})


def _realtime_match(world: World, events: Draws, rows: Draws) -> np.ndarray:
    """1 where the user had an event on the row's cluster earlier the same day."""
    def key(d: Draws) -> np.ndarray:
        day = (d.ts - EPOCH_MS) // DAY_MS
        return (d.users * (world.days + HISTORY_WARMUP_DAYS) + day) * N_CLUSTERS + world.item_cluster[d.items]

    ek = key(events)
    order = np.lexsort((events.ts, ek))
    ek, ets = ek[order], events.ts[order]
    first = np.concatenate([[True], ek[1:] != ek[:-1]]) if len(ek) else np.zeros(0, bool)
    uniq, first_ts = ek[first], ets[first]
    rk = key(rows)
    pos = np.clip(np.searchsorted(uniq, rk), 0, max(len(uniq) - 1, 0))
    hit = (uniq[pos] == rk) & (first_ts[pos] < rows.ts) if len(uniq) else np.zeros(len(rk), bool)
    return hit.astype(np.float64)


def _labels(world: World, scn: Scenario, rows: Draws, rt: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cluster = world.item_cluster[rows.items]
    interest = world.interest(rows.users, cluster)
    quality = world.item_quality[rows.items]
    bias = world.user_bias[rows.users]
    cross = sum((0.5 * _sign(name) * z for name, z in rows.cross.items()), np.zeros(len(rows.users)))
    labels: dict[str, np.ndarray] = {}
    for task in scn.tasks:
        root = task.depends_on is None
        logit = (0.8 * interest + bias + 0.4 * quality + cross + RT_BOOST * rt if root
                 else 0.5 * interest + 0.5 * bias + 0.3 * quality)
        eligible = np.ones(len(logit), bool) if root else labels[task.depends_on] == 1
        rate = scn.synthetic.label_rates.get(task.name, DEFAULT_RATE[root])
        a = _intercept(logit[eligible], rate) if eligible.any() else 0.0
        labels[task.name] = (eligible & (rng.random(len(logit)) < _sigmoid(a + logit))).astype(np.int8)
    return labels


def _exposures(world: World, scn: Scenario, rt_events: Draws | None) -> tuple[Draws, pa.Table, dict[str, np.ndarray]]:
    rng = np.random.default_rng([world.seed, _name_seed("scenario", scn.name)])
    active = np.flatnonzero(rng.random(world.n_users) < scn.synthetic.active_user_fraction)
    u, d, pos, per_user_day = _poisson_days(rng, active, np.arange(world.days), scn.synthetic.exposures_per_user_day)
    requests_per_user_day = -(-per_user_day // REQUEST_SIZE)
    first_request = np.repeat(np.cumsum(requests_per_user_day) - requests_per_user_day, per_user_day)
    request = first_request + pos // REQUEST_SIZE
    request_day = np.repeat(np.repeat(np.arange(world.days)[None, :], len(active), 0).ravel(), requests_per_user_day)
    request_ts = EPOCH_MS + request_day * DAY_MS + rng.integers(DAY_MS, size=len(request_day))
    cross = {f.name: rng.standard_normal(len(u)) for f in scn.cross_features if f.type == "numeric"}
    rows = Draws(u, world.draw_items(rng, u, 0.5), request_ts[request], cross)
    rt = _realtime_match(world, rt_events, rows) if rt_events is not None else np.zeros(len(u))
    labels = _labels(world, scn, rows, rt, rng)
    request_id = (np.int64(_name_seed("request", scn.name) & 0x7FFF) << np.int64(40)) + request
    columns = {"user_id": pa.array(rows.users.astype(np.int64)), "request_id": pa.array(request_id.astype(np.int64)),
               "ts": pa.array(rows.ts.astype(np.int64))}
    for section, feats in (("user", scn.user_features), ("item", scn.item_features), ("cross", scn.cross_features)):
        for f in feats:
            columns[f.name] = feature_column(world, f, section, rows, rng)
    columns.update((t, pa.array(v)) for t, v in labels.items())
    return rows, pa.table(columns), labels


def _events_table(world: World, seq: Sequence, rows: Draws, rng: np.random.Generator) -> pa.Table:
    columns = {"user_id": pa.array(rows.users.astype(np.int64)), "ts": pa.array(rows.ts.astype(np.int64))}
    for f in seq.features:
        columns[f.name] = feature_column(world, f, "item", rows, rng)
    return pa.table(columns)


def _write_by_day(table: pa.Table, schema: pa.Schema, folder: Path) -> None:
    """One file per day, rows in time order, exactly `schema`."""
    folder.mkdir(parents=True, exist_ok=True)
    table = table.select(schema.names).cast(schema)
    if table.num_rows == 0:  # still a table, so that readers see its schema
        pq.write_table(table, folder / "2026-01-01.parquet")
        return
    day = (table["ts"].to_numpy() - EPOCH_MS) // DAY_MS
    order = np.lexsort((table["ts"].to_numpy(), day))
    table, day = table.take(order), day[order]
    bounds = np.flatnonzero(np.diff(day)) + 1
    for start, end in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(day)]])):
        date = dt.date(2026, 1, 1) + dt.timedelta(days=int(day[start]))
        pq.write_table(table.slice(start, end - start), folder / f"{date.isoformat()}.parquet")


def synthesize(registry: Registry, out: str | Path, users: int = 2000, days: int = 7, seed: int = 0,
               overwrite: bool = False, log=print) -> dict[str, int]:
    """Write synthetic raw logs for every scenario and sequence of `registry`; returns rows per table."""
    out = prepare_raw_out(out, overwrite)
    log(f"synthesizing {users:,} users x {days} days (seed {seed}) for scenarios {', '.join(registry.scenarios)} "
        f"and sequences {', '.join(registry.sequences)} into {out}")
    world = World.draw(users, days, seed)
    realtime = registry.realtime_sequences
    spontaneous = {q.name: _spontaneous_events(world, q, np.random.default_rng([seed, _name_seed("sequence", q.name)]))
                   for q in registry.sequences.values()}
    rt_events = spontaneous[realtime[0].name] if realtime else None
    clicks: list[Draws] = []
    counts: dict[str, int] = {}
    for scn in registry.scenarios.values():
        rows, table, labels = _exposures(world, scn, rt_events)
        _write_by_day(table, registry.exposure_schema(scn.name), out / "exposures" / scn.name)
        counts[f"exposures/{scn.name}"] = table.num_rows
        rates = "".join(f", {t} rate {v.mean():.3f}" for t, v in labels.items() if len(v))
        log(f"exposures/{scn.name}: {table.num_rows:,} rows{rates}")
        root = next(t.name for t in scn.tasks if t.depends_on is None)
        clicks.append(rows.take(np.flatnonzero(labels[root] == 1)))
    for q in registry.sequences.values():
        rng = np.random.default_rng([seed, _name_seed("echo", q.name)])
        echoes = [Draws(c.users, c.items, c.ts + rng.integers(1000, 60_000, size=len(c.ts)), {}) for c in clicks]
        parts = [spontaneous[q.name]] + echoes
        rows = Draws(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("users", "items", "ts")), {})
        table = _events_table(world, q, rows, rng)
        _write_by_day(table, registry.behavior_schema(q.name), out / "behaviors" / q.name)
        counts[f"behaviors/{q.name}"] = table.num_rows
        log(f"behaviors/{q.name}: {table.num_rows:,} rows ({q.kind})")
    return counts
