#!/usr/bin/env python
"""Fit a model's size model (for ``diameter="auto"``) on training images, check it on validation.

Features (:func:`cpsam_toolkit.core.size.size_features`) of training images of split v2
(``shipped_split_v2.json``; validation images are never fitted on, ``test/`` splits never read),
each at its own scale and at two random scales (log-uniform 0.5-2), regress the log median
object diameter of the annotated masks (ridge; the penalty chosen by 5-fold cross-validation
on the training features). Prints the validation error per set; ``--write`` stores the size
model in the model file (``meta["size_model"]``) and, with ``--recommend``, adds
``diameter="auto"`` to its recommended settings.

    python scripts/fit_size_model.py --write --recommend      # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from choose_settings import DATASETS, val_images  # noqa: E402

from cpsam_toolkit import load_model  # noqa: E402
from cpsam_toolkit.core.options import InputOptions  # noqa: E402
from cpsam_toolkit.core.size import fit_size_model, resize_for_features, size_features  # noqa: E402
from cpsam_toolkit.network.checkpoints import atomic_save, read_file  # noqa: E402

#: training images per set whose features are taken (all of Usiigaci's)
PER_SET = {"dsb2018": 160, "consep": 120, "usiigaci": 39}


def median_diameter(masks: np.ndarray) -> float:
    """Median equivalent-circle diameter (px) of the objects of a label image (NaN if none)."""
    _, counts = np.unique(masks[masks > 0], return_counts=True)
    return float(np.median(2 * np.sqrt(counts / np.pi))) if len(counts) else float("nan")


def features_of(model, image: np.ndarray, scale: float) -> np.ndarray:
    x = resize_for_features(model._prepare(image, InputOptions(), "image"), scale)
    return size_features(model.net.encoder, x, model.net.cfg.tile, device=model.device, dtype=model.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "cpsam_toolkit" / "models" / "cpsam_small.pt")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", type=Path, default=ROOT / "cpsam_toolkit" / "models" / "shipped_split_v2.json")
    ap.add_argument("--target", type=float, default=30.0, help="object diameter (px) to resize to")
    ap.add_argument("--grow", choices=("never", "dark_background", "always"), default="dark_background",
                    help="when small objects are enlarged to the target (default: on images with a "
                         "dark background, e.g. fluorescence; large ones are always shrunk)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="at most N training images per set (dry runs)")
    ap.add_argument("--write", action="store_true", help="store the size model in the model file")
    ap.add_argument("--recommend", action="store_true", help="and recommend diameter='auto'")
    ap.add_argument("--json", type=Path, default=None, help="write the validation estimates here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    model = load_model(args.model)
    split = json.loads(args.split.read_text())

    t0 = time.perf_counter()
    feats, diams = [], []
    for g, n in PER_SET.items():
        ids = list(split["train"][g])
        rng.shuffle(ids)
        for stem in ids[: min(n, args.limit or n)]:
            d = args.data / DATASETS[g] / "train"
            img, gt = tifffile.imread(d / f"{stem}_img.tif"), tifffile.imread(d / f"{stem}_masks.tif")
            true = median_diameter(gt)
            if not np.isfinite(true):
                continue
            for s in [1.0, *np.exp(rng.uniform(np.log(0.5), np.log(2), 2)).tolist()]:
                feats.append(features_of(model, img, s))
                diams.append(true * s)
        print(f"{g}: {len(feats)} feature vectors ({time.perf_counter() - t0:.0f} s)", flush=True)
    x, y = np.array(feats), np.array(diams)

    folds = np.array_split(rng.permutation(len(x)), 5)
    cv = {}
    for alpha in (0.1, 1.0, 10.0, 100.0):
        errs = []
        for k in range(5):
            train = np.concatenate([folds[j] for j in range(5) if j != k])
            sm = fit_size_model(x[train], y[train], alpha)
            errs += [abs(np.log(sm.predict(f) / t)) for f, t in zip(x[folds[k]], y[folds[k]])]
        cv[alpha] = float(np.median(errs))
    alpha = min(cv, key=cv.get)
    print("cross-validated median |log error| per penalty:", json.dumps(cv), "->", alpha)
    sm = fit_size_model(x, y, alpha, target=args.target, grow=args.grow)

    rows = []
    for g, items in val_images(args.data, args.split, args.limit).items():
        errs = []
        for stem, img, gt in items:
            true = median_diameter(gt)
            if not np.isfinite(true):
                continue
            est = sm.predict(features_of(model, img, 1.0))
            errs.append(abs(np.log(est / true)))
            rows.append({"set": g, "stem": stem, "true": round(true, 1), "estimate": round(est, 1)})
        print(f"validation {g}: median |log error| {np.median(errs):.3f} "
              f"(median ratio error {np.exp(np.median(errs)) - 1:.0%}, {len(errs)} images)")
    if args.json:
        args.json.write_text(json.dumps({"alpha": alpha, "cv": cv, "rows": rows}, indent=1) + "\n")
    if args.write:
        obj = read_file(args.model)
        meta = obj.setdefault("meta", {})
        meta["size_model"] = sm.to_dict()
        if args.recommend:
            meta.setdefault("recommended_settings", {})["diameter"] = "auto"
        atomic_save(obj, args.model)
        note = " (recommends diameter='auto')" if args.recommend else ""
        print(f"wrote the size model into {args.model}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
