"""``cpsam cellprofiler``: where the RunCellposeSAM module is and how CellProfiler finds it."""

from __future__ import annotations

import argparse
import sys

from ..cellprofiler import MODULE_NAME, headless_command, install, plugin_file, plugins_directory


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cellprofiler",
        help="print (or install) the CellProfiler module and the --plugins-directory to use",
        description="Print where the RunCellposeSAM CellProfiler module of this installation is "
        "and the exact --plugins-directory to give CellProfiler, or copy the module into a "
        "folder with --install DIR. `cpsam doctor` checks that CellProfiler can load it.",
    )
    p.add_argument("--install", metavar="DIR", default=None,
                   help="copy runcellposesam.py into DIR (e.g. your CellProfiler plugins folder)")
    p.add_argument("--path-only", action="store_true",
                   help="print only the plugins folder (for scripts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.install:
            file = install(args.install)
            folder = file.parent
        else:
            file, folder = plugin_file(), plugins_directory()
    except OSError as e:
        print(f"cpsam cellprofiler: error: {e}", file=sys.stderr)
        return 1
    if args.path_only:
        print(folder)
        return 0
    print(f"CellProfiler module {MODULE_NAME}: {file}")
    print(f"plugins folder: {folder}")
    print("\nheadless:  " + headless_command(folder))
    print(f"GUI:       File > Preferences > 'CellProfiler plugins directory' = {folder}, then "
          "restart CellProfiler")
    print(f"\nThe module runs in CellProfiler's Python, which must have cpsam-toolkit installed "
          f"(this one: {sys.executable}). Check with: cpsam doctor")
    return 0
