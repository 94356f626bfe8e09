"""Slider latency of the Jupyter viewer on 1024² images: post-processing only, on cached flows.

What the user waits for after releasing a threshold slider in :class:`cpsam_toolkit.widgets.Viewer`
(``background=False``, so the time is the recompute itself plus building the label and hover
payloads, without the browser). The flows and cell probabilities are those of a good model,
made from the ground truth: ``5 x`` unit flows from the masks plus noise, and logits that
rise with the distance inside a cell and fall outside it (so moving the cell-probability
threshold moves every boundary, as with a real network). The reference column is what the
Cellpose GUI does on every change: ``cellpose.dynamics.compute_masks`` from scratch, then hole
filling.

    python benchmarks/bench_viewer.py              # phase-contrast cells and nuclei, 1024²
    python benchmarks/bench_viewer.py --threads 1
    python benchmarks/bench_viewer.py --examples --reps 3   # the bundled examples, shipped model

``--examples``: the four bundled example images segmented once by the shipped model (network
outputs of a real, weak model), then every slider of the viewer moved to new values, as a user
drags them: the cell-probability slider (probability 0.1 … 0.9, i.e. logit -2.2 … 2.2), the
flow-threshold slider and the (log) minimum-size slider. Ours only (the reference has no viewer);
each time is the median over ``--reps`` fresh viewers (no cache hits).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def oracle_outputs(masks: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(flows (2,Y,X), cellprob (Y,X)) float32 of a good model for these masks."""
    from cpsam_toolkit.flows import masks_to_flows

    rng = np.random.default_rng(seed)
    flows = 5 * masks_to_flows(masks) + rng.normal(0, 0.5, (2, *masks.shape))
    inside = ndimage.distance_transform_edt(masks > 0)
    outside = ndimage.distance_transform_edt(masks == 0)
    cellprob = np.clip(1.5 * (inside - outside), -8, 8) + rng.normal(0, 0.5, masks.shape)
    return flows.astype(np.float32), cellprob.astype(np.float32)


def images() -> dict[str, np.ndarray]:
    cells = tifffile.imread(DATA / "usiigaci_phase_contrast_cells" / "train" / "set10_masks.tif")
    nuclei_dir = DATA / "dsb2018_stage1_train_fixed" / "train"
    # a 4x4 mosaic of 256² nuclei label images, relabelled: a dense 1024² nuclei field
    tiles = []
    for f in sorted(nuclei_dir.glob("*_masks.tif")):
        m = tifffile.imread(f)
        if m.shape == (256, 256) and m.max() >= 20:
            tiles.append(m.astype(np.int32))
        if len(tiles) == 16:
            break
    offset, rows = 0, []
    for r in range(4):
        row = []
        for t in tiles[4 * r : 4 * r + 4]:
            row.append(np.where(t > 0, t + offset, 0))
            offset += int(t.max())
        rows.append(np.concatenate(row, 1))
    return {"phase-contrast cells (usiigaci set10)": np.pad(cells, ((0, 2), (0, 0))),
            "nuclei mosaic (16 DSB crops)": np.concatenate(rows, 0)}


def bench_examples(reps: int) -> None:
    """Slider latencies on the bundled examples with the shipped model (a markdown table)."""
    from cpsam_toolkit.io import imread
    from cpsam_toolkit.widgets import Viewer
    from cpsam_toolkit.widgets._base import logit
    from cpsam_toolkit.widgets.demo import example_images, notebook_model

    model = notebook_model()
    probs = [0.3, 0.7, 0.1, 0.9, 0.5]  # drag stops of the cell-probability slider
    flows = [0.4, 1.2, 0.6]
    sizes = [5, 60, 300]
    print("| example | size | objects | cell probability (new value) | flow threshold | min size |")
    print("|---|---|---|---|---|---|")
    for path in example_images():
        image = imread(path)
        result = model.segment(image, **(model.info.get("recommended_settings") or {}))
        t_cp, t_fl, t_ms = [], [], []
        for _ in range(reps):
            v = Viewer(image, result=result.recompute(), background=False)  # a fresh cache
            v.result._stages.clear()
            for p in probs:
                t = time.perf_counter()
                v.recompute(cellprob_threshold=round(logit(p), 3))
                t_cp.append(time.perf_counter() - t)
            for f in flows:
                t = time.perf_counter()
                v.recompute(flow_threshold=f)
                t_fl.append(time.perf_counter() - t)
            for m in sizes:
                t = time.perf_counter()
                v.recompute(min_size=m)
                t_ms.append(time.perf_counter() - t)

        def fmt(ts: list[float]) -> str:
            return f"{statistics.median(ts) * 1e3:.0f} ms (max {max(ts) * 1e3:.0f})"

        print(f"| {path.stem} | {image.shape[0]}×{image.shape[1]} | {result.n_objects} | {fmt(t_cp)} | "
              f"{fmt(t_fl)} | {fmt(t_ms)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--examples", action="store_true", help="the bundled examples with the shipped model")
    ap.add_argument("--reps", type=int, default=3, help="fresh viewers per example (--examples)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.examples:
        print(f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
              f"load average {', '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
        bench_examples(args.reps)
        return

    from cpsam_toolkit.segment import MaskOptions, SegmentationResult, masks_from_flows
    from cpsam_toolkit.widgets import Viewer

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
          f"torch {torch.__version__}")
    cellprob_moves = [0.5, 1.0, -0.5, 0.0, 2.0, -1.0]  # slider releases, each a new value
    flow_moves = [0.2, 0.8, 0.4, 1.5]
    for name, gt in images().items():
        flows, cellprob = oracle_outputs(gt)
        opts = MaskOptions()
        res = SegmentationResult(masks_from_flows(flows, cellprob, opts), flows, cellprob, opts, name)
        v = Viewer(np.zeros(gt.shape, np.float32), result=res, background=False)
        t_cp, t_fl = [], []
        for c in cellprob_moves:
            t = time.perf_counter()
            v.recompute(cellprob_threshold=c)
            t_cp.append(time.perf_counter() - t)
        for f in flow_moves:
            t = time.perf_counter()
            v.recompute(flow_threshold=f)
            t_fl.append(time.perf_counter() - t)
        n = v.result.n_objects
        print(f"\n{name}: {gt.shape[0]}x{gt.shape[1]}, {int(gt.max())} true objects, {n} shown")
        for label, ts in (("cell-probability slider (new value each time)", t_cp),
                          ("flow-threshold slider", t_fl)):
            print(f"  {label:47s} median {statistics.median(ts) * 1e3:6.0f} ms, max {max(ts) * 1e3:6.0f} ms")
        if args.no_reference:
            continue
        from cellpose import dynamics as ref_dyn
        from cellpose import utils as ref_utils

        t_ref = []
        for c in cellprob_moves[:3]:
            t = time.perf_counter()
            m = ref_dyn.compute_masks(flows, cellprob, cellprob_threshold=c, flow_threshold=0.4)
            ref_utils.fill_holes_and_remove_small_masks(m, min_size=15)
            t_ref.append(time.perf_counter() - t)
        r = statistics.median(t_ref)
        print(f"  reference full recompute per change:            median {r * 1e3:6.0f} ms "
              f"({r / statistics.median(t_cp):.1f}x the cell-probability slider, "
              f"{r / statistics.median(t_fl):.0f}x the flow slider)")


if __name__ == "__main__":
    main()
