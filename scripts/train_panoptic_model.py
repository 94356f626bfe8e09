#!/usr/bin/env python
"""Train, evaluate and export the panoptic (nucleus class) model on CoNSeP 256x256 patches.

Data: ``shared/data/consep_patches256/train`` (160 H&E patches, 16 from each of 10 source tiles,
classes epithelial / inflammatory / miscellaneous / spindle_shaped in ``<id>_classes.json``).
Validation is split **by source tile** (no validation patch shares a tile with training):
tiles 14 and 15 (32 patches; 15 is also the shipped model's CoNSeP validation tile, so the
starting network never saw it; 14 adds epithelial nuclei). Training: the other 8 tiles.

    # train in the background (resumable; stops cleanly after --max-minutes)
    nice -n 10 python scripts/train_panoptic_model.py train --max-minutes 35 \
        > runs/panoptic/train.out 2>&1 &
    # per-class metrics of the trained model on the validation tiles (JSON + table)
    python scripts/train_panoptic_model.py evaluate
    # write cpsam_toolkit/models/cpsam_panoptic_consep.pt (fp16) and the model card numbers
    python scripts/train_panoptic_model.py export

The run folder (default ``runs/panoptic``, ignored by git) holds the resumable state, best/last
checkpoints, ``log.jsonl``, cached flow targets and ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "cpsam_toolkit" / "models"
DATA = ROOT.parent / "shared" / "data" / "consep_patches256" / "train"
SHIPPED = MODELS / "cpsam_small.pt"
EXPORT = MODELS / "cpsam_panoptic_consep.pt"
CLASSES = ("epithelial", "inflammatory", "miscellaneous", "spindle_shaped")
VAL_TILES = ("14", "15")
SEED = 0


def tile_of(stem: str) -> str:
    return stem.split("_")[1]


def split(data: Path = DATA) -> tuple[dict, dict]:
    """``({tile: [(img, masks)]}, {tile: [...]})`` for training and validation."""
    stems = sorted(p.name[: -len("_img.tif")] for p in data.glob("*_img.tif"))
    if not stems:
        sys.exit(f"no *_img.tif in {data}")
    tr: dict = {}
    va: dict = {}
    for s in stems:
        t = tile_of(s)
        (va if t in VAL_TILES else tr).setdefault(f"tile_{t}", []).append(
            (data / f"{s}_img.tif", data / f"{s}_masks.tif"))
    return tr, va


def upscaled_copy(data: Path, factor: float, dest: Path) -> Path:
    """``dest`` with every ``*_img.tif`` of ``data`` zoomed by ``factor`` (bilinear), its
    ``*_masks.tif`` (nearest: labels unchanged) and ``*_classes.json``; made once, atomically.

    Training on zoomed patches and segmenting with ``diameter = 30 / factor`` gives the small
    network nuclei of about ``factor`` x their size (CoNSeP nuclei are ~18 px across: 2-3 patch
    tokens of 8 px at native size)."""
    import shutil

    import tifffile
    from scipy import ndimage

    done = dest / "done.json"
    if done.exists() and json.loads(done.read_text()).get("factor") == factor:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for ip in sorted(data.glob("*_img.tif")):
        stem = ip.name[: -len("_img.tif")]
        img = tifffile.imread(ip)
        zoom = (factor, factor) + (1,) * (img.ndim - 2)  # (Y, X[, C])
        up = ndimage.zoom(img.astype(np.float32), zoom, order=1)
        tifffile.imwrite(tmp / ip.name, np.rint(np.clip(up, 0, None)).astype(img.dtype))
        masks = tifffile.imread(data / f"{stem}_masks.tif")
        tifffile.imwrite(tmp / f"{stem}_masks.tif", ndimage.zoom(masks, factor, order=0))
        shutil.copy(data / f"{stem}_classes.json", tmp / f"{stem}_classes.json")
    (tmp / "done.json").write_text(json.dumps({"factor": factor, "source": str(data)}) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def recipe(epochs: int, lr: float = 3e-4, val_every: int = 8):
    from cpsam_toolkit.training import AugmentConfig, Recipe

    # the paper's semantic setup is lr 5e-5, batch 16, 500 epochs, weight decay 0.1, layer drop
    # 0.4 and the fine-tuning augmentations; shortened here for ~35 min on 2 shared CPU cores
    return Recipe(
        name="panoptic_consep", lr=lr, epochs=epochs, batch_size=4, weight_decay=0.1,
        layer_drop=0.1, warmup_epochs=2, schedule="steps", steps=((0.8, 0.25),),
        nimg_per_epoch=32, min_nimg_per_epoch=8, min_masks=1, grad_clip=1.0, val_every=val_every,
        augment=AugmentConfig.spatial_only((0.75, 1.25), "uniform"),
    )


def start_net(init: str | None):
    from cpsam_toolkit.network import CPSAMNet, get_config
    from cpsam_toolkit.network.checkpoints import load_checkpoint
    from cpsam_toolkit.panoptic import make_panoptic

    if init:
        base, _ = load_checkpoint(init)
        desc = str(init)
    else:
        torch.manual_seed(SEED)
        base = CPSAMNet(get_config("small"))
        desc = "random init, preset 'small'"
    return make_panoptic(base, CLASSES, seed=SEED), desc


def cmd_train(args) -> int:
    from cpsam_toolkit.panoptic import train_panoptic

    torch.set_num_threads(args.threads)
    init = args.init if args.init != "none" else None
    if init is None and args.init != "none" and SHIPPED.exists():
        init = str(SHIPPED)
    net, desc = start_net(init)
    data = args.data
    if args.upscale != 1:
        data = upscaled_copy(args.data, args.upscale, args.run / f"data_x{args.upscale:g}")
    tr, va = split(data)
    stop = threading.Event()
    if args.max_minutes:
        timer = threading.Timer(args.max_minutes * 60, stop.set)
        timer.daemon = True
        timer.start()
    t0 = time.time()
    res = train_panoptic(
        net, tr, va, recipe=recipe(args.epochs, args.lr, args.val_every),
        out=args.run / "panoptic_best_fp32.pt",
        run_dir=args.run, resume=args.resume, seed=SEED, device=args.device, stop_event=stop,
        meta={"start_model": desc, "val_tiles": list(VAL_TILES), "data": str(args.data),
              "train_upscale": args.upscale},
    )
    print(res.report())
    cl = np.asarray(res.class_loss)
    if cl.size:
        k = max(1, min(8, cl.size // 4))
        print(f"class loss: first {k} steps {cl[:k].mean():.3f} -> last {k} steps {cl[-k:].mean():.3f}"
              f" ({cl.size} steps this session, {(time.time() - t0) / 60:.1f} min)")
    return 0


def evaluate(model_path: Path, data: Path = DATA, prior: bool = True, device: str = "cpu",
             **settings) -> dict:
    """Per-class metrics of a panoptic model on the validation tiles (default segmentation
    settings unless ``settings``, e.g. ``flow_threshold=0``, are given)."""
    import cpsam_toolkit as cp
    from cpsam_toolkit.io import imread
    from cpsam_toolkit.panoptic import assign_classes, evaluate_panoptic, read_classes

    model = cp.load_model(model_path, device=device)
    _, va = split(data)
    pairs = [p for t in sorted(va) for p in va[t]]
    gt, gcl, pm, pcl, tiles = [], [], [], [], []
    t0 = time.time()
    results = model.segment([imread(ip) for ip, _ in pairs], batch_size=8, **settings)
    for (ip, mp), r in zip(pairs, results, strict=True):
        gt.append(imread(mp))
        gcl.append(read_classes(str(mp).replace("_masks.tif", "_classes.json")))
        pm.append(np.asarray(r.masks))
        pcl.append(r.class_dict)
        tiles.append(tile_of(Path(ip).name))
    out = {"model": str(model_path), "images": len(pairs), "val_tiles": list(VAL_TILES),
           "settings": settings or "defaults",
           "seconds": round(time.time() - t0, 1),
           "removed_as_background": int(sum(r.n_removed for r in results)),
           "all": evaluate_panoptic(gt, gcl, pm, pcl, (0.5,))}
    for t in VAL_TILES:
        sel = [i for i, x in enumerate(tiles) if x == t]
        out[f"tile_{t}"] = evaluate_panoptic([gt[i] for i in sel], [gcl[i] for i in sel],
                                             [pm[i] for i in sel], [pcl[i] for i in sel], (0.5,))
    # the class head alone: true masks, each given the majority of the predicted per-pixel classes
    # (background-majority masks removed, as at inference)
    om, oc = [], []
    for g, r in zip(gt, results, strict=True):
        m2, ids, _, _ = assign_classes(g, r.pixel_classes, len(r.class_names))
        om.append(m2)
        oc.append({i + 1: r.class_names[k] for i, k in enumerate(ids)})
    out["true_masks"] = evaluate_panoptic(gt, gcl, om, oc, (0.5,))
    if prior:  # reference: the same masks, every object given the most common training class
        tr, _ = split(data)
        counts: dict[str, int] = {}
        for t in tr.values():
            for _, mp in t:
                for c in read_classes(str(mp).replace("_masks.tif", "_classes.json")).values():
                    counts[c] = counts.get(c, 0) + 1
        top = max(counts, key=counts.get)
        const = [{int(k): top for k in d} for d in pcl]
        out["prior_baseline"] = {"class": top, "train_instance_counts": counts,
                                 **evaluate_panoptic(gt, gcl, pm, const, (0.5,))}
    return out


def table(ev: dict) -> str:
    a = ev["all"]
    rows = ["| class | AP@0.5 | error rate@0.5 | images | TP / FP / FN (pooled) |", "|---|---|---|---|---|"]
    for c, d in a["per_class"].items():
        ap = f"{d['ap'][0]:.3f}" if d["ap"] else "n/a"
        er = f"{d['error_rate'][0]:.3f}" if d["error_rate"] else "n/a"
        rows.append(f"| {c} | {ap} | {er} | {d['n_images']} | {d['tp'][0]} / {d['fp'][0]} / {d['fn'][0]} |")
    cm = a["class_mean"]
    rows.append(f"| **mean over classes present** (per image, then over images) | "
                f"**{cm['ap'][0]:.3f}** | **{cm['error_rate'][0]:.3f}** | {a['n_images']} | |")
    lines = ["\n".join(rows), "",
             f"class-agnostic AP@0.5 {a['class_agnostic']['ap'][0]:.3f}; class accuracy of "
             f"matched nuclei {a['classification_accuracy']:.3f} ({a['n_matched']} matched)"]
    for t in VAL_TILES:
        d = ev.get(f"tile_{t}")
        if d:
            lines.append(f"tile {t}: class-mean AP@0.5 {d['class_mean']['ap'][0]:.3f}, error rate "
                         f"{d['class_mean']['error_rate'][0]:.3f}, class-agnostic AP@0.5 "
                         f"{d['class_agnostic']['ap'][0]:.3f}")
    tm = ev.get("true_masks")
    if tm:
        per = ", ".join(f"{c} {d['ap'][0]:.3f}" for c, d in tm["per_class"].items() if d["ap"])
        lines.append(f"class head on the true masks: class-mean AP@0.5 {tm['class_mean']['ap'][0]:.3f} "
                     f"({per}); class accuracy {tm['classification_accuracy']:.3f}")
    pb = ev.get("prior_baseline")
    if pb:
        lines.append(f"prior baseline (every nucleus '{pb['class']}'): class-mean AP@0.5 "
                     f"{pb['class_mean']['ap'][0]:.3f}, error rate {pb['class_mean']['error_rate'][0]:.3f}")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else args.run / "last.pt"
    settings = {} if args.flow_threshold is None else {"flow_threshold": args.flow_threshold}
    if args.diameter is not None:
        settings["diameter"] = args.diameter
    ev = evaluate(path, args.data, device=args.device, **settings)
    name = "eval.json" if args.flow_threshold is None else f"eval_flow{args.flow_threshold:g}.json"
    if args.diameter is not None:
        name = name.replace(".json", f"_diam{args.diameter:g}.json")
    (args.run / name).write_text(json.dumps(ev, indent=1) + "\n")
    print(table(ev))
    return 0


def cmd_export(args) -> int:
    from cpsam_toolkit.network.checkpoints import load_checkpoint, save_checkpoint

    src = Path(args.model) if args.model else args.run / "last.pt"
    net, meta = load_checkpoint(src)
    meta = {k: v for k, v in meta.items() if k not in ("config", "format")}
    ev_path = args.run / "eval.json"
    if ev_path.exists():
        meta["val_panoptic"] = json.loads(ev_path.read_text())["all"]
    up = float(meta.get("train_upscale") or 1.0)
    if up != 1.0:  # trained on zoomed patches: segment with the matching diameter (logged, not applied)
        meta["recommended_settings"] = {"diameter": round(30.0 / up, 3)}
        meta["recommended_settings_note"] = (
            f"trained on CoNSeP patches zoomed x{up:g}: segment H&E at 40x (~0.25 um/px) with "
            f"diameter={30.0 / up:g} so nuclei reach the size the network learned")
    meta.update({"name": "cpsam_panoptic_consep", "licence": "BSD-3-Clause (weights); data Apache-2.0 "
                 "(CoNSeP, Graham et al. 2019)", "card": "PANOPTIC_MODEL_CARD.md"})
    save_checkpoint(net, args.dest, meta, half=True)
    print(f"exported {src} -> {args.dest} ({args.dest.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "evaluate", "export"])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "panoptic")
    ap.add_argument("--init", default=None,
                    help="starting weights (default: the shipped cpsam_small.pt if present; "
                         "'none': random 'small' preset)")
    ap.add_argument("--epochs", type=int, default=32, help="epochs of 32 images")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--val-every", type=int, default=8, help="validate every N epochs")
    ap.add_argument("--upscale", type=float, default=1.0,
                    help="train: zoom the patches by this factor first (then segment with "
                         "--diameter 30/factor)")
    ap.add_argument("--diameter", type=float, default=None,
                    help="evaluate: segment with this diameter (px; 30/upscale for an upscaled run)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this long")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="train/evaluate on this device (cpu, cuda, ...)")
    ap.add_argument("--model", default=None, help="evaluate/export this file (default: <run>/last.pt)")
    ap.add_argument("--dest", type=Path, default=EXPORT, help="export: the file to write")
    ap.add_argument("--flow-threshold", type=float, default=None,
                    help="evaluate: flow error threshold (default: the library's 0.4; 0 = no QC)")
    args = ap.parse_args(argv)
    args.run.mkdir(parents=True, exist_ok=True)
    return {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
