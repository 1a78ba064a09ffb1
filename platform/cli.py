"""The `mtfm` command line: one subcommand per user task, each with its own --help.

Every subcommand that reads the scenario registry takes --config-dir (default: $MTFM_CONFIG_DIR,
else ./configs); `eval` and `report` use the registry saved with the checkpoint. The heavy
modules (Ray, torch) are imported inside the handlers so that `mtfm --help` stays instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mtfm.platform.cluster import send_the_token_where_one_exists
from mtfm.platform.registry import RegistryError, load_registry, resolve_config_dir

WINDOW_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text!r}")
    return int(text)


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 1-65535, found {text!r}")
    return int(text)


def host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected an interface address or host name, e.g. 127.0.0.1, found {text!r}")
    return text


def parse_duration_ms(text: str) -> int:
    """'1d' -> 86400000; units ms, s, m, h, d."""
    for unit in sorted(WINDOW_UNITS_MS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].isdigit() and int(text[: -len(unit)]) > 0:
            return int(text[: -len(unit)]) * WINDOW_UNITS_MS[unit]
    raise argparse.ArgumentTypeError(f"expected a duration such as 1d, 12h or 30m, found {text!r}")


# ---------------------------------------------------------------- scenarios

def cmd_scenarios_list(args: argparse.Namespace) -> int:
    reg = load_registry(args.config_dir)
    print(f"config dir: {reg.config_dir}")
    tasks = {s.name: ", ".join(s.task_names) for s in reg.scenarios.values()}
    width = max([len("tasks"), *map(len, tasks.values())])
    print(f"{'scenario':<12} {'user':>5} {'item':>5} {'cross':>5}  {'tasks':<{width}}  description")
    for s in reg.scenarios.values():
        print(f"{s.name:<12} {len(s.user_features):>5} {len(s.item_features):>5} {len(s.cross_features):>5}  "
              f"{tasks[s.name]:<{width}}  {s.description}")
        groups = (("user", s.user_features), ("item", s.item_features), ("cross", s.cross_features))
        print(" " * 13 + " | ".join(f"{group}: {', '.join(f.name for f in feats)}" for group, feats in groups if feats))
    print(f"\n{'sequence':<12} {'kind':<9} {'max_len':>7}  features")
    for q in reg.sequences.values():
        print(f"{q.name:<12} {q.kind:<9} {q.max_len:>7}  {', '.join(f.name for f in q.features)}")
    return 0


def cmd_scenarios_validate(args: argparse.Namespace) -> int:
    reg = load_registry(args.config_dir)
    print(f"ok: {len(reg.scenarios)} scenarios ({', '.join(reg.scenarios)}) and "
          f"{len(reg.sequences)} sequences ({', '.join(reg.sequences)}) in {reg.config_dir}")
    scenarios = Path(reg.config_dir) / "scenarios"
    unread = sorted(p for p in scenarios.glob("*/**/*") if p.suffix.lower() in (".yaml", ".yml") and p.is_file())
    if unread:  # a scenario file put one folder too deep is not registered: say so rather than leave it unseen
        print(f"note: not read, in subfolders of {scenarios} (scenario files are {scenarios}/*.yaml): "
              f"{', '.join(str(p.relative_to(scenarios)) for p in unread)}")
    return 0


def cmd_scenarios_export(args: argparse.Namespace) -> int:
    from mtfm.platform.checkpoint import find_checkpoint, read_meta, trained_registry

    checkpoint = find_checkpoint(args.checkpoint)
    registry = trained_registry(read_meta(checkpoint), str(checkpoint))
    written = registry.write_config_dir(args.out)
    try:  # what was written reads back, but a snapshot is not held to every check a config dir is
        load_registry(args.out)
    except RegistryError as exc:
        print(f"error: wrote {args.out}, but it does not pass as a config dir: {exc}; edit that field (the checkpoint "
              "was trained before this check)", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(registry.scenarios)} scenarios ({', '.join(registry.scenarios)}) and "
          f"{len(registry.sequences)} sequences, the registry {checkpoint} was trained with ({len(written)} files); "
          f"pass --config-dir {args.out} to serve or resume it with that registry")
    return 0


def cmd_scenarios_infer(args: argparse.Namespace) -> int:
    from mtfm.platform.schema_inference import infer_scenario

    skip = tuple(c.strip() for group in args.skip for c in group.split(",") if c.strip())
    result = infer_scenario(args.name, args.exposures, config_dir=args.config_dir, out=args.out, force=args.force,
                            skip=skip)
    print(result.summary())
    validate = "`mtfm scenarios validate" + (f" --config-dir {args.config_dir}`" if args.config_dir else "`")
    scenarios = resolve_config_dir(args.config_dir) / "scenarios"
    if Path(result.out).resolve().parent != scenarios.resolve():  # --out elsewhere: the registry does not read it
        declared = [path for path in (scenarios / f"{args.name}.yaml", scenarios / f"{args.name}.yml") if path.is_file()]
        target = declared[0] if declared else scenarios / f"{args.name}.yaml"
        validate = f"copy it to {target}{' (replacing it)' if declared else ''}, and run {validate}"
    else:
        validate = f"run {validate}"
    print(f"\nwrote draft {result.out} (validated by the registry); confirm the labels and the user/item/cross "
          f"split, then {validate}")
    return 0


# ---------------------------------------------------------------- data

def cmd_data_synth(args: argparse.Namespace) -> int:
    from mtfm.platform.synth import synthesize

    reg = load_registry(args.config_dir)
    try:
        counts = synthesize(reg, args.out, users=args.users, days=args.days, seed=args.seed,
                            overwrite=args.overwrite, first_day=args.first_day)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} holds only part of the logs; run the command again with --overwrite",
              file=sys.stderr)
        return 130
    print(f"wrote {sum(counts.values()):,} rows in {len(counts)} tables under {args.out}")
    return 0


def cmd_data_aggregate(args: argparse.Namespace) -> int:
    from mtfm.platform.aggregate import aggregate

    reg = load_registry(args.config_dir)
    summary = aggregate(reg, args.raw, args.out, window_ms=args.window, max_ts=args.max_ts,
                        num_partitions=args.partitions, overwrite=args.overwrite)
    if summary["samples_out"] == 0:
        print(f"error: no user samples from {args.raw}: no exposure row was valid for the registry in "
              f"{reg.config_dir} (reasons above: rows later than --max-ts, or logs of another registry, which "
              "needs its --config-dir; MovieLens logs: --config-dir configs/movielens)", file=sys.stderr)
        return 1
    return 0


def cmd_data_movielens(args: argparse.Namespace) -> int:
    from mtfm.platform.movielens import convert_movielens

    reg = load_registry(args.config_dir)
    convert_movielens(reg, args.out, path=args.path, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------- training and evaluation

QUICKSTART_MARK = ".mtfm-quickstart"  # a folder quickstart may replace: one it wrote
QUICKSTART_OUT = "data/quickstart"


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded default: synthetic logs -> Ray Data -> Ray Train -> AUC/GAUC."""
    from mtfm.platform.aggregate import aggregate
    from mtfm.platform.cluster import init_ray, is_embedded
    from mtfm.platform.rawlog import refuse_a_file_for_a_folder
    from mtfm.platform.synth import synthesize
    from mtfm.platform.train import TrainConfig, refuse_existing_run, refuse_workers_the_cluster_cannot_hold, train

    reg = load_registry(args.config_dir)
    config = TrainConfig.load(args.train_config).with_flags({"max_steps": args.max_steps})
    if args.days <= config.test_windows:
        print(f"error: --days {args.days}: {args.train_config} holds out the last {config.test_windows} day(s) for "
              f"evaluation; expected more days than that", file=sys.stderr)
        return 1
    refuse_a_file_for_a_folder(Path(args.out), f"--out {args.out}")
    if args.run_dir is not None:
        refuse_a_file_for_a_folder(Path(args.run_dir), f"--run-dir {args.run_dir}")
        refuse_existing_run(Path(args.run_dir).resolve())  # before the data steps, not after them
    root = Path(args.out)
    names = {p.name for p in root.iterdir() if p.name != QUICKSTART_MARK} if root.is_dir() else set()
    # What quickstart writes there; its default folder without the mark is one an earlier version wrote.
    own = (root / QUICKSTART_MARK).is_file() or args.out == QUICKSTART_OUT
    if any(not name.startswith(".") for name in names - ({"raw", "agg", "serve.yaml"} if own else set())):
        print(f"error: --out {args.out}: holds files that `mtfm quickstart` did not write "
              f"({', '.join(sorted(names)[:5])}), and it replaces raw/ and agg/ in its folder; pass a new or empty "
              "folder (or remove that one)", file=sys.stderr)
        return 1
    # Started before the data steps: a train config whose workers this machine cannot hold is refused
    # now, not after them. Started here, Ray forwards the workers' output: aggregate's own start would
    # not, and the training's progress lines (rank 0's) would never reach the terminal.
    init_ray(log_to_driver=True)
    if is_embedded():  # on a cluster train() warns, once: an autoscaler may add nodes
        refuse_workers_the_cluster_cannot_hold(config, print, remedy="a --train-config of fewer workers; on a "
                                               "machine without a GPU, one without use_gpu, such as the default "
                                               "configs/train/tiny.yaml")
    root.mkdir(parents=True, exist_ok=True)
    (root / QUICKSTART_MARK).write_text("written by `mtfm quickstart`, which replaces raw/ and agg/ here on each run\n")
    print(f"[1/3] synthetic raw logs: {args.users} users x {args.days} days -> {root / 'raw'}")
    synthesize(reg, root / "raw", users=args.users, days=args.days, seed=args.seed, overwrite=True)
    print(f"[2/3] Ray Data aggregation -> {root / 'agg'}")
    aggregate(reg, root / "raw", root / "agg", overwrite=True)
    print(f"[3/3] Ray Train: {args.train_config}")
    run_dir = train(config, data=str(root / "agg"), out=args.run_dir, config_dir=args.config_dir)
    # deployments/serve.yaml names ./configs; another registry needs a serve config of its own
    serve = f"MTFM_CHECKPOINT={run_dir} serve run deployments/serve.yaml"
    if reg.config_dir.resolve() != Path("configs").resolve():
        serve = (f"mtfm serve config --config-dir {reg.config_dir} --checkpoint {run_dir} --out "
                 f"{root / 'serve.yaml'} && serve run {root / 'serve.yaml'}")
    print(f"\nnext: mtfm eval --checkpoint {run_dir} --data {root / 'agg'}\n"
          f"      mtfm report {run_dir}\n"
          f"      {serve}")
    return 0



