"""The aggregated user samples as training and evaluation read them (Ray Data).

`mtfm data aggregate` writes one Parquet dataset of user samples (one row per user and window);
training holds out its last `test_windows` windows for evaluation (`split_by_window`), and a model
restricted to some scenarios keeps the users with exposures in them (`keep_users_of`). A folder
that is not such a dataset, a part that cannot be read, parts of different aggregations and the
output of an aggregation that has not finished are refused here, each by name, before any worker
starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from mtfm.platform.aggregate import SAMPLES, UNFINISHED
from mtfm.platform.registry import events_column, exposures_column, scenario_of_column, user_column
from mtfm.platform.run_lock import DRIVER_FILE, live_holder


class Windows(NamedTuple):
    """The windows (their start, epoch ms) the samples hold, in order, cut into training and held-out ones,
    and how many samples (rows) the training windows hold."""
    train: list[int]
    test: list[int]
    train_rows: int = 0


def split_by_window(samples: str | Path, test_windows: int, need_train: bool = True):
    """(train, test, Windows): Ray Datasets of the samples, the last `test_windows` windows the test set.
    Without `need_train` (evaluation) the test set may be every window, and the train set empty."""
    import ray.data
    from ray.data.expressions import col

    path = samples_folder(str(samples))
    try:
        ds = ray.data.read_parquet(path)
        names = ds.schema().names
    except Exception as exc:  # Arrow names the problem but not the file
        name_the_unreadable_parquet(path, exc)
        raise
    refuse_what_is_not_samples(path, names)
    try:
        parts = sample_files(path)
        refuse_parts_with_other_columns(parts)
        rows_per_window = rows_per_window_of(parts)
    except Exception as exc:  # a file whose footer the schema's read did not reach
        name_the_unreadable_parquet(path, exc)
        raise
    windows = list(rows_per_window)
    if len(windows) < test_windows + need_train:
        raise ValueError(f"{path}: {len(windows)} window(s) of data, but test_windows={test_windows} are held out "
                         "for evaluation: generate more days, or hold out fewer (`--test-windows N`, or test_windows in the train "
                         "config)")
    cut = windows[-test_windows]
    return (ds.filter(expr=col("window") < cut), ds.filter(expr=col("window") >= cut),
            Windows(windows[:-test_windows], windows[-test_windows:],
                    sum(rows_per_window[w] for w in windows[:-test_windows])))


def refuse_what_is_not_samples(path: str, names: list[str]) -> None:
    """Aggregated samples have a window column and a scenario's columns; raw logs, say, have neither."""
    if "window" not in names or not any(scenario_of_column(name) for name in names):
        raise ValueError(f"{path}: not aggregated samples (its columns: {', '.join(names[:6])}"
                         f"{', ...' if len(names) > 6 else ''}); aggregate the raw logs first: mtfm data aggregate "
                         "--raw RAW_DIR --out AGG_DIR, then pass AGG_DIR")


def sample_files(path: str) -> tuple:
    """The parts of the samples at `path`: (file system, its Parquet files), those Ray Data reads:
    `*.parquet`, none under a name starting with `.` or `_`."""
    import pyarrow.fs as pafs

    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(path).resolve())
    if fs.get_file_info(root).type == pafs.FileType.File:
        return fs, [root]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return fs, sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                      and not any(p.startswith((".", "_")) for p in f.path[len(root):].split("/")))


def refuse_parts_with_other_columns(parts: tuple) -> None:
    """Every part of one aggregation has the same columns, of the same types (the aggregation casts
    each to the registry's schema): a part that lacks some, or whose event structs lack a field,
    would be read with them null, training its users silently without those features. Reads each
    file's footer only."""
    import pyarrow.parquet as pq

    fs, files = parts
    first = None
    for file in files:
        schema = pq.read_schema(file, filesystem=fs)
        types = {field.name: field.type for field in schema}
        if first is None:
            first = (file, types)
            continue
        lacks, extra = sorted(first[1].keys() - types.keys()), sorted(types.keys() - first[1].keys())
        typed = sorted(name for name in types.keys() & first[1].keys() if types[name] != first[1][name])
        if lacks or extra or typed:
            differs = "; ".join(f"{what} {columns[:5]}{' ...' if len(columns) > 5 else ''}" for what, columns in
                                (("lacks", lacks), ("has besides", extra), ("has another type in", typed)) if columns)
            raise ValueError(f"{file}: its columns differ from those of {first[0]} ({differs}): the parts of one "
                             "samples folder come from one aggregation; aggregate the raw logs again (--overwrite)")


