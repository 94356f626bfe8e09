"""The ``cpsam`` command line: one sub-command per module in :mod:`cpsam_toolkit.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the default. The CLI is a thin adapter: all work is done by the library.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = ("segment", "evaluate", "train", "models", "cellprofiler", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpsam", description="Cellpose-SAM cell segmentation (cpsam-toolkit)."
    )
    parser.add_argument("--version", action="version", version=f"cpsam-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"cpsam_toolkit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"cpsam_toolkit.commands.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cpsam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
