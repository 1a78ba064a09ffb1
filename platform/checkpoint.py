"""Training checkpoints: what one holds, how it is written, and how a model is rebuilt from it.

A checkpoint is a folder:

    model.pt       the model's state_dict (unwrapped from DDP)
    optimizer.pt   {"dense": ..., "embedding": ...} optimizer states (training resume only)
    meta.json      step, epoch, batches consumed in that epoch, the registry snapshot, the model
                   config and the train config

The registry snapshot makes a checkpoint self-describing: evaluation and serving rebuild the
exact model it was trained as, whatever `configs/` says today, and `check_compatible` tells a
user explicitly when the two disagree (never a silent partial load).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtfm.platform.registry import Registry, RegistryError

if TYPE_CHECKING:  # torch and the model stay unimported until a checkpoint is really read or written
    import torch

    from mtfm.model import ModelConfig, RecommenderBase

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says which and why."""


@dataclass
class CheckpointMeta:
    step: int
    epoch: int
    batches_in_epoch: int
    registry: dict[str, Any]
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    samples_fingerprint: str | None = None  # of the samples trained on (`samples.samples_fingerprint`); None before
    # The windows (start, ms) whose samples these weights trained on: this run's training windows and those of
    # the checkpoints it resumed or warm-started from; None before 2026-12-07 (`mtfm eval` then guesses).
    trained_windows: list[int] | None = None

    @property
    def scenarios(self) -> list[str]:
        return list(self.registry["scenarios"])


def write_checkpoint(folder: Path, model: "RecommenderBase", optimizers: dict[str, "torch.optim.Optimizer"],
                     meta: CheckpointMeta) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / MODEL_FILE)
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, folder / OPTIMIZER_FILE)
    (folder / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=1))
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest checkpoint inside a run folder; its
    model file is checked to be a whole archive (see `check_model_file`)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return check_model_file(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a folder' if path.exists() else 'not found'} (expected a run folder or "
                              "one of its checkpoint_* folders)")
    found = sorted(p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / META_FILE).is_file())
    if not found:
        raise CheckpointError(f"{path}: no checkpoint_* folder with a {META_FILE} inside (has the run saved one yet?)")
    return check_model_file(found[-1])


SERVING_PINS = ".serving"  # RUN_DIR/.serving/<key>/checkpoint_*: what Serve apps load (`pin_for_serving`)
SERVED_FILES = (MODEL_FILE, META_FILE)


