"""The scenario registry: loads, validates and answers questions about the platform's configs.

Everything else (data aggregation, the model, training, evaluation, serving) asks the registry
what scenarios and sequences exist and what their features are; nothing else reads
`configs/scenarios/*.yaml` or `configs/sequences.yaml`.

Layout of a config directory (default `./configs`, else `MTFM_CONFIG_DIR`, else `--config-dir`):

    configs/sequences.yaml          the shared behaviour sequences (kind history or realtime)
    configs/scenarios/<name>.yaml   one file per scenario; dropping one in adds a scenario

A feature name means one thing everywhere: if two places declare `poi_id`, both declarations
must be identical (type, buckets, dim, ...), and the model shares one embedding table for it.
That is how a target item meets the same item in the behaviour sequences.

Every validation error names the file, the field (a dotted path) and what was expected; a
feature declared differently in two places names both.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from mtfm.platform.files import recorded_path

FEATURE_TYPES = ("categorical", "numeric", "categorical_list")
# The type-specific keys of a feature and the types they apply to.
TYPE_KEYS = {
    "buckets": ("categorical", "categorical_list"),
    "dim": ("categorical", "categorical_list"),
    "max_len": ("categorical_list",),
    "transform": ("numeric",),
}
NUMERIC_TRANSFORMS = ("none", "log1p", "symlog")
SEQUENCE_KINDS = ("history", "realtime")
TASK_KINDS = ("ctr", "ctcvr", "binary")
SERVING_BACKENDS = ("torch", "onnx", "tensorrt")
# Columns every raw log or aggregated sample has; no feature or task may take these names.
RESERVED_COLUMNS = ("user_id", "request_id", "ts", "window", "reason")  # reason: the quarantine's
# A checkpoint's registry may predate a reserved name (`reason`, reserved since 2026-12-06): it still loads.
SNAPSHOT_RESERVED_COLUMNS = ("user_id", "request_id", "ts", "window")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# The most rows a categorical feature's embedding table may have (int32's range; at dim 4 that table
# alone is 32 GiB): a larger `buckets` is a typo that would otherwise fail later, in the allocator.
MAX_BUCKETS = 2**31 - 1
SCENARIO_SUFFIXES = (".yaml", ".yml")


class RegistryError(ValueError):
    """A config is invalid. The message names the file, the field and what was expected."""

    def __init__(self, file: str | Path, field_path: str, message: str):
        self.file = str(file)
        self.field = field_path
        self.message = message
        super().__init__(f"{file}: {field_path}: {message}" if field_path else f"{file}: {message}")


@dataclass(frozen=True)
class Feature:
    """One input column. Categorical values are integer ids hashed into `buckets` rows."""

    name: str
    type: str
    required: bool = False
    buckets: int | None = None
    dim: int | None = None
    transform: str = "none"
    max_len: int | None = None
    description: str = ""

    @property
    def is_categorical(self) -> bool:
        return self.type in ("categorical", "categorical_list")

    def spec(self) -> dict[str, Any]:
        """What must match when the same name is declared twice (not the documentation)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("description", "required")}


@dataclass(frozen=True)
class Task:
    """A binary label column. `depends_on` names a task this one implies (order implies click)."""

    name: str
    kind: str
    depends_on: str | None = None
    description: str = ""


@dataclass(frozen=True)
class ServingConfig:
    """Per-scenario serving knobs; `deployments/serve.yaml` may override any of them."""

    replicas: int = 1
    max_ongoing_requests: int = 64
    max_batch_requests: int = 16
    max_batch_tokens: int = 65536
    batch_wait_timeout_s: float = 0.0
    max_candidates: int = 1000
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    backend: str = "torch"
    cuda_graphs: bool = True


