"""What the scripts share: argument parsing for configs, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from jaxad.config import apply_overrides, config_path, load_config
from jaxad.errors import JaxadError


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
