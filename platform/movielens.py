"""MovieLens-100K adapter (`mtfm data movielens`): RecBole atomic files -> the raw-log contract.

Three scenarios by user age (configs/movielens: young < 25, adult 25-34, senior >= 35), each
with its own features. Every rating is an exposure (click = rating >= 4, order = rating == 5,
one request per user and second) and also an event of both shared sequences, so a user's
earlier ratings are the history and the ratings inside the window the real-time events.
Timestamps are seconds in the data and milliseconds here.

The input is a folder of RecBole atomic files (`*.inter`, `*.user`, `*.item`: tab-separated,
header `name:type`), by default ml-100k as shipped inside the recbole package (located without
importing it; `pip install --no-deps recbole==1.2.1`).
"""
from __future__ import annotations

import csv
import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm.platform.rawlog import prepare_raw_out
from mtfm.platform.registry import Registry

AGE_GROUPS = {"young": (0, 25), "adult": (25, 35), "senior": (35, 1000)}
REQUIRED_FIELDS = {
    "inter": ("user_id", "item_id", "rating", "timestamp"),
    "user": ("user_id", "age", "gender", "occupation", "zip_code"),
    "item": ("item_id", "release_year", "class"),
}
INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


class MovieLensFormatError(ValueError):
    """An input file or config does not fit the adapter; the message names the file and field."""


