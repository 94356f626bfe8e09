"""Helpers for the plugin's tests (tests/test_cellprofiler_*.py); not a CellProfiler module.

CellProfiler skips files whose name starts with ``_`` when it scans the plugins folder.

Two synthetic model files built from the ``tiny`` network preset:

* :func:`make_random_model` — random weights (finds nothing on a blank image);
* :func:`make_grid_model` (and :func:`make_grid_panoptic_model`, the same with class maps) —
  zero weights in the readout and a bias pattern, so that for any
  input the network predicts flows pointing to the centre of every ``patch x patch`` cell of
  the 256 x 256 tile and a positive cell probability on all but its first row and column.
  An image whose sides are multiples of 2 x patch, up to 256, therefore segments into a known
  grid of ``(patch-1)^2``-pixel squares (checked for 64, 96, 128 and 256),
  which lets tests check counts, centres and the size/border filters exactly, through the
  real library and the real CellProfiler, without a trained model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def make_random_model(path: str | os.PathLike, seed: int = 0) -> Path:
    import torch

    from cpsam_toolkit.network import CPSAMNet, get_config
    from cpsam_toolkit.network.checkpoints import save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(CPSAMNet(get_config("tiny")), path)
    return Path(path)


def make_grid_model(path: str | os.PathLike, seed: int = 0) -> Path:
    import torch

    from cpsam_toolkit.network import CPSAMNet, get_config
    from cpsam_toolkit.network.checkpoints import save_checkpoint

    torch.manual_seed(seed)
    cfg = get_config("tiny")
    net = CPSAMNet(cfg)
    p, nout = cfg.patch, cfg.nout
    with torch.no_grad():
        net.out.weight.zero_()
        bias = torch.zeros(nout, p, p)
        ii, jj = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        c = p / 2
        dy, dx = (c - ii).float(), (c - jj).float()
        norm = torch.sqrt(dy**2 + dx**2).clamp(min=1e-6)
        bias[-3] = 5 * dy / norm  # dY, network units (about 5 x unit vectors)
        bias[-2] = 5 * dx / norm  # dX
        bias[-1] = torch.where((ii >= 1) & (jj >= 1), 6.0, -6.0)  # cell-probability logit
        net.out.bias.copy_(bias.reshape(-1))  # pixel_shuffle: channel c*p*p + i*p + j
    save_checkpoint(net, path)
    return Path(path)


def make_grid_panoptic_model(path: str | os.PathLike, classes=("a", "b", "c"), winner: int = 2,
                             seed: int = 0) -> Path:
    """:func:`make_grid_model` with class maps (``cpsam_toolkit.panoptic``): class number
    ``winner`` (1..K) wins everywhere inside objects (a +1 bias over the other classes)."""
    import torch

    from cpsam_toolkit.network.checkpoints import load_checkpoint, save_checkpoint
    from cpsam_toolkit.panoptic import make_panoptic

    path = Path(path)
    grid = make_grid_model(path.with_name(path.stem + "_plain.pt"), seed=seed)
    net = make_panoptic(load_checkpoint(grid)[0], list(classes))
    p2 = net.cfg.patch**2
    with torch.no_grad():
        net.out.bias[winner * p2 : (winner + 1) * p2] += 1.0
    save_checkpoint(net, path)
    return path


def grid_patch() -> int:
    from cpsam_toolkit.network import get_config

    return int(get_config("tiny").patch)


def expected_grid(shape=(256, 256), patch: int | None = None, remove_border: bool = True):
    """(count, centres (N,2) as (y, x)) the grid model gives on an image of ``shape``."""
    p = patch or grid_patch()
    ny, nx = shape[0] // p, shape[1] // p
    centres = []
    for gy in range(ny):
        for gx in range(nx):
            # squares cover rows/cols 1..p-1 of each cell; the last row/column of cells touches
            # the bottom/right image border
            if remove_border and (gy == ny - 1 or gx == nx - 1):
                continue
            centres.append((gy * p + p / 2, gx * p + p / 2))
    return len(centres), np.array(centres, dtype=float).reshape(-1, 2)