def pin_for_serving(checkpoint: Path) -> Path:
    """A copy of `checkpoint`'s model and meta files that its run does not prune, for Serve's
    replicas to load, also when one restarts later: a run that goes on training (`--resume`)
    deletes its older checkpoints (`keep_checkpoints`). Hard links (no space while the original
    exists; copies where links are refused) under RUN_DIR/.serving/<key>/<name>, the key naming
    the model file's version: a pin is reused, never replaced, so apps already serving it keep
    their weights even if a checkpoint of that name is written again. `checkpoint` itself where
    its folder cannot be written. `mtfm serve pins` lists them and removes those no app loads.
    A pin reused (a rollback to it, say) has its folder's time set to now: the newest pin, which
    a prune keeps while the rollout starts replicas on it."""
    import os
    import shutil

    if is_pinned(checkpoint):
        _mark_chosen(checkpoint)
        return checkpoint
    model = (checkpoint / MODEL_FILE).stat()
    pinned = checkpoint.parent / SERVING_PINS / f"{model.st_ino:x}-{model.st_mtime_ns:x}" / checkpoint.name
    if (pinned / META_FILE).is_file():
        _mark_chosen(pinned)
        return pinned
    staging = pinned.with_name(f".{pinned.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for name in SERVED_FILES:
            try:
                os.link(checkpoint / name, staging / name)
            except OSError:  # links refused (another owner's files, fs.protected_hardlinks) or unsupported
                shutil.copy2(checkpoint / name, staging / name)
        staging.rename(pinned)
    except OSError:
        if not (pinned / META_FILE).is_file():  # another build pinned it meanwhile, else the folder is read-only
            return checkpoint
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pinned


def _mark_chosen(pin: Path) -> None:
    import os

    try:
        os.utime(pin)
    except OSError:  # a pin in a folder this user cannot write: it cannot be pruned by this user either
        pass


def is_pinned(checkpoint: Path) -> bool:
    return checkpoint.parent.parent.name == SERVING_PINS


def pinned_versions(checkpoint: Path) -> list[Path]:
    """The pins of a checkpoint folder (which may be gone), newest first."""
    pins = checkpoint.parent / SERVING_PINS
    found = [p for p in pins.glob(f"*/{checkpoint.name}") if (p / META_FILE).is_file()] if pins.is_dir() else []
    return sorted(found, key=lambda p: (p / META_FILE).stat().st_mtime_ns, reverse=True)


def find_served_checkpoint(path: str | Path) -> tuple[Path, str | None]:
    """`find_checkpoint(path)`; or, for a checkpoint folder its run has removed since an app
    pinned it, that folder's newest pin, with a note saying so."""
    path = Path(path)
    pins = [] if path.exists() else pinned_versions(path)
    if pins:
        return pins[0], f"{path}: removed by its run since it was pinned for serving; serving the pin {pins[0]}"
    return find_checkpoint(path), None


def check_model_file(folder: Path) -> Path:
    """`folder`, once its model file opens as the zip archive torch.save writes: one cut short is
    refused here, before a Ray worker or replica loads it (and fails, and is retried). Cheap: only
    the archive's directory, at the file's end, is read."""
    _check_archive(folder / MODEL_FILE, "a checkpoint's weights")
    return folder


def check_optimizer_file(folder: Path) -> Path:
    """`folder`, once its optimizer file opens as an archive (as `check_model_file`): a resume
    needs it, and the training workers would otherwise fail on it, each retried."""
    _check_archive(folder / OPTIMIZER_FILE, "a checkpoint's optimizer states, which a resume needs")
    return folder


def _check_archive(path: Path, what: str) -> None:
    try:
        with zipfile.ZipFile(path):
            return
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not found ({what}, saved next to its {META_FILE})") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}; cut short or damaged, e.g. by a copy "
                              "that did not finish)") from exc


def load_state_dict(folder: Path, map_location: "str | torch.device" = "cpu", mmap: bool = False) -> dict:
    """The tensors of `folder`'s model file; damage inside the archive, which `check_model_file`
    does not read, is a `CheckpointError` too (torch's own message blames its weights_only default)."""
    import torch

    path = folder / MODEL_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        # An unpickling error's own message blames torch's weights_only default; a RuntimeError's says what failed.
        said = f": {str(exc).splitlines()[0]}" if isinstance(exc, RuntimeError) and str(exc) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint (torch.load: {type(exc).__name__}{said}; damaged, "
                              "or not written by torch.save)") from exc


def load_weights(model: "torch.nn.Module", folder: Path, mmap: bool = False, subgraph: bool = False) -> None:
    """The weights of `folder`'s model file into `model`: every tensor of the file, or with
    `subgraph` (a scenario's part of the model) the model's own, the others left. A file whose
    tensors do not fit the model its meta.json describes (another run's model.pt copied in) is a
    `CheckpointError` naming it."""
    state = load_state_dict(folder, mmap=mmap)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    unexpected = [] if subgraph else [k for k in state if k not in own]
    if missing or mismatched or unexpected:
        k = (missing or mismatched or unexpected)[0]
        found = "missing" if k in missing else "not in the model" if k in unexpected else \
            f"{tuple(state[k].shape)}, not {tuple(own[k].shape)}"
        raise CheckpointError(f"{folder / MODEL_FILE}: its tensors do not fit the model its {META_FILE} describes "
                              f"({len(missing)} missing, {len(mismatched)} of another shape, {len(unexpected)} not in "
                              f"the model; e.g. {k}: {found}): the model file of another run?")
    model.load_state_dict({k: state[k] for k in own})


