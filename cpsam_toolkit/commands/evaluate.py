"""``cpsam evaluate``: score predicted label images against ground truth (thin adapter)."""

from __future__ import annotations

import argparse
import sys

from .. import evaluate as E
from .. import metrics as M

PROG = "cpsam evaluate"


def _threshold(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < t <= 1:
        raise argparse.ArgumentTypeError(f"IoU threshold must be in (0, 1], got {text}")
    return t


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="score predicted masks against ground truth (AP, error rate, F1, PQ, AJI)",
        description=(
            "Pair <stem><pred-suffix> files in --pred with <stem><gt-suffix> files in --gt "
            "(sub-folders included; the first sub-folder names the dataset), match objects "
            "optimally at each IoU threshold and print a per-dataset table. "
            "AP = TP/(TP+FP+FN); error rate = (FP+FN)/(TP+FN)."
        ),
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted labels")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth labels")
    p.add_argument(
        "--pred-suffix",
        default=E.DEFAULT_SUFFIX,
        metavar="S",
        help="prediction file ending after the stem (default %(default)s)",
    )
    p.add_argument(
        "--gt-suffix",
        default=E.DEFAULT_SUFFIX,
        metavar="S",
        help="ground-truth file ending after the stem (default %(default)s)",
    )
    p.add_argument(
        "--thresholds",
        type=_threshold,
        nargs="+",
        default=list(M.IOU_GRID),
        metavar="T",
        help="IoU thresholds (default 0.5 0.55 ... 0.95)",
    )
    p.add_argument(
        "--aggregate",
        choices=("mean-per-image", "pooled"),
        default="mean-per-image",
        help="table numbers: mean of per-image scores (paper) or scores of counts "
        "pooled over images; the JSON has both (default %(default)s)",
    )
    p.add_argument(
        "--per-class",
        action="store_true",
        help="also score class by class from <stem>_classes.json next to each file",
    )
    p.add_argument(
        "--no-recursive", dest="recursive", action="store_false", help="do not look into sub-folders"
    )
    p.add_argument("--json", metavar="FILE", help="write all per-image and aggregate numbers")
    p.add_argument(
        "--plot", metavar="FILE.png", help="write a figure: AP and error rate vs IoU, per-image error rates"
    )
    # Future: a --robustness flag will degrade the inputs, segment them, and evaluate per
    # condition through E.evaluate_pairs + E.summarize(key=...); not implemented here.
    p.set_defaults(func=run)
    return p


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        pairing = E.pair_files(args.pred, args.gt, args.pred_suffix, args.gt_suffix, args.recursive)
    except FileNotFoundError as e:
        _err(str(e))
        return 2
    for f in pairing.pred_only:
        print(
            f"{PROG}: unpaired prediction (no ground truth {f.name[: -len(args.pred_suffix)]}"
            f"{args.gt_suffix}): {f}",
            file=sys.stderr,
        )
    for f in pairing.gt_only:
        print(f"{PROG}: missing prediction for ground truth: {f}", file=sys.stderr)
    if not pairing.pairs:
        _err(
            f"nothing to evaluate: no '*{args.pred_suffix}' file in {args.pred} has a "
            f"'*{args.gt_suffix}' partner in {args.gt} ({len(pairing.pred_only)} predictions, "
            f"{len(pairing.gt_only)} ground-truth files)"
        )
        return 1
    result = E.evaluate_pairs(
        pairing.pairs, args.thresholds, args.per_class, (args.pred_suffix, args.gt_suffix)
    )
    for file, msg in result.errors:
        _err(f"cannot use {file}: {msg}")
    how = args.aggregate.replace("-", "_")
    if result.images:
        print(E.format_table(E.summary_table(result, how), how))
        print(
            f"{len(result.images)} image pairs evaluated, {len(pairing.pred_only)} unpaired "
            f"predictions, {len(pairing.gt_only)} missing predictions, "
            f"{len(result.errors)} unreadable"
        )
    else:
        _err("no pair could be evaluated")
    if args.json:
        print(f"wrote {E.write_json(result, args.json, pairing)}")
    if args.plot and result.images:
        try:
            fig = E.plot_summary(result, how)
        except ModuleNotFoundError as e:
            _err(f"--plot needs {e.name}: pip install 'cpsam-toolkit[plot]'")
            return 1
        print(f"wrote {E.save_figure(fig, args.plot)}")
    return 1 if result.errors or not result.images else 0
