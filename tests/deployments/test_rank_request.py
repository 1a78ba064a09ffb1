"""Request parsing in process: the one-row table equals one built independently from the JSON,
a bad value deep inside a long list is refused naming its exact field, a parsed request crosses
Ray as one Arrow stream, and the HTTP endpoint's routes below an app's prefix."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import pickle
import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from mtfm.deployments.rank_request import RankRequestParser, RequestError, example_request
from mtfm.platform.registry import events_column, exposures_column, load_registry, user_column
from serve_test_utils import REPO

REGISTRY = load_registry(REPO / "configs")
NOW_MS = example_request(REGISTRY, "hp")["ts"] + 1000


def _varied_body(scenario: str) -> dict:
    """Events out of order with ts ties, one at the request ts (allowed), optional features null or absent,
    numerics given as ints."""
    body = example_request(REGISTRY, scenario, candidates=40, events=60, seed=5)
    history = body["sequences"]["history"]
    history.reverse()
    history[3]["ts"] = history[4]["ts"]  # a tie: request order is kept
    history[0]["ts"] = body["ts"]
    for i, candidate in enumerate(body["candidates"]):
        for f in REGISTRY.scenario(scenario).exposure_features:
            if not f.required and i % 3 == 0:
                candidate[f.name] = None
            elif not f.required and i % 3 == 1:
                candidate.pop(f.name)
            elif f.type == "numeric" and i % 3 == 2:
                candidate[f.name] = int(candidate[f.name])
    return body


def _expected_table(body: dict, scenario: str) -> pa.Table:
    """The aggregated row written out by hand, converted by pyarrow's own row conversion."""
    scn = REGISTRY.scenario(scenario)
    schema = REGISTRY.aggregated_schema()

    def features(obj: dict, feats) -> dict:
        return {f.name: (float(obj[f.name]) if f.type == "numeric" and obj.get(f.name) is not None
                         else obj.get(f.name)) for f in feats}

    row = {"user_id": body["user_id"], "window": 0, user_column(scenario): features(body["user"], scn.user_features),
           exposures_column(scenario): [{"request_id": None, "ts": body["ts"], **features(c, scn.exposure_features)}
                                        for c in body["candidates"]]}
    for name, seq in REGISTRY.sequences.items():
        events = sorted(body["sequences"].get(name, []), key=lambda e: e["ts"])
        row[events_column(name)] = [{"ts": e["ts"], **features(e, seq.features)} for e in events]
    names = ["user_id", "window", user_column(scenario), exposures_column(scenario)]
    names += [events_column(n) for n in REGISTRY.sequences]
    return pa.Table.from_pylist([row], schema=pa.schema([schema.field(n) for n in names]))


@pytest.mark.parametrize("scenario", ["hp", "phf", "sqs"])
def test_the_parsed_table_equals_the_row_built_by_hand(scenario):
    body = _varied_body(scenario)
    request = RankRequestParser(REGISTRY, scenario, max_candidates=1000).parse(copy.deepcopy(body), now_ms=NOW_MS)
    expected = _expected_table(body, scenario)
    assert request.table.equals(expected), (request.table.to_pylist(), expected.to_pylist())
    assert request.num_candidates == 40
    kept = sum(min(len(body["sequences"][n]), s.max_len) for n, s in REGISTRY.sequences.items())
    assert request.num_tokens == kept + 40


def test_the_user_state_changes_with_the_events_only():
    parser = RankRequestParser(REGISTRY, "hp", max_candidates=1000)
    body = _varied_body("hp")
    state = parser.parse(copy.deepcopy(body), now_ms=NOW_MS).user_state
    other_candidates = {**copy.deepcopy(body), "candidates": body["candidates"][:5]}
    assert parser.parse(other_candidates, now_ms=NOW_MS).user_state == state
    moved = copy.deepcopy(body)
    moved["sequences"]["history"][10]["ts"] -= 1
    assert parser.parse(moved, now_ms=NOW_MS).user_state != state


