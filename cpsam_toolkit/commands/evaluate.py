"""``cpsam evaluate``: score predicted label images against ground truth (thin adapter).

``cpsam evaluate --robustness`` instead segments ground-truth images under the perturbations of
the Cellpose-SAM paper (see :mod:`cpsam_toolkit.robustness`).
"""

from __future__ import annotations

import argparse
import sys

from .. import evaluate as E
from .. import metrics as M
from .. import robustness as R
from ..segment import load_model

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
    p.add_argument("--pred", metavar="DIR", help="folder of predicted labels (not with --robustness)")
    p.add_argument("--gt", metavar="DIR", help="folder of ground-truth labels (not with --robustness)")
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
    _add_robustness_arguments(p)
    p.set_defaults(func=run)
    p.set_defaults(_parser=p)
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


#: cpsam_toolkit.robustness.FAMILIES (repeated so that building the parser does not import torch)
ROBUSTNESS_FAMILIES = ("channels", "size", "poisson", "blur", "downsample", "anisotropic")


def _add_robustness_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "robustness report (--robustness)",
        "Segment the images of --images with --model under the paper's perturbations (channel "
        "order, cell size, Poisson noise, blur, downsampling, anisotropic blur), score each "
        "against its <stem><gt-suffix> ground truth at IoU 0.5 and write a table and a figure. "
        "See docs/robustness.md.",
    )
    g.add_argument("--robustness", action="store_true", help="make a robustness report")
    g.add_argument("--model", "-m", metavar="NAME|PATH", help="model to test (registry name or file)")
    g.add_argument(
        "--images",
        nargs="+",
        metavar="DIR",
        help="folders of images <stem>[_img].<ext> with <stem><gt-suffix> ground truth",
    )
    g.add_argument(
        "--families",
        nargs="+",
        choices=ROBUSTNESS_FAMILIES,
        default=list(ROBUSTNESS_FAMILIES),
        metavar="F",
        help=f"perturbation families (default all: {' '.join(ROBUSTNESS_FAMILIES)})",
    )
    g.add_argument("--max-images", type=_positive_int, metavar="N", help="at most N images per folder")
    g.add_argument(
        "--split",
        metavar="JSON",
        help="only images listed in the 'val' lists of this split file (e.g. "
        "cpsam_toolkit/models/shipped_split.json, the shipped model's validation images)",
    )
    g.add_argument(
        "--crop", type=_positive_int, metavar="N", help="centre-crop images and labels to at most N x N"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    g.add_argument(
        "--annotations-b",
        metavar="DIR",
        help="second annotation of the same images (same file names): adds the inter-annotator "
        "error rate and the human-consensus bound",
    )
    g.add_argument(
        "--gray",
        choices=("pad", "replicate"),
        default="pad",
        help="grayscale images: signal in the first channel, others zero (pad, default; channel "
        "permutations then move it), or copied to all three",
    )
    g.add_argument("--csv", metavar="FILE", help="write the per-image and mean table as CSV")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="tiles per network call (8)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    parser = getattr(args, "_parser", None)
    if getattr(args, "robustness", False):
        return run_robustness(args)
    extra = [o for o, v in (("--csv", getattr(args, "csv", None)),) if v]
    missing = [o for o, v in (("--pred", args.pred), ("--gt", args.gt)) if not v]
    if missing or extra:
        msg = (
            f"the following arguments are required: {', '.join(missing)} (or use --robustness)"
            if missing
            else "--csv is only written by --robustness reports"
        )
        if parser is not None:
            parser.error(msg)  # exits with status 2 and the usage line
        _err(msg)
        return 2
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


def run_robustness(args: argparse.Namespace) -> int:
    """``--robustness``: load data and model, make the report, print it and write the files."""

    parser = getattr(args, "_parser", None)
    missing = [o for o, v in (("--model", args.model), ("--images", args.images)) if not v]
    if missing:
        msg = f"--robustness needs {' and '.join(missing)}"
        if parser is not None:
            parser.error(msg)
        _err(msg)
        return 2
    if args.pred or args.per_class:
        _err("--robustness segments --images itself; --pred/--per-class do not apply")
        return 2
    if not (args.json or args.csv or args.plot):
        print(f"{PROG}: note: no --json/--csv/--plot given; only the table is printed", file=sys.stderr)
    try:
        data = R.load_folder(
            args.images,
            args.gt_suffix,
            max_images=args.max_images,
            split=args.split,
            annotations_b=args.annotations_b,
            crop=args.crop,
            recursive=args.recursive,
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        _err(str(e))
        return 2
    for f, why in data.skipped:
        print(f"{PROG}: skipped {f}: {why}", file=sys.stderr)
    if not data.images:
        _err(
            f"no image with a '*{args.gt_suffix}' ground truth found in {' '.join(args.images)}"
            + (f" among the stems of {args.split}" if args.split else "")
        )
        return 1
    if args.annotations_b is not None and not any(b is not None for b in data.annotations_b):
        _err(f"no ground-truth file name of --images is present in --annotations-b {args.annotations_b}")
        return 1

    try:
        model = load_model(args.model, device=args.device)
    except Exception as e:  # noqa: BLE001 - report any loading problem with the model named
        _err(f"cannot load model {args.model!r}: {e}")
        return 2
    print(
        f"{PROG}: robustness of {model.name} on {len(data.images)} images, families "
        f"{' '.join(args.families)}, seed {args.seed}",
        file=sys.stderr,
    )
    try:
        report = R.robustness_report(
            model,
            data.images,
            data.masks,
            families=args.families,
            seed=args.seed,
            progress=args.progress,
            names=data.names,
            annotations_b=data.annotations_b,
            gray=args.gray,
            segment_kwargs={"batch_size": args.batch_size},
        )
    except ValueError as e:
        _err(str(e))
        return 1
    print(R.format_report(report))
    if args.json:
        print(f"wrote {R.write_json(report, args.json)}")
    if args.csv:
        print(f"wrote {R.write_csv(report, args.csv)}")
    if args.plot:
        try:
            fig = R.plot_report(report)
        except ModuleNotFoundError as e:
            _err(f"--plot needs {e.name}: pip install 'cpsam-toolkit[plot]'")
            return 1
        print(f"wrote {R.save_figure(fig, args.plot)}")
    return 0
