"""The Serve application builder: one deployment per registered scenario, behind one router or
(`scenario_ingress`) one scenario taking HTTP itself.

`serve run deployments/serve.yaml` calls `build_app(args)` with the `args` of serve.yaml. The
builder enumerates the registry itself, so a scenario added by dropping in its YAML is served
by a new build with no code change and no edit of serve.yaml, which holds only overrides:

    checkpoint   a run folder or checkpoint_* folder; $MTFM_CHECKPOINT overrides it; default:
                 the newest checkpoint saved under ./runs; an mtfm model trained on every served
                 scenario (a baseline architecture, or a model whose config's `scenarios:` lacks
                 one, is refused here, before any replica starts)
    config_dir   the registry (default $MTFM_CONFIG_DIR, else ./configs): which scenarios, and
                 each one's `serving:` knobs (replicas, batching, resources, backend)
    scenarios    per-scenario overrides of those knobs, e.g. {hp: {replicas: 2}}
    revision     written by `mtfm serve config`: a digest of the checkpoint and registry it found
                 (`serving_revision`). `serve deploy` rebuilds an app only when its config changed,
                 so a file regenerated after training on, or after a registry change, rolls them out;
                 `--redeploy` adds the time, to retry a failed rollout with nothing else changed
    and the replicas' and router's settings, `AppArgs` below (the README has the table)

Deployment `ranker_<scenario>` loads only that scenario's subgraph; the ingress `RankRouter`
routes `POST /<scenario>/rank` to it. With `scenario_ingress: <scenario>` the app serves that
one scenario and its deployment takes HTTP itself (same API, no router hop): an app per
scenario, for the lowest latency (README, "Latency through Serve").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve import Application

from mtfm.platform.checkpoint import (META_FILE, MODEL_FILE, CheckpointError, find_served_checkpoint, is_pinned,
                                      pin_for_serving, read_meta, registry_changes, trained_config_dir,
                                      trained_model_config, trained_registry)
from mtfm.platform.registry import (Registry, RegistryError, ServingConfig, load_registry, read_serving_knobs,
                                    resolve_config_dir, serving_conflict)

from .router import RankRouter
from .scenario import ScenarioDeployment

CHECKPOINT_ENV = "MTFM_CHECKPOINT"
DEFAULT_RUNS_DIR = "runs"


class AppArgs(BaseModel):
    """The `args` of the application in serve.yaml. Strict: a count is an integer (not true or "3"),
    a flag true or false, a number finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    checkpoint: str | None = None
    config_dir: str | None = None
    scenarios: dict[str, Any] = Field(  # read by the registry's reader of `serving:` blocks, in scenario_serving
        default_factory=dict, description="per-scenario overrides of the knobs of its YAML's `serving:`")
    chunk_size: int = Field(256, ge=1, description="candidates scored together against one user side")
    user_cache_ttl_s: float = Field(30.0, ge=0, description="keep encoded user sides this long (0: no cache)")
    user_cache_mb: int = Field(256, ge=1, description="per replica")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    router_replicas: int = Field(1, ge=1)
    router_num_cpus: float = Field(0.25, ge=0)
    scenario_ingress: str | None = Field(
        None, description="serve only this scenario, its replicas taking HTTP themselves (no router)")
    revision: str | None = Field(
        None, description="what `mtfm serve config` found: a changed file is what makes `serve deploy` roll it out")


class ServeConfigError(ValueError):
    """The serving setup is inconsistent; the message names the setting and what was expected."""


@dataclasses.dataclass
class AppPlan:
    """What an app would serve, every check passed: the checkpoint (absolute) and where it was named
    (`source`), the registry, each served scenario's serving knobs, and notes on harmless differences
    between the registry and what the checkpoint was trained with."""
    args: AppArgs
    checkpoint: Path
    source: str
    registry: Registry
    serving: dict[str, ServingConfig]
    notes: list[str]


