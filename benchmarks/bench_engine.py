"""Network and whole-image speed: cpsam-toolkit vs the reference cellpose 4.2, same weights.

Both run in this one process on the same inputs with the same random ViT-L weights (the reference
``CPSAM`` initialised at random and saved as an official state dict, loaded by both). Prints
medians and ratios (reference time / our time: > 1 means we are faster) and checks that the
outputs agree.

    python benchmarks/bench_engine.py                      # full ViT-L (slow on a CPU: ~10 min)
    python benchmarks/bench_engine.py --depth 4 --size 512 # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

DATA = Path(os.environ.get("CPSAM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def median_time(fn, reps: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of ``reps`` calls (CPU sums all threads; on a shared
    machine it is the steadier figure)."""
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts), statistics.median(cs)


def make_weights(depth: int, path: Path) -> None:
    from cellpose.vit import CPSAM

    torch.manual_seed(0)
    ref = CPSAM()
    ref.encoder.blocks = ref.encoder.blocks[:depth]
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.2)
    torch.save(ref.state_dict(), path)


def test_image(size: int) -> np.ndarray:
    img = tifffile.imread(DATA / "usiigaci_phase_contrast_cells" / "train" / "set10_img.tif")
    reps = int(np.ceil(size / min(img.shape)))
    return np.tile(img, (reps, reps))[:size, :size]


def paired(fn_a, fn_b, reps: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """:func:`median_time` of two functions, their calls alternated (a, b, a, b, ...) so that a
    changing load on a shared machine falls on both."""
    runs_a, runs_b = [], []
    for _ in range(reps):
        runs_a.append(median_time(fn_a, 1))
        runs_b.append(median_time(fn_b, 1))
    med = lambda runs: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))  # noqa: E731
    return med(runs_a), med(runs_b)


def bench_dtype(dt: str, weights: Path, args: argparse.Namespace) -> list[tuple]:
    """Rows (task, reference (wall, CPU) s, ours (wall, CPU) s, note) for one precision."""
    from cellpose import models

    import cpsam_toolkit as cp
    from cpsam_toolkit.metrics import average_precision

    ref = models.CellposeModel(gpu=False, pretrained_model=str(weights), use_bfloat16=dt == "bf16")
    ref.net.encoder.blocks = ref.net.encoder.blocks[: args.depth]
    ours = cp.load_model(weights, device="cpu", dtype=dt)
    x = torch.rand(args.batch_size, 3, 256, 256)
    xr, xo = x.to(ref.net.dtype), x.to(ours.dtype)
    with torch.inference_mode():  # network only: one batch of tiles, after a warm-up
        ref.net(xr[:1])
        ours.net(xo[:1])
        t_ref, t_our = paired(lambda: ref.net(xr), lambda: ours.net(xo), args.reps)
        t_ref, t_our = (tuple(t / args.batch_size for t in ts) for ts in (t_ref, t_our))
    rows = [(f"network, one 256² tile ({dt}, batch {args.batch_size})", t_ref, t_our, "")]
    warm = test_image(256)  # first calls: allocator pools, compiled kernels, caches
    ref.eval(warm, batch_size=args.batch_size)
    ours.segment(warm, batch_size=args.batch_size)
    for size in args.size:
        img = test_image(size)
        out = {}
        t_ref, t_our = paired(
            lambda img=img, out=out: out.update(ref=ref.eval(img, batch_size=args.batch_size)[0]),
            lambda img=img, out=out: out.update(our=ours.segment(img, batch_size=args.batch_size).masks),
            max(1, args.reps - 2),
        )
        ap50 = average_precision(out["ref"], out["our"], thresholds=[0.5])[0][0]
        note = f"masks: ref {out['ref'].max()} / ours {out['our'].max()}, AP@0.5 {ap50:.3f}"
        rows.append((f"whole {size}² image ({dt})", t_ref, t_our, note))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=24, help="encoder blocks (24 = ViT-L)")
    ap.add_argument("--size", type=int, nargs="+", default=[1024])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        w = Path(d) / "vit.pt"
        make_weights(args.depth, w)
        rows = [r for dt in args.dtypes for r in bench_dtype(dt, w, args)]
        print(f"\nViT encoder depth {args.depth} (24 = ViT-L), random weights; medians")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        print("| task | reference wall / CPU (s) | ours wall / CPU (s) | ratio wall / CPU | note |")
        print("|---|---|---|---|---|")
        for name, (a, ca), (b, cb), note in rows:
            print(f"| {name} | {a:.2f} / {ca:.2f} | {b:.2f} / {cb:.2f} | **{a / b:.2f}x** / "
                  f"{ca / cb:.2f}x | {note} |")


if __name__ == "__main__":
    main()
