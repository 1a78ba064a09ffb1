"""Raw-log column casting and row validation: what can be cast is, each value that cannot is flagged."""
from __future__ import annotations

import pyarrow as pa
import pytest

from repo_paths import CONFIGS
from mtfm.platform.rawlog import Contract, cast_column, ts_in_ms, validate
from mtfm.platform.registry import load_registry


def test_cast_column_value_by_value():
    cases = [
        (pa.array(["1.5", " 2 ", "x", None]), pa.float32(), [1.5, 2.0, None, None], [False, False, True, False]),
        (pa.array([1.0, 2.5, None]), pa.int64(), [1, None, None], [False, True, False]),
        (pa.array([0, 1, 300]), pa.int8(), [0, 1, None], [False, False, True]),
        (pa.array([["1", "2"], ["a"], None, []]), pa.list_(pa.int64()), [[1, 2], [None], None, []],
         [False, True, False, False]),
        (pa.array([1, 2]), pa.list_(pa.int64()), [None, None], [True, True]),
        (pa.chunked_array([[1, 2], [3]], pa.int32()), pa.int64(), [1, 2, 3], [False, False, False]),
    ]
    for column, target, values, bad in cases:
        cast, flagged = cast_column(column, target)
        assert cast.type == target and cast.to_pylist() == values and flagged.tolist() == bad, (column, target)


@pytest.mark.parametrize("array, expected", [
    (pa.array([2**62, -1, None, 1_700_000_000], pa.timestamp("s")),  # beyond int64 in ms: saturated, not wrapped
     [2**63 - 1, -1000, None, 1_700_000_000_000]),
    (pa.array([1_700_000_000_123_999, -1, None], pa.timestamp("us")), [1_700_000_000_123, -1, None]),  # floored
    (pa.array([1_700_000_000_123_999_999, -1], pa.timestamp("ns", tz="Asia/Tokyo")), [1_700_000_000_123, -1]),
    (pa.array([20_454, None], pa.date32()), [20_454 * 86_400_000, None]),
    (pa.array([86_400_000, None], pa.date64()), [86_400_000, None]),
    (pa.array([5, None], pa.int64()), [5, None]),  # numbers: read as ms, as they are
])
def test_ts_of_arrow_timestamps_and_dates_is_read_in_ms(array, expected):
    assert ts_in_ms(array).to_pylist() == expected
    assert ts_in_ms(pa.chunked_array([array])).to_pylist() == expected


def test_ts_bounds_keep_0_and_max_ts_and_quarantine_what_lies_outside():
    registry = load_registry(CONFIGS)
    contract = Contract.for_table(registry, "behaviors", "history")
    max_ts = 1_700_000_000_000
    table = pa.table({"user_id": [1, 2, 3, 4], "ts": [max_ts, max_ts + 1, 0, -1], "poi_id": [5, 6, 7, 8]})
    good, bad = validate(table, contract, max_ts)
    assert good["user_id"].to_pylist() == [1, 3] and good["ts"].to_pylist() == [max_ts, 0]
    assert bad["user_id"].to_pylist() == [2, 4]
    assert bad["reason"].to_pylist() == ["ts out of range (expected 0 <= ts <= max_ts)"] * 2