def serving_conflict(cfg: ServingConfig) -> tuple[str, str] | None:
    """The knob that contradicts another one and what was expected of it, or None. The one place
    for these rules: the registry applies them to each scenario's `serving:` block, the Serve app
    builder again after serve.yaml's overrides."""
    if cfg.max_ongoing_requests < cfg.max_batch_requests:
        # A replica never holds more than max_ongoing_requests, so batches could never fill.
        return "max_ongoing_requests", (
            f"max_ongoing_requests {cfg.max_ongoing_requests} is below max_batch_requests {cfg.max_batch_requests}; "
            f"expected at least {cfg.max_batch_requests} (twice that, {2 * cfg.max_batch_requests}, lets the next "
            "batch fill while one is scored)")
    return None


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic log generator (`mtfm data synth`) for one scenario."""

    exposures_per_user_day: float = 10.0
    active_user_fraction: float = 1.0
    label_rates: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    user_features: tuple[Feature, ...]
    item_features: tuple[Feature, ...]
    cross_features: tuple[Feature, ...]
    tasks: tuple[Task, ...]
    serving: ServingConfig
    synthetic: SyntheticConfig
    source: str

    @property
    def features(self) -> tuple[Feature, ...]:
        return self.user_features + self.item_features + self.cross_features

    @property
    def exposure_features(self) -> tuple[Feature, ...]:
        """The per-exposure features (item and cross) that form a T-token with the user's."""
        return self.item_features + self.cross_features

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


@dataclass(frozen=True)
class Sequence:
    """A shared behaviour log: `history` events precede the window (H-tokens), `realtime`
    events fall inside it (R-tokens)."""

    name: str
    kind: str
    max_len: int
    features: tuple[Feature, ...]
    description: str
    events_per_user_day: float
    source: str