def _broken(path: str, value) -> dict:
    body = _varied_body("hp")
    listing, index, name = path.split(".")
    if listing == "candidates":
        body["candidates"][int(index)][name] = value
    else:
        body["sequences"][listing][int(index)][name] = value
    return body


@pytest.mark.parametrize("path, value, kind", [
    ("history.37.poi_id", "p7", "wrong_type"),
    ("history.12.category", True, "wrong_type"),
    ("history.44.price", float("nan"), "wrong_type"),
    ("history.50.ts", NOW_MS + 10**6, "event_after_request"),
    ("history.8.ts", None, "missing_field"),
    ("history.9.ts", -5, "ts_before_epoch"),
    ("history.20.colour", 1, "unknown_field"),
    ("realtime.3.action", 2**63, "wrong_type"),
    ("candidates.25.poi_id", None, "missing_field"),
    ("candidates.31.distance_km", [1.0], "wrong_type"),
    ("candidates.7.distance_km", 3.4028236e38, "wrong_type"),  # finite, but inf in the model's float32
    ("history.2.price", -1e39, "wrong_type"),
    ("candidates.9.distance_km", 10**39, "wrong_type"),
])
def test_a_bad_value_deep_in_a_list_is_refused_by_its_exact_field(path, value, kind):
    listing, index, name = path.split(".")
    body = _broken(path, value)
    # Fields are named by their index in the request, before the events are sorted by ts.
    where = f"candidates[{index}]" if listing == "candidates" else f"sequences.{listing}[{index}]"
    with pytest.raises(RequestError) as error:
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
    assert (error.value.kind, error.value.field) == (kind, f"{where}.{name}")


def test_an_unknown_key_is_named_but_not_echoed_whole():
    for body in ({**_varied_body("hp"), "k" * 100_000: 1}, _broken("candidates.3." + "k" * 100_000, 1)):
        with pytest.raises(RequestError) as error:
            RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
        assert error.value.kind == "unknown_field", error.value.kind
        assert re.fullmatch(r"(candidates\[3\]\.)?k+\.\.\.\(100,0\d\d characters\)", error.value.field), \
            error.value.field[-40:]
        assert len(error.value.to_json()["error"]["field"]) < 200 and len(str(error.value)) < 1000


def test_a_request_ts_in_seconds_is_named_as_such():
    body = _varied_body("hp")
    body["ts"] = NOW_MS // 1000
    with pytest.raises(RequestError, match=r"is after the request ts \d+ \(the request ts looks like seconds: "
                                           r"times are ms since 1970\)") as error:
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
    assert error.value.kind == "event_after_request"
    body["ts"] = 0  # not seconds either: no such hint
    with pytest.raises(RequestError, match=r"is after the request ts 0; expected events at or before it$"):
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)


def test_a_request_ts_before_1970_is_out_of_range_not_of_the_wrong_type():
    body = _varied_body("hp")
    body["ts"] = -5
    with pytest.raises(RequestError, match=r"expected a time in ms since the epoch \(>= 0\), found -5$") as error:
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
    assert (error.value.status, error.value.kind, error.value.field) == (422, "ts_before_epoch", "ts")


def _as_columns(objects: list[dict], names) -> dict[str, list]:
    """The same objects as an object of columns; a field absent from every object is omitted."""
    return {name: [o.get(name) for o in objects] for name in names if any(name in o for o in objects)}


def _columnar(body: dict, scenario: str = "hp") -> dict:
    scn = REGISTRY.scenario(scenario)
    out = copy.deepcopy(body)
    out["candidates"] = _as_columns(body["candidates"], [f.name for f in scn.exposure_features])
    out["sequences"] = {name: _as_columns(events, ["ts", *(f.name for f in REGISTRY.sequences[name].features)])
                        for name, events in body["sequences"].items()}
    return out


