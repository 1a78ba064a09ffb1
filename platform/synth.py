"""Synthetic raw logs (`mtfm data synth`): exposures and behaviours for every registered scenario.

Writes the raw-log contract of DESIGN.md (`exposures/<scenario>/<date>.parquet` with exactly
`Registry.exposure_schema`, `behaviors/<sequence>/<date>.parquet` with `behavior_schema`), driven
only by the YAML: a scenario or feature the generator has never seen gets values by its type.

The generative model (deterministic per seed; every step is vectorised numpy, a day at a time):

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
  intercept is solved, on each day's exposures, so its rate (conditional on the parent) matches
  `label_rates` (default 0.1 root, 0.3 dependent). A small scenario (sqs) learns from the same theta_u.
- Day-stable. The world, the active users and the static user noise come from the seed alone;
  each day's draws (counts, times, items, cross latents, labels, echo delays, item-feature noise)
  from a generator keyed by (seed, table, day) (`_day_rng`). So day d's file of every table
  (warm-up days included) is the same bytes whatever `days` and `first_day`: a run of days
  N..N+D-1 (`--first-day N`) writes what a longer run writes for them, and new days can be added
  to a folder later. A click late on day d-1 echoes past midnight into day d's file: a run starting
  at N > 0 draws day N-1's exposures (not written) for those echoes, and the echoes of its own last
  day that land after it are left to the run that writes the next day. `SYNTH_RECORD` (beside
  exposures/ and behaviors/) holds the seed, users, tables and a digest of what the generator reads
  from the registry, so that days of another world are not added to a folder (`prepare_synth_out`).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm.platform.rawlog import SYNTH_RECORD, prepare_raw_out, refuse_a_file_for_a_folder
from mtfm.platform.registry import Feature, Registry, Scenario, Sequence

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: windows are day-aligned
DAY_MS = 86_400_000
N_CLUSTERS = 32
N_ITEMS = 20_000
ITEM_LEVEL_BUCKETS = 1000
HISTORY_WARMUP_DAYS = 7
MAX_DAYS = 1 << 20  # days 0..MAX_DAYS-1: the request ids' bits for the day
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
    def draw(cls, n_users: int, seed: int) -> "World":
        rng = np.random.default_rng([seed, 0])
        item_cluster = rng.integers(N_CLUSTERS, size=N_ITEMS)
        popularity = 1.0 / (rng.permutation(N_ITEMS) + 10.0) ** 0.8
        order = np.argsort(item_cluster, kind="stable")
        theta = rng.dirichlet(np.full(N_CLUSTERS, 0.2), size=n_users)
        theta_cum = np.cumsum(theta, axis=1)
        theta_cum[:, -1] = 1.0
        return cls(
            n_users=n_users, item_cluster=item_cluster, item_quality=rng.standard_normal(N_ITEMS),
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


def _realtime_match(world: World, events: Draws, rows: Draws) -> np.ndarray:
    """1 where the user had an event on the row's cluster earlier the same day."""
    def key(d: Draws) -> np.ndarray:
        day = (d.ts - EPOCH_MS) // DAY_MS
        return (day * world.n_users + d.users) * N_CLUSTERS + world.item_cluster[d.items]

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


def _day_rng(seed: int, kind: str, name: str, day: int) -> np.random.Generator:
    """The generator of one table's draws on one day. The name seed says "day" so that no key of it equals a
    static one: numpy's SeedSequence pads a short key with zeros ([s, n] draws as [s, n, 0] does)."""
    return np.random.default_rng([seed, _name_seed(kind, name, "day"), day % 2**32])  # warm-up days are < 0


def _concat(parts: list[Draws]) -> Draws:
    if not parts:
        return Draws(*(np.zeros(0, np.int64) for _ in range(3)), {})
    return Draws(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("users", "items", "ts")), {})


def _spontaneous_events(world: World, seq: Sequence, day: int) -> Draws:
    """A sequence's own events of one day: Poisson(events_per_user_day) per user, at uniform times."""
    rng = _day_rng(world.seed, "sequence", seq.name, day)
    users = np.repeat(np.arange(world.n_users), rng.poisson(seq.events_per_user_day, size=world.n_users))
    ts = EPOCH_MS + day * DAY_MS + rng.integers(DAY_MS, size=len(users))
    return Draws(users, world.draw_items(rng, users, 0.85), ts, {})