def plan_app(args: AppArgs | dict, config_name: str = "the serve config", built_in: str | None = None) -> AppPlan:
    """Every check `build_app` makes before it deploys anything, on the `args` of an application
    in the serve config `config_name` (named in the errors). Raises ServeConfigError, CheckpointError
    or RegistryError naming the setting and what was expected. Relative paths are read from the
    current folder, as the app builder reads them from the folder the app is built in; `built_in`
    says which folder that is in the errors (default: the cluster's, where its `ray start` ran)."""
    args = parse_app_args(args, config_name)
    config_dir = resolve_config_dir(args.config_dir)
    if not config_dir.is_absolute() and not config_dir.is_dir():
        named = (f"{config_name}: args.config_dir" if args.config_dir else
                 "$MTFM_CONFIG_DIR" if os.environ.get("MTFM_CONFIG_DIR") else "the default config dir")
        folder = built_in or f"the folder the app is built in ({Path.cwd()}, where this cluster's `ray start` ran)"
        raise ServeConfigError(f"{named} {str(config_dir)!r}: no config directory at {config_dir.resolve()}: a "
                               f"relative path is read from {folder}; write an absolute path "
                               "(`mtfm serve config --config-dir /ABSOLUTE/configs`)")
    registry = load_registry(config_dir)
    serving = scenario_serving(registry, args.scenarios, config_name)
    if args.scenario_ingress is not None:
        if args.scenario_ingress not in serving:
            raise ServeConfigError(f"{config_name}: args.scenario_ingress: unknown scenario {args.scenario_ingress!r}; "
                                   f"registered in {registry.config_dir}: {', '.join(registry.scenarios)}")
        serving = {args.scenario_ingress: serving[args.scenario_ingress]}
    checkpoint = resolve_checkpoint(args.checkpoint, config_name=config_name)
    if os.environ.get(CHECKPOINT_ENV):
        source = f"${CHECKPOINT_ENV}"
    elif args.checkpoint:
        source = "args.checkpoint"
    else:
        source = f"the newest checkpoint under {DEFAULT_RUNS_DIR}/"
    notes = refuse_what_it_cannot_serve(checkpoint, source, servable_scenarios(checkpoint), registry, list(serving),
                                        "args.scenario_ingress serves" if args.scenario_ingress is not None
                                        else f"{registry.config_dir} registers")
    return AppPlan(args, checkpoint, source, registry, serving, notes)


