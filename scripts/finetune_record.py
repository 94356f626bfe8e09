#!/usr/bin/env python
"""The recorded fine-tuning run of ``docs/finetuning.md``: the shipped model fine-tuned on 8 images
of one modality (DSB2018 fluorescence nuclei) through the ``cpsam train`` CLI, validated on the
fluorescence images of the shipped model's own validation split.

    python scripts/finetune_record.py --work runs/finetune_record [--epochs 100] [-- extra cpsam train args]

Writes ``<work>/train`` (8 pairs) and ``<work>/val`` (40 pairs) as ``<id>_img.tif`` /
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


def is_fluorescence(img: np.ndarray) -> bool:
    """Grey (equal channels) on a dark background: mean < 100 of 255."""
    grey = img if img.ndim == 2 else img[..., 0]
    same = img.ndim == 2 or all(np.array_equal(grey, img[..., c]) for c in range(img.shape[-1]))
    return bool(same and grey.mean() < 100)


def write_pairs(data: Path, ids: list[str], n: int, dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in ids:
        img = tifffile.imread(data / DSB / "train" / f"{s}_img.tif")
        if is_fluorescence(img):
            tifffile.imwrite(dest / f"{s}_img.tif", img)
            masks = tifffile.imread(data / DSB / "train" / f"{s}_masks.tif")
            tifffile.imwrite(dest / f"{s}_masks.tif", masks)
            k += 1
        if k == n:
            break
    return k


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
    ntr = write_pairs(args.data, split["train"]["dsb2018"], 8, args.work / "train")
    nva = write_pairs(args.data, split["val"]["dsb2018"], 100, args.work / "val")
    print(f"{ntr} training and {nva} validation fluorescence images in {args.work}", flush=True)
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
