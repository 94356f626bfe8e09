"""``cpsam doctor``: check the environment (Python, numpy, torch and device, GPU memory, cached
weights, CellProfiler loading the module) and say how to fix what is missing."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..doctor import run_checks, summary


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check this environment and say what is missing and how to fix it",
        description="Check Python and numpy against CellProfiler's needs, torch and its device, "
        "free GPU memory, cached model weights, and whether cellprofiler_core loads the "
        "RunCellposeSAM module. Exit status 1 if a check failed.",
    )
    p.add_argument("--no-cellprofiler", action="store_true",
                   help="skip the CellProfiler checks (they start CellProfiler, a few seconds)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checks = run_checks(cellprofiler=not args.no_cellprofiler)
    counts = summary(checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], **counts}, indent=1))
    else:
        for c in checks:
            print(c.line())
        print(f"\n{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failed")
    return 1 if counts["fail"] else 0