def read_meta(checkpoint: str | Path) -> CheckpointMeta:
    folder = find_checkpoint(checkpoint)
    try:
        raw = json.loads((folder / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / META_FILE}: not a valid checkpoint description (not JSON: {exc})") from exc
    fields = dataclasses.fields(CheckpointMeta)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]  # an earlier version's lack the rest
    missing = [name for name in required if name not in raw] if isinstance(raw, dict) else required
    if missing:
        raise CheckpointError(f"{folder / META_FILE}: not a valid checkpoint description (expected a JSON object with "
                              f"{', '.join(required)}; missing {', '.join(missing)})")
    # Keys a later version adds are left out: such a checkpoint still loads and serves here.
    return CheckpointMeta(**{f.name: raw[f.name] for f in fields if f.name in raw})


def trained_model_config(checkpoint: str | Path, meta: CheckpointMeta | None = None) -> "ModelConfig":
    """The model config a checkpoint was trained with (its meta.json's copy; `meta`: that file, if
    already read); an invalid one is refused naming the meta.json."""
    from mtfm.model import parse_model_config

    folder = find_checkpoint(checkpoint)
    return parse_model_config(dict((meta or read_meta(folder)).model_config), str(folder / META_FILE), snapshot=True)


def load_model(checkpoint: str | Path) -> tuple["RecommenderBase", CheckpointMeta]:
    """Rebuild the model exactly as it was trained (its own registry snapshot) and load its weights, on the CPU."""
    from mtfm.model import build_model

    folder = find_checkpoint(checkpoint)
    meta = read_meta(folder)
    model = build_model(trained_model_config(folder, meta), trained_registry(meta, str(folder)))
    load_weights(model, folder)
    return model.eval(), meta


@dataclass
class WarmStart:
    """What `warm_start` did, tensor by tensor name (parameters and buffers).

    remapped: the first layer of each group tokenizer whose input features changed, loaded column by
    column (`feature_changes` says how, per group); kept_columns: of each, the columns loaded as trained,
    which `freeze_loaded_steps` keeps frozen while the new features' columns train."""

    loaded: list[str]
    initialised: list[str]
    skipped: list[str]
    remapped: list[str] = dataclasses.field(default_factory=list)
    feature_changes: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    kept_columns: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def describe(self, names: set[str]) -> str:
        """The loaded tensors counted by top-level module on one line (most of the model: each one is
        named in the run's warm_start.json), then the fresh and skipped ones grouped by the module they
        belong to; `names` are scenario, sequence and feature names, so that e.g. every tensor of
        scenario `grocery` groups together. Last, each group whose input features changed."""
        tops = Counter(key.split(".")[0] for key in self.loaded)
        counts = ", ".join(f"{top} {n}" for top, n in sorted(tops.items()))
        lines = [f"loaded: {len(self.loaded)} tensors"
                 + (f" ({counts}; each one named in the run's warm_start.json)" if self.loaded else " (none)")]
        for verb, keys in (("initialised fresh", self.initialised),
                           ("skipped (in the checkpoint, not in this model)", self.skipped)):
            groups: dict[str, int] = {}
            for key in keys:
                parts = key.split(".")
                cut = next((i + 1 for i, p in enumerate(parts) if p in names), min(2, len(parts)))
                prefix = ".".join(parts[:cut])
                groups[prefix] = groups.get(prefix, 0) + 1
            lines.append(f"{verb}: {len(keys)} tensors" + ("" if keys else " (none)"))
            lines += [f"    {prefix}.* ({n})" for prefix, n in sorted(groups.items())]
        if self.feature_changes:
            lines.append("input features changed: each group's first tokenizer layer loads the weights of the "
                         "features it kept; new and changed ones start at zero (a changed one with a fresh table), "
                         "removed ones' are dropped")
            lines += [f"    {group}: " + "; ".join(f"{kind} {', '.join(features)}" for kind, features in change.items())
                      + (" (its tokens as trained until the new weights train)" if change.keys() <= {"new", "reordered"}
                         else " (its tokens change)")
                      for group, change in sorted(self.feature_changes.items())]
        return "\n".join(lines)


