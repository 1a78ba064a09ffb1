"""Synthetic logs: the raw-log contract, determinism per seed, label structure, and signal a model can learn."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mtfm.platform.rawlog import SYNTH_RECORD
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
    world = World.draw(n_users=3, seed=0)
    ts = EPOCH_MS + DAY_MS + 5_000  # day 1
    one = dict(users=np.array([1]), items=np.array([7]))
    exposure = Draws(**one, ts=np.array([ts]), cross={})
    for event_ts, expected in ((ts, 0.0), (ts - 1, 1.0), (ts + 1, 0.0), (ts - DAY_MS, 0.0)):
        events = Draws(**one, ts=np.array([event_ts]), cross={})
        assert _realtime_match(world, events, exposure).tolist() == [expected], event_ts - ts
    other_user = Draws(users=np.array([2]), items=np.array([7]), ts=np.array([ts - 1]), cross={})
    assert _realtime_match(world, other_user, exposure).tolist() == [0.0]


def _day_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.glob("*/*/*.parquet"))}


def test_a_day_is_the_same_whatever_days_and_first_day(registry, tmp_path):
    """Days 0-3 of a 4-day run are those of a 6-day run, file by file; days 4-5 written later into the 4-day
    folder (--first-day 4) complete it into the 6-day run's, echoes of day 3's last clicks past midnight included."""
    four, six, alone = tmp_path / "four", tmp_path / "six", tmp_path / "alone"
    synthesize(registry, four, users=300, days=4, seed=4, **QUIET)
    synthesize(registry, six, users=300, days=6, seed=4, **QUIET)
    days4, days6 = _day_files(four), _day_files(six)
    assert len(days4) == 3 * 4 + 2 * 4 + 7 and len(days6) == 3 * 6 + 2 * 6 + 7  # scenarios, sequences, warm-up days
    assert "behaviors/history/2025-12-25.parquet" in days4 and "behaviors/realtime/2025-12-31.parquet" not in days4
    for name, path in days4.items():
        assert pq.read_table(path).equals(pq.read_table(days6[name])), name
        assert path.read_bytes() == days6[name].read_bytes(), name
    counts = synthesize(registry, four, users=300, days=2, first_day=4, seed=4, **QUIET)
    assert _day_files(four).keys() == days6.keys()
    for name, path in _day_files(four).items():
        assert pq.read_table(path).equals(pq.read_table(days6[name])), name
    assert counts["exposures/hp"] == sum(pq.read_metadata(six / "exposures/hp" / f).num_rows
                                         for f in ("2026-01-05.parquet", "2026-01-06.parquet"))
    # One day alone, into an empty folder: that day's files (no warm-up), the same again.
    synthesize(registry, alone, users=300, days=1, first_day=3, seed=4, **QUIET)
    assert sorted(_day_files(alone)) == sorted(n for n in days6 if n.endswith("2026-01-04.parquet"))
    for name, path in _day_files(alone).items():
        assert pq.read_table(path).equals(pq.read_table(days6[name])), name
    # The comparison covers a click of day 3 whose echo lands on day 4 (seed 4 has one): drawn by the run that
    # starts at day 4.
    midnight = EPOCH_MS + 4 * DAY_MS
    hp = pd.read_parquet(six / "exposures/hp/2026-01-04.parquet")
    late = hp[(hp["click"] == 1) & (hp["ts"] > midnight - 60_000)][["user_id", "poi_id"]]
    early = pd.read_parquet(four / "behaviors/history/2026-01-05.parquet")
    early = early[early["ts"] < midnight + 60_000][["user_id", "poi_id"]]
    assert len(late.merge(early)) >= 1


def test_days_added_to_a_folder_must_continue_it(registry, tmp_path):
    raw = tmp_path / "raw"
    synthesize(registry, raw, users=40, days=3, seed=2, **QUIET)
    before = {name: path.read_bytes() for name, path in _day_files(raw).items()}
    # A day already written is refused by name (nothing is written), unless --overwrite.
    with pytest.raises(FileExistsError, match=r"exposures/hp/2026-01-03\.parquet already exists \(day 2\): .*raw holds "
                                              r"days 0-2; write only days it lacks \(--first-day N --days D\), or "
                                              r"pass --overwrite to write again from day 2 on"):
        synthesize(registry, raw, users=40, days=2, first_day=2, seed=2, **QUIET)
    # Another seed or number of users: refused, whatever the days.
    with pytest.raises(FileExistsError, match="seed 2 and 40 users .* not of --seed 3 and --users 40: .*--overwrite"):
        synthesize(registry, raw, users=40, days=1, first_day=3, seed=3, **QUIET)
    with pytest.raises(FileExistsError, match="not of --seed 2 and --users 41"):
        synthesize(registry, raw, users=41, days=1, first_day=3, seed=2, **QUIET)
    assert {name: path.read_bytes() for name, path in _day_files(raw).items()} == before
    assert json.loads((raw / SYNTH_RECORD).read_text())["seed"] == 2
    # What the generator reads from the registry must be the same too; a serving knob changes no row.
    changed, serving = registry.to_dict(), registry.to_dict()
    changed["scenarios"]["hp"]["synthetic"]["exposures_per_user_day"] *= 2
    serving["scenarios"]["hp"]["serving"]["replicas"] += 1
    with pytest.raises(FileExistsError, match=r"drawn with other features, tasks or `synthetic:` settings"):
        synthesize(Registry.from_dict(changed), raw, users=40, days=1, first_day=3, seed=2, **QUIET)
    # --overwrite from day 1: days 1 and later are removed (said), days 1 and 2 written again (the same bytes).
    said = []
    synthesize(Registry.from_dict(serving), raw, users=40, days=1, first_day=1, seed=2, overwrite=True, log=said.append)
    assert said[0] == f"--overwrite: removing {2 * 5} file(s) of day 1 and later days from {raw}"
    assert {n: p.read_bytes() for n, p in _day_files(raw).items()} == {n: b for n, b in before.items()
                                                                        if "2026-01-03" not in n}
    # A day with only some of its files (a run cut short) is named, with the command that writes it again.
    (raw / "exposures/sqs/2026-01-02.parquet").unlink()
    with pytest.raises(FileExistsError, match=r"holds days 0, and part of day\(s\) 1 \(a run cut short\? write again "
                                              r"from day 1 with --overwrite --first-day 1\)"):
        synthesize(registry, raw, users=40, days=1, first_day=1, seed=2, **QUIET)
    # Days skipped before the first written are noted.
    synthesize(registry, raw, users=40, days=1, first_day=4, seed=2, log=said.append)
    assert said[-len(registry.scenarios) - len(registry.sequences) - 2] == (
        f"note: {raw} lacks day(s) 1-3 before day 4: their windows will have no samples, and the history of the days "
        "written here lacks their events")
    # Logs no record describes (another tool's, or an earlier version's) are refused too; --overwrite replaces them.
    (raw / SYNTH_RECORD).unlink()
    with pytest.raises(FileExistsError, match=f"holds raw logs but no {SYNTH_RECORD}"):
        synthesize(registry, raw, users=40, days=1, first_day=3, seed=2, **QUIET)
    synthesize(registry, raw, users=40, days=1, first_day=3, seed=7, overwrite=True, **QUIET)
    assert sorted(_day_files(raw)) == [f"{kind}/{name}/2026-01-04.parquet" for kind, names in
                                       (("behaviors", registry.sequences), ("exposures", registry.scenarios))
                                       for name in sorted(names)]
