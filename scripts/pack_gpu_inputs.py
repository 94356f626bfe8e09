#!/usr/bin/env python
"""Pack everything the GPU run needs into the git-ignored folder ``.gpu/`` (run once, here).

The device machine (an H200 with Python 3.12, torch and numpy 2, no network) receives the
working tree plus the folders named in ``carry``, 64 MiB in all. This script writes:

``.gpu/train_data.npz``
    the training and validation images of the three 2D sets (DSB2018, Usiigaci, CoNSeP) under
    the shipped model's split (``cpsam_toolkit/models/shipped_split_v2.json``, else
    ``shipped_split.json``), normalised as at inference (1-99 percentile per channel), shrunk
    where objects are larger than ``--diameter`` px (never enlarged), stored as uint8
    (``value = q / 200``; grey images as one channel), each encoded as JPEG (quality 95: the
    lossless codecs need 3x the space; zlib on raw uint8 113 MiB for the v2 split) with uint16
    labels (zlib); flow targets are computed on the GPU at the start of training
    (precomputed int8 flows would not fit).
``.gpu/bench_sources.npz``
    a few real images from which ``benchmarks/gpu_bench.py`` tiles its 16 x 1024² and
    2 x 4096² images at run time (tiled images do not compress).
``.gpu/whl/``
    wheels for Python 3.12 / manylinux x86_64 of what the device machine lacks: ``cellpose``
    4.2.1.1 (the reference) and the dependencies of ours and its (fastremap, fill-voids,
    segment-anything, natsort, roifile).

    python scripts/pack_gpu_inputs.py                 # everything; prints sizes
    python scripts/pack_gpu_inputs.py --no-wheels     # data only (no network)

Then run the GPU call documented in docs/benchmarks.md ("GPU run: how to run it").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "cpsam_toolkit" / "models"
DATASETS = {
    "dsb2018": "dsb2018_stage1_train_fixed",
    "usiigaci": "usiigaci_phase_contrast_cells",
    "consep": "consep_patches256",
}
GROUPS = tuple(DATASETS)
#: uint8 code = round(normalised value * QUANT), clipped to 0..255 (values up to 1.275)
QUANT = 200.0
#: the wheels the device machine lacks, pinned (the versions this project tests with)
WHEELS = ("cellpose==4.2.1.1", "fastremap==1.21.0", "fill-voids==2.1.2", "segment-anything==1.0",
          "natsort==8.4.0", "roifile==2026.11.6")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
#: what may travel to the device machine: 64 MiB, checkout included
LIMIT = 64 * 2**20


def split_path() -> Path:
    """The split the shipped model uses: v2 if present, else v1."""
    v2 = MODELS / "shipped_split_v2.json"
    return v2 if v2.is_file() else MODELS / "shipped_split.json"


def load_split(path: str | os.PathLike | None = None) -> dict:
    """``{"train": {group: [ids]}, "val": {group: [ids]}, ...}`` from a split file."""
    p = Path(path) if path else split_path()
    if not p.is_file():
        raise FileNotFoundError(f"split file {p} not found; create it with scripts/train_shipped_model.py")
    split = json.loads(p.read_text())
    for part in ("train", "val"):
        unknown = set(split.get(part, {})) - set(GROUPS)
        if unknown:
            raise ValueError(f"{p}: unknown data sets {sorted(unknown)} in '{part}'")
    split["file"] = p.name
    return split


def median_diameter(masks: np.ndarray) -> float:
    """Median equivalent-circle diameter (px) of the objects; 0 if none."""
    areas = np.bincount(masks.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(2 * np.sqrt(areas / np.pi))) if len(areas) else 0.0


def _resize(x: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    if nearest:
        return F.interpolate(t[None].float(), size=shape, mode="nearest")[0, 0].numpy().astype(x.dtype)
    return F.interpolate(t.float(), size=shape, mode="area")[0].numpy()


def encode(q: np.ndarray, quality: int) -> np.ndarray:
    """(C,H,W) uint8, C 1 or 3 -> JPEG bytes (uint8 array)."""
    import cv2

    x = q[0] if q.shape[0] == 1 else np.ascontiguousarray(np.moveaxis(q, 0, -1)[..., ::-1])  # RGB -> BGR
    ok, buf = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.ravel()


def decode(buf: np.ndarray) -> np.ndarray:
    """JPEG bytes -> (C,H,W) uint8 (C 1 or 3)."""
    import cv2

    x = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if x is None:
        raise ValueError("packed image could not be decoded; pack the data again")
    return x[None] if x.ndim == 2 else np.ascontiguousarray(np.moveaxis(x[..., ::-1], -1, 0))


def images(z, part: str) -> list[np.ndarray]:
    """Decoded (C,H,W) uint8 images of one part of a packed file, in order."""
    blob, off = z[f"{part}_jpeg"], z[f"{part}_jpeg_off"]
    return [decode(blob[off[i]:off[i + 1]]) for i in range(len(off) - 1)]


def pack_image(img: np.ndarray, masks: np.ndarray, diameter: float, name: str
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """One image -> (uint8 (C,H,W) with C 1 or 3, uint16 (H,W) labels, scale applied)."""
    from cpsam_toolkit.training.data import prepare_image, validate_labels

    m = validate_labels(masks, name + " labels")
    x = prepare_image(img, m.shape, name)  # (C,H,W) float32, normalised as at inference
    if x.shape[0] == 3 and np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2]):
        x = x[:1]  # grey stored as RGB
    d = median_diameter(m)
    scale = min(1.0, diameter / d) if d > 0 and diameter > 0 else 1.0
    if scale < 0.95:
        shape = (max(8, round(m.shape[0] * scale)), max(8, round(m.shape[1] * scale)))
        x = _resize(x, shape, nearest=False)
        m = _resize(m.astype(np.int32), shape, nearest=True)
    else:
        scale = 1.0
    q = np.clip(np.round(x * QUANT), 0, 255).astype(np.uint8)
    if m.max() >= 2**16:
        raise ValueError(f"{name}: {m.max()} objects do not fit uint16 labels")
    return q, m.astype(np.uint16), scale


def pack_data(data: Path, split: dict, out: Path, diameter: float = 30.0,
              limit: dict[str, int] | None = None, quality: int = 95) -> dict:
    """Write ``out`` (npz) with the train and val images of ``split``; return its summary.

    ``limit`` caps the images per set and part (``{"train": n, "val": n}``; for tests)."""
    import tifffile

    arrays: dict[str, np.ndarray] = {}
    summary: dict = {"split": split["file"], "diameter": diameter, "quant": QUANT, "groups": list(GROUPS),
                     "jpeg_quality": quality}
    files = [f for g in GROUPS for f in (data / DATASETS[g] / "train").glob("*_classes.json")]
    kinds = sorted({v for f in files for v in json.loads(f.read_text()).values()})
    if kinds:  # class index k (1-based) = kinds[k - 1], the same in every image
        summary["class_names"] = kinds
    for part in ("train", "val"):
        imgs, masks, rows, names, classes, class_off = [], [], [], [], [], [0]
        for gi, g in enumerate(GROUPS):
            ids = list(split.get(part, {}).get(g, []))
            if limit is not None:
                ids = ids[: limit[part]]
            folder = data / DATASETS[g] / "train"
            for s in ids:
                q, m, sc = pack_image(tifffile.imread(folder / f"{s}_img.tif"),
                                      tifffile.imread(folder / f"{s}_masks.tif"), diameter, f"{g}/{s}")
                imgs.append(encode(q, quality))
                masks.append(m.ravel())
                rows.append((gi, q.shape[0], m.shape[0], m.shape[1], round(sc * 1e4)))
                names.append(f"{g}/{s}")
                cj = folder / f"{s}_classes.json"
                lut = np.zeros(int(m.max()) + 1, np.uint8)
                if cj.is_file():  # CoNSeP: class index (1-based, sorted names) per instance id
                    # instance ids were kept (validate_labels renumbers only when ids have gaps)
                    cl = json.loads(cj.read_text())
                    for k, v in cl.items():
                        if int(k) < len(lut):
                            lut[int(k)] = 1 + kinds.index(v)
                classes.append(lut)
                class_off.append(class_off[-1] + len(lut))
        r = np.array(rows, np.int64).reshape(-1, 5)
        arrays[f"{part}_jpeg"] = np.concatenate(imgs) if imgs else np.zeros(0, np.uint8)
        arrays[f"{part}_jpeg_off"] = np.concatenate([[0], np.cumsum([len(b) for b in imgs])]).astype(np.int64)
        arrays[f"{part}_masks"] = np.concatenate(masks) if masks else np.zeros(0, np.uint16)
        arrays[f"{part}_rows"] = r  # group, channels, height, width, scale x 1e4
        arrays[f"{part}_px_off"] = np.concatenate([[0], np.cumsum(r[:, 2] * r[:, 3])]).astype(np.int64)
        arrays[f"{part}_names"] = np.array(names)
        arrays[f"{part}_classes"] = np.concatenate(classes) if classes else np.zeros(0, np.uint8)
        arrays[f"{part}_class_off"] = np.array(class_off, np.int64)
        summary[part] = {g: int((r[:, 0] == i).sum()) for i, g in enumerate(GROUPS)}
        summary[f"{part}_megapixels"] = round(float(r[:, 2] @ r[:, 3]) / 1e6, 2) if len(r) else 0.0
    arrays["summary"] = np.array(json.dumps(summary))
    _save_npz(out, arrays)
    return summary


def _save_npz(out: Path, arrays: dict[str, np.ndarray]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)


def load_packed(path: str | os.PathLike, part: str) -> list[dict]:
    """The images of one part of a packed file as dicts (name, group, image (C,H,W) float32
    normalised, masks (H,W) uint16, scale); for validation and tests."""
    z = np.load(path, allow_pickle=False)
    s = json.loads(str(z["summary"]))
    rows, poff = z[f"{part}_rows"], z[f"{part}_px_off"]
    out = []
    for i, ((g, _, h, w, sc), im) in enumerate(zip(rows, images(z, part))):
        out.append({
            "name": str(z[f"{part}_names"][i]), "group": s["groups"][g],
            "image": im.astype(np.float32) / s["quant"],
            "masks": z[f"{part}_masks"][poff[i]:poff[i + 1]].reshape(h, w), "scale": sc / 1e4,
        })
    return out


def pack_bench(data: Path, out: Path) -> dict:
    """Real source images for the GPU benchmarks' tiled 1024² / 4096² images."""
    import tifffile

    src = {
        "usiigaci_set10": data / DATASETS["usiigaci"] / "train" / "set10_img.tif",
        "fluorescence": ROOT / "cpsam_toolkit" / "examples" / "nuclei_fluorescence_img.tif",
        "phase_crop": ROOT / "cpsam_toolkit" / "examples" / "cells_phase_contrast_img.tif",
    }
    dsb = sorted((data / DATASETS["dsb2018"] / "train").glob("*_img.tif"))
    arrays = {k: tifffile.imread(p) for k, p in src.items()}
    for p in dsb:  # one 1024² grey fluorescence image of DSB
        a = tifffile.imread(p)
        if a.shape[:2] == (1024, 1024) and a.ndim == 3 and np.array_equal(a[..., 0], a[..., 1]):
            arrays["dsb_1024"] = a[..., 0]
            break
    for k, a in arrays.items():
        if a.ndim == 3:
            arrays[k] = a[..., 0] if np.array_equal(a[..., 0], a[..., 1]) else a
    _save_npz(out, arrays)
    return {k: list(a.shape) for k, a in arrays.items()}