def recbole_ml100k() -> Path:
    """The ml-100k folder inside the installed recbole package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MovieLens-100K comes with the recbole package, which is not installed: "
                                f"run `{INSTALL_HINT}`, or pass --path to a folder of RecBole atomic files")
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not found in the installed recbole; run `{INSTALL_HINT}`")
    return folder


def read_atomic(folder: Path, suffix: str) -> pd.DataFrame:
    """One RecBole atomic file of `folder` (`*.<suffix>`), every column as text, types dropped from the header."""
    files = sorted(folder.glob(f"*.{suffix}"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one *.{suffix} RecBole atomic file, found {len(files)}")
    df = pd.read_csv(files[0], sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    df.columns = [c.split(":")[0] for c in df.columns]
    missing = [f for f in REQUIRED_FIELDS[suffix] if f not in df.columns]
    if missing:
        raise MovieLensFormatError(f"{files[0]}: missing field(s) {', '.join(missing)} "
                         f"(expected {', '.join(REQUIRED_FIELDS[suffix])}; found {', '.join(df.columns)})")
    df.attrs["file"] = str(files[0])
    return df


def _ids(values: pd.Series) -> np.ndarray:
    """Integer ids: the token itself when it is a number, else a stable hash of it."""
    numeric = pd.to_numeric(values, errors="coerce")
    hashed = np.array([zlib.crc32(v.encode()) for v in values[numeric.isna()]], dtype=np.int64)
    out = numeric.fillna(0).to_numpy(np.int64, copy=True)
    out[numeric.isna().to_numpy()] = hashed
    return out


def _vocabulary_ids(values: pd.Series) -> np.ndarray:
    """1-based ids of the sorted distinct values (0 for empty)."""
    vocab = sorted(set(values) - {""})
    return values.map({v: i + 1 for i, v in enumerate(vocab)}).fillna(0).to_numpy(np.int64)


def _number(values: pd.Series, file: str, field: str, strict: bool = True) -> np.ndarray:
    """Numbers; a value that is not one (an empty one included) is an error if `strict`, else NaN
    (ml-100k has 'unkonwn' years)."""
    parsed = pd.to_numeric(values.replace("", np.nan), errors="coerce")
    bad = parsed.isna()
    if strict and bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        found = repr(values.iloc[row]) if values.iloc[row] != "" else "an empty value"
        raise MovieLensFormatError(f"{file}: field {field}: expected a number, found {found} (data row {row + 1})")
    return parsed.to_numpy(np.float64)


def load_ratings(folder: Path) -> pd.DataFrame:
    """One row per rating with every column any MovieLens scenario may ask for."""
    inter, users, items = (read_atomic(folder, s) for s in ("inter", "user", "item"))
    ratings = pd.DataFrame({
        "user_id": _ids(inter["user_id"]), "movie_id": _ids(inter["item_id"]),
        "rating": _number(inter["rating"], inter.attrs["file"], "rating"),
        "ts": (_number(inter["timestamp"], inter.attrs["file"], "timestamp") * 1000).astype(np.int64),
    })
    user = pd.DataFrame({
        "user_id": _ids(users["user_id"]), "age_years": _number(users["age"], users.attrs["file"], "age"),
        "gender": users["gender"].map({"M": 1, "F": 2}).fillna(0).astype(np.int64),
        "occupation": _vocabulary_ids(users["occupation"]),
        "zip_region": users["zip_code"].str[:1].map(lambda c: int(c) + 1 if c.isdigit() else 0).astype(np.int64),
    })
    genre_lists = items["class"].str.split()
    genre_vocab = {g: i + 1 for i, g in enumerate(sorted({g for gs in genre_lists for g in gs}))}
    year = np.nan_to_num(_number(items["release_year"], items.attrs["file"], "release_year", strict=False))
    item = pd.DataFrame({
        "movie_id": _ids(items["item_id"]),
        "genres": [[genre_vocab[g] for g in gs] for gs in genre_lists],
        "release_year_abs": year,
    })
    df = ratings.merge(user, on="user_id", how="left", validate="many_to_one")
    df = df.merge(item, on="movie_id", how="left", validate="many_to_one")
    unknown_users = df["age_years"].isna()
    if unknown_users.any():
        raise MovieLensFormatError(f"{folder}: user {df.loc[unknown_users, 'user_id'].iloc[0]} rates but is not in the *.user file")
    df["genres"] = df["genres"].map(lambda g: g if isinstance(g, list) else [])
    df["release_year_abs"] = df["release_year_abs"].fillna(0)
    known = df["release_year_abs"] > 0
    rated_year = pd.to_datetime(df["ts"], unit="ms").dt.year
    df["release_year"] = np.where(known, df["release_year_abs"] - 1900, 0.0)
    df["release_decade"] = np.where(known, (df["release_year_abs"] - 1900) // 10 + 1, 0).astype(np.int64)
    df["movie_age_years"] = np.where(known, rated_year - df["release_year_abs"], 0.0)
    df["age"] = df["age_years"]
    df["click"] = (df["rating"] >= 4).astype(np.int8)
    df["order"] = (df["rating"] == 5).astype(np.int8)
    df["rating"] = df["rating"].round().astype(np.int64)
    # One request per user and second: ratings given together were shown together.
    df["request_id"] = df["user_id"] * 2**31 + df["ts"] // 1000
    return df.sort_values(["ts", "user_id", "movie_id"], kind="stable").reset_index(drop=True)


def _to_table(df: pd.DataFrame, schema: pa.Schema, where: str) -> pa.Table:
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise MovieLensFormatError(f"{where}: declares {', '.join(missing)}, which the MovieLens adapter does not provide "
                         f"(it provides: {', '.join(sorted(set(df.columns) - {'age_years', 'release_year_abs'}))})")
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def _write_by_month(table: pa.Table, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    month = pd.to_datetime(table["ts"].to_numpy(), unit="ms").strftime("%Y-%m").to_numpy()
    for m in np.unique(month):
        pq.write_table(table.filter(pa.array(month == m)), folder / f"{m}.parquet")


def convert_movielens(registry: Registry, out: str | Path, path: str | Path | None = None,
                      overwrite: bool = False, log=print) -> dict[str, int]:
    """Write MovieLens as raw logs for the registry's age scenarios and sequences; returns rows per table."""
    missing = [s for s in AGE_GROUPS if s not in registry.scenarios]
    if missing:
        raise MovieLensFormatError(f"{registry.config_dir}: scenario(s) {', '.join(missing)} not registered; the MovieLens "
                         f"adapter writes {', '.join(AGE_GROUPS)}: use --config-dir configs/movielens")
    folder = Path(path) if path else recbole_ml100k()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'} (--path: a "
                                "folder of RecBole atomic files, ml-100k.inter, .user and .item)")
    out = prepare_raw_out(out, overwrite)
    df = load_ratings(folder)
    log(f"read {len(df):,} ratings of {df['user_id'].nunique():,} users on {df['movie_id'].nunique():,} movies from {folder}")
    counts = {}
    for name, (low, high) in AGE_GROUPS.items():
        mine = df[(df["age_years"] >= low) & (df["age_years"] < high)]
        table = _to_table(mine, registry.exposure_schema(name), registry.scenarios[name].source)
        _write_by_month(table, out / "exposures" / name)
        counts[f"exposures/{name}"] = table.num_rows
        log(f"exposures/{name}: {table.num_rows:,} rows, {mine['user_id'].nunique():,} users, "
            f"click rate {mine['click'].mean():.3f}, order rate {mine['order'].mean():.3f}")
    for name, seq in registry.sequences.items():
        table = _to_table(df, registry.behavior_schema(name), seq.source)
        _write_by_month(table, out / "behaviors" / name)
        counts[f"behaviors/{name}"] = table.num_rows
        log(f"behaviors/{name}: {table.num_rows:,} rows ({seq.kind})")
    return counts