def warm_start(model: "RecommenderBase", checkpoint: str | Path) -> WarmStart:
    """Load every tensor of `checkpoint` that this model has under the same name (the shared
    modules, and the modules of scenarios both know); the model's other tensors (a scenario the
    checkpoint lacks) keep their fresh initialisation; the checkpoint's tensors this model lacks
    (a retired scenario) are reported and left in the checkpoint.

    A group (sequence or scenario) both know whose input features changed since the checkpoint's
    registry (added, removed, reordered, or a type, buckets, dim or transform changed) gets its
    tokenizer's first layer column by column: the columns of each feature it kept as trained, those
    of a new or changed feature zero. With features only added or reordered its tokens, and every
    score, are then the trained model's until those weights train; a changed or removed feature
    changes them. A changed feature's embedding table starts fresh.
    Any other tensor present in both with another shape is an error: the two were built from
    different model configs."""
    from mtfm.model.tokenizer import GroupTokenizer, HeterogeneousTokenizer, group_features

    folder = find_checkpoint(checkpoint)
    state = load_state_dict(folder)
    trained = trained_registry(read_meta(folder), str(folder))
    trained_groups = group_features(trained)
    own = model.state_dict()

    remapped, changes, kept, changed_tables = {}, {}, {}, set()
    for prefix, module in model.named_modules():
        if isinstance(module, HeterogeneousTokenizer):  # a table is one feature's, whatever groups name it
            changed_tables |= {f"{prefix}.tables.{name}.weight" for name in module.tables if name in trained.features
                               and _spec(trained.features[name]) != _spec(model.registry.features[name])}
        if not isinstance(module, GroupTokenizer):
            continue
        group, key = prefix.rsplit(".", 1)[-1], f"{prefix}.mlp.0.weight"
        old = trained_groups.get(group)
        if (old is not None and key in state and state[key].shape[0] == own[key].shape[0]
                and [(f.name, _spec(f)) for f in old] != [(f.name, _spec(f)) for f in module.features]):
            remapped[key], changes[group], kept[key] = _input_weight_by_feature(state[key], old, module.features,
                                                                                 own[key])

    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape
                  and k not in remapped and k not in changed_tables]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(f"{folder}: {len(mismatched)} tensors have other shapes than this model's, e.g. {k}: "
                              f"{tuple(state[k].shape)} in the checkpoint vs {tuple(own[k].shape)} here; warm start "
                              "needs the model config the checkpoint was trained with (its meta.json has it, with "
                              "its registry)")
    loaded = [k for k in own if k in state and k not in remapped and k not in changed_tables]
    model.load_state_dict({k: state[k] for k in loaded} | remapped, strict=False)
    return WarmStart(loaded, [k for k in own if k not in loaded and k not in remapped],
                     [k for k in state if k not in own], sorted(remapped), changes, kept)


def _spec(feature) -> tuple:
    return tuple(getattr(feature, key) for key in _MODEL_SPEC)


def _input_weight_by_feature(trained: "torch.Tensor", trained_features, features, like: "torch.Tensor"):
    """A group tokenizer's first-layer weight (hidden, inputs) for `features` from the one `trained` for
    `trained_features`: the columns of each feature both have with the same spec as trained, those of a
    new or changed feature zero. Returns it, what changed ({"new": [...], "changed": ..., "removed": ...},
    or {"reordered": the features} where only the order did) and the columns loaded as trained."""
    import torch

    from mtfm.model.tokenizer import input_columns

    was, now = input_columns(trained_features), input_columns(features)
    trained_specs = {f.name: _spec(f) for f in trained_features}
    weight = torch.zeros_like(like)
    change: dict[str, list[str]] = {"new": [], "changed": [], "removed": [n for n in was if n not in now]}
    kept: list[int] = []
    for feature in features:
        first, width = now[feature.name]
        if feature.name not in trained_specs:
            change["new"].append(feature.name)
        elif trained_specs[feature.name] != _spec(feature):
            change["changed"].append(feature.name)
        else:
            start = was[feature.name][0]
            weight[:, first:first + width] = trained[:, start:start + width]
            kept += range(first, first + width)
    change = {kind: names for kind, names in change.items() if names} or {"reordered": list(now)}
    return weight, change, kept