@pytest.mark.parametrize("scenario", ["hp", "sqs"])
def test_events_and_candidates_as_columns_give_the_same_request(scenario):
    parser = RankRequestParser(REGISTRY, scenario, max_candidates=1000)
    body = _varied_body(scenario)
    columns = _columnar(body, scenario)
    assert isinstance(columns["candidates"], dict) and isinstance(columns["sequences"]["history"], dict)
    request = parser.parse(columns, now_ms=NOW_MS)
    assert request.table.equals(_expected_table(body, scenario))
    rows = parser.parse(copy.deepcopy(body), now_ms=NOW_MS)
    assert (request.num_candidates, request.num_tokens, request.user_state) == (
        rows.num_candidates, rows.num_tokens, rows.user_state)


@pytest.mark.parametrize("path, value, kind, field", [
    ("sequences.history.poi_id", ("set", 37, "p7"), "wrong_type", "sequences.history.poi_id[37]"),
    ("sequences.history.ts", ("set", 50, NOW_MS + 10**6), "event_after_request", "sequences.history.ts[50]"),
    ("sequences.history.ts", ("set", 8, None), "missing_field", "sequences.history.ts[8]"),
    ("sequences.realtime.action", ("set", 3, 2**63), "wrong_type", "sequences.realtime.action[3]"),
    ("sequences.history.colour", ("column", [1]), "unknown_field", "sequences.history.colour"),
    ("sequences.history.price", ("column", 4.5), "wrong_type", "sequences.history.price"),
    ("sequences.history.category", ("column", [1, 2]), "wrong_length", "sequences.history.category"),
    ("candidates.poi_id", ("column", [1, 2]), "wrong_length", "candidates.poi_id"),  # the first column: still named
    ("candidates.poi_id", ("set", 25, None), "missing_field", "candidates.poi_id[25]"),
    ("candidates.distance_km", ("set", 31, [1.0]), "wrong_type", "candidates.distance_km[31]"),
    ("candidates.distance_km", ("set", 7, 3.4028236e38), "wrong_type", "candidates.distance_km[7]"),
    ("candidates.distance_km", ("set", 9, -(10**39)), "wrong_type", "candidates.distance_km[9]"),
    ("candidates.poi_id", ("drop",), "missing_field", "candidates.poi_id"),
    ("sequences.history.ts", ("column", None), "missing_field", "sequences.history.ts"),
    ("sequences.history.ts", ("set", 4, -1), "ts_before_epoch", "sequences.history.ts[4]"),
])
def test_a_bad_value_in_a_column_is_refused_by_its_exact_field(path, value, kind, field):
    body = _columnar(_varied_body("hp"))
    *parent, name = path.split(".")
    columns = body
    for key in parent:
        columns = columns[key]
    if value[0] == "set":
        columns[name][value[1]] = value[2]
    elif value[0] == "column":
        columns[name] = value[1]
    else:
        del columns[name]
    with pytest.raises(RequestError) as error:
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
    assert (error.value.kind, error.value.field) == (kind, field), error.value.message


def test_candidate_columns_are_counted_against_the_limits():
    parser = RankRequestParser(REGISTRY, "hp", max_candidates=10)
    body = _columnar(_varied_body("hp"))
    for empty in ({}, {name: [] for name in body["candidates"]}):
        with pytest.raises(RequestError, match="at least one candidate"):
            parser.parse({**body, "candidates": empty}, now_ms=NOW_MS)
    with pytest.raises(RequestError, match="found 40 candidates"):
        parser.parse(body, now_ms=NOW_MS)
    # Every column null: the first required one is named, as when other columns are given.
    required = next(f.name for f in REGISTRY.scenario("hp").exposure_features if f.required)
    with pytest.raises(RequestError) as error:
        parser.parse({**body, "candidates": {name: None for name in body["candidates"]}}, now_ms=NOW_MS)
    assert (error.value.kind, error.value.field) == ("missing_field", f"candidates.{required}")
    assert "required column missing or null (expected a list of values, each" in error.value.message
    # A sequence of null columns is one without events, as an empty one is.
    no_events = {**body, "sequences": {name: {column: None for column in columns}
                                       for name, columns in body["sequences"].items()}}
    few = {name: values[:3] for name, values in body["candidates"].items()}
    assert parser.parse({**no_events, "candidates": few}, now_ms=NOW_MS).num_tokens == 3


