"""Synthetic logs: the raw-log contract, determinism per seed, label structure, and signal a model can learn."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mtfm.platform.registry import Registry, load_registry
from mtfm.platform.synth import DAY_MS, EPOCH_MS, Draws, World, _realtime_match, synthesize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(CONFIGS)


@pytest.fixture(scope="module")
def raw(tmp_path_factory, registry) -> Path:
    out = tmp_path_factory.mktemp("raw")
    synthesize(registry, out, users=400, days=4, seed=3, **QUIET)
    return out


def test_tables_have_exactly_the_contract_schema(registry, raw):
    for name in registry.scenarios:
        files = sorted((raw / "exposures" / name).glob("*.parquet"))
        assert len(files) == 4 and files[0].name == "2026-01-01.parquet"
        assert all(pq.read_schema(f).equals(registry.exposure_schema(name)) for f in files)
    for name in registry.sequences:
        files = sorted((raw / "behaviors" / name).glob("*.parquet"))
        assert files and all(pq.read_schema(f).equals(registry.behavior_schema(name)) for f in files)
    history = pq.read_table(raw / "behaviors" / "history")["ts"].to_numpy()
    assert history.min() < EPOCH_MS  # a warm-up week, so that day 0 has a history


def test_deterministic_per_seed(registry, tmp_path):
    a = synthesize(registry, tmp_path / "a", users=50, days=2, seed=11, **QUIET)
    b = synthesize(registry, tmp_path / "b", users=50, days=2, seed=11, **QUIET)
    synthesize(registry, tmp_path / "c", users=50, days=2, seed=12, **QUIET)
    assert a == b
    for table in a:
        assert pq.read_table(tmp_path / "a" / table).equals(pq.read_table(tmp_path / "b" / table))
    assert not pq.read_table(tmp_path / "a" / "exposures/hp").equals(pq.read_table(tmp_path / "c" / "exposures/hp"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthesize(registry, tmp_path / "a", users=5, days=1, seed=0, **QUIET)


def test_labels_follow_depends_on_and_rates(registry, raw):
    for name, scn in registry.scenarios.items():
        df = pd.read_parquet(raw / "exposures" / name)
        for task in scn.tasks:
            assert set(df[task.name].unique()) <= {0, 1}
            if task.depends_on:
                assert not (df[task.name] > df[task.depends_on]).any(), (name, task.name)
                rate = df.loc[df[task.depends_on] == 1, task.name].mean()
            else:
                rate = df[task.name].mean()
            target = scn.synthetic.label_rates[task.name]
            assert abs(rate - target) < 0.35 * target + 0.03, (name, task.name, rate, target)
    hp = pd.read_parquet(raw / "exposures" / "hp")
    assert hp.groupby("request_id")["ts"].nunique().max() == 1  # a request's exposures share its ts


def _click_rate(df: pd.DataFrame, mask) -> float:
    return df.loc[mask, "click"].mean()


def test_signal_realtime_interest_and_distance(raw):
    hp = pd.read_parquet(raw / "exposures" / "hp")
    hp["day"] = (hp["ts"] - EPOCH_MS) // DAY_MS
    # A realtime event on the same category earlier the same day raises the click rate.
    rt = pd.read_parquet(raw / "behaviors" / "realtime")
    rt["day"] = (rt["ts"] - EPOCH_MS) // DAY_MS
    first = rt.groupby(["user_id", "day", "category"], as_index=False)["ts"].min().rename(columns={"ts": "rt_ts"})
    hp = hp.merge(first, on=["user_id", "day", "category"], how="left")
    earlier = hp["rt_ts"] < hp["ts"]
    assert _click_rate(hp, earlier) > 1.8 * _click_rate(hp, ~earlier)
    # Distance lowers it.
    near, far = hp["distance_km"].quantile([0.25, 0.75])
    assert _click_rate(hp, hp["distance_km"] <= near) > 1.3 * _click_rate(hp, hp["distance_km"] >= far)
    # The history (before the day) shows the user's interests, in every scenario, the small one too.
    history = pd.read_parquet(raw / "behaviors" / "history")
    for name in ("hp", "sqs"):
        df = pd.read_parquet(raw / "exposures" / name)
        df["day_start"] = (df["ts"] - EPOCH_MS) // DAY_MS * DAY_MS + EPOCH_MS
        seen = history.merge(df[["user_id", "day_start"]].drop_duplicates(), on="user_id")
        seen = seen[seen["ts"] < seen["day_start"]][["user_id", "day_start", "category"]].drop_duplicates()
        seen["in_history"] = True
        df = df.merge(seen, on=["user_id", "day_start", "category"], how="left")
        known = df["in_history"].eq(True)
        assert _click_rate(df, known) > 1.5 * _click_rate(df, ~known), name


def test_realtime_match_needs_an_event_strictly_earlier_the_same_day():
    """_realtime_match by hand: an exposure matches a realtime event of its user on its item's cluster the
    same day only if the event came strictly before it (an event at the exposure's own ms is not yet seen)."""
    world = World.draw(n_users=3, days=2, seed=0)
    ts = EPOCH_MS + DAY_MS + 5_000  # day 1
    one = dict(users=np.array([1]), items=np.array([7]))
    exposure = Draws(**one, ts=np.array([ts]), cross={})
    for event_ts, expected in ((ts, 0.0), (ts - 1, 1.0), (ts + 1, 0.0), (ts - DAY_MS, 0.0)):
        events = Draws(**one, ts=np.array([event_ts]), cross={})
        assert _realtime_match(world, events, exposure).tolist() == [expected], event_ts - ts
    other_user = Draws(users=np.array([2]), items=np.array([7]), ts=np.array([ts - 1]), cross={})
    assert _realtime_match(world, other_user, exposure).tolist() == [0.0]
