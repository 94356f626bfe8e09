"""3D on real data: cpsam-toolkit vs the reference cellpose 4.2 pipeline, same network.

The QCANet 8-cell mouse embryo (``shared/data/qcanet_mouse_embryo_3d``: 51 x 120 x 122 voxels,
8 nuclei, Z spacing 2.18 x the XY pixel size) is segmented by both pipelines with the *same*
network (the shipped model, or ``--model``): the reference's ``CellposeModel.eval`` is driven with
our network in place of its ViT-L (its own code path from there: normalisation, Z resampling,
``run_3D``, summed views, 3D tracking and its post-processing). Prints AP at IoU 0.5 / 0.75,
object counts, each true nucleus's best IoU, and the wall time of each, for 3D (ignoring and
using the anisotropy) and 2D + stitching.

    python benchmarks/compare_3d.py                     # about 5 min on 2 busy CPU cores
    python benchmarks/compare_3d.py --model cpsam       # official weights, if you have them
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qcanet_mouse_embryo_3d" / "train"


def reference_model(model):
    """A reference ``CellposeModel`` that runs our network (no weights download)."""
    from cellpose import models

    class RefNet(torch.nn.Module):  # the reference expects (output, style) from its network
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.device, self.dtype = torch.device("cpu"), torch.float32

        def forward(self, x):
            return self.net(x.float()), torch.zeros(x.shape[0], 256)

    ref = models.CellposeModel.__new__(models.CellposeModel)
    ref.net, ref.device, ref.gpu = RefNet(model.net).eval(), torch.device("cpu"), False
    ref.backbone, ref.pretrained_model = "sam_vitl", "cpsam-toolkit network"
    return ref


def best_ious(truth: np.ndarray, pred: np.ndarray) -> list[float]:
    """For each true object, its highest IoU with any predicted object."""
    from cpsam_toolkit.metrics import iou_matrix

    iou = iou_matrix(truth, pred)[0]
    best = iou.max(axis=1) if iou.shape[1] else np.zeros(iou.shape[0])
    return [round(float(v), 2) for v in best]


def main() -> None:
    import cpsam_toolkit as cp
    from cpsam_toolkit.metrics import average_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name or file (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    image = tifffile.imread(DATA / "8_cell_stage_img.tif")
    truth = tifffile.imread(DATA / "8_cell_stage_masks.tif")
    model = cp.load_model(args.model, device="cpu", dtype="fp32")
    ref = reference_model(model)
    runs = {
        "3D, anisotropy ignored": (dict(do_3d=True, z_axis=0), dict(do_3D=True, z_axis=0)),
        "3D, anisotropy 2.18": (dict(do_3d=True, z_axis=0, anisotropy=2.18),
                                dict(do_3D=True, z_axis=0, anisotropy=2.18)),
        "2D + stitching 0.25": (dict(z_axis=0, stitch_threshold=0.25),
                                dict(z_axis=0, stitch_threshold=0.25)),
    }
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); model: {model}")
    print(f"volume {image.shape} {image.dtype}, {int(truth.max())} true nuclei\n")
    print("| run | pipeline | objects | AP@0.5 | AP@0.75 | TP / FP / FN @0.5 | best IoU per nucleus "
          "| time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (ours_kw, ref_kw) in runs.items():
        for who in ("reference", "cpsam-toolkit"):
            t = time.perf_counter()
            if who == "reference":
                masks = ref.eval(image, **ref_kw)[0]
            else:
                masks = model.segment(image, **ours_kw).masks
            dt = time.perf_counter() - t
            a, tp, fp, fn = average_precision(truth, masks, [0.5, 0.75])
            print(f"| {name} | {who} | {int(masks.max())} | {a[0]:.3f} | {a[1]:.3f} | "
                  f"{tp[0]} / {fp[0]} / {fn[0]} | {' '.join(map(str, best_ious(truth, masks)))} | {dt:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