def test_a_request_crosses_ray_as_one_arrow_stream(ray_cluster):
    """What the router sends a replica: through Ray's own serializer the request comes back
    equal, and its pickled form holds no Arrow table (Ray's reducer for those walks nested
    columns in Python, milliseconds per request of 1000 events)."""
    import ray

    body = _varied_body("hp")
    request = RankRequestParser(REGISTRY, "hp", max_candidates=100).parse(body, now_ms=NOW_MS)
    reduced = request.__reduce_ex__(5)  # what pickle (and Ray's cloudpickle) stores: arguments and state
    parts = [*reduced[1], *(reduced[2].values() if len(reduced) > 2 and isinstance(reduced[2], dict) else ())]
    assert not any(isinstance(p, (pa.Table, pa.Array, pa.ChunkedArray)) for p in parts)
    received = ray.get(ray.put(request))
    assert received.table.schema == request.table.schema
    assert received.table.equals(request.table)
    assert received == dataclasses.replace(request, table=received.table)
    # A table of several chunks, sliced: the stream holds exactly the slice's rows.
    table = pa.concat_tables([request.table] * 3).slice(1, 2)
    sliced = dataclasses.replace(request, table=table)
    back = pickle.loads(pickle.dumps(sliced, protocol=5))
    assert table.column(0).num_chunks == 2
    assert back.table.num_rows == 2 and back.table.equals(table)


def _post(endpoint, path: str, body: dict | bytes, root_path: str = "", headers=()) -> tuple[int, dict]:
    """`endpoint.answer` on a real Starlette request (`body` as JSON, or bytes as they are); scoring
    answers with the scenario it was asked for."""
    from starlette.requests import Request

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def rank(scenario, request):
        return {"scenario": scenario, "candidates": request.num_candidates}

    async def health():
        return {"status": "ok"}

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *headers]}
    response = asyncio.run(endpoint.answer(Request(scope, receive), rank, health))
    return response.status_code, json.loads(response.body)


def test_healthz_answers_503_only_when_no_scenario_answers():
    """GET and HEAD alike: "ok" and "degraded" (some scenarios down: the others still serve) are
    200, "unavailable" 503; GET's body names each scenario's state either way."""
    from starlette.requests import Request

    from mtfm.deployments.http_api import RankEndpoint

    endpoint = RankEndpoint({"hp": RankRequestParser(REGISTRY, "hp", 10)}, 1 << 20)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    for status, code in (("ok", 200), ("degraded", 200), ("unavailable", 503)):
        report = {"status": status, "scenarios": {"hp": {"status": "unavailable", "error": "x"}}}

        async def health(report=report):
            return report

        for method in ("GET", "HEAD"):
            scope = {"type": "http", "method": method, "path": "/healthz", "root_path": "", "query_string": b"",
                     "headers": []}
            response = asyncio.run(endpoint.answer(Request(scope, receive), None, health))
            assert response.status_code == code, (status, method)
            assert json.loads(response.body) == report if method == "GET" else response.body == b""


def test_bare_rank_is_served_only_by_the_app_of_one_scenario():
    from mtfm.deployments.http_api import RankEndpoint

    body = example_request(REGISTRY, "hp", candidates=3)
    parser = RankRequestParser(REGISTRY, "hp", max_candidates=10)
    router = RankEndpoint({"hp": parser}, 1 << 20)
    alone = RankEndpoint({"hp": parser}, 1 << 20, bare_rank=True)
    assert _post(router, "/hp/rank", body) == (200, {"scenario": "hp", "candidates": 3})
    assert _post(router, "/rank", body)[0] == 404
    assert _post(alone, "/rank", body) == (200, {"scenario": "hp", "candidates": 3})
    # Below an app's route prefix (Serve's root_path), as the scenario apps are deployed at /<scenario>.
    assert _post(alone, "/hp/rank", body, root_path="/hp") == (200, {"scenario": "hp", "candidates": 3})
    assert _post(alone, "/hp/hp/rank", body, root_path="/hp")[0] == 200
    assert _post(alone, "/hp/sqs/rank", body, root_path="/hp")[1]["error"]["kind"] == "unknown_scenario"
    with pytest.raises(ValueError, match="exactly one scenario"):
        RankEndpoint({"hp": parser, "sqs": RankRequestParser(REGISTRY, "sqs", 10)}, 1 << 20, bare_rank=True)