def download_wheels(dest: Path) -> list[str]:
    """Fetch the pinned wheels for the device machine (Python 3.12, manylinux x86_64)."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in dest.glob("*.whl")}
    for spec in WHEELS:
        name = spec.split("==")[0]
        if name.lower() in have:
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), spec]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        subprocess.run(cmd, check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def tree_size(root: Path = ROOT) -> int:
    """Bytes of the files git tracks plus the untracked files it does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / f.decode()).stat().st_size for f in out if f and (root / f.decode()).is_file())


def folder_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path(os.environ.get("CPSAM_DATA", ROOT.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=data,
                    help="the shared/data folder (default $CPSAM_DATA, else ../shared/data)")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--split", type=Path, default=None, help="split file (default: the shipped model's)")
    ap.add_argument("--diameter", type=float, default=30.0,
                    help="shrink images whose median object diameter is larger than this (px)")
    ap.add_argument("--limit", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                    help="at most this many train / val images per set (tests)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the packed images")
    ap.add_argument("--no-wheels", action="store_true", help="do not download wheels")
    ap.add_argument("--no-bench", action="store_true", help="do not pack the benchmark images")
    args = ap.parse_args(argv)

    split = load_split(args.split)
    limit = {"train": args.limit[0], "val": args.limit[1]} if args.limit else None
    s = pack_data(args.data, split, args.out / "train_data.npz", args.diameter, limit, args.quality)
    print(f"training data ({s['split']}): train {s['train']} ({s['train_megapixels']} Mpx), "
          f"val {s['val']} ({s['val_megapixels']} Mpx)")
    if not args.no_bench:
        print("benchmark sources:", pack_bench(args.data, args.out / "bench_sources.npz"))
    if not args.no_wheels:
        print("wheels:", ", ".join(download_wheels(args.out / "whl")))
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.glob("*.npz"))}
    whl = folder_size(args.out / "whl") if (args.out / "whl").is_dir() else 0
    tree = tree_size()
    total = tree + folder_size(args.out)
    for k, v in sizes.items():
        print(f"  {k:24s} {v / 2**20:6.2f} MiB")
    print(f"  {'whl/':24s} {whl / 2**20:6.2f} MiB")
    print(f"  {'checkout (git files)':24s} {tree / 2**20:6.2f} MiB")
    print(f"  {'total that travels':24s} {total / 2**20:6.2f} MiB of {LIMIT / 2**20:.0f} MiB")
    if total > LIMIT:
        print("ERROR: over the device tool's 64 MiB limit; pack with a larger --diameter or fewer images",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
