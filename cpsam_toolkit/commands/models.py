"""``cpsam models``: list, download and inspect model files (adapter over the registry)."""

from __future__ import annotations

import argparse
import json
import sys

from ..network import registry
from ..network.checkpoints import CheckpointError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list, download and inspect model weights",
        description="List the registered models and where they are cached, download one, or "
        "show what a weights file contains. Cache: $CPSAM_HOME or ~/.cache/cpsam; files in "
        "~/.cellpose/models (the reference cellpose package) are used too.",
    )
    p.set_defaults(func=_list, json=False)
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")

    pl = sub.add_parser("list", help="registered models and where each is cached (default)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_list)

    pd = sub.add_parser("download", help="download a registered model into the cache")
    pd.add_argument("name", help="model name (see `cpsam models`)")
    pd.add_argument("--force", action="store_true", help="download again even if cached")
    pd.add_argument("--url-base", default=None,
                    help="download <URL_BASE>/<file> instead (a mirror); "
                         "default $CPSAM_MODEL_URL_BASE or Hugging Face")
    pd.add_argument("--no-progress", action="store_true", help="no progress bar")
    pd.set_defaults(func=_download)

    pi = sub.add_parser("info", help="format, network size and parameter count of a file")
    pi.add_argument("model", help="a weights file or a model name (not downloaded here)")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pi.set_defaults(func=_info)


def _size(n: int | None, approx: bool = False) -> str:
    if not n:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            text = f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            return ("~" if approx else "") + text
        n /= 1000
    return str(n)  # pragma: no cover


def _error(exc: Exception) -> int:
    print(f"cpsam models: error: {exc}", file=sys.stderr)
    return 1


def _list(args: argparse.Namespace) -> int:
    rows = registry.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "SIZE", "LICENCE", "WHERE")]
    for r in rows:
        where = r["path"] or ("missing from this installation" if r["packaged"]
                              else "not downloaded")
        table.append((r["name"], _size(r["size"], approx=r["path"] is None), r["licence"], where))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    cached = registry.cached_default()
    default = f"{cached} (cached)" if cached else \
        f"{registry.PUBLISHED_DEFAULTS[0]} (downloaded on first use)"
    why = "CPSAM_OFFLINE is set" if registry.offline() else "CPSAM_OFFLINE=1"
    print(f"\ndefault (no model named): {default}; offline ({why} or unreachable): "
          f"{registry.DEFAULT_MODEL}")
    print(f"cache: {registry.cache_dir()}  (also searched: "
          f"{', '.join(str(d) for d in registry.cellpose_dirs())})")
    return 0


def _download(args: argparse.Namespace) -> int:
    try:
        path = registry.download_model(args.name, url_base=args.url_base,
                                       progress=not args.no_progress, force=args.force)
    except (registry.ModelError, CheckpointError) as e:
        return _error(e)
    print(path)
    return 0


def _info(args: argparse.Namespace) -> int:
    try:
        info = registry.describe(args.model)
    except (registry.ModelError, CheckpointError) as e:
        return _error(e)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    cfg = info.get("config") or {}
    print(f"file:        {info['path']}")
    print(f"size:        {_size(info['size_bytes'])} ({info['size_bytes']} bytes)")
    print(f"sha256:      {info['sha256']}")
    print(f"format:      {info['format']}")
    print(f"preset:      {info['preset'] or 'none (custom size)'}")
    print("config:      " + ", ".join(f"{k}={v}" for k, v in cfg.items()
                                      if v not in ([], (), None)))
    print(f"parameters:  {info['parameters']:,}"
          + (f" ({info['trainable_parameters']:,} trainable)"
             if info.get("trainable_parameters") is not None else ""))
    for k, v in (info.get("meta") or {}).items():
        print(f"meta.{k}: {v}")
    return 0