def test_a_request_whose_client_goes_away_is_counted_as_cancelled():
    """Serve cancels the handler of a request whose client disconnected (or Starlette's body stream
    raises ClientDisconnect, if the client left while sending): the request must still show in the
    metrics, as a 4xx of error kind `cancelled`, and a cancellation must reach the caller. A health
    probe that gives up is no rank request and is not counted."""
    from starlette.requests import Request

    from mtfm.deployments.http_api import RankEndpoint

    recorded = []
    endpoint = RankEndpoint({"hp": RankRequestParser(REGISTRY, "hp", max_candidates=10)}, 1 << 20)
    endpoint.metrics = SimpleNamespace(accepted=lambda *a: recorded.append(("accepted", *a)),
                                       error=lambda *a: recorded.append(("error", *a)),
                                       request=lambda s, status, ms: recorded.append(("request", s, status)))
    raw = json.dumps(example_request(REGISTRY, "hp", candidates=2)).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def disconnect():
        return {"type": "http.disconnect"}

    def request(method, path, receive):
        return Request({"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
                        "headers": []}, receive)

    async def cancelled_while(method, path):
        """`answer` cancelled once its scoring or health call started; the cancellation reaches the caller."""
        started = asyncio.Event()

        async def forever(*_):
            started.set()
            await asyncio.Event().wait()  # a batch, or a restarting replica, the client does not wait for

        handler = asyncio.ensure_future(endpoint.answer(request(method, path, receive), forever, forever))
        await started.wait()
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler

    asyncio.run(cancelled_while("POST", "/hp/rank"))
    assert recorded == [("accepted", "hp", 2), ("error", "hp", "cancelled"), ("request", "hp", 499)]
    recorded.clear()
    asyncio.run(cancelled_while("GET", "/healthz"))
    assert recorded == []
    response = asyncio.run(endpoint.answer(request("POST", "/hp/rank", disconnect), None, None))
    assert response.status_code == 499
    assert recorded == [("error", "hp", "cancelled"), ("request", "hp", 499)]


@pytest.mark.parametrize("raw, kind, message", [
    (b"[1, 2]", "wrong_type", "expected a JSON object, found a list"),
    (b'"hello"', "wrong_type", "expected a JSON object, found a string"),
    (b"null", "wrong_type", "expected a JSON object, found null"),
    (b"\xff\xfe{", "invalid_json", "not UTF-8 JSON (byte 0xff at offset 0); expected a JSON object encoded in UTF-8"),
    ('{"user_id": 1}'.encode("utf-16"), "invalid_json",
     "not UTF-8 JSON (byte 0xff at offset 0); expected a JSON object encoded in UTF-8"),
    ('{"user_id": "café"}'.encode("latin-1"), "invalid_json",
     "not UTF-8 JSON (byte 0xe9 at offset 16); expected a JSON object encoded in UTF-8"),
    (b"\xef\xbb\xbf" + '{"user_id": "café"}'.encode("latin-1"), "invalid_json",  # after a BOM: offsets count it
     "not UTF-8 JSON (byte 0xe9 at offset 19); expected a JSON object encoded in UTF-8"),
])
def test_a_body_that_is_not_a_utf8_json_object_is_refused_as_the_body(raw, kind, message):
    from mtfm.deployments.http_api import RankEndpoint

    status, answer = _post(RankEndpoint({"hp": RankRequestParser(REGISTRY, "hp", 10)}, 1 << 20), "/hp/rank", raw)
    assert (status, answer) == (400, {"error": {"kind": kind, "field": "body", "message": message}})


