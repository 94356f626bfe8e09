#!/usr/bin/env python
"""Throughput of plate runs: images per second on a folder of small real images.

Compares, on the same folder of N crops of real DSB2018 images (default 200 of 256 x 256):

* ``one-at-a-time``  — read, ``model.segment(image)``, write, image after image (tiles of one
  image per network call: what a simple loop over the reference does);
* ``plate``          — :func:`cpsam_toolkit.batch.run_plate` in one process: tiles batched
  across images, reading and writing in background threads;
* ``dask-2``         — the same on a ``LocalCluster`` of 2 worker processes (each loads the
  model once and gets half the torch threads).

    python benchmarks/bench_batch.py                       # tiny preset, 200 images
    python benchmarks/bench_batch.py --preset small --n 100 --json bench_batch.json

Random weights are used unless --model is given: the network cost depends only on its size,
but the number of objects (and so the dynamics cost) depends on the weights, so numbers with a
trained model differ. Outputs go to a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CPSAM_DATA", ROOT.parent / "shared" / "data"))


def make_folder(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` crops of ``size``² from DSB2018 images (several crops per large image)."""
    d = DATA / "dsb2018_stage1_train_fixed" / "train"
    files = sorted(d.glob("*_img.tif"))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for f in rng.permutation(files):
        img = tifffile.imread(f)
        if img.shape[0] < size or img.shape[1] < size:
            continue
        for _ in range(max(1, (img.shape[0] // size) * (img.shape[1] // size) // 2)):
            y = int(rng.integers(0, img.shape[0] - size + 1))
            x = int(rng.integers(0, img.shape[1] - size + 1))
            p = folder / f"crop{len(out):04d}.tif"
            tifffile.imwrite(p, img[y : y + size, x : x + size], compression="zlib")
            out.append(p)
            if len(out) == n:
                return out
    return out


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def one_at_a_time(model, files: list[Path], out: Path, batch_size: int) -> float:
    from cpsam_toolkit.io import imread
    from cpsam_toolkit.outputs import save_masks

    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for f in files:
        res = model.segment(imread(f), batch_size=batch_size)
        save_masks(out / f"{f.stem}_masks.tif", res.masks)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="images (200)")
    ap.add_argument("--size", type=int, default=256, help="crop size (256)")
    ap.add_argument("--preset", default="tiny", help="network preset with random weights (tiny)")
    ap.add_argument("--model", default=None, help="a weights file instead of random weights")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", default="one-at-a-time,plate,dask-2")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads of the single-process modes (default: torch's, = cores)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from cpsam_toolkit import batch
    from cpsam_toolkit.network import CPSAMNet, get_config
    from cpsam_toolkit.network.checkpoints import save_checkpoint
    from cpsam_toolkit.segment import NetOptions, load_model

    tmp = Path(tempfile.mkdtemp(prefix="cpsam-bench-batch-"))
    try:
        files = make_folder(tmp / "plate", args.n, args.size)
        model_path = args.model
        if model_path is None:
            torch.manual_seed(0)
            model_path = tmp / f"{args.preset}.pt"
            save_checkpoint(CPSAMNet(get_config(args.preset)), model_path)
        model = load_model(model_path)
        model.segment(tifffile.imread(files[0]))  # warm-up
        results: dict = {"n_images": len(files), "size": args.size, "model": str(args.model or args.preset),
                         "batch_size": args.batch_size, "machine": machine(), "modes": {}}
        modes = args.modes.split(",")
        for mode in modes:
            if mode == "one-at-a-time":
                sec = one_at_a_time(model, files, tmp / mode, args.batch_size)
                n_obj = None
            elif mode == "plate":
                rep = batch.run_plate(tmp / "plate", tmp / mode, model,
                                      net_options=NetOptions(batch_size=args.batch_size))
                sec, n_obj = rep.seconds, rep.n_objects
            elif mode.startswith("dask"):
                from distributed import Client

                n = int(mode.split("-")[1]) if "-" in mode else args.workers
                threads = max(1, (os.cpu_count() or 1) // n)
                t_start = time.perf_counter()
                cluster = batch.local_cluster(n, 1, threads, silence_logs=40)
                client = Client(cluster)
                t_up = time.perf_counter() - t_start
                try:
                    rep = batch.run_plate(tmp / "plate", tmp / mode, str(model_path), client=client,
                                          net_options=NetOptions(batch_size=args.batch_size),
                                          torch_threads=threads)
                    sec, n_obj = rep.seconds, rep.n_objects
                finally:
                    client.close()
                    cluster.close()
                results["modes"].setdefault(mode, {})["cluster_start_s"] = round(t_up, 2)
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            r = results["modes"].setdefault(mode, {})
            r.update(seconds=round(sec, 2), images_per_s=round(len(files) / sec, 3))
            if n_obj is not None:
                r["objects"] = n_obj
            print(f"{mode:>14}: {len(files)} images in {sec:7.1f} s = {len(files) / sec:6.2f} images/s",
                  flush=True)
        # the same masks whichever way they were computed
        names = sorted(p.name for p in (tmp / modes[0]).glob("*_masks.tif"))
        same = all(
            all((tifffile.imread(tmp / m / nm) == tifffile.imread(tmp / modes[0] / nm)).all()
                for nm in names)
            for m in modes[1:]
        )
        results["identical_masks"] = bool(same)
        print(f"identical masks across modes: {same}")
        print(json.dumps(results["machine"]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
