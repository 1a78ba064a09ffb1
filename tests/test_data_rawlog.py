"""Raw-log column casting: what can be cast is, each value that cannot is flagged."""
from __future__ import annotations

import pyarrow as pa

from mtfm.platform.rawlog import cast_column


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