def test_a_compressed_body_is_refused_by_its_encoding():
    import gzip

    from mtfm.deployments.http_api import RankEndpoint

    endpoint = RankEndpoint({"hp": RankRequestParser(REGISTRY, "hp", 10)}, 1 << 20)
    body = example_request(REGISTRY, "hp", candidates=2)
    status, answer = _post(endpoint, "/hp/rank", gzip.compress(json.dumps(body).encode()),
                           headers=[(b"content-encoding", b"gzip")])
    assert (status, answer["error"]["kind"], answer["error"]["field"]) == (415, "unsupported_encoding", "body")
    assert answer["error"]["message"] == "Content-Encoding gzip is not accepted; send the JSON body uncompressed"
    for identity in (b"identity", b"Identity", b""):
        status, answer = _post(endpoint, "/hp/rank", body, headers=[(b"content-encoding", identity)])
        assert (status, answer) == (200, {"scenario": "hp", "candidates": 2})


def test_a_bad_id_in_a_list_feature_is_refused_as_an_id():
    parser = RankRequestParser(REGISTRY, "phf", max_candidates=10)
    body = example_request(REGISTRY, "phf", candidates=2)
    body["candidates"][1]["dish_tags"] = [1, "a"]
    columns = _columnar(body, "phf")
    for given, field in ((body, "candidates[1].dish_tags[1]"), (columns, "candidates.dish_tags[1][1]")):
        with pytest.raises(RequestError) as error:
            parser.parse(given, now_ms=NOW_MS)
        assert (error.value.field, error.value.message) == (field, "expected an integer id (int64), found a string 'a'")
    body["candidates"][1]["dish_tags"] = "a"  # the list itself
    with pytest.raises(RequestError, match=r"^candidates\[1\]\.dish_tags: expected a list of integer ids \(list<"):
        parser.parse(body, now_ms=NOW_MS)


def test_an_unknown_path_names_the_routes_below_the_apps_prefix():
    from mtfm.deployments.http_api import RankEndpoint

    parser = RankRequestParser(REGISTRY, "hp", max_candidates=10)
    status, body = _post(RankEndpoint({"hp": parser}, 1 << 20), "/hp/score", {})
    assert status == 404 and body["error"]["message"] == (
        "no route '/hp/score'; expected POST /<scenario>/rank with scenario one of hp, or GET /healthz")
    status, body = _post(RankEndpoint({"hp": parser}, 1 << 20, bare_rank=True), "/hp/", {}, root_path="/hp")
    assert status == 404 and body["error"]["message"] == (
        "no route '/hp/'; expected POST /hp/rank, or GET /hp/healthz")


def test_server_timing_header_leaves_out_what_is_not_a_number():
    from mtfm.deployments.http_api import server_timing

    assert (server_timing(0.001, {"queued_ms": 0.5, "score_ms": 1.25}, 0.003) ==
            "parse;dur=1.000, queue;dur=0.500, score;dur=1.250, total;dur=3.000")
    # A scored request is answered whatever its batch says: a part that is not a number is left out.
    bad_parts = {"queued_ms": None, "score_ms": float("nan")}
    assert server_timing(0.001, bad_parts, 0.002) == "parse;dur=1.000, total;dur=2.000"
    assert server_timing(0.001, None, 0.002) == "parse;dur=1.000, total;dur=2.000"