def _exposure_rows(world: World, scn: Scenario, active: np.ndarray, day: int, rt_events: Draws | None):
    """One day of a scenario before its features: (rows, request ids, labels, the day's generator, which the
    features draw on)."""
    rng = _day_rng(world.seed, "scenario", scn.name, day)
    per_user = rng.poisson(scn.synthetic.exposures_per_user_day, size=len(active))
    users = np.repeat(active, per_user)
    position = np.arange(len(users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    requests_per_user = -(-per_user // REQUEST_SIZE)
    request = np.repeat(np.cumsum(requests_per_user) - requests_per_user, per_user) + position // REQUEST_SIZE
    request_ts = EPOCH_MS + day * DAY_MS + rng.integers(DAY_MS, size=int(requests_per_user.sum()))
    cross = {f.name: rng.standard_normal(len(users)) for f in scn.cross_features if f.type == "numeric"}
    rows = Draws(users, world.draw_items(rng, users, 0.5), request_ts[request], cross)
    rt = _realtime_match(world, rt_events, rows) if rt_events is not None else np.zeros(len(users))
    labels = _labels(world, scn, rows, rt, rng)
    # Unique in the scenario: its name's 15 bits, then the day's 20, then the request of that day (28 bits).
    request_id = ((np.int64(_name_seed("request", scn.name) & 0x7FFF) << np.int64(48))
                  + (np.int64(day) << np.int64(28)) + request)
    return rows, request_id, labels, rng


def _exposures_table(world: World, scn: Scenario, rows: Draws, request_id: np.ndarray,
                     labels: dict[str, np.ndarray], rng: np.random.Generator) -> pa.Table:
    columns = {"user_id": pa.array(rows.users.astype(np.int64)), "request_id": pa.array(request_id.astype(np.int64)),
               "ts": pa.array(rows.ts.astype(np.int64))}
    for section, feats in (("user", scn.user_features), ("item", scn.item_features), ("cross", scn.cross_features)):
        for f in feats:
            columns[f.name] = feature_column(world, f, section, rows, rng)
    columns.update((t, pa.array(v)) for t, v in labels.items())
    return pa.table(columns)


def _events_table(world: World, seq: Sequence, rows: Draws, day: int) -> pa.Table:
    rng = _day_rng(world.seed, "events", seq.name, day)
    columns = {"user_id": pa.array(rows.users.astype(np.int64)), "ts": pa.array(rows.ts.astype(np.int64))}
    for f in seq.features:
        columns[f.name] = feature_column(world, f, "item", rows, rng)
    return pa.table(columns)


def day_date(day: int) -> dt.date:
    return dt.date(2026, 1, 1) + dt.timedelta(days=day)


def _day_file(folder: Path, day: int) -> Path:
    return folder / f"{day_date(day).isoformat()}.parquet"


def _file_day(path: Path) -> int | None:
    """The day of a file named <date>.parquet; None for any other name."""
    try:
        return (dt.date.fromisoformat(path.stem) - dt.date(2026, 1, 1)).days if path.suffix == ".parquet" else None
    except ValueError:
        return None


def _write_day(table: pa.Table, schema: pa.Schema, folder: Path, day: int) -> None:
    """One day's file, rows in time order, exactly `schema` (written also without rows: readers see its schema)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = table.select(schema.names).cast(schema)
    pq.write_table(table.take(np.argsort(table["ts"].to_numpy(), kind="stable")), _day_file(folder, day))


def _record(registry: Registry, users: int, seed: int) -> dict:
    """What the days of one folder must share (the sidecar SYNTH_RECORD): the seed, the users, the tables, and a
    digest of what the generator reads from the registry (features, tasks, `synthetic:` knobs, sequences; not
    descriptions, embedding dims or serving knobs, which change no row)."""
    def feature(f: Feature) -> dict:
        return {k: v for k, v in dataclasses.asdict(f).items() if k not in ("description", "dim", "required")}

    drawn = {"sequences": [[q.name, q.kind, q.events_per_user_day, [feature(f) for f in q.features]]
                           for q in registry.sequences.values()],
             "scenarios": [[s.name, [feature(f) for f in s.user_features + s.item_features + s.cross_features],
                            [dataclasses.asdict(task) for task in s.tasks], dataclasses.asdict(s.synthetic)]
                           for s in registry.scenarios.values()]}
    digest = hashlib.sha256(json.dumps(drawn, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"seed": seed, "users": users, "tables": [f"exposures/{s}" for s in registry.scenarios]
            + [f"behaviors/{q}" for q in registry.sequences], "registry": digest}


def _files_to_write(registry: Registry, out: Path, first_day: int, days: int) -> list[Path]:
    files = []
    for day in range(first_day - (HISTORY_WARMUP_DAYS if first_day == 0 else 0), first_day + days):
        files += [_day_file(out / "exposures" / s, day) for s in registry.scenarios if day >= 0]
        files += [_day_file(out / "behaviors" / q.name, day) for q in registry.sequences.values()
                  if day >= 0 or q.kind == "history"]
    return files


def _days_held(registry: Registry, out: Path) -> tuple[list[int], list[int]]:
    """The days 0.. of which `out` holds every table's file, and those of which it holds only some (a run cut
    short)."""
    files: dict[int, int] = {}
    for path in out.glob("*/*/*.parquet"):
        day = _file_day(path)
        if day is not None and day >= 0 and path.parent.parent.name in ("exposures", "behaviors"):
            files[day] = files.get(day, 0) + 1
    tables = len(registry.scenarios) + len(registry.sequences)
    return sorted(d for d, n in files.items() if n >= tables), sorted(d for d, n in files.items() if n < tables)


def _spans(days: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for day in days:
        if spans and day == spans[-1][1] + 1:
            spans[-1][1] = day
        else:
            spans.append([day, day])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _world_differs(record: dict, recorded, out: Path) -> str | None:
    """Why the logs in `out` (their SYNTH_RECORD, or None if it has none) are not of this world; None if they are."""
    if recorded is None:
        return (f"{out} holds raw logs but no {SYNTH_RECORD} (logs not written by `mtfm data synth`, or by a version "
                "before --first-day)")
    if not isinstance(recorded, dict):
        recorded = {}
    if (recorded.get("seed"), recorded.get("users")) != (record["seed"], record["users"]):
        return (f"{out} holds the synthetic logs of seed {recorded.get('seed')} and {recorded.get('users')} users "
                f"({SYNTH_RECORD}), not of --seed {record['seed']} and --users {record['users']}: days added there "
                "would not continue them")
    if recorded.get("tables") != record["tables"]:
        return (f"{out} holds synthetic logs of the tables {', '.join(map(str, recorded.get('tables') or []))} "
                f"({SYNTH_RECORD}), not of this registry's {', '.join(record['tables'])}")
    if recorded.get("registry") != record["registry"]:
        return (f"{out} holds synthetic logs drawn with other features, tasks or `synthetic:` settings than this "
                f"registry's ({SYNTH_RECORD}): days added there would not continue them")
    return None


def prepare_synth_out(registry: Registry, out: str | Path, users: int, seed: int, first_day: int, days: int,
                      overwrite: bool, log=print) -> Path:
    """The --out to write days first_day.. into. Days of the same world (SYNTH_RECORD: seed, users, tables and
    what the generator reads from the registry) are added to those already there; a file of a day to write is
    refused unless `overwrite`, which then removes the files of first_day and later days (with first_day 0, or
    logs of another world or none recorded: all of exposures/ and behaviors/). Days before first_day that the
    folder lacks are noted."""
    out = Path(out)
    refuse_a_file_for_a_folder(out, f"--out {out}")
    held = [out / sub for sub in ("exposures", "behaviors") if (out / sub).exists()]
    record = _record(registry, users, seed)
    if not held:
        prepare_raw_out(out, overwrite)  # nothing to replace: removes a stale record
    else:
        try:
            recorded = json.loads((out / SYNTH_RECORD).read_text())
            why = _world_differs(record, recorded, out)
        except FileNotFoundError:
            why = _world_differs(record, None, out)
        except (OSError, ValueError) as exc:
            why = f"{out / SYNTH_RECORD} cannot be read ({exc})"
        if why is not None:
            if not overwrite:
                raise FileExistsError(f"{why}; choose an empty --out folder or pass --overwrite to replace its "
                                      "exposures/ and behaviors/")
            prepare_raw_out(out, overwrite=True)
        elif overwrite and first_day == 0:
            prepare_raw_out(out, overwrite=True)
        elif overwrite:
            doomed = [p for sub in held for p in sub.glob("*/*.parquet")
                      if (d := _file_day(p)) is not None and d >= first_day]
            if doomed:
                log(f"--overwrite: removing {len(doomed)} file(s) of day {first_day} and later days from {out}")
            for path in doomed:
                path.unlink()
        else:
            existing = next((p for p in _files_to_write(registry, out, first_day, days) if p.exists()), None)
            if existing is not None:
                whole, partial = _days_held(registry, out)
                cut_short = (f", and part of day(s) {_spans(partial)} (a run cut short? write again from day "
                             f"{partial[0]} with --overwrite --first-day {partial[0]})") if partial else ""
                raise FileExistsError(f"{existing} already exists (day {_file_day(existing)}): {out} holds days "
                                      f"{_spans(whole)}{cut_short}; write only days it lacks (--first-day N "
                                      f"--days D), or pass --overwrite to write again from day {first_day} on "
                                      "(its files and those of all later days are removed first)")
    whole, partial = _days_held(registry, out) if out.is_dir() else ([], [])
    missing = [d for d in range(first_day) if d not in whole]
    if missing:
        log(f"note: {out} lacks day(s) {_spans(missing)} before day {first_day}: their windows will have no "
            "samples, and the history of the days written here lacks their events")
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTH_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out


def synthesize(registry: Registry, out: str | Path, users: int = 2000, days: int = 7, seed: int = 0,
               overwrite: bool = False, first_day: int = 0, log=print) -> dict[str, int]:
    """Write days first_day..first_day+days-1 of the synthetic raw logs for every scenario and sequence of
    `registry` (with day 0, the history's warm-up days before it); returns the rows written per table."""
    if first_day < 0 or days < 1 or first_day + days > MAX_DAYS:
        raise ValueError(f"expected first_day >= 0, days >= 1 and first_day + days <= {MAX_DAYS} (request ids hold "
                         f"the day in 20 bits), found {first_day} and {days}")
    out = prepare_synth_out(registry, out, users, seed, first_day, days, overwrite, log)
    last = first_day + days - 1
    log(f"synthesizing {users:,} users x {days} days ({day_date(first_day)} to {day_date(last)}, days {first_day}-"
        f"{last}; seed {seed}) for scenarios {', '.join(registry.scenarios)} and sequences "
        f"{', '.join(registry.sequences)} into {out}")
    world = World.draw(users, seed)
    sequences = list(registry.sequences.values())
    realtime = registry.realtime_sequences[0] if registry.realtime_sequences else None
    active = {name: np.flatnonzero(np.random.default_rng([seed, _name_seed("scenario", name)]).random(users)
                                   < scn.synthetic.active_user_fraction)
              for name, scn in registry.scenarios.items()}
    counts = {f"exposures/{s}": 0 for s in registry.scenarios} | {f"behaviors/{q.name}": 0 for q in sequences}
    positives = {s: {t: 0 for t in scn.task_names} for s, scn in registry.scenarios.items()}
    if first_day == 0:  # the warm-up: the history sequences' own events of the days before day 0
        for q in sequences:
            for day in range(-HISTORY_WARMUP_DAYS, 0) if q.kind == "history" else ():
                table = _events_table(world, q, _spontaneous_events(world, q, day), day)
                _write_day(table, registry.behavior_schema(q.name), out / "behaviors" / q.name, day)
                counts[f"behaviors/{q.name}"] += table.num_rows
    # Every click is echoed into every sequence up to a minute later, past midnight too: the day before the
    # first is drawn (not written) for the echoes of its clicks that land in the first.
    spill: dict[str, Draws] = {q.name: _concat([]) for q in sequences}
    for day in range(max(first_day - 1, 0), last + 1):
        write = day >= first_day
        spontaneous = {q.name: _spontaneous_events(world, q, day) for q in sequences if write or q is realtime}
        rt_events = spontaneous[realtime.name] if realtime is not None else None
        clicks: list[Draws] = []
        for name, scn in registry.scenarios.items():
            rows, request_id, labels, rng = _exposure_rows(world, scn, active[name], day, rt_events)
            if write:
                table = _exposures_table(world, scn, rows, request_id, labels, rng)
                _write_day(table, registry.exposure_schema(name), out / "exposures" / name, day)
                counts[f"exposures/{name}"] += table.num_rows
                for task, values in labels.items():
                    positives[name][task] += int(values.sum())
            root = next(t.name for t in scn.tasks if t.depends_on is None)
            clicks.append(rows.take(np.flatnonzero(labels[root] == 1)))
        end = EPOCH_MS + (day + 1) * DAY_MS
        for q in sequences:
            rng = _day_rng(seed, "echo", q.name, day)
            echoes = _concat([Draws(c.users, c.items, c.ts + rng.integers(1000, 60_000, size=len(c.ts)), {})
                              for c in clicks])
            if write:
                rows = _concat([spontaneous[q.name], spill[q.name], echoes.take(np.flatnonzero(echoes.ts < end))])
                table = _events_table(world, q, rows, day)
                _write_day(table, registry.behavior_schema(q.name), out / "behaviors" / q.name, day)
                counts[f"behaviors/{q.name}"] += table.num_rows
            spill[q.name] = echoes.take(np.flatnonzero(echoes.ts >= end))  # the next day's, written with it
    for name, scn in registry.scenarios.items():
        n = counts[f"exposures/{name}"]
        rates = "".join(f", {t} rate {v / n:.3f}" for t, v in positives[name].items() if n)
        log(f"exposures/{name}: {n:,} rows{rates}")
    for q in sequences:
        log(f"behaviors/{q.name}: {counts[f'behaviors/{q.name}']:,} rows ({q.kind})")
    return counts