def rows_per_window_of(parts: tuple) -> dict[int, int]:
    """How many samples each window holds, windows in order, from the `window` column alone, read here batch
    by batch (Ray Data's `groupby` starts hash-aggregate workers for it)."""
    import collections

    import pyarrow.dataset as pads

    fs, files = parts
    rows: collections.Counter = collections.Counter()
    for batch in pads.dataset(files, filesystem=fs, format="parquet").to_batches(columns=["window"]):
        counts = batch.column(0).drop_null().value_counts()
        rows.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
    return dict(sorted(rows.items()))


def name_the_unreadable_parquet(path: str, error: Exception) -> None:
    """Raises a ValueError naming the first *.parquet file under a local `path` whose footer cannot
    be read (Ray Data reads those files only), if there is one; `error` was what reading them gave."""
    import pyarrow.parquet as pq

    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).rglob("*.parquet"))
    for file in files:
        try:
            pq.read_metadata(file)
        except Exception:  # noqa: BLE001 - any failure to read its footer names this file
            raise ValueError(f"{file}: not readable as Parquet ({error})") from error


def samples_fingerprint(samples: str) -> str:
    """Names and sizes of the samples' parts, hashed: what a run's checkpoints record of the data they
    were trained on, for a resume mid-epoch to tell samples written again at the same path."""
    import hashlib

    filesystem, files = sample_files(samples)
    parts = "\n".join(f"{info.path}\t{info.size}" for info in filesystem.get_file_info(files))
    return hashlib.sha1(parts.encode()).hexdigest()[:16]