def test_numeric_values_beyond_float32_and_null_columns():
    parser = RankRequestParser(REGISTRY, "hp", max_candidates=1000)
    rows = _varied_body("hp")
    rows["candidates"][2]["distance_km"] = 2**24 + 1  # not exact in float32: converted, not a server error
    assert parser.parse(copy.deepcopy(rows), now_ms=NOW_MS).num_candidates == 40
    rows["candidates"][2]["distance_km"] = 10**400  # beyond float: refused
    with pytest.raises(RequestError) as error:
        parser.parse(rows, now_ms=NOW_MS)
    assert (error.value.kind, error.value.field) == ("wrong_type", "candidates[2].distance_km")
    columns = _columnar(_varied_body("hp"))
    optional = next(f.name for f in REGISTRY.scenario("hp").exposure_features if not f.required)
    columns["candidates"][optional] = None  # a null column is an omitted one
    assert parser.parse(columns, now_ms=NOW_MS).num_candidates == 40
    largest = 3.4028235e38  # float32's largest value as printed: it fits, in rows and in columns
    rows["candidates"][2]["distance_km"] = -largest
    columns["candidates"]["distance_km"][2] = largest
    for body, sign in ((rows, -1), (columns, 1)):
        values = parser.parse(body, now_ms=NOW_MS).table.column("hp__exposures")[0].values.field("distance_km")
        assert values[2].as_py() == sign * float(np.float32(largest))  # finite: float32's largest value


@pytest.mark.parametrize("value", [False, 0, "", 1.5])
def test_a_sequence_that_is_neither_events_nor_columns_is_refused(value):
    body = _varied_body("hp")
    body["sequences"]["history"] = value  # not taken as "no events"
    with pytest.raises(RequestError) as error:
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
    assert (error.value.kind, error.value.field) == ("wrong_type", "sequences.history")


EDGE_VALUES = [None, True, False, 0, -1, 7, 1.5, -0.0, 2**24, 2**24 + 1, -(2**24) - 1, 2**53 + 1, 2**63 - 1, 2**63,
               -(2**63), -(2**63) - 1, 10**39, 10**400, 3.4028235e38, 3.4028236e38, -1e308, 5e-324, float("nan"),
               float("inf"), "1", [], [1, 2], [True], [1.0], [2**63], {}]


def _plainly_fits(feature, value) -> bool:
    """Whether a value is of the kind the column check must accept without the value-by-value one."""
    def int64(v):
        return type(v) is int and -(2**63) <= v < 2**63
    if value is None:
        return not feature.required
    if feature.type == "categorical":
        return int64(value)
    if feature.type == "numeric":
        return (type(value) is int and abs(value) <= 2**24) or (type(value) is float and abs(value) <= 3.4028235e38)
    return type(value) is list and all(int64(v) for v in value)


@pytest.mark.parametrize("value", EDGE_VALUES, ids=repr)
def test_the_column_check_gives_what_the_value_by_value_check_gives(value):
    from mtfm.deployments.rank_request import _ObjectSchema
    from mtfm.platform.registry import Feature

    features = (Feature("id", "categorical", required=True, buckets=64), Feature("tag", "categorical", buckets=8),
                Feature("price", "numeric", required=True), Feature("rating", "numeric"),
                Feature("genres", "categorical_list", buckets=16, max_len=4))
    schema = _ObjectSchema(features, extra=("ts",))
    valid = {"ts": [5, 6, 7, 8], "id": [1, 2, 3, 4], "tag": [None, 1, 2, 3], "price": [0.5, 2, -3.25, 1e30],
             "rating": [4, None, 4.5, 0.0], "genres": [[1], None, [], [2, 3]]}
    for feature in (Feature("ts", "categorical", required=True), *features):
        columns = {name: list(values) for name, values in valid.items()}
        columns[feature.name][2] = value
        quick = schema.plain_arrays(columns)
        try:
            reference = schema.value_by_value(columns, "x")
        except RequestError:
            reference = None
        # The quick check may be stricter (it then defers to the value-by-value one), never looser or different.
        if quick is not None:
            assert reference is not None, (feature.name, value)
            assert all(quick[name].equals(reference[name]) for name in schema.names), (feature.name, value)
        if _plainly_fits(feature, value):
            assert quick is not None, (feature.name, value)


