"""The `mtfm` command line: one subcommand per user task, each with its own --help.

Every subcommand takes --config-dir (default: $MTFM_CONFIG_DIR, else ./configs). The heavy
modules (Ray, torch) are imported inside the handlers so that `mtfm --help` stays instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtfm.platform.registry import RegistryError, load_registry

WINDOW_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


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
    print(f"{'scenario':<12} {'user':>5} {'item':>5} {'cross':>5}  tasks")
    for s in reg.scenarios.values():
        print(f"{s.name:<12} {len(s.user_features):>5} {len(s.item_features):>5} {len(s.cross_features):>5}  "
              f"{', '.join(s.task_names)}   {s.description}")
    print(f"\n{'sequence':<12} {'kind':<9} {'max_len':>7}  features")
    for q in reg.sequences.values():
        print(f"{q.name:<12} {q.kind:<9} {q.max_len:>7}  {', '.join(f.name for f in q.features)}")
    return 0


def cmd_scenarios_validate(args: argparse.Namespace) -> int:
    reg = load_registry(args.config_dir)
    print(f"ok: {len(reg.scenarios)} scenarios ({', '.join(reg.scenarios)}) and "
          f"{len(reg.sequences)} sequences ({', '.join(reg.sequences)}) in {reg.config_dir}")
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

    scenarios = sub.add_parser("scenarios", help="list and validate the registered scenarios",
                               description="Inspect the scenario registry (configs/scenarios/*.yaml and configs/sequences.yaml).")
    ssub = scenarios.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ssub.add_parser("list", parents=[common], help="print every scenario and sequence")
    p.set_defaults(handler=cmd_scenarios_list)
    p = ssub.add_parser("validate", parents=[common], help="load and validate every config; exit 1 with the error if any is bad")
    p.set_defaults(handler=cmd_scenarios_validate)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except RegistryError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
