#!/usr/bin/env python
"""The recorded fine-tuning run of ``docs/finetuning.md``: the shipped model fine-tuned on 8 images
of one modality (DSB2018 brightfield nuclei, dark nuclei on a light background) through the
``cpsam train`` CLI, validated on the brightfield images of the shipped model's own validation split.

    python scripts/finetune_record.py --work runs/finetune_record [--epochs 100] [-- extra cpsam train args]

Writes ``<work>/train`` (8 pairs) and ``<work>/val`` (the 4 validation pairs) as ``<id>_img.tif`` /
``<id>_masks.tif``, runs ``cpsam train`` into ``<work>/model.pt`` (resumable with ``--resume``)
and prints the base / final / best report; the per-epoch log is ``<work>/model.pt.run/log.jsonl``.
The same selection of images is used by ``tests/test_training.py`` on a small budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT / "cpsam_toolkit" / "models" / "shipped_split.json"
DSB = "dsb2018_stage1_train_fixed"


def modality(img: np.ndarray) -> str:
    """DSB2018 image kind: "fluorescence" (grey, dark background: mean < 100 of 255),
    "brightfield" (grey, light background) or "stained" (colour, e.g. H&E)."""
    grey = img if img.ndim == 2 else img[..., 0]
    if img.ndim == 3 and not all(np.array_equal(grey, img[..., c]) for c in range(img.shape[-1])):
        return "stained"
    return "fluorescence" if grey.mean() < 100 else "brightfield"


def select(data: Path, ids: list[str], n: int, kind: str = "brightfield") -> list[str]:
    """The first ``n`` ids of ``ids`` whose image is of modality ``kind``."""
    out = []
    for s in ids:
        if modality(tifffile.imread(data / DSB / "train" / f"{s}_img.tif")) == kind:
            out.append(s)
        if len(out) == n:
            break
    return out


def write_pairs(data: Path, ids: list[str], dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    for s in ids:
        for part in ("img", "masks"):
            src = data / DSB / "train" / f"{s}_{part}.tif"
            tifffile.imwrite(dest / src.name, tifffile.imread(src))
    return len(ids)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "finetune_record")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `cpsam train` arguments (after --)")
    args = ap.parse_args(argv)
    split = json.loads(SPLIT.read_text())
    ntr = write_pairs(args.data, select(args.data, split["train"]["dsb2018"], 8), args.work / "train")
    nva = write_pairs(args.data, select(args.data, split["val"]["dsb2018"], 100), args.work / "val")
    print(f"{ntr} training and {nva} validation brightfield images in {args.work}", flush=True)
    cmd = [sys.executable, "-m", "cpsam_toolkit", "train", "--train", str(args.work / "train"),
           "--val", str(args.work / "val"), "--model", "cpsam_toolkit_small",
           "--out", str(args.work / "model.pt"),
           "--recipe", "finetune", "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", "2",
           "--layer-drop", "0.1", "--min-masks", "1", "--val-every", "10", "--quiet", *args.extra]
    if args.resume:
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