def samples_folder(samples: str) -> str:
    """The aggregate's samples/ folder if `samples` is its --out folder, else `samples` itself: a
    local path, or a URI that Ray Data reads (s3://, gs://, file://, ...)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(samples) if "://" in samples else (
        pyarrow.fs.LocalFileSystem(), str(Path(samples).resolve()))
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound and "_ray_pkg_" in path:
        raise FileNotFoundError(f"{samples}: not in the copy of the job's working directory that Ray made ({path}): "
                                "`ray job submit --working-dir` leaves out what .gitignore names, such as data/; pass "
                                "--data as an absolute path on storage every node sees, or a URI (s3://...)")
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{samples}: no aggregated samples here (run `mtfm data synth` and `mtfm data "
                                "aggregate` first, or `mtfm quickstart`; pass the aggregate's samples/ folder or its "
                                "--out folder)")
    if filesystem.get_file_info(f"{path}/{SAMPLES}").type == pyarrow.fs.FileType.Directory:
        refuse_an_unfinished_aggregation(filesystem, f"{path}/{SAMPLES}", samples)
        return f"{samples.rstrip('/')}/{SAMPLES}"
    folder = path if filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory else path.rsplit("/", 1)[0]
    refuse_an_unfinished_aggregation(filesystem, folder, samples)
    return samples


def local_samples_schema(samples: str):
    """The schema of local aggregated samples (their first part's), read with pyarrow before Ray starts, so that
    samples a model cannot read are refused at once, as is what is not samples (raw logs, say); None for a URI (it
    may need the cluster's credentials), or a folder without parts or with a part that does not read
    (`split_by_window` names those)."""
    import pyarrow.parquet as pq

    if "://" in str(samples):
        return None
    path = samples_folder(str(samples))
    fs, files = sample_files(path)
    try:
        schema = pq.read_schema(files[0], filesystem=fs) if files else None
    except Exception:  # noqa: BLE001 - an unreadable part is named by split_by_window
        return None
    if schema is not None:
        refuse_what_is_not_samples(path, schema.names)
    return schema


def refuse_an_unfinished_aggregation(filesystem, folder: str, samples: str) -> None:
    """Samples of an aggregation that has not finished (its samples/ `folder` holds UNFINISHED until
    it writes its summary) are those of only some users: one still running, or one interrupted.
    Training on them would go on without a word."""
    from pyarrow.fs import FileType, LocalFileSystem

    if filesystem.get_file_info(f"{folder}/{UNFINISHED}").type == FileType.NotFound:
        return
    out = folder.rstrip("/").rsplit("/", 1)[0]
    if isinstance(filesystem, LocalFileSystem) and live_holder(Path(out)) is not None:
        raise ValueError(f"{samples}: an aggregation is still writing these samples ({out}/{DRIVER_FILE}); wait "
                         "for it to finish")
    raise ValueError(f"{samples}: the output of an aggregation that did not finish ({folder}/{UNFINISHED}: "
                     "interrupted, or still running elsewhere), so it holds only some users' samples; aggregate the "
                     "raw logs again (mtfm data aggregate ... --overwrite)")


def keep_users_of(ds, scenarios: list[str]):
    """The rows with at least one exposure in `scenarios`: a model restricted to some scenarios
    learns nothing from the others' users, and a batch of only those would give it no loss."""
    columns = [exposures_column(s) for s in scenarios if exposures_column(s) in ds.schema().names]
    if not columns:
        raise ValueError(f"the samples hold no exposures of {scenarios}")

    def keep(table):
        import pyarrow.compute as pc

        mask = pc.fill_null(pc.greater(pc.list_value_length(table[columns[0]]), 0), False)
        for column in columns[1:]:
            mask = pc.or_(mask, pc.fill_null(pc.greater(pc.list_value_length(table[column]), 0), False))
        return table.filter(mask)

    return ds.map_batches(keep, batch_format="pyarrow")


def scenarios_in(names: list[str]) -> set[str]:
    """The scenarios whose exposure columns are among the samples' column `names`."""
    return {scenario_of_column(name) for name in names} - {None}


def refuse_samples_that_do_not_fit(schema, data: str, registry, scenarios: list[str], *, whose: str, remedy: str,
                                   remedy_for_scenarios: str = "", config_dir_flag: bool = False) -> None:
    """Samples (Arrow `schema`) without the columns of each of `scenarios` and of `registry`'s sequences,
    or whose columns lack a feature the registry declares or hold it as another type: aggregated before
    those were registered or with another registry. Reading them would fail in the workers (each failure
    retried) or mid-evaluation. `whose` names what needs them, `remedy` what to do; `config_dir_flag`: the
    command takes --config-dir, so samples of none of `scenarios` name the config dirs beside that register theirs."""
    names, sequences = schema.names, list(registry.sequences)
    held = scenarios_in(names)
    if not held & set(scenarios):
        nearby = _config_dirs_registering(held, Path(registry.config_dir)) if config_dir_flag else []
        found = (f"{' and '.join(map(str, nearby))} register{'s' if len(nearby) == 1 else ''} them: pass "
                 f"--config-dir {nearby[0]}, or " if nearby else "")
        raise ValueError(f"{data}: no exposures of the scenarios of {whose} ({list(scenarios)}); the samples hold "
                         f"{sorted(held)}: aggregated with another registry? {found}{remedy}")
    why = "the samples were aggregated before they were registered, or with another registry"
    lacking = [s for s in scenarios if s not in held]
    if lacking:
        raise ValueError(f"{data}: no columns of scenario(s) {lacking}, which {whose} covers: {why}; {remedy}"
                         f"{remedy_for_scenarios}")
    lacking = [q for q in sequences if events_column(q) not in names]
    if lacking:
        raise ValueError(f"{data}: no column of sequence(s) {lacking}, which {whose} reads: {why}; {remedy}")
    expected = registry.aggregated_schema()
    read = ([user_column(s) for s in scenarios] + [exposures_column(s) for s in scenarios]
            + [events_column(q) for q in sequences])
    differences = [d for column in read if column in expected.names
                   for d in _feature_differences(column, expected.field(column).type,
                                                 schema.field(column).type if column in names else None)]
    if differences:
        raise ValueError(f"{data}: {'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''} ({whose} "
                         f"reads them): the samples were aggregated before these features were declared as they are "
                         f"now, or with another registry; {remedy}")


def _config_dirs_registering(scenarios: set[str], config_dir: Path) -> list[Path]:
    """Config dirs inside `config_dir` or beside it (as configs/movielens is to configs) whose scenarios/ has a YAML
    for each of `scenarios`: where samples aggregated with another registry of this project came from."""
    if not scenarios:
        return []
    candidates = sorted({*config_dir.glob("*/scenarios"), *config_dir.parent.glob("*/scenarios")})
    return [folder.parent for folder in candidates if folder.parent.resolve() != config_dir.resolve()
            and all((folder / f"{name}.yaml").is_file() or (folder / f"{name}.yml").is_file() for name in scenarios)]


def _feature_differences(column: str, expected, found) -> list[str]:
    """How the samples' `column` (Arrow type `found`; None: no such column) differs from the registry's
    `expected` type: the features it lacks and those of another type. Extra fields are left alone."""
    import pyarrow as pa

    if found is None:
        return [f"no column {column}"]
    if pa.types.is_list(expected) and pa.types.is_list(found):
        expected, found = expected.value_type, found.value_type
    if not (pa.types.is_struct(expected) and pa.types.is_struct(found)):
        return [] if _same_type(expected, found) else [f"column {column} is {found}, expected {expected}"]
    have = {found.field(i).name: found.field(i).type for i in range(found.num_fields)}
    out = []
    for i in range(expected.num_fields):
        field = expected.field(i)
        if field.name not in have:
            out.append(f"column {column} has no feature {field.name}")
        elif not _same_type(field.type, have[field.name]):
            out.append(f"column {column}: feature {field.name} is {have[field.name]}, the registry declares "
                       f"{field.type}")
    return out


def _same_type(a, b) -> bool:
    """Arrow types equal but for the names of list items (Parquet writes `element` where Arrow wrote `item`)."""
    import pyarrow as pa

    if pa.types.is_list(a) and pa.types.is_list(b):
        return _same_type(a.value_type, b.value_type)
    return a.equals(b)