def test_a_refused_value_is_shown_shortened_and_null_as_null():
    parser = RankRequestParser(REGISTRY, "hp", max_candidates=1000)
    body = example_request(REGISTRY, "hp", candidates=2)
    body["user"]["user_city"] = 10**100
    with pytest.raises(RequestError) as error:
        parser.parse(body, now_ms=NOW_MS)
    assert error.value.field == "user.user_city"
    assert error.value.message.endswith("found an integer " + "1" + "0" * 59 + "... (101 characters)")
    movielens = load_registry(REPO / "configs" / "movielens")
    body = example_request(movielens, "young", candidates=2)
    body["candidates"][1]["genres"] = [3, None]
    with pytest.raises(RequestError) as error:
        RankRequestParser(movielens, "young", max_candidates=10).parse(body, now_ms=body["ts"] + 1000)
    assert error.value.field == "candidates[1].genres[1]" and error.value.message.endswith("found null")


def test_a_column_of_one_value_among_longer_ones_is_said_in_the_singular():
    body = _columnar(_varied_body("hp"))
    body["sequences"]["history"]["category"] = [3]
    with pytest.raises(RequestError) as error:
        RankRequestParser(REGISTRY, "hp", max_candidates=1000).parse(body, now_ms=NOW_MS)
    length = len(body["sequences"]["history"]["poi_id"])
    assert error.value.message.startswith(f"1 value; expected {length}, as "), error.value.message


def test_a_required_field_sent_as_null_is_told_from_one_left_out():
    parser = RankRequestParser(REGISTRY, "hp", max_candidates=1000)
    cases = [(lambda b: b.update(ts=None), "ts", "required field null (expected"),
             (lambda b: b.pop("ts"), "ts", "required field missing (expected"),
             (lambda b: b["user"].update(user_city=None), "user.user_city", "required feature null (expected"),
             (lambda b: b["user"].pop("user_city"), "user.user_city", "required feature missing (expected")]
    for edit, field, message in cases:
        body = _varied_body("hp")
        edit(body)
        with pytest.raises(RequestError) as error:
            parser.parse(body, now_ms=NOW_MS)
        assert (error.value.kind, error.value.field) == ("missing_field", field)
        assert error.value.message.startswith(message), error.value.message


def test_a_body_over_the_limit_is_read_up_to_a_bound_before_its_413(monkeypatch):
    """Read and thrown away up to DRAIN_BYTES past the limit (a client that sends its whole body first
    then gets the 413, not a reset), but not when its Content-Length alone is past that bound."""
    from starlette.requests import Request

    from mtfm.deployments import http_api

    monkeypatch.setattr(http_api, "DRAIN_BYTES", 5000)
    endpoint = http_api.RankEndpoint({"hp": RankRequestParser(REGISTRY, "hp", 10)}, 2000)

    def post(chunks: int, declared: int | None, kind: str = "body_too_large") -> tuple[int, int]:
        """(status, chunks of 1000 bytes the endpoint read) for a body of `chunks` such chunks."""
        read = 0

        async def receive():
            nonlocal read
            read += 1
            return {"type": "http.request", "body": b"x" * 1000, "more_body": read < chunks}

        headers = [(b"content-length", str(declared).encode())] if declared is not None else []
        scope = {"type": "http", "method": "POST", "path": "/hp/rank", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), *headers]}
        response = asyncio.run(endpoint.answer(Request(scope, receive), None, None))
        assert json.loads(response.body)["error"]["kind"] == kind
        return response.status_code, read

    assert post(2, declared=2000, kind="invalid_json") == (400, 2)  # at the limit: read as a body ("xx..." no JSON)
    assert post(2, declared=None, kind="invalid_json") == (400, 2)
    assert post(3, declared=3000) == (413, 3)
    assert post(6, declared=6000) == (413, 6)  # all of it: within the limit and the bound
    assert post(20, declared=None) == (413, 8)  # chunked: read until past limit + bound (8000 > 7000)
    assert post(20, declared=20_000) == (413, 0)  # declared past the bound: not read at all
