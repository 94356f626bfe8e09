#!/usr/bin/env python
"""Measure post-processing and test-time settings of a model on the validation split, per set.

The network runs once per (image, test-time augmentation, tile overlap); flow and
cell-probability thresholds are then varied on the cached flows (``res.recompute``), so a
whole grid costs a few network passes. Only validation images (``shipped_split_v2.json``,
carved from ``train/``) are used; no ``test/`` split is read.

    python scripts/choose_settings.py --model cpsam_toolkit/models/cpsam_small.pt \
        --json runs/settings_v1.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    "dsb2018": "dsb2018_stage1_train_fixed",
    "usiigaci": "usiigaci_phase_contrast_cells",
    "consep": "consep_patches256",
}


def val_images(data: Path, split_file: Path, limit: int | None = None) -> dict[str, list[tuple]]:
    """``{set: [(stem, image, masks), ...]}`` of the split's validation images."""
    split = json.loads(split_file.read_text())
    out = {}
    for g, ids in split["val"].items():
        d = data / DATASETS[g] / "train"
        ids = ids[:limit] if limit else ids
        out[g] = [(s, tifffile.imread(d / f"{s}_img.tif"), tifffile.imread(d / f"{s}_masks.tif"))
                  for s in ids]
    return out


def modality(img: np.ndarray) -> str:
    """DSB2018 image kind: "fluorescence" (grey, dark background), "brightfield" or "stained"."""
    grey = img if img.ndim == 2 else img[..., 0]
    if img.ndim == 3 and not all(np.array_equal(grey, img[..., c]) for c in range(img.shape[-1])):
        return "stained"
    return "fluorescence" if grey.mean() < 100 else "brightfield"


def count_ok(count: int, masks: np.ndarray) -> bool:
    """The count test of the CellProfiler module: within max(3, 25%) of the annotated count."""
    truth = len(np.unique(masks)) - 1
    return abs(count - truth) <= max(3, 0.25 * truth)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "cpsam_toolkit" / "models" / "cpsam_small.pt"))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", type=Path, default=ROOT / "cpsam_toolkit" / "models" / "shipped_split_v2.json")
    ap.add_argument("--flow-thresholds", default="0.4,0.6,0.8,1.0")
    ap.add_argument("--cellprob-thresholds", default="-1,-0.5,0,0.5")
    ap.add_argument("--augment", default="0,1", help="test-time augmentation off/on")
    ap.add_argument("--overlaps", default="0.1,0.25")
    ap.add_argument("--diameters", default="none",
                    help="comma-separated: none (no resizing), auto (the model's size model) or pixels")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per set (quick looks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--per-image", type=Path, default=None,
                    help="also write one row per (image, setting) with the image kind (JSON lines)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cpsam_toolkit import load_model
    from cpsam_toolkit.metrics import average_precision

    model = load_model(args.model)
    data = val_images(args.data, args.split, args.limit)
    fts = [float(v) for v in args.flow_thresholds.split(",")]
    cps = [float(v) for v in args.cellprob_thresholds.split(",")]
    diams = [None if v == "none" else v if v == "auto" else float(v) for v in args.diameters.split(",")]
    rows = []
    per_image = args.per_image.open("w") if args.per_image else None
    for aug, ov, diam in itertools.product([bool(int(v)) for v in args.augment.split(",")],
                                           [float(v) for v in args.overlaps.split(",")], diams):
        for g, items in data.items():
            t0 = time.perf_counter()
            run = dict(augment=aug, tile_overlap=ov, diameter=diam, flow_threshold=0.4,
                       cellprob_threshold=0.0)
            base = [model.segment(img, **run) for _, img, _ in items]
            # what a CellProfiler user sees: DSB fluorescence images given as one channel
            fluo = [(img[..., 0] if img.ndim == 3 else img, m) for _, img, m in items
                    if g == "dsb2018" and modality(img) == "fluorescence"]
            one = [model.segment(img, **run) for img, _ in fluo]
            t_net = time.perf_counter() - t0
            for cp, ft in itertools.product(cps, fts):
                preds = [r.recompute(flow_threshold=ft, cellprob_threshold=cp).masks for r in base]
                ap50 = average_precision([m for _, _, m in items], preds, 0.5)[0][:, 0]
                for (stem, img, _), a in zip(items, ap50) if per_image else ():
                    per_image.write(json.dumps({
                        "set": g, "stem": stem, "kind": modality(img), "augment": aug, "tile_overlap": ov,
                        "diameter": diam, "flow_threshold": ft, "cellprob_threshold": cp,
                        "ap50": float(a)}) + "\n")
                rows.append({"set": g, "augment": aug, "tile_overlap": ov, "diameter": diam,
                             "flow_threshold": ft, "cellprob_threshold": cp, "ap50": float(np.mean(ap50)),
                             "n": len(items), "net_seconds": round(t_net, 1)})
                if fluo:
                    counts = [r.recompute(flow_threshold=ft, cellprob_threshold=cp).n_objects for r in one]
                    rows[-1]["one_channel_counts_ok"] = (
                        f"{sum(count_ok(c, m) for c, (_, m) in zip(counts, fluo))}/{len(fluo)}")
                print(json.dumps(rows[-1]), flush=True)
    if per_image:
        per_image.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "split": str(args.split), "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