def trained_registry(meta: CheckpointMeta, where: str) -> Registry:
    """The registry snapshot a checkpoint was trained with; an unreadable one is a `CheckpointError`
    that starts with `where` (the flag and path the user gave)."""
    try:
        return Registry.from_dict(meta.registry)
    except (KeyError, TypeError, RegistryError) as exc:
        raise CheckpointError(f"{where}: the registry snapshot in its {META_FILE} cannot be read "
                              f"({type(exc).__name__}: {exc})") from exc


# What of a feature's spec the model's parameters and inputs depend on (its max_len trims a list's
# ids, which nothing learned depends on).
_MODEL_SPEC = ("type", "buckets", "dim", "transform")


def registry_changes(trained: Registry, current: Registry,
                     scenarios: tuple[str, ...] | list[str] | None = None) -> tuple[list[str], list[str]]:
    """How `current` differs from the registry a checkpoint was trained with, in the sequences
    and in `scenarios` (default: all; the model's own): (changes to the model: a feature added,
    removed, moved or reordered within its group, its type, buckets, dim or transform, a
    sequence's kind, the tasks; changes to how an epoch is cut into batches: a sequence's
    max_len), each as "<where>: <trained> -> <current>"."""
    model, cuts = [], []

    def group(where: str, old: tuple, new: tuple) -> None:
        if [f.name for f in old] != [f.name for f in new]:  # a group's features feed one layer, in order
            model.append(f"{where}: {[f.name for f in old]} -> {[f.name for f in new]}")
        now = {f.name: f for f in new}
        for a in old:  # and each feature both have, so that every difference is named at once
            b = now.get(a.name)
            model.extend(f"{where}.{a.name}.{key}: {getattr(a, key)} -> {getattr(b, key)}"
                         for key in _MODEL_SPEC if b is not None and getattr(a, key) != getattr(b, key))

    for name in sorted(set(trained.sequences) | set(current.sequences)):
        old, new = trained.sequences.get(name), current.sequences.get(name)
        if old is None or new is None:
            model.append(f"sequences.{name}: {'added' if new is not None else 'removed'}")
            continue
        if old.kind != new.kind:
            model.append(f"sequences.{name}.kind: {old.kind} -> {new.kind}")
        if old.max_len != new.max_len:
            cuts.append(f"sequences.{name}.max_len: {old.max_len} -> {new.max_len}")
        group(f"sequences.{name}.features", old.features, new.features)
    for name in sorted(set(trained.scenarios) & set(current.scenarios)):
        if scenarios is not None and name not in scenarios:
            continue
        old, new = trained.scenarios[name], current.scenarios[name]
        for part in ("user_features", "item_features", "cross_features"):
            group(f"scenarios.{name}.{part}", getattr(old, part), getattr(new, part))
        if old.task_names != new.task_names:
            model.append(f"scenarios.{name}.tasks: {list(old.task_names)} -> {list(new.task_names)}")
    return model, cuts


def check_compatible(meta: CheckpointMeta, registry: Registry, where: str) -> None:
    """Refuse a checkpoint whose scenarios differ from the registry's (DESIGN: never a silent
    partial load). Adding a scenario to a trained model is an explicit warm start."""
    have, want = set(meta.scenarios), set(registry.scenarios)
    if have == want:
        return
    parts = []
    if want - have:
        parts.append(f"the registry has scenarios the checkpoint lacks: {sorted(want - have)}")
    if have - want:
        parts.append(f"the checkpoint has scenarios the registry lacks: {sorted(have - want)}")
    trained_with = trained_config_dir(meta)
    other_dir = f"pass the config dir it was trained with (--config-dir {trained_with}), " \
        if trained_with and Path(trained_with).resolve() != Path(registry.config_dir).resolve() else ""
    raise CheckpointError(f"{where}: {'; '.join(parts)}. Resuming needs the scenarios the checkpoint was "
                          f"trained with ({sorted(have)}, stored in its {META_FILE}): {other_dir}resume with that "
                          f"registry (`mtfm scenarios export --checkpoint {where} --out DIR` writes it; then "
                          "--config-dir DIR), or start a new run from it with --init-from (warm start)")


def trained_config_dir(meta: CheckpointMeta) -> str | None:
    """The config dir a checkpoint's registry was loaded from, as the run named it (None if unrecorded)."""
    return meta.registry.get("config_dir")