def cmd_train(args: argparse.Namespace) -> int:
    from mtfm.platform.train import run_from_args

    return run_from_args(args)


def cmd_report(args: argparse.Namespace) -> int:
    from mtfm.platform.report import run_from_args

    return run_from_args(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from mtfm.platform.eval import run_from_args

    return run_from_args(args)


# ---------------------------------------------------------------- model

def cmd_model_summary(args: argparse.Namespace) -> int:
    from mtfm.model import build_model, load_model_config
    from mtfm.model.summary import TokenMix, forward_flops, parameter_counts, training_flops

    reg = load_registry(args.config_dir)
    config = load_model_config(args.config)
    model = build_model(config, reg)
    if config.architecture == "mtfm":
        body = (f"{config.num_heads} query heads / {config.kv_heads} kv heads of dim {config.dim_per_head}, "
                f"layout {config.hta_layout} = {config.num_layers} layers ({', '.join(config.layer_kinds)}; the top "
                f"one always runs as target attention), attention {config.attention_impl}, GLN {config.norm_impl}")
    else:  # a baseline: target-attention pooling of the sequences, then its interaction network
        interaction = f"{config.cross_layers} cross layers + deep MLP" if config.architecture == "dcnv2" else "top MLP"
        body = (f"target-attention pooling with {config.num_heads} heads of dim {config.d_model // config.num_heads}, "
                f"then {interaction}, attention {config.attention_impl}")
    print(f"model {config.name} ({config.source}): {config.architecture}, d_model {config.d_model}, {body}, "
          f"compute {config.compute_dtype}")
    print(f"scenarios: {', '.join(model.registry.scenarios)}; sequences: {', '.join(reg.sequences)}")
    print("\nparameters")
    for part, count in parameter_counts(model).items():
        print(f"  {part:<18} {count:>14,}")
    if config.architecture != "mtfm":
        print(f"\nforward FLOPs: counted for architecture mtfm only, not {config.architecture}")
        return 0
    mix = TokenMix.typical(model.registry, args.targets)
    print(f"\nforward FLOPs per sample ({mix.num_tokens:.0f} tokens: "
          + ", ".join(f"{g} {round(n, 1):g}" for g, n in mix.tokens.items())
          + f"; {mix.full_pairs:,.0f} visible pairs with every token a query, {mix.target_pairs:,.0f} with T only)")
    forward = forward_flops(config, model.registry, mix)
    for part, flops in forward.items():
        print(f"  {part:<18} {flops / 1e9:>14.4f} GFLOP")
    print(f"\ntraining FLOPs per sample (backward 2x forward, 2.5x for attention)\n"
          f"  {'total':<18} {training_flops(forward) / 1e9:>14.4f} GFLOP")
    return 0


# ---------------------------------------------------------------- serving

def _holds_a_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint, or a run folder holding one, on this machine (a meta file:
    the checkpoint may still be refused, as a baseline's or a damaged one)."""
    from mtfm.platform.checkpoint import CHECKPOINT_PREFIX, META_FILE

    return (path / META_FILE).is_file() or any((p / META_FILE).is_file() for p in path.glob(f"{CHECKPOINT_PREFIX}*"))


def cmd_serve_config(args: argparse.Namespace) -> int:
    from mtfm.deployments.app import (CHECKPOINT_ENV, DEFAULT_RUNS_DIR, ServeConfigError, newest_checkpoint,
                                      redeploy_revision, refuse_what_it_cannot_serve, servable_scenarios,
                                      serving_revision)
    from mtfm.deployments.serve_config import render_serve_config
    from mtfm.platform.checkpoint import CheckpointError, find_served_checkpoint

    reg = load_registry(args.config_dir)  # refuse to write a serve config for an invalid registry
    scenarios = list(reg.scenarios)
    revision = None  # of the checkpoint found here, if one is
    if args.checkpoint is None:  # the app picks one when it is built: said, and checked as it is now
        from_env = os.environ.get(CHECKPOINT_ENV)
        if from_env:
            picks = f"checkpoint: null serves ${CHECKPOINT_ENV} where the app is built ({from_env} here)"
            picked = Path(from_env).expanduser()
        else:
            picks = f"checkpoint: null serves the newest checkpoint under {DEFAULT_RUNS_DIR}/ when the app is built"
            picked = newest_checkpoint(DEFAULT_RUNS_DIR)
        if picked is None:
            print(f"note: {picks}; there is none under {Path(DEFAULT_RUNS_DIR).resolve()} now (train one first, or "
                  "pass --checkpoint)", file=sys.stderr)
        else:
            try:
                found, _ = find_served_checkpoint(picked)
                notes = refuse_what_it_cannot_serve(found, None, servable_scenarios(found), reg, scenarios,
                                                    f"{reg.config_dir} registers")
                print(f"note: {picks}: now {found}", file=sys.stderr)
                for line in notes:
                    print(f"note: {line}", file=sys.stderr)
                revision = serving_revision(found, reg)
            except (CheckpointError, ServeConfigError, RegistryError) as exc:  # still written: the app picks later
                print(f"warning: {picks}: now {picked}, which the app would refuse: {exc}. Pass --checkpoint to "
                      "serve another", file=sys.stderr)
    else:
        try:
            found, note = find_served_checkpoint(args.checkpoint)
            trained = servable_scenarios(found)
        except (CheckpointError, ServeConfigError) as exc:
            if _holds_a_checkpoint(Path(args.checkpoint).expanduser()):  # found here and refused: so would the app be
                print(f"error: {exc}", file=sys.stderr)
                return 1
            revision_said = ("with args.revision the time alone (--redeploy; nothing here to digest)" if args.redeploy
                             else "without args.revision (nothing here to digest)")
            print(f"warning: {exc}; written as given, for a cluster whose machines have that path, {revision_said}: "
                  "to roll out a newer checkpoint there, name it (--checkpoint RUN/checkpoint_N)", file=sys.stderr)
        else:
            if note:  # as the app builder will
                print(f"note: {note}", file=sys.stderr)
            untrained = [s for s in scenarios if s not in trained]
            if untrained and args.scenario_ingress and len(untrained) < len(scenarios):
                scenarios = [s for s in scenarios if s in trained]
                print(f"note: {args.checkpoint} was trained on {trained} only: no app for {untrained}", file=sys.stderr)
            try:  # what the app builder would refuse is not written
                notes = refuse_what_it_cannot_serve(found, None, trained, reg, scenarios, f"{reg.config_dir} registers")
            except (CheckpointError, ServeConfigError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            for line in notes:
                print(f"note: {line}", file=sys.stderr)
            revision = serving_revision(found, reg)
    # The registry validated above: --config-dir, else $MTFM_CONFIG_DIR, else ./configs. The app is built in the
    # folder where the cluster's `ray start` ran: paths given are written absolute (the default stays relative,
    # for `serve run` from the repository root).
    # (absolute, not resolved: a symlink such as runs/latest stays one)
    explicit = args.config_dir or os.environ.get("MTFM_CONFIG_DIR")
    config_dir = os.path.abspath(reg.config_dir) if explicit else str(reg.config_dir)
    checkpoint = None if args.checkpoint is None else os.path.abspath(os.path.expanduser(args.checkpoint))
    if args.redeploy:
        revision = redeploy_revision(revision)
    text = render_serve_config(config_dir=config_dir, checkpoint=checkpoint, host=args.host, port=args.port,
                               scenario_ingress=scenarios if args.scenario_ingress else None, revision=revision)
    if args.out is None:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        print(f"error: --out {out}: " + ("a folder; expected a file" if out.is_dir() else f"no folder {out.parent}"),
              file=sys.stderr)
        return 1
    from mtfm.platform.files import write_whole

    write_whole(out.resolve(), text)  # resolved: a link stays a link, to the file it names
    print(f"wrote {out}", file=sys.stderr)
    return 0


APP_BUILDER = "mtfm.deployments.app:build_app"


def _keys_serve_ignores(config: dict) -> list[tuple[str, str, list[str]]]:
    """(where, key, the keys Serve reads there) for each key of a Serve config that Serve's schema does not know:
    it validates what it knows and drops the rest, so a misspelt `http_options` binds the default address."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, gRPCOptionsSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    found = []

    def against(schema, mapping, where: str) -> None:
        if isinstance(mapping, dict):
            known = list(schema.model_fields)
            found.extend((where, key, known) for key in mapping if key not in known)

    against(ServeDeploySchema, config, "")
    against(HTTPOptionsSchema, config.get("http_options"), "http_options.")
    against(gRPCOptionsSchema, config.get("grpc_options"), "grpc_options.")
    for i, app in enumerate(config.get("applications") or []):
        against(ServeApplicationSchema, app, f"applications[{i}].")
        for j, deployment in enumerate(app.get("deployments") or [] if isinstance(app, dict) else []):
            where = f"applications[{i}].deployments[{j}]."
            against(DeploymentSchema, deployment, where)
            if isinstance(deployment, dict):
                against(RayActorOptionsSchema, deployment.get("ray_actor_options"), f"{where}ray_actor_options.")
                against(AutoscalingConfig, deployment.get("autoscaling_config"), f"{where}autoscaling_config.")
    return found


def _ray_version() -> str:
    import ray

    return ray.__version__


def cmd_serve_check(args: argparse.Namespace) -> int:
    """Every check the app builder makes, on each of this project's applications in a serve config,
    without Ray: `serve run` of a config the builder refuses keeps running and answers 404s, with
    the reason among Ray's retries."""
    import difflib

    import yaml

    from mtfm.deployments.app import ServeConfigError, digest_of_revision, plan_app, serving_revision
    from mtfm.platform.checkpoint import CheckpointError

    path = Path(args.file)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {path}: cannot read it: {exc}", file=sys.stderr)
        return 1
    except yaml.YAMLError as exc:
        print(f"error: {path}: not YAML: {exc}", file=sys.stderr)
        return 1
    apps = config.get("applications") if isinstance(config, dict) else None
    if not isinstance(apps, list) or not apps or not all(isinstance(app, dict) for app in apps):
        print(f"error: {path}: expected a Serve config, a mapping whose `applications` is a list of applications "
              "(`mtfm serve config` writes one)", file=sys.stderr)
        return 1
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:  # what `serve run` checks first: Serve's own schema (names, route prefixes, args a mapping)
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            print(f"error: {path}: {where}: {error['msg']} (Serve's config schema)", file=sys.stderr)
        return 1
    unknown = _keys_serve_ignores(config)
    for where, key, expected in unknown:
        close = difflib.get_close_matches(str(key), expected, n=1)
        print(f"error: {path}: {where}{key if isinstance(key, str) else repr(key)}: unknown key, which Serve ignores "
              f"(`serve run` would use the default instead){f'; did you mean {close[0]}?' if close else ''} Expected "
              f"one of: {', '.join(expected)} (as this machine's Ray {_ray_version()} reads them)", file=sys.stderr)
    if unknown:
        return 1
    failed = checked = 0
    built_in = f"this folder ({Path.cwd()}), as a `serve run` that starts its own Ray here would"
    wanted = {"CPU": 0.0, "GPU": 0.0}  # what the checked apps' replicas ask of a cluster, for a `serve run` here
    unavailable: dict[str, list[str]] = {}  # backend -> the scenarios configured with it
    for i, app in enumerate(apps):
        name = f"applications[{i}] ({app.get('name', 'default')})"
        problem = _route_prefix_problem(app.get("route_prefix", "/"))
        if problem:  # Serve's schema lets these through; its deploy step refuses them
            print(f"error: {path} {name}: route_prefix {app['route_prefix']!r}: {problem}", file=sys.stderr)
            failed += 1
            continue
        if app.get("import_path") != APP_BUILDER:
            problem = _import_problem(app.get("import_path", ""))
            if problem:
                print(f"error: {path} {name}: import_path {app.get('import_path')!r}: {problem}", file=sys.stderr)
                failed += 1
            else:
                print(f"note: {path} {name}: import_path {app.get('import_path')!r} is not {APP_BUILDER}; not "
                      "checked", file=sys.stderr)
            continue
        checked += 1
        try:
            plan = plan_app(app.get("args", {}), f"{path} {name}", built_in)
        except (ServeConfigError, CheckpointError, RegistryError) as exc:
            message = str(exc) if str(exc).startswith(f"{path} {name}") else f"{path} {name}: {exc}"
            print(f"error: {message}", file=sys.stderr)
            failed += 1
            continue
        for note in plan.notes:
            print(f"note: {path} {name}: {note}", file=sys.stderr)
        now = serving_revision(plan.checkpoint, plan.registry)
        digested = digest_of_revision(plan.args.revision)
        if digested is not None and digested != now:
            print(f"warning: {path} {name}: args.revision {plan.args.revision} was written for another checkpoint or "
                  f"registry than the app finds now ({now}): `serve deploy` of this file leaves a deployed app as it "
                  f"is; regenerate it (`mtfm serve config ... --out {path}`) to roll them out", file=sys.stderr)
        scenarios = ", ".join(f"{scenario} ({cfg.replicas} x {cfg.backend}, {cfg.num_gpus:g} GPU)"
                              for scenario, cfg in plan.serving.items())
        print(f"ok: {path} {name} at {app.get('route_prefix', '/')}: {plan.checkpoint} ({plan.source}), registry "
              f"{plan.registry.config_dir}; serves {scenarios}")
        for scenario, cfg in plan.serving.items():
            wanted["CPU"] += cfg.replicas * cfg.num_cpus
            wanted["GPU"] += cfg.replicas * cfg.num_gpus
            unavailable.setdefault(cfg.backend, []).append(scenario)
        if plan.args.scenario_ingress is None:
            wanted["CPU"] += plan.args.router_replicas * plan.args.router_num_cpus
    if not checked:
        print(f"error: {path}: no application builds with {APP_BUILDER}", file=sys.stderr)
        return 1
    for warning in _what_this_machine_lacks(wanted, unavailable):
        print(f"warning: {path}: {warning}", file=sys.stderr)
    return 1 if failed else 0


def _route_prefix_problem(prefix) -> str | None:
    """What Serve's deploy step refuses in an application's route_prefix (its config schema does not)."""
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        return "expected a path that starts with '/', e.g. /hp"
    if prefix != "/" and prefix.endswith("/"):
        return "expected no trailing '/' (but for the prefix '/' itself)"
    if "{" in prefix or "}" in prefix:
        return "expected no wildcards ('{', '}')"
    return None


def _import_problem(import_path: str) -> str | None:
    """Why `serve run` could not import an application's builder (None when it can), from this folder as
    `serve run`'s default --app-dir."""
    import importlib

    module, _, attribute = import_path.rpartition(":") if ":" in import_path else import_path.rpartition(".")
    if not module or not attribute:
        return "expected MODULE:ATTRIBUTE, e.g. " + APP_BUILDER
    sys.path.insert(0, str(Path.cwd()))
    try:
        found = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - what `serve run` would meet
        return f"cannot import {module} ({type(exc).__name__}: {exc})"
    finally:
        sys.path.remove(str(Path.cwd()))
    if not hasattr(found, attribute):
        return f"{module} has no {attribute}"
    return None


def _what_this_machine_lacks(wanted: dict[str, float], backends: dict[str, list[str]]) -> list[str]:
    """Where `serve run` would start its own Ray here (no RAY_ADDRESS): the backends this machine cannot
    run and the CPUs and GPUs its replicas ask for beyond the machine's. A cluster may have them."""
    if os.environ.get("RAY_ADDRESS"):
        return []
    import torch

    from mtfm.deployments.backends import backend_unavailable_reason

    lacks = [f"scenario(s) {', '.join(scenarios)}: {reason}; their replicas would not start here"
             for backend, scenarios in backends.items() if (reason := backend_unavailable_reason(backend))]
    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    lacks += [f"the replicas ask for {wanted[kind]:g} {kind} in all, this machine has {have[kind]:g}: a `serve run` "
              "here would wait for them (a cluster with more: RAY_ADDRESS)" for kind in ("CPU", "GPU")
              if wanted[kind] > have[kind]]
    return lacks


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def cmd_serve_pins(args: argparse.Namespace) -> int:
    """A run's pins (RUN/.serving), which apps of the Serve instances at --url load, and with --prune the others
    removed (`mtfm.deployments.pins`)."""
    import time

    from mtfm.deployments.pins import RECENT_S, checkpoints_served, removable, remove_pins, run_pins

    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: {'not a folder' if run.exists() else 'not found'} (expected a run folder)")
    if args.prune and not args.url:
        raise ValueError(f"--prune needs --url, the HTTP address of each Serve instance with apps serving from {run}: "
                         "a pin that no app is asked about may still be loaded by one, and read again when its "
                         "replica restarts")
    pins = run_pins(run)
    users: dict[Path, list[str]] = {}
    for url in args.url:
        others: list[str] = []
        for app, scenarios in checkpoints_served(url, others).items():
            for scenario, folder in scenarios.items():
                if folder is not None:
                    users.setdefault(Path(folder).resolve(), []).append(f"{scenario} ({app})")
                elif args.prune:
                    raise ValueError(f"{url}: scenario {scenario} of app {app} did not report the checkpoint it "
                                     "loads (its replica is down, starting or busy, or the app was deployed before "
                                     "replicas reported it); nothing was removed: prune once every scenario answers")
                else:
                    print(f"note: {url}: scenario {scenario} of app {app} did not report the checkpoint it loads",
                          file=sys.stderr)
        for other in others:
            print(f"note: {url}: app {other}: not an mtfm app, skipped", file=sys.stderr)
    if not pins:
        print(f"{run}: no pins ({run / '.serving'} holds none: no app has been built from this run's checkpoints)")
        return 0
    print(f"{run / '.serving'}: {len(pins)} pin(s), newest first")
    rows = [("pin", "step", "chosen (UTC)", "frees", "loaded by")]
    for pin in pins:
        rows.append((str(pin.folder.relative_to(run)), str(pin.step),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(pin.chosen_at)),
                     _size(pin.unshared_bytes),
                     ", ".join(users.get(pin.folder.resolve(), [])) or ("-" if args.url else "(no --url asked)")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if args.prune and not any(pin.folder.resolve() in users for pin in pins):
        print(f"no app at {', '.join(args.url)} loads a pin of {run}: nothing removed (with no app serving from it, "
              f"`rm -r {run / '.serving'}` removes them all)")
    elif args.prune:
        now = time.time()
        doomed = removable(pins, set(users), now)
        removed = remove_pins(doomed)
        newest_loaded = max(pin.chosen_at for pin in pins if pin.folder.resolve() in users)
        spared = [pin for pin in pins if pin not in doomed and pin.folder.resolve() not in users]
        newer = sum(1 for pin in spared if pin.chosen_at >= newest_loaded)
        recent = len(spared) - newer
        chosen = len(doomed) - len(removed)
        reasons = [f"{newer} newer than every pin an app loads" if newer else "",
                   f"{recent} an app build chose in the last {RECENT_S / 60:g} minutes" if recent else ""]
        reasons = " and ".join(r for r in reasons if r)
        print(f"removed {len(removed)} pin(s) no app loads, freeing {_size(sum(p.unshared_bytes for p in removed))}; "
              f"kept {len(pins) - len(removed)}" + (f", of them {reasons} (a rollout may be starting on it)"
                                                     if reasons else "")
              + (f", and {chosen} an app build chose meanwhile" if chosen else ""))
    return 0


def cmd_serve_example_request(args: argparse.Namespace) -> int:
    import json

    from mtfm.deployments.rank_request import example_request

    reg = load_registry(args.config_dir)
    if args.scenario not in reg.scenarios:
        print(f"error: unknown scenario {args.scenario!r}; registered in {reg.config_dir}: {', '.join(reg.scenarios)} "
              "(another config dir: --config-dir DIR or $MTFM_CONFIG_DIR)", file=sys.stderr)
        return 1
    most = reg.scenario(args.scenario).serving.max_candidates
    if args.candidates > most:
        print(f"error: --candidates {args.candidates}: scenario {args.scenario} accepts at most {most} per request "
              "(its serving.max_candidates)", file=sys.stderr)
        return 1
    print(json.dumps(example_request(reg, args.scenario, candidates=args.candidates, events=args.events,
                                     seed=args.seed, columns=args.columns), indent=args.indent or None))
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", default=None, metavar="DIR",
                        help="config directory holding sequences.yaml and scenarios/ "
                             "(default: $MTFM_CONFIG_DIR, else ./configs)")

    parser = argparse.ArgumentParser(
        prog="mtfm", description="Train and serve one multi-scenario recommendation foundation model (MTFM) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scenarios = sub.add_parser("scenarios", help="list, validate, export and infer (draft) scenarios",
                               description="Inspect the scenario registry (configs/scenarios/*.yaml and configs/sequences.yaml).")
    ssub = scenarios.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ssub.add_parser("list", parents=[common], help="print every scenario and sequence",
                        description="Print every registered scenario (its features and tasks) and sequence.")
    p.set_defaults(handler=cmd_scenarios_list)
    p = ssub.add_parser("validate", parents=[common], help="load and validate every config; exit 1 with the error if any is bad",
                        description="Load and validate sequences.yaml and every scenarios/*.yaml of the config "
                                    "directory; exit 1 with 'file: field: what was expected' on the first error.")
    p.set_defaults(handler=cmd_scenarios_validate)
    p = ssub.add_parser("export", help="write the registry a checkpoint was trained with as a config dir",
                        description="Write the registry a checkpoint was trained with (its meta.json's copy) as a "
                                    "config dir: sequences.yaml and scenarios/<name>.yaml, to serve or resume the "
                                    "checkpoint with after the config dir it came from has changed (`mtfm eval` "
                                    "reads the checkpoint's own registry already).")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (its newest checkpoint) or one checkpoint_* folder")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    p.set_defaults(handler=cmd_scenarios_export)
    p = ssub.add_parser("infer", parents=[common], help="draft a scenario YAML from an exposure log",
                        description="Infer a draft configs/scenarios/NAME.yaml from an exposure log (Parquet file "
                                    "or folder, or CSV): feature types, buckets/dim from cardinality, numeric "
                                    "transforms, label columns as tasks, the user/item/cross split; features the "
                                    "registry already declares are copied exactly. The draft is validated by the "
                                    "registry and a table of what was inferred, and why, is printed. Rules: "
                                    "platform/schema_inference.py.")
    p.add_argument("--name", required=True, metavar="NAME", help="scenario name (a lower-case identifier)")
    p.add_argument("--exposures", required=True, metavar="PATH",
                   help="the exposure log: a Parquet file, a folder of Parquet files, or a CSV file")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the draft (default: <config-dir>/scenarios/NAME.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--skip", action="append", default=[], metavar="COLUMN[,COLUMN]",
                   help="leave these columns out (e.g. string columns not mapped to integer ids); repeatable")
    p.set_defaults(handler=cmd_scenarios_infer)

    data = sub.add_parser("data", help="make raw logs and aggregate them into user-level samples",
                          description="Raw logs (exposures/<scenario>/, behaviors/<sequence>/ Parquet) and their "
                                      "aggregation into one sample per user and window (README.md, section 'Data').")
    dsub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = dsub.add_parser("synth", parents=[common], help="write synthetic raw logs for every registered scenario",
                        description="Write synthetic raw logs (the raw-log contract) for every scenario and sequence "
                                    "of the registry, driven by their YAML (features, tasks, synthetic: knobs). "
                                    "Deterministic per seed, and per day: day N (2026-01-01 UTC + N days) is the "
                                    "same whatever --days and --first-day, so new days can be added to an --out "
                                    "later (--first-day), as logs arrive.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write exposures/ and behaviors/ into")
    p.add_argument("--users", type=positive_int, default=2000, metavar="N", help="number of users (default 2000)")
    p.add_argument("--days", type=positive_int, default=7, metavar="D", help="number of days to write (default 7)")
    p.add_argument("--first-day", type=non_negative_int, default=0, metavar="N",
                   help="write days N..N+D-1 only (default 0; day 0 also writes the history's 7 warm-up days); "
                        "into an --out holding earlier days of the same --seed and --users, they are added")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="write days whose files exist again: the files of --first-day and later days are removed "
                        "first (all of exposures/ and behaviors/ with --first-day 0, or where --out holds logs of "
                        "another seed, --users or registry)")
    p.set_defaults(handler=cmd_data_synth)

    p = dsub.add_parser("aggregate", parents=[common], help="aggregate raw logs into user samples on Ray Data",
                        description="Aggregate raw logs into one sample per (user, window) on Ray Data (RAY_ADDRESS "
                                    "if set, else a local Ray): OUT/samples/*.parquet with the registry's aggregated "
                                    "schema, bad rows with a reason under OUT/quarantine/<kind>/<table>/, and "
                                    "OUT/_summary.json.")
    p.add_argument("--raw", required=True, metavar="DIR", help="raw logs: DIR/exposures/<scenario>/, DIR/behaviors/<sequence>/")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--window", type=parse_duration_ms, default=parse_duration_ms("1d"), metavar="DURATION",
                   help="aggregation window, aligned to the epoch: 1d (default), 12h, 30m, ...")
    p.add_argument("--max-ts", type=int, default=None, metavar="MS",
                   help="latest valid ts in ms; later rows are quarantined (default: now plus one day)")
    p.add_argument("--partitions", type=positive_int, default=None, metavar="P",
                   help="user partitions (default: enough for at most ~4M raw rows each, a multiple of the CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace samples/, quarantine/ and _summary.json in --out")
    p.set_defaults(handler=cmd_data_aggregate)

    p = dsub.add_parser("movielens", parents=[common], help="convert MovieLens-100K (RecBole atomic files) to raw logs",
                        description="Convert MovieLens-100K into the raw-log contract: three scenarios by user age "
                                    "(<25, 25-34, >=35), click = rating >= 4, order = rating == 5, every rating also a "
                                    "behaviour event. Use with --config-dir configs/movielens. Needs "
                                    "`pip install --no-deps recbole==1.2.1` unless --path is given.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write exposures/ and behaviors/ into")
    p.add_argument("--path", default=None, metavar="DIR",
                   help="a folder of RecBole atomic files (*.inter, *.user, *.item) with the ml-100k fields "
                        "(default: ml-100k shipped in the recbole package)")
    p.add_argument("--overwrite", action="store_true", help="replace exposures/ and behaviors/ already in --out")
    p.set_defaults(handler=cmd_data_movielens)

    model = sub.add_parser("model", help="inspect model configs",
                           description="Inspect a model config (configs/model/*.yaml) on the registered scenarios.")
    msub = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = msub.add_parser("summary", parents=[common], help="print parameter counts and FLOPs per sample",
                        description="Print a model config's layers, parameter counts by part, and forward and "
                                    "training FLOPs per sample on a typical token mix of the registered scenarios "
                                    "(training: backward 2x forward, 2.5x for attention).")
    p.add_argument("--config", required=True, metavar="FILE", help="model config, e.g. configs/model/small.yaml")
    p.add_argument("--targets", type=non_negative_int, default=100, metavar="N",
                   help="T-tokens per sample for the FLOP count, spread over the scenarios (default 100); "
                        "sequences count at their max_len")
    p.set_defaults(handler=cmd_model_summary)

    p = sub.add_parser("quickstart", parents=[common], help="synthetic data -> Ray Data -> Ray Train -> AUC/GAUC, on local Ray",
                       description="Run the main job end to end on the embedded default (local Ray, local Parquet, "
                                   "synthetic data): write synthetic logs, aggregate them with Ray Data, train the "
                                   "tiny config with Ray Train and print AUC/GAUC per scenario and task.")
    p.add_argument("--out", default=QUICKSTART_OUT, metavar="DIR", help="data folder (default data/quickstart): its raw/ and agg/ are replaced on each run; a "
                        "folder holding anything quickstart did not write is refused")
    p.add_argument("--users", type=positive_int, default=400, help="synthetic users (default 400)")
    p.add_argument("--days", type=positive_int, default=4,
                   help="days of logs; the last (the train config's test_windows) are the test set (default 4)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default 0)")
    p.add_argument("--train-config", default="configs/train/tiny.yaml", metavar="CFG",
                   help="train config (default configs/train/tiny.yaml; configs/train/gpu.yaml on one GPU)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop training after this many steps (default: the train config's max_steps, else its epochs)")
    p.add_argument("--run-dir", default=None, metavar="RUN_DIR", help="run folder (default: runs/<name>-<time>)")
    p.set_defaults(handler=cmd_quickstart)

    p = sub.add_parser("train", parents=[common], help="train on Ray Train (embedded local Ray unless RAY_ADDRESS is set)",
                       description="Train a model on aggregated samples with Ray Train (TorchTrainer): token-budget "
                                   "batches, DDP over num_workers, checkpoints with resume, AUC/GAUC on the last "
                                   "windows. Same as `python -m mtfm.platform.train`. With no RAY_ADDRESS it "
                                   "starts a local Ray of its own; RAY_ADDRESS=HOST:6379 joins a cluster (with "
                                   "RAY_AUTH_MODE=token where ~/.ray/auth_token exists).")
    from mtfm.platform.train import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="AUC and GAUC per (scenario, task) of a checkpoint",
                       description="Evaluate a checkpoint on the held-out last windows (days) of aggregated samples: "
                                   "AUC and GAUC (per-user AUC, impression-weighted, over users with both classes). "
                                   "The scenarios are those saved with the checkpoint.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder (its newest checkpoint is used) or one checkpoint_* folder")
    p.add_argument("--data", default=None, metavar="AGG_DIR",
                   help="aggregated samples (--out of `mtfm data aggregate`; default: the data the run trained on)")
    p.add_argument("--test-windows", type=positive_int, default=None, metavar="N",
                   help="hold out the last N windows (default: the checkpoint's train config, usually 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("report", help="plot a run: loss, AUC/GAUC curves, attention heatmap",
                       description="Write PNGs into RUN_DIR/report/: the loss curve, AUC and GAUC per scenario and "
                                   "task over the run's checkpoints, and the top layer's attention of T-tokens "
                                   "(columns, by scenario) to H-tokens (rows) for a few users.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `mtfm train`")
    p.add_argument("--data", default=None, metavar="AGG_DIR",
                   help="aggregated samples for the attention heatmap (default: the run's training data)")
    p.set_defaults(handler=cmd_report)

    serve = sub.add_parser("serve", help="serve every scenario on Ray Serve: config and example requests",
                           description="Ray Serve: one deployment per registered scenario behind POST /<scenario>/rank. "
                                       "Start it with `serve run deployments/serve.yaml`.")
    vsub = serve.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = vsub.add_parser("config", parents=[common], help="write serve.yaml generated from the registry",
                        description="Write the Serve config (`mtfm serve config --out deployments/serve.yaml`), or "
                                    "print it without --out. It holds overrides only: the app builder enumerates the "
                                    "registry, so new scenarios need no edit. Nothing is written when the registry or "
                                    "the checkpoint is refused (a --checkpoint without a checkpoint on this machine is "
                                    "written with a warning: it may be a path on the cluster).")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the config to FILE, replacing it whole, and only if every check passed (a shell's "
                        "`> FILE` empties it before the command runs)")
    p.add_argument("--checkpoint", default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                   help="checkpoint to serve (default: null = $MTFM_CHECKPOINT, else the newest checkpoint saved "
                        "under runs/)")
    p.add_argument("--host", type=host, default="0.0.0.0",
                   help="HTTP interface (default 0.0.0.0: every interface; 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--scenario-ingress", action="store_true",
                   help="one app per registered scenario, its replicas taking HTTP themselves at /<scenario>/rank "
                        "(no router hop; regenerate when scenarios change)")
    p.add_argument("--redeploy", action="store_true",
                   help="stamp args.revision with the time, so that `serve deploy` of the file rebuilds the app and "
                        "starts every replica again even where the checkpoint and the registry are unchanged: to retry "
                        "a rollout that failed for a cause outside them (a package or a GPU a node lacked), once fixed")
    p.set_defaults(handler=cmd_serve_config)
    p = vsub.add_parser("check", help="check a serve config as the app builder will, before `serve run`",
                        description="Check FILE against Serve's config schema, then make every check the app "
                                    f"builder makes on each application that builds with {APP_BUILDER} (its args, the "
                                    "registry, each scenario's serving knobs, the checkpoint and whether it can serve "
                                    "them), without starting Ray. Relative paths are read in this folder and "
                                    "$MTFM_CHECKPOINT in this shell, as a `serve run FILE` that starts its own Ray "
                                    "here reads them (on a running cluster the app is built where its `ray start` "
                                    "ran, with its environment). `serve run` of a config the builder refuses keeps "
                                    "running and answers 404 on every path. Exit status 1 if anything is refused.")
    p.add_argument("file", metavar="FILE", help="the serve config, e.g. deployments/serve.yaml")
    p.set_defaults(handler=cmd_serve_check)
    p = vsub.add_parser("pins", help="list a run's checkpoints pinned for serving; --prune removes those no app loads",
                        description="List the checkpoints of RUN_DIR pinned for serving (RUN_DIR/.serving: hard "
                                    "links the app builder makes, never removed by training or serving, so that a "
                                    "replica restarted later finds its weights), with what removing each frees (its "
                                    "files the run no longer holds) and which apps load it: every app of the Serve "
                                    "instance at --url (its proxy's /-/routes) is asked by its /healthz. --prune "
                                    "removes the pins no app loads, but not those newer than every pin an app loads "
                                    "(a rollout may be starting on them), and nothing unless every scenario of every "
                                    "app answered.")
    p.add_argument("run", metavar="RUN_DIR", help="the run folder whose checkpoints apps serve")
    p.add_argument("--url", action="append", default=[], metavar="SERVE_URL",
                   help="the HTTP address of Serve's proxy, e.g. http://127.0.0.1:8000 (every app there is asked); "
                        "once per Serve instance with apps serving from RUN_DIR")
    p.add_argument("--prune", action="store_true",
                   help="remove the pins no app loads, older than the newest one an app loads")
    p.set_defaults(handler=cmd_serve_pins)
    p = vsub.add_parser("example-request", parents=[common], help="print a valid rank request for a scenario",
                        description="Print a valid JSON body for POST /<scenario>/rank, built from the scenario's "
                                    "YAML: every user, item and cross feature and every sequence.")
    p.add_argument("--scenario", required=True, metavar="S", help="a registered scenario")
    p.add_argument("--candidates", type=positive_int, default=3, metavar="K",
                   help="candidates (default 3; at most the scenario's serving.max_candidates)")
    p.add_argument("--events", type=non_negative_int, default=4, metavar="N", help="events per sequence (default 4)")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                   help="varies the feature values (default 0)")
    p.add_argument("--indent", type=non_negative_int, default=2, metavar="N",
                   help="JSON indent (default 2; 0: compact, on one line)")
    p.add_argument("--columns", action="store_true",
                   help="events and candidates as objects of columns (smaller, faster to check)")
    p.set_defaults(handler=cmd_serve_example_request)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    send_the_token_where_one_exists()
    try:
        return args.handler(args) or 0
    except RegistryError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # CheckpointError is a ValueError
        # a bad input named by the code that refused it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was left, and how to go on, is said where it is known
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush fails again
        return 0


if __name__ == "__main__":
    sys.exit(main())