@dataclass(frozen=True)
class Registry:
    """All scenarios (sorted by name) and sequences (in file order) of one config directory."""

    config_dir: Path
    scenarios: dict[str, Scenario]
    sequences: dict[str, Sequence]

    def scenario(self, name: str) -> Scenario:
        if name not in self.scenarios:
            raise KeyError(f"unknown scenario {name!r}; registered: {', '.join(self.scenarios) or 'none'}")
        return self.scenarios[name]

    def sequence(self, name: str) -> Sequence:
        if name not in self.sequences:
            raise KeyError(f"unknown sequence {name!r}; registered: {', '.join(self.sequences) or 'none'}")
        return self.sequences[name]

    @property
    def features(self) -> dict[str, Feature]:
        """Every feature by name (one spec per name, checked at load time)."""
        out: dict[str, Feature] = {}
        for seq in self.sequences.values():
            out.update((f.name, f) for f in seq.features)
        for scn in self.scenarios.values():
            out.update((f.name, f) for f in scn.features)
        return out

    @property
    def history_sequences(self) -> tuple[Sequence, ...]:
        return tuple(s for s in self.sequences.values() if s.kind == "history")

    @property
    def realtime_sequences(self) -> tuple[Sequence, ...]:
        return tuple(s for s in self.sequences.values() if s.kind == "realtime")

    # ------------------------------------------------------------ data contracts (DESIGN.md)

    def exposure_schema(self, scenario: str) -> pa.Schema:
        """Raw log `exposures/<scenario>/`: one row per exposure."""
        scn = self.scenario(scenario)
        return pa.schema([pa.field("user_id", pa.int64(), False), pa.field("request_id", pa.int64()),
                          pa.field("ts", pa.int64(), False)]
                         + [feature_field(f) for f in scn.features]
                         + [pa.field(t, pa.int8()) for t in scn.task_names])

    def behavior_schema(self, sequence: str) -> pa.Schema:
        """Raw log `behaviors/<sequence>/`: one row per user action."""
        seq = self.sequence(sequence)
        return pa.schema([pa.field("user_id", pa.int64(), False), pa.field("ts", pa.int64(), False)]
                         + [feature_field(f) for f in seq.features])

    def aggregated_schema(self) -> pa.Schema:
        """Aggregated samples: one row per (user, window).

        `<scenario>__user` is the user's features in that scenario (from its earliest exposure in
        the window; null if the user had none there; no column for a scenario without user
        features: Parquet has no struct of no fields); `<scenario>__exposures` the window's
        exposures sorted by ts (empty if none); `<sequence>__events` the sequence's events
        sorted by ts, newest `max_len` kept (history: before the window; realtime: inside it).
        """
        fields = [pa.field("user_id", pa.int64(), False), pa.field("window", pa.int64(), False)]
        for scn in self.scenarios.values():
            if scn.user_features:
                fields.append(pa.field(user_column(scn.name), pa.struct([feature_field(f) for f in scn.user_features])))
            exposure = pa.struct([pa.field("request_id", pa.int64()), pa.field("ts", pa.int64())]
                                 + [feature_field(f) for f in scn.exposure_features]
                                 + [pa.field(t, pa.int8()) for t in scn.task_names])
            fields.append(pa.field(exposures_column(scn.name), pa.list_(exposure)))
        for seq in self.sequences.values():
            event = pa.struct([pa.field("ts", pa.int64())] + [feature_field(f) for f in seq.features])
            fields.append(pa.field(events_column(seq.name), pa.list_(event)))
        return pa.schema(fields)

    def to_dict(self) -> dict[str, Any]:
        """A plain snapshot (stored in checkpoints); `Registry.from_dict` rebuilds it."""
        return {
            # absolute, for a resume from another folder to find it (a snapshot's own name stays as it is)
            "config_dir": (recorded_path(Path(self.config_dir).absolute()) if Path(self.config_dir).is_dir()
                           else str(self.config_dir)),
            "sequences": {n: _raw_sequence(s) for n, s in self.sequences.items()},
            "scenarios": {n: _raw_scenario(s) for n, s in self.scenarios.items()},
        }

    def write_config_dir(self, out: str | Path) -> list[Path]:
        """This registry as a config dir `out` (a new or empty folder): sequences.yaml and one
        scenarios/<name>.yaml each, which `load_registry` reads back as this registry. What a
        checkpoint was trained with, to serve or resume it with (`mtfm scenarios export`)."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RegistryError(out, "", "expected a new or empty folder to write the config dir into")
        try:
            (out / "scenarios").mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a parent folder should be, no permission
            raise RegistryError(out, "", f"cannot be made ({exc.strerror}: {exc.filename})") from exc
        sequences = [_raw_sequence(s) | {"features": [declared_feature(f) for f in s.features]}
                     for s in self.sequences.values()]
        files = {out / "sequences.yaml": {"sequences": sequences}}
        for name, s in self.scenarios.items():
            files[out / "scenarios" / f"{name}.yaml"] = _raw_scenario(s) | {
                group: [declared_feature(f) for f in getattr(s, group)]
                for group in ("user_features", "item_features", "cross_features")}
        for path, raw in files.items():  # a feature, a task, a knob block on one line each, as configs/ writes them
            path.write_text(dump_yaml(raw, sort_keys=False, default_flow_style=None, width=120))
        return list(files)

    @classmethod
    def from_dict(cls, snapshot: dict[str, Any]) -> "Registry":
        seqs = parse_sequences({"sequences": list(snapshot["sequences"].values())}, "<snapshot>/sequences",
                                snapshot=True)
        scns = {}
        for name, raw in snapshot["scenarios"].items():
            scns[name] = _parse_scenario(raw, f"<snapshot>/scenarios/{name}", expected_name=name, snapshot=True)
        return _assemble(Path(snapshot.get("config_dir", "<snapshot>")), seqs, scns)


def user_column(scenario: str) -> str:
    return f"{scenario}__user"


def exposures_column(scenario: str) -> str:
    return f"{scenario}{_EXPOSURES}"


def scenario_of_column(column: str) -> str | None:
    """The scenario whose exposures an aggregated-samples column holds; None for any other column."""
    return column[: -len(_EXPOSURES)] if column.endswith(_EXPOSURES) else None


_EXPOSURES = "__exposures"


def events_column(sequence: str) -> str:
    return f"{sequence}__events"


def feature_field(f: Feature) -> pa.Field:
    """The Arrow type of a feature: categorical ids int64, numeric float32, lists of int64."""
    arrow_type = {"categorical": pa.int64(), "numeric": pa.float32(), "categorical_list": pa.list_(pa.int64())}[f.type]
    return pa.field(f.name, arrow_type)


def resolve_config_dir(config_dir: str | Path | None = None) -> Path:
    """`config_dir` if given, else `$MTFM_CONFIG_DIR`, else `./configs`."""
    return Path(config_dir or os.environ.get("MTFM_CONFIG_DIR") or "configs")


def load_registry(config_dir: str | Path | None = None) -> Registry:
    root = resolve_config_dir(config_dir)
    if not root.is_dir():
        what = "a file, not a config directory" if root.exists() else "config directory not found"
        raise RegistryError(root, "", f"{what} (expected a folder holding sequences.yaml and scenarios/*.yaml; "
                            "set --config-dir or MTFM_CONFIG_DIR)")
    seq_file = sequences_file(root)
    sequences = parse_sequences(read_yaml_mapping(seq_file), str(seq_file))
    scn_dir = root / "scenarios"
    files = scenario_files(scn_dir)
    if not files:
        raise RegistryError(scn_dir, "", "no scenario files found (expected at least one scenarios/<name>.yaml)")
    scenarios: dict[str, Scenario] = {}
    for path in files:
        if path.stem in scenarios:  # grocery.yaml and grocery.yml: one would silently replace the other
            raise RegistryError(path, "name", f"scenario {path.stem!r} is also declared in "
                                f"{scenarios[path.stem].source}; keep one of the two files")
        scenarios[path.stem] = _parse_scenario(read_yaml_mapping(path), str(path), expected_name=path.stem)
    return _assemble(root, sequences, dict(sorted(scenarios.items())))


def sequences_file(root: Path) -> Path:
    """`root/sequences.yaml`, checked to be a file."""
    path = root / "sequences.yaml"
    if path.is_dir():
        raise RegistryError(path, "", "a directory, not a file: expected the YAML file declaring the config "
                            "directory's shared sequences")
    if not path.is_file():
        raise RegistryError(path, "", "file not found: every config directory declares its shared sequences here")
    return path


def scenario_files(scn_dir: Path) -> list[Path]:
    """The files the registry reads as scenarios: `scn_dir`'s *.yaml, then its *.yml, each sorted by
    name. Hidden files are skipped, as editors keep lock and swap files there (`.#hp.yaml`, often a
    link to nowhere); anything else named like a scenario file that cannot be read as one is an error."""
    if scn_dir.exists() and not scn_dir.is_dir():
        raise RegistryError(scn_dir, "", "a file, not a folder: expected the folder of scenarios/<name>.yaml files")
    files = []
    for path in sorted(scn_dir.iterdir()) if scn_dir.is_dir() else ():
        if path.name.startswith(".") or path.suffix.lower() not in SCENARIO_SUFFIXES:
            continue
        if path.suffix not in SCENARIO_SUFFIXES:  # hp.YAML would be skipped unseen
            raise RegistryError(path, "", f"a scenario file's name ends in .yaml or .yml, lower case; rename it "
                                f"{path.stem}.yaml")
        if path.is_dir():
            raise RegistryError(path, "", "a directory, not a file: every scenarios/*.yaml (or .yml) is read as a "
                                "scenario; rename the folder or move it out of scenarios/")
        if not path.is_file():
            what = "a link to a file that does not exist" if path.is_symlink() else "not a regular file"
            raise RegistryError(path, "", f"{what} (expected a scenario file); remove it or make it one")
        files.append(path)
    return sorted(files, key=lambda p: (p.suffix == ".yml", p.name))


def _assemble(root: Path, sequences: dict[str, Sequence], scenarios: dict[str, Scenario]) -> Registry:
    clash = set(sequences) & set(scenarios)
    if clash:
        name = sorted(clash)[0]
        raise RegistryError(scenarios[name].source, "name",
                            f"{name!r} is already the name of a sequence in {sequences[name].source}; names must be unique")
    _check_feature_consistency(root, sequences, scenarios)
    return Registry(root, scenarios, sequences)


def _check_feature_consistency(root: Path, sequences: dict[str, Sequence], scenarios: dict[str, Scenario]) -> None:
    """Every declaration of a feature name has the same spec. A clash is between two places (two
    files, or two in sequences.yaml), so the error is the config directory's and names both, in
    load order."""
    seen: dict[str, tuple[Feature, str]] = {}
    places = [(s.source, f"sequences[{j}].features", s.features) for j, s in enumerate(sequences.values())]
    for s in scenarios.values():
        places += [(s.source, "user_features", s.user_features), (s.source, "item_features", s.item_features),
                   (s.source, "cross_features", s.cross_features)]
    for source, section, feats in places:
        for i, f in enumerate(feats):
            where = f"{source} ({section}[{i}])"
            if f.name in seen and seen[f.name][0].spec() != f.spec():
                first, first_where = seen[f.name]
                raise RegistryError(root, "", f"feature {f.name} is declared differently in {first_where} and {where}: "
                                    f"{_spec_difference(first, f)}; expected identical declarations (a feature name "
                                    "means one thing everywhere): rename one of them or make them identical")
            seen.setdefault(f.name, (f, where))


def _spec_difference(a: Feature, b: Feature) -> str:
    """What differs, e.g. "type categorical vs numeric" or "buckets 64 vs 32": the type, and the
    keys meaningful for both types (a numeric's transform is no concern of a categorical)."""
    keys = ["type"] + [k for k, types in TYPE_KEYS.items() if a.type in types and b.type in types]
    return ", ".join(f"{k} {getattr(a, k)} vs {getattr(b, k)}" for k in keys if getattr(a, k) != getattr(b, k))


# ---------------------------------------------------------------- parsing

class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `3e-3` and `1e5` as numbers as YAML 1.2 does (YAML 1.1 wants a
    dot in the mantissa, `3.0e-3`, and reads the rest as strings), and refusing a key given twice in
    one mapping (PyYAML keeps the last silently: a second `tasks:` would drop the first's tasks)."""

    def compose_node(self, parent, index):
        # Checked as composed, before `<<` merges are flattened into the mappings that use them.
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} is given twice (first on line {first_line[key] + 1})",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line
        return node


class _ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting a string such as "1e3" that `_ConfigLoader` reads as a number."""


for _yaml_class in (_ConfigLoader, _ConfigDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))


def dump_yaml(data: Any, **options) -> str:
    """`data` as YAML that `read_yaml_mapping` reads back as it was."""
    return yaml.dump(data, Dumper=_ConfigDumper, **options)


def read_yaml_mapping(path: str | Path, what: str = "config", error: type[RegistryError] = RegistryError) -> dict:
    """One YAML config file as a mapping; a missing file, bad YAML or a non-mapping is `error`
    naming the file. `what` says what the file should be, e.g. "train config (configs/train/*.yaml)"."""
    if not str(path).strip():  # Path("") is the current folder
        raise error("''", "", f"an empty path where a {what} was expected")
    path = Path(path)
    if path.is_dir():
        raise error(path, "", f"a folder where a {what} was expected")
    if not path.is_file():
        raise error(path, "", f"{what} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)
    except yaml.MarkedYAMLError as exc:  # "line N, column M: what", not PyYAML's "<unicode string>" block
        mark, context = exc.problem_mark, exc.context or ""
        if context and exc.context_mark is not None:
            context += f" (line {exc.context_mark.line + 1})"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (context, exc.problem) if part)
        raise error(path, "", f"not valid YAML: {where}{what}") from exc
    except yaml.YAMLError as exc:
        raise error(path, "", f"not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(path, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(data, dict):
        raise error(path, "", f"expected a mapping at the top level, found {_kind(data)}")
    return data


class FieldReader:
    """Reads one YAML mapping with type checks; unknown keys are an error, and a missing or null key
    takes the default. The one reader of config fields: scenario files, serve.yaml's overrides, train
    configs and model configs (which raise their own subclass of RegistryError, `error`)."""

    def __init__(self, raw: Any, file: str, where: str, allowed: tuple[str, ...],
                 error: type[RegistryError] = RegistryError):
        if not isinstance(raw, dict):
            raise error(file, where or "<top>", f"expected a mapping, found {_kind(raw)}")
        unknown = [k for k in raw if k not in allowed]
        if unknown:
            raise error(file, _join(where, str(unknown[0])), f"unknown key; expected one of: {', '.join(allowed)}")
        self.raw, self.file, self.where, self.error = raw, file, where, error

    def path(self, key: str) -> str:
        return _join(self.where, key)

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise self.error(self.file, self.path(key),
                                 f"required field missing (expected {what or _tname(types)})")
            return default
        value = self.raw[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types))
        if not ok:
            raise self.error(self.file, self.path(key),
                             f"expected {what or _tname(types)}, found {_kind(value)} {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default, what=f"one of {', '.join(choices)}")
        if value not in choices:
            raise self.error(self.file, self.path(key), f"expected one of {', '.join(choices)}, found {value!r}")
        return value

    def positive(self, key: str, types: type | tuple[type, ...], default: Any = ..., minimum: float = 1) -> Any:
        value = self.get(key, types, default, what=f"{_tname(types)} >= {minimum}")
        not_finite = isinstance(value, float) and not math.isfinite(value)  # NaN and inf are no counts or rates
        if value is not None and (not_finite or value < minimum):
            raise self.error(self.file, self.path(key), f"expected {_tname(types)} >= {minimum}"
                             f"{', finite' if not_finite else ''}, found {value!r}")
        return value

    def finite(self, key: str, default: Any = ...) -> float | None:
        """A number (an integer read as one); NaN and infinities are refused."""
        value = self.get(key, (int, float), default)
        if value is not None and not math.isfinite(value):
            raise self.error(self.file, self.path(key), f"expected a finite number, found {value!r}")
        return None if value is None else float(value)

    def name(self, key: str = "name") -> str:
        value = self.get(key, str, what="a lower-case identifier")
        if not NAME_PATTERN.match(value):
            raise self.error(self.file, self.path(key),
                             f"expected a lower-case identifier (letters, digits, single underscores), found {value!r}")
        return value

    def items(self, key: str, default: Any = ...) -> list:
        return self.get(key, list, default, what="a list")


def _parse_feature(raw: Any, file: str, where: str, reserved: tuple[str, ...] = RESERVED_COLUMNS) -> Feature:
    f = FieldReader(raw, file, where, ("name", "type", "required", "buckets", "dim", "transform", "max_len", "description"))
    name = f.name()
    if name in reserved:
        raise RegistryError(file, f.path("name"), f"{name!r} is a reserved column ({', '.join(reserved)})")
    ftype = f.choice("type", FEATURE_TYPES)
    required = f.get("required", bool, False, what="true or false")
    desc = f.get("description", str, "")
    for key, types in TYPE_KEYS.items():
        if key in f.raw and ftype not in types:
            raise RegistryError(file, f.path(key), f"not allowed for a {ftype} feature (only for {' and '.join(types)})")
    if ftype == "numeric":
        return Feature(name, ftype, required, transform=f.choice("transform", NUMERIC_TRANSFORMS, "none"), description=desc)
    buckets = f.positive("buckets", int, minimum=2)
    if buckets > MAX_BUCKETS:
        raise RegistryError(file, f.path("buckets"), f"expected an integer <= {MAX_BUCKETS} (2**31 - 1), found "
                            f"{buckets}: more rows than an embedding table can be indexed by (a typo?)")
    dim = f.positive("dim", int, minimum=1)
    max_len = _list_max_len(f) if ftype == "categorical_list" else None
    return Feature(name, ftype, required, buckets=buckets, dim=dim, max_len=max_len, description=desc)


def _list_max_len(f: FieldReader) -> int:
    # Required rather than defaulted: the model keeps only the first max_len ids of each list, and
    # a silent default would drop the rest of longer lists unnoticed.
    if f.raw.get("max_len") is None:
        raise RegistryError(f.file, f.path("max_len"), "required field missing for a categorical_list feature "
                            "(expected an integer >= 1: how many ids of each list the model keeps; longer lists "
                            "are cut to their first max_len)")
    return f.positive("max_len", int)


def _parse_features(items: list, file: str, where: str, taken: dict[str, str],
                    reserved: tuple[str, ...] = RESERVED_COLUMNS) -> tuple[Feature, ...]:
    out = []
    for i, raw in enumerate(items):
        feat = _parse_feature(raw, file, f"{where}[{i}]", reserved)
        if feat.name in taken:
            raise RegistryError(file, f"{where}[{i}].name", f"duplicate name {feat.name!r} (already used in {taken[feat.name]})")
        taken[feat.name] = f"{where}[{i}]"
        out.append(feat)
    return tuple(out)


def _parse_scenario(raw: Any, file: str, expected_name: str, snapshot: bool = False) -> Scenario:
    f = FieldReader(raw, file, "", ("name", "description", "user_features", "item_features", "cross_features",
                                "tasks", "serving", "synthetic"))
    name = f.name()
    if name != expected_name:
        if not NAME_PATTERN.match(expected_name):  # the file's name is the one to change
            raise RegistryError(file, "name", f"{name!r}: a scenario's file is named as the scenario, a lower-case "
                                f"identifier; rename the file to {name}{Path(file).suffix}")
        raise RegistryError(file, "name", f"expected {expected_name!r} (the file name without .yaml), found {name!r}")
    reserved = SNAPSHOT_RESERVED_COLUMNS if snapshot else RESERVED_COLUMNS
    if name in reserved:  # as `mtfm scenarios infer --name` refuses it
        raise RegistryError(file, "name", f"{name!r} is a reserved column ({', '.join(reserved)}); name the "
                            "scenario otherwise (and its file)")
    taken: dict[str, str] = {}
    user = _parse_features(f.items("user_features", []), file, "user_features", taken, reserved)
    item = _parse_features(f.items("item_features"), file, "item_features", taken, reserved)
    if not item:
        raise RegistryError(file, "item_features", "expected at least one item feature (a T-token is built from them)")
    cross = _parse_features(f.items("cross_features", []), file, "cross_features", taken, reserved)
    tasks_raw = f.items("tasks")
    if not tasks_raw:
        raise RegistryError(file, "tasks", "expected at least one task (a label column such as click or order)")
    tasks: list[Task] = []
    for i, traw in enumerate(tasks_raw):
        t = FieldReader(traw, file, f"tasks[{i}]", ("name", "kind", "depends_on", "description"))
        tname = t.name()
        if tname in taken or tname in reserved:
            raise RegistryError(file, f"tasks[{i}].name", f"duplicate name {tname!r} (already a feature, task or reserved column)")
        taken[tname] = f"tasks[{i}]"
        dep = t.get("depends_on", str, None)
        if dep is not None and dep not in [x.name for x in tasks]:
            raise RegistryError(file, f"tasks[{i}].depends_on", f"expected the name of an earlier task, found {dep!r}")
        tasks.append(Task(tname, t.choice("kind", TASK_KINDS, "binary"), dep, t.get("description", str, "")))
    return Scenario(
        name=name,
        description=f.get("description", str, ""),
        user_features=user, item_features=item, cross_features=cross, tasks=tuple(tasks),
        serving=_parse_serving(f.get("serving", dict, {}), file, snapshot),
        synthetic=_parse_synthetic(f.get("synthetic", dict, {}), file, [t.name for t in tasks]),
        source=file,
    )


def _parse_serving(raw: dict, file: str, snapshot: bool = False) -> ServingConfig:
    """The `serving:` knobs, each checked and then against each other (`serving_conflict`). A
    checkpoint's snapshot skips the latter: nothing serves from it (the app reads the config dir),
    and a checkpoint from before that check must still load."""
    cfg = read_serving_knobs(raw, file, "serving", ServingConfig())
    conflict = None if snapshot else serving_conflict(cfg)
    if conflict is not None:
        raise RegistryError(file, _join("serving", conflict[0]), conflict[1])
    return cfg


def read_serving_knobs(raw: Any, file: str, where: str, base: ServingConfig) -> ServingConfig:
    """`base` with the knobs `raw` sets, each checked on its own: a scenario's `serving:` block (base:
    the defaults) and serve.yaml's per-scenario overrides (base: the scenario's knobs) read alike."""
    f = FieldReader(raw, file, where, tuple(x.name for x in dataclasses.fields(ServingConfig)))
    return ServingConfig(
        replicas=f.positive("replicas", int, base.replicas),
        max_ongoing_requests=f.positive("max_ongoing_requests", int, base.max_ongoing_requests),
        max_batch_requests=f.positive("max_batch_requests", int, base.max_batch_requests),
        max_batch_tokens=f.positive("max_batch_tokens", int, base.max_batch_tokens),
        batch_wait_timeout_s=float(f.positive("batch_wait_timeout_s", (int, float), base.batch_wait_timeout_s,
                                              minimum=0)),
        max_candidates=f.positive("max_candidates", int, base.max_candidates),
        num_cpus=float(f.positive("num_cpus", (int, float), base.num_cpus, minimum=0)),
        num_gpus=float(f.positive("num_gpus", (int, float), base.num_gpus, minimum=0)),
        backend=f.choice("backend", SERVING_BACKENDS, base.backend),
        cuda_graphs=f.get("cuda_graphs", bool, base.cuda_graphs, what="true or false"),
    )


def _parse_synthetic(raw: dict, file: str, task_names: list[str]) -> SyntheticConfig:
    f = FieldReader(raw, file, "synthetic", ("exposures_per_user_day", "active_user_fraction", "label_rates"))
    d = SyntheticConfig()
    rates = f.get("label_rates", dict, {})
    for task, rate in rates.items():
        if task not in task_names:
            raise RegistryError(file, f"synthetic.label_rates.{task}", f"unknown task; expected one of {', '.join(task_names)}")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate < 1:
            raise RegistryError(file, f"synthetic.label_rates.{task}", f"expected a probability in (0, 1), found {rate!r}")
    fraction = float(f.get("active_user_fraction", (int, float), d.active_user_fraction))
    if not 0 < fraction <= 1:  # NaN included
        raise RegistryError(file, "synthetic.active_user_fraction", f"expected a fraction in (0, 1], found {fraction}")
    return SyntheticConfig(float(f.positive("exposures_per_user_day", (int, float), d.exposures_per_user_day, minimum=0)),
                           fraction, {k: float(v) for k, v in rates.items()})


def parse_sequences(raw: Any, file: str, snapshot: bool = False) -> dict[str, Sequence]:
    """The shared sequences of `file` (raw: its YAML mapping), by name; errors name the file and field.
    `snapshot`: read from a checkpoint's record of a registry, whose reserved column names are its own."""
    top = FieldReader(raw, file, "", ("sequences",))
    items = top.items("sequences")
    if not items:
        raise RegistryError(file, "sequences", "expected at least one sequence")
    out: dict[str, Sequence] = {}
    for i, sraw in enumerate(items):
        where = f"sequences[{i}]"
        f = FieldReader(sraw, file, where, ("name", "kind", "max_len", "features", "description", "events_per_user_day"))
        name = f.name()
        if name in out:
            raise RegistryError(file, f"{where}.name", f"duplicate sequence name {name!r}")
        feats = _parse_features(f.items("features"), file, f"{where}.features", {},
                                SNAPSHOT_RESERVED_COLUMNS if snapshot else RESERVED_COLUMNS)
        if not feats:
            raise RegistryError(file, f"{where}.features", "expected at least one item feature")
        out[name] = Sequence(
            name=name, kind=f.choice("kind", SEQUENCE_KINDS), max_len=f.positive("max_len", int),
            features=feats, description=f.get("description", str, ""),
            events_per_user_day=float(f.positive("events_per_user_day", (int, float), 5.0, minimum=0)),
            source=file,
        )
    return out


