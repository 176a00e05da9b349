"""What the scripts share: argument parsing for configs and for multi-host runs, and one-line errors
instead of tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from jaxad.config import apply_overrides, config_path, load_config
from jaxad.errors import ConfigError, JaxadError
from jaxad.runtime import distributed


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--method", default="crd", help="use configs/METHOD.py (default: crd)")
    group.add_argument("--config", dest="config_file", type=Path, help="use this config file instead")


def resolve_config(args: argparse.Namespace, overrides: Sequence[str], config_dir: Path) -> ml_collections.ConfigDict:
    """The chosen config file with ``--config.key=value`` overrides applied."""
    path = args.config_file if args.config_file is not None else config_path(args.method, config_dir)
    return apply_overrides(load_config(path), overrides)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.key=value`` items from the other arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main; a user error prints one line and exits 2, no traceback."""
    try:
        sys.exit(main() or 0)
    except JaxadError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


DISTRIBUTED_ENV = {"coordinator": "JAXAD_COORDINATOR", "num_processes": "JAXAD_NUM_PROCESSES",
                   "process_id": "JAXAD_PROCESS_ID"}


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (one fit over several processes)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0, or 'auto' on a TPU pod slice (env JAXAD_COORDINATOR)")
    group.add_argument("--num-processes", help="how many processes take part (env JAXAD_NUM_PROCESSES)")
    group.add_argument("--process-id", help="this process's index, 0 .. N-1 (env JAXAD_PROCESS_ID)")


def join_processes(args: argparse.Namespace) -> None:
    """Start the multi-host runtime when ``--coordinator`` (or ``JAXAD_COORDINATOR``) is given;
    with ``auto`` JAX finds the processes of a TPU pod slice itself. Nothing happens without it."""
    given = {key: getattr(args, key) or os.environ.get(var) or None for key, var in DISTRIBUTED_ENV.items()}
    if given["coordinator"] is None:
        if given["num_processes"] is not None or given["process_id"] is not None:
            raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT (or 'auto' on a TPU pod slice)")
        return
    if given["coordinator"] == "auto":
        distributed.initialize()
        return
    numbers = {}
    for key in ("num_processes", "process_id"):
        flag = "--" + key.replace("_", "-")
        if given[key] is None:
            raise ConfigError(f"--coordinator {given['coordinator']}: also give {flag} (or {DISTRIBUTED_ENV[key]})")
        try:
            numbers[key] = int(given[key])
        except ValueError:
            raise ConfigError(f"{flag}={given[key]!r}: not an integer") from None
    if not 0 <= numbers["process_id"] < numbers["num_processes"]:
        raise ConfigError(f"--process-id={numbers['process_id']}: must lie in 0 .. {numbers['num_processes'] - 1}")
    distributed.initialize(given["coordinator"], numbers["num_processes"], numbers["process_id"])
