"""Benchmark: cpsam_toolkit.metrics against cellpose.metrics on the same large label images.

    python benchmarks/bench_metrics.py [--size 2048] [--grid 40] [--reps 5]

Builds a dense synthetic label image (``grid x grid`` cells, Voronoi regions clipped to disks,
about 1,600 objects at the defaults) and a prediction (shifted, some objects dropped, merged,
dilated, false blobs), checks that both implementations give the same counts, and prints the
median time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import numpy as np
from scipy import ndimage as ndi


def synthetic_labels(size: int, grid: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    step = size / grid
    c = (np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij"), -1) + 0.5) * step
    c = (c.reshape(-1, 2) + rng.uniform(-0.25, 0.25, (grid * grid, 2)) * step).astype(int)
    c = np.clip(c, 0, size - 1)
    seeds = np.zeros((size, size), np.uint16)
    seeds[c[:, 0], c[:, 1]] = np.arange(1, len(c) + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[iy, ix]
    lab[dist > 0.55 * step] = 0
    return lab


def fake_prediction(m: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.roll(m, (2, -1), axis=(0, 1)).astype(np.int64)
    labels = np.unique(p)[1:]
    pick = rng.permutation(labels)
    n = len(labels)
    p[np.isin(p, pick[: n // 20])] = 0  # drop 5 %
    grow = np.isin(p, pick[n // 20 : n // 5])  # dilate 15 % into background
    grown = ndi.grey_dilation(np.where(grow, p, 0), size=5)
    p = np.where((p == 0) & (grown > 0), grown, p)
    for a in pick[n // 5 : n // 5 + 20]:  # merge 20 objects with their right neighbour
        ys, xs = np.nonzero(p == a)
        if xs.size:
            right = p[ys, np.minimum(xs + 3, p.shape[1] - 1)]
            right = right[(right != a) & (right > 0)]
            if right.size:
                p[p == right[0]] = a
    nxt = int(p.max()) + 1
    for _ in range(30):  # false blobs
        y, x = rng.integers(0, p.shape[0] - 12), rng.integers(0, p.shape[1] - 12)
        sl = p[y : y + 12, x : x + 12]
        sl[sl == 0] = nxt
        nxt += 1
    return p.astype(np.uint16)


def timeit(fn, reps: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(x.split(":", 1)[1].strip() for x in out.splitlines() if "Model name" in x)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import os

    return f"{model}, {os.cpu_count()} logical CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--grid", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import cellpose
    import cellpose.metrics as ref

    from cpsam_toolkit import metrics as ours

    gt = synthetic_labels(args.size, args.grid)
    pred = fake_prediction(gt)
    print(f"machine: {cpu_name()}; cellpose {cellpose.version}")
    print(
        f"inputs: {gt.shape} uint16, {len(np.unique(gt)) - 1} true and "
        f"{len(np.unique(pred)) - 1} predicted objects; {args.reps} reps after a warm-up"
    )
    grid = list(ours.IOU_GRID)
    cases = [
        ("average_precision, 3 thresholds", [0.5, 0.75, 0.9]),
        ("average_precision, 10 thresholds", grid),
    ]
    print(f"{'task':40s} {'reference':>10s} {'ours':>10s} {'speed-up':>9s}")
    for name, th in cases:
        t_ref, _, r = timeit(lambda th=th: ref.average_precision(gt, pred, threshold=th), args.reps)
        t_our, _, o = timeit(lambda th=th: ours.average_precision(gt, pred, th), args.reps)
        assert all(np.array_equal(a, b) for a, b in zip(r[1:], o[1:], strict=True)), "mismatch"
        print(f"{name:40s} {t_ref:9.3f}s {t_our:9.3f}s {t_ref / t_our:8.1f}x   tp={o[1].tolist()}")
    t_ref, _, r = timeit(lambda: ref.aggregated_jaccard_index([gt], [pred])[0], args.reps)
    t_our, _, o = timeit(lambda: ours.aggregated_jaccard_index(gt, pred, variant="cellpose"), args.reps)
    assert abs(r - o) < 1e-9, (r, o)
    print(f"{'aggregated_jaccard_index (cellpose)':40s} {t_ref:9.3f}s {t_our:9.3f}s {t_ref / t_our:8.1f}x")
    t_our, _, s = timeit(lambda: ours.matching(gt, pred, grid), args.reps)
    print(
        f"{'ours: matching, 10 thresholds, all stats':40s} {'':>10s} {t_our:9.3f}s "
        f"{'':>9s} AP@0.5={s.ap[0]:.3f} err@0.5={s.error_rate[0]:.3f} AJI={s.aji:.3f}"
    )


if __name__ == "__main__":
    main()
