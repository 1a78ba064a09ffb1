"""The `POST /<scenario>/rank` request: validation against the scenario's features, and the
one-row aggregated table that the ranker's collator turns into tokens.

A request is one user and K candidates of one scenario (JSON):

    {"user_id": 42,
     "ts": 1767225600000,                                   request time, int64 ms
     "user": {"user_city": 3, ...},                          the scenario's user features
     "sequences": {"history": [{"ts": ..., "poi_id": 7, ...}, ...],
                   "realtime": [...]},                       events of the shared sequences
     "candidates": [{"poi_id": 11, "distance_km": 1.5, ...}, ...]}   item and cross features

Events may come in any order (they are sorted by ts; the newest `max_len` per sequence are
kept, as in training) and must not be later than the request; the model's dynamic mask
decides what each candidate sees. Every candidate is a T-token at the request's ts. Optional
features may be omitted or null; unknown names are refused (a typo would otherwise score
silently without the feature).

Every refusal is a `RequestError`: an HTTP status, a machine-readable `kind`, the request
`field` at fault (a dotted path such as `candidates[3].poi_id`) and what was expected.

Events and candidates may also come as columns, one list of values per field, which is
smaller and about twice as fast to decode and check (README, "Latency through Serve"):

     "sequences": {"history": {"ts": [...], "poi_id": [7, ...], ...}},
     "candidates": {"poi_id": [11, ...], "distance_km": [1.5, ...], ...}

Every column of an object must have the same length; an optional feature's column may be
omitted (all null) or hold nulls; a bad value is named as `candidates.poi_id[3]`.

Lists of objects (events, candidates) are checked a column at a time and turned into Arrow
arrays without a Python object per event; only when a column fails is the list checked object
by object, which names the first bad field.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from types import NoneType
from typing import Any

import numpy as np
import pyarrow as pa

from mtfm.platform.registry import Feature, Registry, Scenario, events_column, exposures_column, feature_field, user_column

# A client clock may run a little ahead of the server's; beyond this the ts is refused.
FUTURE_TOLERANCE_MS = 60_000
REQUEST_KEYS = ("user_id", "ts", "user", "sequences", "candidates")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Numeric features are float32 in the model: from this magnitude on a value rounds to inf there (and
# then to 0); below it, to at most float32's largest finite value, 3.4028235e38.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
# 2026-01-01 00:00 UTC: the example request's time (in the past, so always accepted).
EXAMPLE_TS_MS = 1_767_225_600_000


_LONGEST_FIELD = 200


class RequestError(ValueError):
    """A refused request. `status` is the HTTP status, `kind` a stable error name for clients
    and metrics, `field` the request part at fault ("body" for the body as a whole, empty where
    the request is not at fault: a replica unavailable, a scoring failure)."""

    def __init__(self, status: int, kind: str, field: str, message: str):
        if len(field) > _LONGEST_FIELD:  # a field is named from the client's keys: not echoed whole
            field = f"{field[:_LONGEST_FIELD // 2]}...({len(field):,} characters)"
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.kind, self.field, self.message = status, kind, field, message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "field": self.field, "message": self.message}}


@dataclass(frozen=True)
class RankRequest:
    """A validated request: its one-row aggregated table and what batching needs to know.

    table: columns user_id, window, <scenario>__user, <scenario>__exposures and
    <sequence>__events for every sequence, typed as in `registry.aggregated_schema()`.
    num_tokens: the tokens the collator will make of it (kept events + candidates).
    user_state: a digest of the user id and every event: requests with the same one have the
    same user side (the key of a replica's `UserSideCache`).
    """

    scenario: str
    user_id: int
    ts: int
    table: pa.Table
    num_candidates: int
    num_tokens: int
    user_state: str

    def __reduce__(self):
        # The router sends every request to a replica. Ray's own reducer for Arrow tables
        # walks nested list<struct> columns in Python: ray.put + ray.get of a 1000-event
        # request's table took 2-3.5 ms (bench/serve_gpu.py); one IPC stream, 0.03 ms each way.
        return _request_from_ipc, (self.scenario, self.user_id, self.ts, _table_to_ipc(self.table),
                                   self.num_candidates, self.num_tokens, self.user_state)


def _table_to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _request_from_ipc(scenario: str, user_id: int, ts: int, table: pa.Buffer, num_candidates: int, num_tokens: int,
                      user_state: str) -> RankRequest:
    return RankRequest(scenario, user_id, ts, pa.ipc.open_stream(table).read_all(), num_candidates, num_tokens,
                       user_state)


class RankRequestParser:
    """Validates JSON requests for one scenario of a registry (the checkpoint's snapshot)."""

    def __init__(self, registry: Registry, scenario: str, max_candidates: int):
        self.scenario: Scenario = registry.scenario(scenario)
        self.sequences = tuple(registry.sequences.values())
        self.max_candidates = max_candidates
        self.user_schema = _ObjectSchema(self.scenario.user_features)
        self.candidate_schema = _ObjectSchema(self.scenario.exposure_features)
        self.event_schemas = {s.name: _ObjectSchema(s.features, extra=("ts",)) for s in self.sequences}
        schema = registry.aggregated_schema()
        names = ["user_id", "window", user_column(scenario), exposures_column(scenario)]
        names = [name for name in names if name in schema.names]  # no user column without user features
        names += [events_column(s.name) for s in self.sequences]
        self.schema = pa.schema([schema.field(n) for n in names])

    def parse(self, body: Any, now_ms: int) -> RankRequest:
        if not isinstance(body, dict):
            raise RequestError(400, "wrong_type", "body", f"expected a JSON object, found {_json_kind(body)}")
        for key in body:
            if key not in REQUEST_KEYS:
                raise RequestError(422, "unknown_field", str(key), f"unknown field; expected {', '.join(REQUEST_KEYS)}")
        user_id = _integer(_required(body, "user_id", "an integer user id"), "user_id")
        ts = _integer(_required(body, "ts", "the request time in ms since the epoch"), "ts")
        if ts < 0:
            raise RequestError(422, "ts_before_epoch", "ts", f"expected a time in ms since the epoch (>= 0), found {ts}")
        if ts > now_ms + FUTURE_TOLERANCE_MS:
            raise RequestError(422, "ts_in_future", "ts",
                               f"{ts} is {(ts - now_ms) / 1000:.0f} s after the server's clock ({now_ms}); expected "
                               f"a request time at most {FUTURE_TOLERANCE_MS // 1000} s ahead")
        user = self.user_schema.parse(_mapping(body.get("user", {}), "user"), "user")
        events = self._sequences(_mapping(body.get("sequences", {}), "sequences"), ts)
        candidates, num_candidates = self._candidates(body)
        candidates["ts"] = pa.repeat(pa.scalar(ts, pa.int64()), num_candidates)  # request_id: null
        scenario = self.scenario.name
        columns = {"user_id": pa.array([user_id], pa.int64()), "window": pa.array([0], pa.int64()),
                   exposures_column(scenario): self._one_list(exposures_column(scenario), candidates, num_candidates)}
        if user_column(scenario) in self.schema.names:
            columns[user_column(scenario)] = pa.array([user], self.schema.field(user_column(scenario)).type)
        for seq in self.sequences:
            evs = events[seq.name]
            columns[events_column(seq.name)] = self._one_list(events_column(seq.name), evs, len(evs["ts"]))
        table = pa.Table.from_arrays([columns[name] for name in self.schema.names], schema=self.schema)
        kept = sum(min(len(events[seq.name]["ts"]), seq.max_len) for seq in self.sequences)
        # The user side's key: the user and every event, as the table holds them (one Arrow stream).
        state = hashlib.blake2b(user_id.to_bytes(8, "little", signed=True), digest_size=16)
        state.update(_table_to_ipc(table.select([events_column(s.name) for s in self.sequences])))
        return RankRequest(scenario, user_id, ts, table, num_candidates, kept + num_candidates, state.hexdigest())

    def _one_list(self, column: str, values: dict[str, pa.Array], n: int) -> pa.Array:
        """A one-row list<struct> column from per-field arrays (fields not given are null)."""
        list_type = self.schema.field(column).type
        struct_type = list_type.value_type
        children = [(values[f.name] if values[f.name].type == f.type else values[f.name].cast(f.type))
                    if f.name in values else pa.nulls(n, f.type) for f in struct_type]
        items = pa.StructArray.from_arrays(children, fields=list(struct_type))
        return pa.ListArray.from_arrays(pa.array([0, n], pa.int32()), items, type=list_type)

    def _sequences(self, given: dict, ts: int) -> dict[str, dict[str, pa.Array]]:
        """Per sequence, its events as columns (ts and every feature), sorted by ts."""
        known = {s.name: s for s in self.sequences}
        for name in given:
            if name not in known:
                raise RequestError(422, "unknown_field", f"sequences.{name}",
                                   f"unknown sequence; expected one of {', '.join(known)}")
        out = {}
        for seq in self.sequences:
            where = f"sequences.{seq.name}"
            items = given.get(seq.name)
            items = [] if items is None else items
            schema = self.event_schemas[seq.name]
            if isinstance(items, dict):
                columns, _ = schema.given_columns(items, where)
                bad = _first_outside(columns["ts"], ts)
                if bad is not None:
                    raise _event_time_error(f"{where}.ts[{bad}]", columns["ts"][bad].as_py(), ts)
                items = []
            elif not isinstance(items, list):
                raise RequestError(422, "wrong_type", where,
                                   f"expected a list of events or an object of columns, found {_json_kind(items)}")
            else:
                columns = schema.columns(items)
            if columns is None or _first_outside(columns["ts"], ts) is not None:
                checked = {name: [] for name in schema.names}
                for i, raw in enumerate(items):  # finds the first bad field, in request order
                    event = schema.parse(_mapping(raw, f"{where}[{i}]"), f"{where}[{i}]")
                    event_ts = _integer(_required(raw, "ts", "the event time in ms", f"{where}[{i}]"), f"{where}[{i}].ts")
                    if not 0 <= event_ts <= ts:
                        raise _event_time_error(f"{where}[{i}].ts", event_ts, ts)
                    for name in schema.names:
                        checked[name].append(event_ts if name == "ts" else event[name])
                columns = schema.checked_arrays(checked)
            out[seq.name] = _sorted_by_ts(columns)
        return out

    def _candidates(self, body: dict) -> tuple[dict[str, pa.Array], int]:
        """The candidates' features as columns, and how many candidates."""
        items = _required(body, "candidates", "a non-empty list of candidate objects, or an object of columns")
        if not isinstance(items, (list, dict)):
            raise RequestError(422, "wrong_type", "candidates",
                               f"expected a list of candidates or an object of columns, found {_json_kind(items)}")
        schema = self.candidate_schema
        if isinstance(items, dict):
            columns, count = schema.given_columns(items, "candidates", rows_required=True)
        else:
            columns, count = None, len(items)
        if not count:
            raise RequestError(422, "empty_candidates", "candidates", "expected at least one candidate, found none")
        if count > self.max_candidates:
            raise RequestError(422, "too_many_candidates", "candidates",
                               f"found {count} candidates; scenario {self.scenario.name} accepts at most "
                               f"{self.max_candidates} per request (split the request)")
        if columns is None:
            columns = schema.columns(items)
        if columns is None:
            parsed = [schema.parse(_mapping(raw, f"candidates[{i}]"), f"candidates[{i}]") for i, raw in enumerate(items)]
            columns = schema.checked_arrays({name: [p[name] for p in parsed] for name in schema.names})
        return columns, count


def example_request(registry: Registry, scenario: str, *, candidates: int = 3, events: int = 4,
                    ts: int = EXAMPLE_TS_MS, user_id: int = 1, seed: int = 0, columns: bool = False) -> dict[str, Any]:
    """A valid request for `scenario`, built from its features: every feature set (so the example
    documents them all), events one minute apart before `ts`. `seed` varies the values.
    `columns`: events and candidates as objects of columns."""
    scn = registry.scenario(scenario)

    def values(features: tuple[Feature, ...], salt: int) -> dict[str, Any]:
        return {f.name: _example_value(f, seed * 7919 + salt * 31 + j) for j, f in enumerate(features)}

    def listing(objects: list[dict], names: list[str]) -> list[dict] | dict[str, list]:
        return {name: [o[name] for o in objects] for name in names} if columns else objects

    return {
        "user_id": user_id,
        "ts": ts,
        "user": values(scn.user_features, 0),
        "sequences": {s.name: listing([{"ts": ts - 60_000 * (events - i), **values(s.features, 100 + i)}
                                       for i in range(events)], ["ts", *(f.name for f in s.features)])
                      for s in registry.sequences.values()},
        "candidates": listing([values(scn.exposure_features, 1000 + i) for i in range(candidates)],
                              [f.name for f in scn.exposure_features]),
    }


def _example_value(f: Feature, n: int) -> Any:
    if f.type == "categorical":
        return 1 + n % max(f.buckets - 1, 1)
    if f.type == "categorical_list":
        return [1 + (n + k) % max(f.buckets - 1, 1) for k in range(min(2, f.max_len or 2))]
    # In the range the synthetic logs give each transform (`platform/synth.py`), which a quickstart model
    # was trained on: none in (0, 1), log1p a positive amount, symlog around 0.
    if f.transform == "log1p":
        return round(0.5 + (n % 97) / 4, 2)
    if f.transform == "symlog":
        return round((n % 41) / 10 - 2, 2)
    return round(0.05 + (n % 91) / 100, 2)


# ---------------------------------------------------------------- field checks

def _required(body: dict, key: str, expected: str, where: str = "") -> Any:
    field = f"{where}.{key}" if where else key
    if body.get(key) is None:
        found = "null" if key in body else "missing"
        raise RequestError(422, "missing_field", field, f"required field {found} (expected {expected})")
    return body[key]


def _mapping(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(422, "wrong_type", field, f"expected an object, found {_json_kind(value)}")
    return value


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, "wrong_type", field, f"expected an integer, found {_found(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise RequestError(422, "wrong_type", field, f"expected a 64-bit integer, found {_found(value)}")
    return value


class _ObjectSchema:
    """The declared features of one kind of request object (user, event, candidate); `extra`
    names required integer fields besides the features (an event's ts)."""

    def __init__(self, features: tuple[Feature, ...], extra: tuple[str, ...] = ()):
        self.features, self.extra = features, extra
        self.names = (*extra, *(f.name for f in features))
        self.declared = frozenset(self.names)
        self.expected = ", ".join(self.names)
        self.types = {**{name: pa.int64() for name in extra}, **{f.name: feature_field(f).type for f in features}}
        self.feature_by_name = {f.name: f for f in features}

    def columns(self, items: list) -> dict[str, pa.Array] | None:
        """Every object's fields as Arrow columns (absent optional features null), or None when
        any object or value is not plainly valid: then `parse` object by object names the first
        bad field (or accepts what this quick check was too strict for)."""
        if not all(type(item) is dict and item.keys() <= self.declared for item in items):
            return None
        return self.plain_arrays({name: [item.get(name) for item in items] for name in self.names})

    def given_columns(self, given: dict, where: str, rows_required: bool = False) -> tuple[dict[str, pa.Array], int]:
        """Columns given as {field: [values]}, checked, as Arrow arrays, and their common length:
        an omitted optional feature is all null; a bad value is named `<where>.<field>[i]`. With
        `rows_required` (candidates), a required column given as null is named even with no
        other column given (else that is no rows: a sequence without events)."""
        for name in given:
            if name not in self.declared:
                raise RequestError(422, "unknown_field", f"{where}.{name}", f"unknown column; expected {self.expected}")
        nulled = [name for name, values in given.items() if values is None]
        given = {name: values for name, values in given.items() if values is not None}  # null: omitted
        count = _column_length(given, where)
        for name in self.names:
            feature = self.feature_by_name.get(name)
            named = count or (rows_required and name in nulled)
            if named and name not in given and (feature is None or feature.required):
                expected = "the event time in ms" if feature is None else _expected(feature)
                values = f"{count} value{'s' * (count != 1)}" if count else "a list of values"
                raise RequestError(422, "missing_field", f"{where}.{name}",
                                   f"required column missing or null (expected {values}, each {expected})")
        out = {name: given[name] if name in given else [None] * count for name in self.names}
        arrays = self.plain_arrays(out)
        return (self.value_by_value(out, where) if arrays is None else arrays), count

    def value_by_value(self, columns: dict[str, list], where: str) -> dict[str, pa.Array]:
        """Every value of `columns` checked on its own (the first bad one is named
        `<where>.<field>[i]`), then the columns as Arrow arrays."""
        checked = {name: [] for name in self.names}
        for name in self.extra:
            for i, value in enumerate(columns[name]):
                field = f"{where}.{name}[{i}]"
                if value is None:
                    raise RequestError(422, "missing_field", field, "required value missing (expected an integer)")
                checked[name].append(_integer(value, field))
        for f in self.features:
            for i, value in enumerate(columns[f.name]):
                field = f"{where}.{f.name}[{i}]"
                if value is None and f.required:
                    raise RequestError(422, "missing_field", field, f"required value missing (expected {_expected(f)})")
                checked[f.name].append(None if value is None else _feature_value(f, value, field))
        return self.checked_arrays(checked)

    def checked_arrays(self, checked: dict[str, list]) -> dict[str, pa.Array]:
        """Columns of values already checked one by one, as Arrow arrays."""
        return {name: pa.array(values, self.types[name]) for name, values in checked.items()}

    def plain_arrays(self, columns: dict[str, list]) -> dict[str, pa.Array] | None:
        """Every column as an Arrow array of its field's type when every value is plainly valid,
        else None (then `value_by_value` names the first bad value, or accepts what this was too
        strict for). Per column, one pass in C for the set of the values' types, then Arrow's
        conversion, which refuses ints beyond int64 (and, into float32, beyond 2^24, which the
        value-by-value check accepts through float()) and turns a number beyond float32's range
        into inf, which one more pass finds. Only a list feature's ids are walked by a generator."""
        arrays = {}
        for name, values in columns.items():
            types = set(map(type, values))
            feature = self.feature_by_name.get(name)
            if NoneType in types:
                if feature is None or feature.required:
                    return None
                types.discard(NoneType)
            kind = "categorical" if feature is None else feature.type
            if not types <= _PLAIN_TYPES[kind]:
                return None
            if kind == "categorical_list":
                ids = chain.from_iterable(v for v in values if v is not None)
                if not set(map(type, ids)) <= {int}:
                    return None
            try:
                array = pa.array(values, self.types[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                return None
            if kind == "numeric" and not _all_finite(array):
                return None
            arrays[name] = array
        return arrays

    def parse(self, given: dict, where: str) -> dict[str, Any]:
        """The declared features of `given`, checked by type; absent optional ones are None."""
        for name in given:
            if name not in self.declared:
                expected = f"expected one of {self.expected}" if self.names else "this scenario declares none here"
                raise RequestError(422, "unknown_field", f"{where}.{name}", f"unknown feature; {expected}")
        out = {}
        for f in self.features:
            value = given.get(f.name)
            if value is None:
                if f.required:
                    found = "null" if f.name in given else "missing"
                    raise RequestError(422, "missing_field", f"{where}.{f.name}",
                                       f"required feature {found} (expected {_expected(f)})")
                out[f.name] = None
            else:
                out[f.name] = _feature_value(f, value, f"{where}.{f.name}")
        return out


def _column_length(columns: dict, where: str) -> int:
    """The common length of an object of columns; refuses a non-list column or a length mismatch."""
    lengths = {}
    for name, values in columns.items():
        if not isinstance(values, list):
            raise RequestError(422, "wrong_type", f"{where}.{name}",
                               f"expected a list of values (a column), found {_json_kind(values)}")
        lengths[name] = len(values)
    if len(set(lengths.values())) > 1:  # the column at fault: the first whose length most others do not share
        counts = Counter(lengths.values())
        common = max(counts, key=lambda length: (counts[length], -list(lengths.values()).index(length)))
        odd = next(name for name, length in lengths.items() if length != common)
        if counts[common] == 1:
            like = f"column {next(name for name, length in lengths.items() if length == common)!r} has"
        else:
            like = f"{counts[common]} other columns have"
        found = f"{lengths[odd]} value{'s' * (lengths[odd] != 1)}"
        raise RequestError(422, "wrong_length", f"{where}.{odd}", f"{found}; expected {common}, as {like}")
    return next(iter(lengths.values()), 0)


# The Python types a column of each kind may hold, nulls aside (bool is not int here: JSON's true is refused).
_PLAIN_TYPES = {"categorical": {int}, "numeric": {int, float}, "categorical_list": {list}}


# NumPy views the arrays below without a copy (no nulls: required values), and a NumPy call costs
# a few us where a pyarrow.compute call costs about ten, which would show on small requests.

def _all_finite(numbers: pa.Array) -> bool:
    if numbers.null_count:
        numbers = numbers.drop_null()
    return bool(np.isfinite(np.asarray(numbers)).all())


def _first_outside(ts: pa.Array, limit: int) -> int | None:
    """The index of the first event time before the epoch or after `limit`, or None."""
    values = np.asarray(ts)
    bad = np.flatnonzero((values < 0) | (values > limit))
    return int(bad[0]) if len(bad) else None


def _event_time_error(field: str, event_ts: int, request_ts: int) -> RequestError:
    if event_ts < 0:
        return RequestError(422, "ts_before_epoch", field,
                            f"expected a time in ms since the epoch (>= 0), found {event_ts}")
    seconds = " (the request ts looks like seconds: times are ms since 1970)" if 10**9 <= request_ts < 10**10 else ""
    return RequestError(422, "event_after_request", field,
                        f"{event_ts} is after the request ts {request_ts}{seconds}; expected events at or before it")


def _sorted_by_ts(columns: dict[str, pa.Array]) -> dict[str, pa.Array]:
    """Events sorted by ts; ties keep the request's order (a stable sort)."""
    ts = np.asarray(columns["ts"])
    if len(ts) < 2 or (ts[1:] >= ts[:-1]).all():  # clients mostly send them sorted
        return columns
    order = pa.array(np.argsort(ts, kind="stable"))
    return {name: values.take(order) for name, values in columns.items()}


def _feature_value(f: Feature, value: Any, field: str) -> Any:
    if f.type == "categorical":
        return _typed(value, field, _expected(f), _integer)
    if f.type == "numeric":
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:
            number = math.nan
        if not (math.isfinite(number) and abs(number) < FLOAT32_OVERFLOW):
            raise RequestError(422, "wrong_type", field, f"expected {_expected(f)}, found {_found(value)}")
        return number
    if not isinstance(value, list):
        raise RequestError(422, "wrong_type", field, f"expected {_expected(f)}, found {_found(value)}")
    element = f"an integer id ({feature_field(f).type.value_type})"
    return [_typed(v, f"{field}[{i}]", element, _integer) for i, v in enumerate(value)]


def _typed(value: Any, field: str, expected: str, check) -> Any:
    try:
        return check(value, field)
    except RequestError as exc:
        raise RequestError(422, "wrong_type", field, f"expected {expected}, found {_found(value)}") from exc


def _expected(f: Feature) -> str:
    arrow = feature_field(f).type
    return {"categorical": f"an integer id ({arrow})",
            "numeric": f"a finite number within float32's range, up to 3.4028235e38 in magnitude ({arrow})",
            "categorical_list": f"a list of integer ids ({arrow})"}[f.type]


def _found(value: Any, limit: int = 60) -> str:
    """A refused value as an error names it: its JSON kind, then the value (shortened), but null alone."""
    if value is None:
        return "null"
    shown = repr(value)
    return f"{_json_kind(value)} {shown if len(shown) <= limit else shown[:limit] + f'... ({len(shown)} characters)'}"


def _json_kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
