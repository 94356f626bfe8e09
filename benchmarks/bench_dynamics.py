"""Dynamics benchmark: cpsam_toolkit vs the reference cellpose 4.2, in one process.

Inputs (as in the reference notes): a label image of non-overlapping disks (radius 10-18 px),
flows ``dP = 5 * mu`` with ``mu`` the reference's own masks_to_flows, cellprob +4 inside and
-4 outside. Steps timed:

* masks → flows: ``flows.masks_to_flows`` vs ``cellpose.dynamics.masks_to_flows_gpu``;
* flows → masks with QC: ``dynamics.compute_masks`` vs ``cellpose.dynamics.compute_masks``
  followed by ``cellpose.utils.fill_holes_and_remove_small_masks`` (niter 200, flow_threshold
  0.4, min_size 15);
* flows → masks without QC (flow_threshold 0).

Each step: one warm-up (not for the reference at 2048²), then the median wall time of
``--reps`` runs (``--ref-reps`` for the reference). Agreement: flows (mean cosine, 99th-percentile angle) and
masks (identical pixels, counts, AP@0.5). Usage::

    python benchmarks/bench_dynamics.py                   # 512² x100 and 2048² x1600 disks
    python benchmarks/bench_dynamics.py --sizes 512 --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cpsam_toolkit import dynamics, flows

CASES = {512: 100, 1024: 400, 2048: 1600}


def disks(size: int, n: int, seed: int = 0) -> np.ndarray:
    """(size, size) uint16 labels of ``n`` non-overlapping disks of radius 10-18 px."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((size, size), np.uint16)
    placed = np.zeros((0, 3))
    while len(placed) < n:
        r = rng.uniform(10, 18)
        cy, cx = rng.uniform(r, size - r, 2)
        if len(placed) and np.any(
            (placed[:, 0] - cy) ** 2 + (placed[:, 1] - cx) ** 2 < (placed[:, 2] + r + 1) ** 2
        ):
            continue
        placed = np.vstack([placed, [cy, cx, r]])
        y0, x0 = int(max(cy - r - 1, 0)), int(max(cx - r - 1, 0))
        yy, xx = np.mgrid[y0 : int(min(cy + r + 2, size)), x0 : int(min(cx + r + 2, size))]
        masks[y0 : y0 + yy.shape[0], x0 : x0 + yy.shape[1]][
            (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        ] = len(placed)
    return masks


def timed(
    fn: Callable[[], object], reps: int, warmup: bool = True
) -> tuple[tuple[float, float], object]:
    """Median (wall, process CPU) seconds of ``reps`` runs after an optional warm-up, and the
    last result. CPU time sums all threads; on a shared machine it is the steadier figure."""
    out = fn() if warmup else None
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return (float(np.median(wall)), float(np.median(cpu))), out


def ap_at_05(true: np.ndarray, pred: np.ndarray) -> float:
    nt, npred = int(true.max()), int(pred.max())
    if nt == 0 and npred == 0:
        return 1.0
    overlap = np.zeros((nt + 1, npred + 1), np.int64)
    np.add.at(overlap, (true.ravel().astype(np.int64), pred.ravel().astype(np.int64)), 1)
    inter = overlap[1:, 1:]
    union = overlap.sum(1)[1:, None] + overlap.sum(0)[None, 1:] - inter
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-iou)
    tp = int((iou[rows, cols] >= 0.5).sum())
    return tp / (nt + npred - tp)


def flow_agreement(ours: np.ndarray, ref: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    a, b = ours[:, masks > 0].astype(np.float64), ref[:, masks > 0]
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    cos = np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(0) / np.maximum(na * nb, 1e-300))
    return float(cos.mean()), float(np.percentile(np.degrees(np.arccos(np.clip(cos, -1, 1))), 99))


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                     if ln.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}")


Times = tuple[float, float]


def run_case(size: int, reps: int, ref_reps: int) -> list[tuple[str, Times, Times, str]]:
    from cellpose import dynamics as ref_dyn
    from cellpose import utils as ref_utils

    cpu = torch.device("cpu")
    gt = disks(size, CASES.get(size, size * size // 2600))
    rows = []

    # the reference's 15 s runs at 2048² need no warm-up (the 512² case has warmed torch up)
    warm = size < 2048
    t_ref, (mu_ref, _) = timed(lambda: ref_dyn.masks_to_flows_gpu(gt, device=cpu), ref_reps,
                               warm)
    t_our, mu = timed(lambda: flows.masks_to_flows(gt, device="cpu"), reps)
    cos, p99 = flow_agreement(mu, mu_ref, gt)
    rows.append(("masks → flows", t_ref, t_our, f"mean cos {cos:.8f}, p99 angle {p99:.1e}°"))

    dP = (5 * mu_ref).astype(np.float32)
    cellprob = np.where(gt > 0, 4.0, -4.0).astype(np.float32)

    def ref_masks(flow_threshold: float) -> np.ndarray:
        m = ref_dyn.compute_masks(dP, cellprob, niter=200, flow_threshold=flow_threshold,
                                  device=cpu)
        return ref_utils.fill_holes_and_remove_small_masks(m, min_size=15)

    for label, thr in (("flows → masks, QC", 0.4), ("flows → masks, no QC", 0.0)):
        t_ref, m_ref = timed(lambda thr=thr: ref_masks(thr), ref_reps, warm)
        t_our, m_our = timed(
            lambda thr=thr: dynamics.compute_masks(dP, cellprob, flow_threshold=thr,
                                                   device="cpu"), reps)
        same = "identical" if np.array_equal(m_our, m_ref) else (
            f"{np.mean(m_our == m_ref):.5f} px equal")
        rows.append((label, t_ref, t_our,
                     f"{same}; {m_ref.max()}/{m_our.max()} masks; AP50 vs ref "
                     f"{ap_at_05(m_ref, m_our):.3f}, vs GT {ap_at_05(gt, m_our):.3f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--reps", type=int, default=3, help="timed runs of ours (median)")
    ap.add_argument("--ref-reps", type=int, default=3, help="timed runs of the reference")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print("| image | step | reference wall / CPU (s) | ours wall / CPU (s) | speed-up wall / CPU "
          "| agreement |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for step, t_ref, t_our, agree in run_case(size, args.reps, args.ref_reps):
            n = CASES.get(size, size * size // 2600)
            print(f"| {size}² ({n} disks) | {step} | {t_ref[0]:.3f} / {t_ref[1]:.3f} | "
                  f"{t_our[0]:.3f} / {t_our[1]:.3f} | **{t_ref[0] / t_our[0]:.1f}x** / "
                  f"{t_ref[1] / t_our[1]:.1f}x | {agree} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