def serving_revision(checkpoint: Path, registry: Registry) -> str:
    """A digest of what an app serves: the checkpoint (its folder, step and model file's size and time)
    and the registry's sequences and scenarios. `mtfm serve config` writes it into the file as
    `args.revision`: Ray Serve leaves an app whose config is unchanged as it is, even where the app
    would now find a newer checkpoint or another registry, so this is what changes the file."""
    checkpoint = Path(checkpoint).resolve()
    # A pin (RUN/.serving/<key>/<name>) is its checkpoint's hard links: named as that checkpoint, the same revision
    # whether the run still holds the folder or has pruned it since.
    named = checkpoint.parents[2] / checkpoint.name if is_pinned(checkpoint) else checkpoint
    stat = (checkpoint / MODEL_FILE).stat()
    snapshot = registry.to_dict()
    key = [str(named), read_meta(checkpoint).step, stat.st_size, stat.st_mtime_ns, snapshot["sequences"],
           snapshot["scenarios"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def redeploy_revision(revision: str | None) -> str:
    """`revision` (a `serving_revision`, or None where nothing was found to digest) stamped with the time
    (`mtfm serve config --redeploy`): a file Serve has not seen, so `serve deploy` rebuilds the app and replaces
    every replica. Ray Serve leaves an app whose config is unchanged as it is, a failed one included."""
    now_us = time.time_ns() // 1000
    stamp = f"redeploy-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now_us // 1_000_000))}.{now_us % 1_000_000:06d}Z"
    return f"{revision}+{stamp}" if revision else stamp


def digest_of_revision(revision: str | None) -> str | None:
    """The `serving_revision` part of an `args.revision` (None where it has none)."""
    if revision is None or revision.startswith("redeploy-"):
        return None
    return revision.partition("+")[0]


def parse_app_args(args: AppArgs | dict, config_name: str = "the serve config") -> AppArgs:
    """`args` as AppArgs; a ServeConfigError naming every setting refused and what it expects."""
    if isinstance(args, AppArgs):
        return args
    if not isinstance(args, dict):
        raise ServeConfigError(f"{config_name}: args: expected a mapping of settings, found {type(args).__name__}")
    try:
        return AppArgs.model_validate(args)
    except ValidationError as exc:
        known = ", ".join(AppArgs.model_fields)
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"{config_name}: args.{where}: unknown setting; expected one of: {known}")
            else:
                problems.append(f"{config_name}: args.{where}: {error['msg']}, found {error['input']!r}")
        raise ServeConfigError("; ".join(problems)) from None


def build_app(args: AppArgs) -> Application:
    plan = plan_app(args)
    args = plan.args
    print(f"[mtfm] serving {plan.checkpoint} ({plan.source})", file=sys.stderr, flush=True)
    for note in plan.notes:
        print(f"[mtfm] note: {note}", file=sys.stderr, flush=True)
    pinned = pin_for_serving(plan.checkpoint)  # what replicas load, also on a restart after the run pruned it
    if pinned != plan.checkpoint:
        print(f"[mtfm] replicas load {pinned} (pinned: the run's later checkpoints do not remove it)", file=sys.stderr,
              flush=True)
    if is_pinned(pinned) and time.time() - pinned.stat().st_mtime > 60:  # its time not set: not this user's to set
        print(f"[mtfm] note: {pinned} could not be marked as chosen now (this user may not set its time): `mtfm "
              "serve pins --prune` takes it for an earlier rollout's until an app loads it; prune once this app "
              "serves", file=sys.stderr, flush=True)
    rankers = {
        name: ScenarioDeployment.options(
            name=f"ranker_{name}", num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        ).bind(name, str(pinned), dataclasses.asdict(cfg), args.chunk_size, args.user_cache_ttl_s,
               args.user_cache_mb, args.max_body_bytes if args.scenario_ingress is not None else None)
        for name, cfg in plan.serving.items()
    }
    if args.scenario_ingress is not None:
        return rankers[args.scenario_ingress]
    router = RankRouter.options(num_replicas=args.router_replicas, ray_actor_options={"num_cpus": args.router_num_cpus},
                                max_ongoing_requests=sum(c.max_ongoing_requests for c in plan.serving.values()))
    return router.bind(rankers, str(pinned), {n: c.max_candidates for n, c in plan.serving.items()},
                       args.max_body_bytes)


def servable_scenarios(checkpoint: Path) -> list[str]:
    """The scenarios `checkpoint` has a subgraph for: those its model was trained on (its model
    config's `scenarios` where set, else every scenario of the registry saved with it). A baseline
    architecture has none: it is refused here, before any replica starts."""
    meta = read_meta(checkpoint)
    config = trained_model_config(checkpoint, meta)
    if config.architecture != "mtfm":
        raise ServeConfigError(f"checkpoint {checkpoint} is a {config.architecture} model (its model config's "
                               "architecture), a baseline with no per-scenario subgraph to serve; serve a checkpoint "
                               "of an mtfm model (architecture: mtfm, e.g. trained with configs/model/small.yaml)")
    return list(config.scenarios) if config.scenarios is not None else meta.scenarios


def refuse_what_it_cannot_serve(checkpoint: str | Path, source: str | None, trained: list[str], registry: Registry,
                                served: list[str], served_by: str) -> list[str]:
    """Raises ServeConfigError if the model at `checkpoint` (named by `source`, if given), trained on
    `trained`, cannot serve the scenarios `served` (what `served_by`, e.g. "<config dir> registers")
    as `registry` declares them: one it was not trained on, or a feature or task of theirs (or of a
    sequence) that differs from what it was trained with, since its replicas parse requests with the
    registry it was trained with. Returns notes on what differs harmlessly (a sequence's max_len:
    the replicas keep the trained one). The one rule of what a checkpoint serves, for the app
    builder and `mtfm serve config`."""
    named = f"checkpoint {checkpoint}" + (f" ({source})" if source else "")
    untrained = [s for s in served if s not in trained]
    if untrained and not set(trained) & set(registry.scenarios):  # another registry's model: no subset is served
        recorded = trained_config_dir(read_meta(checkpoint))
        raise ServeConfigError(f"{named} was trained on {trained}, none of which {registry.config_dir} registers: "
                               "the wrong checkpoint, or the wrong config dir? Name the checkpoint or the config dir "
                               "it was trained with" + (f" (it was trained with {recorded})" if recorded else ""))
    if untrained:
        servable = [s for s in trained if s in registry.scenarios]
        raise ServeConfigError(f"{named} was trained without scenarios {untrained} that {served_by} (it was trained "
                               f"on {trained}); train or warm-start a model with them, or serve only scenarios it "
                               f"has: a config dir that registers just {servable}, or one app per trained scenario "
                               f"from `mtfm serve config --scenario-ingress --checkpoint {checkpoint} --config-dir "
                               f"{registry.config_dir}`")
    trained_with = trained_registry(read_meta(checkpoint), str(checkpoint))
    model_changes, cuts = registry_changes(trained_with, registry, served)
    loosened, tightened = _required_changes(trained_with, registry, served)
    model_changes += loosened
    if model_changes:
        raise ServeConfigError(f"{named} was trained with other features, tasks or sequences than "
                               f"{registry.config_dir} declares now: {'; '.join(model_changes + cuts)}; its replicas "
                               "take and score requests as it was trained (its features, their transforms, which are "
                               f"required, its tasks), not as {registry.config_dir} declares them. Train or "
                               "warm-start a model on the registry as it is now (`mtfm train "
                               f"--init-from {checkpoint} ...`), or serve with the config dir it was trained with "
                               f"(`mtfm scenarios export --checkpoint {checkpoint} --out DIR` writes it)")
    retired = [s for s in trained if s not in registry.scenarios]
    notes = [f"{named} was also trained on {retired}, which {registry.config_dir} does not register: not served"
             ] if retired else []
    notes += [f"{named}: {cut} in {registry.config_dir}; its replicas keep the max_len it was trained with"
              for cut in cuts]
    notes += [f"{named}: {change} in {registry.config_dir}; its replicas still take requests without it, as it was "
              "trained" for change in tightened]
    return notes


def _required_changes(trained: Registry, current: Registry, served: list[str]) -> tuple[list[str], list[str]]:
    """Features of the sequences and of `served` whose `required` changed since the model was trained,
    a change the model itself does not see (`registry_changes` leaves it out): (no longer required:
    its replicas still refuse a request without them; newly required: its replicas still take one)."""
    groups = [(f"sequences.{name}.features", s.features, current.sequences[name].features)
              for name, s in trained.sequences.items() if name in current.sequences]
    groups += [(f"scenarios.{name}.{part}", getattr(trained.scenarios[name], part),
                getattr(current.scenarios[name], part))
               for name in served if name in trained.scenarios and name in current.scenarios
               for part in ("user_features", "item_features", "cross_features")]
    pairs = [(where, old, new) for where, before, now in groups for old in before for new in now
             if old.name == new.name and old.required != new.required]
    return ([f"{where}.{old.name}.required: true -> false" for where, old, new in pairs if old.required],
            [f"{where}.{old.name}.required: false -> true" for where, old, new in pairs if new.required])


def resolve_checkpoint(argument: str | None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
                       config_name: str = "the serve config") -> Path:
    """$MTFM_CHECKPOINT, else `argument`, else the newest checkpoint saved under `runs_dir`
    (`newest_checkpoint`), as an absolute path (replicas may start in another working directory)."""
    from_env = os.environ.get(CHECKPOINT_ENV)
    chosen = from_env or argument
    if chosen:
        try:
            found, note = find_served_checkpoint(Path(chosen).expanduser())
        except CheckpointError as exc:  # say where the path came from: the variable is easily left set
            source = f"${CHECKPOINT_ENV}" if from_env else f"{config_name}'s args.checkpoint"
            raise CheckpointError(f"{exc} (the checkpoint to serve, from {source})") from exc
        if note:  # the run pruned it since it was first served: its newest pin, the weights served then
            print(f"[mtfm] {note}", file=sys.stderr, flush=True)
        return found.resolve()
    newest = newest_checkpoint(runs_dir)
    if newest is None:
        raise CheckpointError(f"no checkpoint to serve: set `checkpoint` in {config_name}'s args or ${CHECKPOINT_ENV}, "
                              f"or train a run under {Path(runs_dir).resolve()} (`mtfm train ...`)")
    return newest


def newest_checkpoint(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path | None:
    """The checkpoint saved last under `runs_dir` (absolute), or None: by the time its meta.json was
    written, which nothing rewrites later (a run folder's own time moves whenever a report or an
    eval file is written into it)."""
    runs = Path(runs_dir)
    saved = []
    for meta in runs.glob(f"*/checkpoint_*/{META_FILE}") if runs.is_dir() else ():
        try:  # ties (a file system keeping whole seconds) go to the later step; a running job may delete one
            saved.append((meta.stat().st_mtime_ns, meta.parent.name, meta.parent))
        except FileNotFoundError:
            continue
    return max(saved)[2].resolve() if saved else None


def scenario_serving(registry: Registry, overrides: dict[str, Any],
                     config_name: str = "the serve config") -> dict[str, ServingConfig]:
    """Each registered scenario's serving knobs: its YAML's `serving:` with the serve config's
    overrides, which are read as that block is."""
    unknown = sorted(set(overrides) - set(registry.scenarios))
    if unknown:
        raise ServeConfigError(f"{config_name}: args.scenarios.{unknown[0]}: unknown scenario; registered in "
                               f"{registry.config_dir}: {', '.join(registry.scenarios)}")
    out = {}
    for name, scenario in registry.scenarios.items():
        try:
            given = overrides.get(name)
            cfg = read_serving_knobs({} if given is None else given, config_name, f"args.scenarios.{name}",
                                     scenario.serving)
        except RegistryError as exc:
            raise ServeConfigError(str(exc)) from None
        # Whether the backend can run is the replica's check, on its own node (this builder runs on
        # the Serve controller's, a CPU head on a cluster). The YAML's knobs passed the conflict check
        # in the registry; with serve.yaml's overrides they have not.
        conflict = serving_conflict(cfg)
        if conflict is not None:
            raise ServeConfigError(f"scenario {name} (serving in {scenario.source} or {config_name} "
                                   f"args.scenarios.{name}): {conflict[1]}")
        out[name] = cfg
    return out
