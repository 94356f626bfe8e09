#!/usr/bin/env python
"""Large 2D images: whole image vs blocks mode vs ``segment_blockwise`` (time, peak RAM, masks).

On one mosaic of real DSB2018 fluorescence crops (256² crops tiled edge to edge, with their
annotations; ``tests/test_blockwise.py``), each way runs in a fresh subprocess, one after the
other, so each one's peak resident memory (``ru_maxrss``) is its own:

* ``whole``     — ``model.segment(img, host_memory="unlimited")``;
* ``blocks``    — ``model.segment(img, host_memory=...)``: above the budget the library
  segments the image in blocks by itself (:mod:`cpsam_toolkit.modes.blocks`);
* ``blockwise`` — :func:`cpsam_toolkit.blockwise.segment_blockwise` to a zarr label array
  (the out-of-memory path: lazy input, zarr output).

Reports seconds (segmentation only, and with the model load), peak RSS, the RSS before
segmenting (model and image loaded), objects, and the agreement of each with the whole image
(AP at IoU 0.5 / 0.75) and with the annotations (AP@0.5).

    python benchmarks/bench_blockwise.py --size 4096                   # shipped model
    python benchmarks/bench_blockwise.py --size 3072 --model gradient  # CI stand-in network
    python benchmarks/bench_blockwise.py --size 3072 --profile         # cProfile, one process

``--profile`` runs the whole image and blocks mode back to back in one process under
cProfile and prints each one's top functions, for finding what blocks cost beyond the network.
Set ``CPSAM_OFFLINE=1`` to use the shipped model without asking the registry; torch runs
one thread (``--threads``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CPSAM_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "tests"))  # the mosaic and the stand-in network of the tests


def get_model(name: str):
    """``shipped`` (the small model in the package), ``gradient`` (the tests' stand-in) or a
    weights path / registry name."""
    from cpsam_toolkit.segment import load_model

    if name == "gradient":
        from test_cli_segment import gradient_cellpose

        return gradient_cellpose()
    return load_model(None if name == "shipped" else name)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One way, in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = get_model(args.model)
    img = np.load(args.image)
    before = peak_rss_mb()
    t1 = time.perf_counter()
    settings = model.settings.replace(augment=False) if args.no_augment else model.settings
    if args.worker == "whole":
        masks = model.segment(img, settings, host_memory="unlimited").masks
    elif args.worker == "blocks":
        masks = model.segment(img, settings, host_memory=args.host_memory).masks
    else:
        from cpsam_toolkit import blockwise

        res = blockwise.segment_blockwise(img, model, Path(args.tmp) / "blockwise.zarr",
                                          block_size=args.block_size, halo=args.halo, settings=settings)
        masks = res.read()
    t2 = time.perf_counter()
    np.save(Path(args.tmp) / f"{args.worker}.npy", masks.astype(np.uint32))
    print(json.dumps({"way": args.worker, "seconds": t2 - t1, "with_load_s": t2 - t0,
                      "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
                      "objects": int(len(np.unique(masks)) - 1)}))


def profile(args: argparse.Namespace, img: np.ndarray) -> None:
    import torch

    from cpsam_toolkit.modes import blocks

    torch.set_num_threads(args.threads)
    model = get_model(args.model)
    plan = blocks.choose_blocks(img.shape, blocks.host_memory_budget(args.host_memory))
    print(f"{args.size}² {args.model}: blocks mode plans {plan}")
    model.segment(img[:512, :512])  # warm up (compiled loops, first-call costs)
    times = {}
    for way, hm in (("whole", "unlimited"), ("blocks", args.host_memory)):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        res = model.segment(img, host_memory=hm)
        prof.disable()
        times[way] = time.perf_counter() - t0
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s).sort_stats("tottime")
        st.print_stats(args.top)
        print(f"\n===== {way}: {times[way]:.1f} s, {res.n_objects} objects =====")
        print("\n".join(s.getvalue().splitlines()[:args.top + 12]))
    print(f"\nblocks / whole time: {times['blocks'] / times['whole']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="mosaic side (px)")
    p.add_argument("--model", default="shipped", help="shipped, gradient, or a weights path/name")
    p.add_argument("--host-memory", default="1GB", help="budget for blocks mode")
    p.add_argument("--block-size", type=int, default=2048, help="segment_blockwise block (px)")
    p.add_argument("--halo", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-augment", action="store_true",
                   help="the model's settings without test-time augmentation (4x less network time)")
    p.add_argument("--ways", default="whole,blocks,blockwise")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--profile", action="store_true", help="cProfile whole and blocks, one process")
    p.add_argument("--top", type=int, default=25, help="functions shown by --profile")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from test_blockwise import mosaic

    from cpsam_toolkit.metrics import average_precision
    from cpsam_toolkit.modes import blocks

    img, lab = mosaic(DATA, args.size)
    img = np.clip(img, 0, 255).astype(np.uint8)  # as a microscope's 8-bit export
    if args.profile:
        return profile(args, img)
    plan = blocks.choose_blocks(img.shape, blocks.host_memory_budget(args.host_memory))
    print(f"{args.size}² uint8 mosaic, model {args.model}, {args.threads} torch thread(s), "
          f"load {os.getloadavg()[0]:.1f}; blocks mode: {plan}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "image.npy", img)
        for way in args.ways.split(","):
            cmd = [sys.executable, __file__, "--worker", way, "--image", str(Path(tmp) / "image.npy"),
                   "--tmp", tmp, "--model", args.model, "--host-memory", args.host_memory,
                   "--block-size", str(args.block_size), "--halo", str(args.halo),
                   "--threads", str(args.threads)] + (["--no-augment"] if args.no_augment else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{way:>9}: {row['seconds']:7.1f} s  peak RSS {row['peak_rss_mb']:7.0f} MB "
                  f"(before {row['rss_before_mb']:.0f})  {row['objects']} objects", flush=True)
        masks = {r["way"]: np.load(Path(tmp) / f"{r['way']}.npy") for r in rows}
    for r in rows:
        m = masks[r["way"]]
        r["ap_gt_50"] = float(average_precision(lab, m, [0.5])[0][0])
        if "whole" in masks:
            ap = average_precision(masks["whole"], m, [0.5, 0.75])[0]
            r["ap_whole_50"], r["ap_whole_75"] = float(ap[0]), float(ap[1])
    base = next((r for r in rows if r["way"] == "whole"), None)
    print("\n| way | s | × whole | peak RSS (MB) | × whole | objects | AP@0.5 vs whole | AP@0.75 "
          "| AP@0.5 vs labels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tr = r["seconds"] / base["seconds"] if base else float("nan")
        mr = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        print(f"| {r['way']} | {r['seconds']:.1f} | {tr:.2f} | {r['peak_rss_mb']:.0f} | {mr:.2f} | "
              f"{r['objects']} | {r.get('ap_whole_50', float('nan')):.4f} | "
              f"{r.get('ap_whole_75', float('nan')):.4f} | {r['ap_gt_50']:.3f} |")
    if args.json:
        meta = {"size": args.size, "model": args.model, "threads": args.threads,
                "host_memory": args.host_memory, "augment": not args.no_augment,
                "block_size": args.block_size, "halo": args.halo,
                "blocks_plan": None if plan is None else plan.__dict__, "machine": platform.machine(),
                "cpus": os.cpu_count(), "load_after": os.getloadavg()[0]}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