# ---------------------------------------------------------------- snapshots

def declared_feature(f: Feature, every_key: bool = False) -> dict[str, Any]:
    """A feature as the YAML mapping that declares it: defaults left out (what a config dir holds), or
    with `every_key` each key written (a registry snapshot's)."""
    raw: dict[str, Any] = {"name": f.name, "type": f.type}
    if f.type == "numeric":
        if every_key or f.transform != "none":
            raw["transform"] = f.transform
    else:
        raw.update(buckets=f.buckets, dim=f.dim)
        if f.max_len is not None:
            raw["max_len"] = f.max_len
    if every_key or f.required:
        raw["required"] = f.required
    if every_key or f.description:
        raw["description"] = f.description
    return raw


def _raw_scenario(s: Scenario) -> dict[str, Any]:
    return {
        "name": s.name, "description": s.description,
        "user_features": [declared_feature(f, every_key=True) for f in s.user_features],
        "item_features": [declared_feature(f, every_key=True) for f in s.item_features],
        "cross_features": [declared_feature(f, every_key=True) for f in s.cross_features],
        "tasks": [{k: v for k, v in dataclasses.asdict(t).items() if v is not None} for t in s.tasks],
        "serving": dataclasses.asdict(s.serving),
        "synthetic": dataclasses.asdict(s.synthetic),
    }


def _raw_sequence(s: Sequence) -> dict[str, Any]:
    return {"name": s.name, "kind": s.kind, "max_len": s.max_len, "description": s.description,
            "events_per_user_day": s.events_per_user_day,
            "features": [declared_feature(f, every_key=True) for f in s.features]}


# ---------------------------------------------------------------- small helpers

def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _tname(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}
    types = tuple(t for t in _tuple(types) if not (t is int and float in _tuple(types)))  # an integer is a number
    return " or ".join(names.get(t, t.__name__) for t in types)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "nothing"}.get(type(value), type(value).__name__)
