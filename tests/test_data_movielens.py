"""MovieLens adapter: the real ml-100k from the recbole package, and a tiny folder of atomic files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mtfm.platform.aggregate import aggregate
from mtfm.platform.movielens import MovieLensFormatError, convert_movielens
from mtfm.platform.registry import Registry, load_registry

ML_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "movielens"
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(ML_CONFIGS)


def test_real_ml100k(registry, tmp_path):
    pytest.importorskip("recbole", reason="pip install --no-deps recbole==1.2.1")
    counts = convert_movielens(registry, tmp_path, **QUIET)
    assert sum(counts[f"exposures/{s}"] for s in registry.scenarios) == 100_000
    assert counts["behaviors/history"] == counts["behaviors/realtime"] == 100_000
    for name in registry.scenarios:
        table = pq.read_table(tmp_path / "exposures" / name)
        assert table.schema.equals(registry.exposure_schema(name))
        click, order = table["click"].to_numpy(), table["order"].to_numpy()
        assert 0.45 < click.mean() < 0.65 and 0.15 < order.mean() < 0.3 and not (order > click).any()
    assert pq.read_table(tmp_path / "behaviors" / "history").schema.equals(registry.behavior_schema("history"))


def _write_atomic(folder: Path) -> None:
    folder.mkdir()
    (folder / "tiny.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5\t86400\n1\t11\t3\t86500\n1\t10\t4\t172900\n2\t11\t4\t86400\n3\t12\t1\t90000\n")
    (folder / "tiny.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t20\tF\tstudent\t12345\n2\t30\tM\twriter\tT8H1N\n3\t61\tM\tretired\t55555\n")
    (folder / "tiny.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tA\t1990\tComedy Drama\n11\tB\tunknown\tHorror\n12\tC\t1970\tDrama\n")


def test_tiny_folder_end_to_end(ray_cluster, registry, tmp_path):
    _write_atomic(tmp_path / "atomic")
    convert_movielens(registry, tmp_path / "raw", path=tmp_path / "atomic", **QUIET)
    young = pq.read_table(tmp_path / "raw" / "exposures" / "young").to_pylist()
    assert [(r["movie_id"], r["click"], r["order"]) for r in young] == [(10, 1, 1), (11, 0, 0), (10, 1, 0)]
    assert young[0]["ts"] == 86_400_000 and young[0]["genres"] == [1, 2]  # Comedy, Drama of (Comedy, Drama, Horror)
    assert young[0]["release_year"] == 90.0 and young[1]["release_year"] == 0.0
    adult = pq.read_table(tmp_path / "raw" / "exposures" / "adult").to_pylist()
    assert adult[0]["zip_region"] == 0 and adult[0]["occupation"] == 3  # a Canadian zip; writer after retired, student
    senior = pq.read_table(tmp_path / "raw" / "exposures" / "senior").to_pylist()
    assert senior[0]["age"] == 61.0 and senior[0]["release_decade"] == 8

    summary = aggregate(registry, tmp_path / "raw", tmp_path / "agg", **QUIET)
    assert summary["exposures_in"] == summary["exposures_out"] == 5 and summary["samples_out"] == 4
    rows = {(r["user_id"], r["window"]): r for r in pq.read_table(tmp_path / "agg" / "samples").to_pylist()}
    day2 = rows[(1, 86_400_000 * 2)]
    assert [e["movie_id"] for e in day2["history__events"]] == [10, 11] and day2["young__user"]["gender"] == 2
    assert day2["adult__exposures"] == [] and day2["adult__user"] is None
    # Read with the default registry (no --config-dir): the error names the config dir that registers them.
    from mtfm.platform.samples import local_samples_schema, refuse_samples_that_do_not_fit

    default = load_registry(ML_CONFIGS.parent)
    with pytest.raises(ValueError, match=rf"the samples hold \['adult', 'senior', 'young'\]: aggregated with another "
                                         rf"registry\? {ML_CONFIGS} registers them: pass --config-dir {ML_CONFIGS}, or "
                                         "aggregate again"):
        refuse_samples_that_do_not_fit(local_samples_schema(str(tmp_path / "agg")), str(tmp_path / "agg"), default,
                                       list(default.scenarios), whose="model tiny", remedy="aggregate again",
                                       config_dir_flag=True)
    with pytest.raises(ValueError, match=r"aggregated with another registry\? aggregate again$"):  # as `mtfm eval`
        refuse_samples_that_do_not_fit(local_samples_schema(str(tmp_path / "agg")), str(tmp_path / "agg"), default,
                                       list(default.scenarios), whose="checkpoint", remedy="aggregate again")


def test_clear_errors(registry, tmp_path, monkeypatch):
    _write_atomic(tmp_path / "atomic")
    (tmp_path / "atomic" / "tiny.user").write_text("user_id:token\tage:token\n1\t20\n")
    with pytest.raises(MovieLensFormatError, match=r"tiny.user: missing field\(s\) gender, occupation, zip_code"):
        convert_movielens(registry, tmp_path / "raw", path=tmp_path / "atomic", **QUIET)
    _write_atomic(tmp_path / "blank")
    inter = tmp_path / "blank" / "tiny.inter"
    inter.write_text(inter.read_text().replace("1\t11\t3\t86500", "1\t11\t\t86500"))  # a rating left empty
    with pytest.raises(MovieLensFormatError, match=r"tiny.inter: field rating: expected a number, found an empty "
                                                   r"value \(data row 2\)"):
        convert_movielens(registry, tmp_path / "raw", path=tmp_path / "blank", **QUIET)
    inter.write_text(inter.read_text().replace("1\t11\t\t86500", "1\t11\t3\tsoon"))
    with pytest.raises(MovieLensFormatError, match=r"field timestamp: expected a number, found 'soon' \(data row 2\)"):
        convert_movielens(registry, tmp_path / "raw", path=tmp_path / "blank", **QUIET)
    with pytest.raises(MovieLensFormatError, match="use --config-dir configs/movielens"):
        convert_movielens(load_registry(ML_CONFIGS.parent), tmp_path / "raw", **QUIET)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder \(--path: a folder of RecBole atomic"):
        convert_movielens(registry, tmp_path / "raw", path=tmp_path / "nowhere", **QUIET)
    assert not (tmp_path / "raw").exists()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1"):
        convert_movielens(registry, tmp_path / "raw", **QUIET)
