"""3D segmentation: a 2D network on the three orthogonal slice stacks of a volume.

Pipeline of :func:`segment_volume` (``do_3d=True`` in :meth:`CellposeSAM.segment`):

1. **Axes.** The volume is reordered to (Z, Y, X, C) from (Z, Y, X), (Z, C, Y, X), (Z, Y, X, C)
   or any order, given ``z_axis`` (and ``channel_axis`` for 4-D input).
2. **Normalisation** over the whole volume: the 1st/99th percentiles of each channel over all
   voxels map to 0/1 (the reference's ``norm3D``; subsampled above 224**3 voxels), so planes of
   one volume keep one contrast. ``lowhigh`` gives fixed per-channel bounds instead.
3. **Anisotropy.** With ``anisotropy = a`` (Z spacing / XY spacing) the network sees a volume
   resampled to ``Z' = round(a * Z)`` planes (linear interpolation along Z, half-pixel centres),
   so objects look round in the ZY and ZX slices. Resampled slices are made lazily from the
   normalised volume, one at a time: the resampled volume is never stored.
4. **Network** on the YX planes (Z' of them), the ZX planes (Y) and the ZY planes (X), all
   through one :meth:`CellposeSAM.iter_predict` stream so tiles of many slices share batches.
   Each slice's output is folded into float32 accumulators on the original (Z, Y, X) grid as it
   arrives (Z' → Z by linear interpolation), so memory is the normalised volume, the 4
   accumulators and the tiles in flight — never all slices' outputs.
5. **Combination** (``combine="mean"``, default): every flow component is seen by two views and
   averaged, ``dZ = (dZ_zx + dZ_zy) / 2``, ``dY = (dY_yx + dY_zy) / 2``, ``dX = (dX_yx + dX_zx) / 2``,
   and ``cellprob`` is the mean of the three logits. This is what the Cellpose-SAM paper
   describes ("averaged"). The reference code (cellpose 4.2 ``core.run_3D``) *sums* instead
   (flows ~2 x 5 in magnitude, cellprob = sum of 3 logits); ``combine="sum"`` reproduces that.
   Both give the same foreground at ``cellprob_threshold=0``; the sum doubles the Euler step.
6. **Post-processing** (:func:`masks_from_volume_flows`, re-run by :meth:`VolumeResult.recompute`):
   optional Gaussian smoothing of the flows (``flow3d_smooth``, sigma in XY pixels: the Z sigma
   is divided by the anisotropy on the anisotropic grid), 3D Euler tracking
   (:func:`cpsam_toolkit.dynamics.compute_masks`, no flow-error QC in 3D) on the original grid with
   ``dZ`` divided by the anisotropy (the network's Z unit is one resampled plane), hole filling
   and removal of objects below ``min_size`` voxels.

Measured choices (an "oracle" 2D network that returns the exact 2D flows of the ground truth
as it appears in each slice, optionally blurred to mimic a network's finite resolution; on
synthetic ellipsoids and on the real labels of the QCANet embryo volume, ``tests/test_volume.py``):

* **anisotropy**: with blurred oracle outputs, objects 4x thinner in Z are found (AP@0.5 1.0)
  when Z is resampled by the anisotropy and lost or broken (AP@0.5 0.33) when it is ignored;
* **dynamics grid**: tracking on the original grid with ``dZ`` divided by the anisotropy gives
  the same AP@0.5/0.75 as tracking on the resampled grid and taking masks back by nearest
  neighbour (``dynamics_grid="network"``), at a fraction of the cost (no resampled volume
  is held); the latter is kept as an option;
* **niter**: 200 and 1000 (the paper's value, chosen for volumes upsampled 10x in Z with very
  large objects) gave identical masks; 1000 costs ~2-5x the tracking time. Default 200 (the
  reference's), scaled with ``diameter`` — raise it for objects over ~150 px across;
* **mean vs sum** and ``flow3d_smooth`` 0 vs 2 made no difference with the oracle; on a real
  network they can (see ``notebooks/05_3d.ipynb`` for the shipped model's numbers).

Memory: the normalised volume (C float32 volumes), 4 float32 accumulators, and during the
tracking a smoothed/rescaled copy of the flows plus the tracker's own arrays (about 11 float32
volumes in all for one channel); network outputs are never stored per slice.

:func:`stitch_planes` is the alternative (``stitch_threshold > 0``): 2D masks per plane joined
across planes by IoU. Training pairs from labelled volumes: :mod:`cpsam_toolkit.training.volume`;
volume files: :func:`cpsam_toolkit.batch.segment_volume_files`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import dynamics
from ..core.options import InputOptions, MaskOptions, NetOptions, scale_niter, split_settings
from ..core.postprocess import masks_from_flows, object_table, select_objects
from ..core.result import SegmentationResult
from ..metrics import label_overlap
from ..preprocess import ImageInputError, check_finite, normalize, to_channels_last
from ..settings import Settings
from .panoptic import iter_panoptic
from .planar import iter_planar

if TYPE_CHECKING:  # pragma: no cover
    from ..core.predictor import Predictor as CellposeSAM  # anything with iter_predict

log = logging.getLogger("cpsam_toolkit")

__all__ = [
    "VIEWS",
    "VolumeMaskOptions",
    "VolumeResult",
    "FlowAccumulator",
    "masks_from_volume_flows",
    "predict_volume",
    "resample_z",
    "segment_planes",
    "segment_volume",
    "stitch_planes",
    "to_zyxc",
]

#: the three slice orientations, in the order they are run: (view, axes of the slice)
VIEWS = ("yx", "zx", "zy")
#: default Euler iterations in 3D (the reference's default; the paper used 1000 — see the
#: module docstring for what we measured)
DEFAULT_NITER = 200


# --------------------------------------------------------------------------------------------
# axes and resampling
# --------------------------------------------------------------------------------------------
def to_zyxc(
    volume: Any,
    z_axis: int | None,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    name: str = "volume",
) -> np.ndarray:
    """Reorder a volume to (Z, Y, X, C) with 1 <= C <= 3 (a view where possible, input dtype).

    Parameters
    ----------
    volume : array
        3-D (Z, Y, X in any order) or 4-D with a channel axis.
    z_axis : int
        Axis of Z (required: a 3-D array could also be a 2D image with channels).
    channel_axis : int, optional
        Axis of the channels; required for 4-D input, must be None for 3-D input.
    channels : sequence of int, optional
        Up to three channel indices to use, in order (default: the first three, with a warning).
    name : str
        Used in error messages.
    """
    arr = np.asarray(volume)
    if (
        arr.dtype == object
        or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)
        or (np.iscomplexobj(arr))
    ):
        raise ImageInputError(f"{name}: unsupported dtype {arr.dtype}; give a real-valued array")
    if arr.ndim not in (3, 4):
        raise ImageInputError(
            f"{name}: a volume needs 3 dimensions (Z, Y, X) or 4 with channels, got shape "
            f"{arr.shape}" + ("; for a 2D image leave do_3d off" if arr.ndim == 2 else "")
        )
    if z_axis is None:
        raise ImageInputError(
            f"{name}: 3D segmentation of shape {arr.shape} needs z_axis= (the axis of the planes, "
            "e.g. z_axis=0 for (Z, Y, X))"
            + ("" if arr.ndim == 3 else " and channel_axis= (e.g. 1 for (Z, C, Y, X))")
        )
    nd = arr.ndim
    if not -nd <= z_axis < nd:
        raise ImageInputError(f"{name}: z_axis={z_axis} is out of range for shape {arr.shape}")
    z_axis %= nd
    if nd == 3:
        if channel_axis is not None:
            raise ImageInputError(
                f"{name}: channel_axis={channel_axis} given for a 3-D array {arr.shape}; a volume "
                "with channels is 4-D. Omit channel_axis for a single-channel (Z, Y, X) volume"
            )
        zyxc = np.moveaxis(arr, z_axis, 0)[..., None]
    else:
        if channel_axis is None:
            raise ImageInputError(
                f"{name}: 4-D volume {arr.shape} needs channel_axis= (e.g. 1 for (Z, C, Y, X) or "
                "-1 for (Z, Y, X, C))"
            )
        if not -nd <= channel_axis < nd:
            raise ImageInputError(
                f"{name}: channel_axis={channel_axis} is out of range for shape {arr.shape}"
            )
        channel_axis %= nd
        if channel_axis == z_axis:
            raise ImageInputError(f"{name}: z_axis and channel_axis are both {z_axis}")
        zyxc = np.moveaxis(arr, (z_axis, channel_axis), (0, 3))
    z, y, x, c = zyxc.shape
    if min(z, y, x) < 2:
        raise ImageInputError(f"{name}: volume of size {z}x{y}x{x} (ZxYxX) is too small (>= 2 each)")
    if channels is not None or c > 3:
        # channel selection as for 2D images (same rules, same messages)
        flat = to_channels_last(zyxc.reshape(z * y, x, c), channel_axis=2, channels=channels, name=name)
        zyxc = flat.reshape(z, y, x, flat.shape[-1])
    return zyxc


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation taps from ``n_in`` samples to ``n_out`` (half-pixel centres, edges
    clamped): output ``k`` = ``(1 - w[k]) * in[i0[k]] + w[k] * in[i1[k]]``."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resample_z(x: np.ndarray, n: int, axis: int = 0, order: int = 1) -> np.ndarray:
    """Resample ``axis`` of ``x`` to ``n`` samples: linear (``order=1``) or nearest (0)."""
    m = x.shape[axis]
    if n == m:
        return x
    if order == 0:
        pos = (np.arange(n) + 0.5) * (m / n) - 0.5
        idx = np.clip(np.floor(pos + 0.5), 0, m - 1).astype(np.int64)
        return np.take(x, idx, axis=axis)
    i0, i1, w = _taps(m, n)
    shape = [1] * x.ndim
    shape[axis] = n
    w = w.reshape(shape)
    a = np.take(x, i0, axis=axis).astype(np.float32, copy=False)
    a *= 1 - w
    a += w * np.take(x, i1, axis=axis)
    return a


def network_depth(nz: int, anisotropy: float) -> int:
    """Planes the network sees for ``nz`` planes at ``anisotropy``: ``max(2, round(a * nz))``."""
    return max(2, int(round(nz * float(anisotropy)))) if anisotropy != 1 else nz


# --------------------------------------------------------------------------------------------
# accumulating the three views
# --------------------------------------------------------------------------------------------
class FlowAccumulator:
    """Running float32 sums of the three views' outputs on the (Z, Y, X) grid.

    Slices come from a volume of ``nz_net`` planes (Z resampled); their outputs are folded into
    ``nz`` planes by linear interpolation as they arrive, in any order. Memory: 4 float32
    volumes of the output grid.

    Parameters
    ----------
    shape : (nz, ny, nx)
        Output grid.
    nz_net : int
        Planes of the volume the network saw (``network_depth``); ``nz`` if isotropic.
    combine : "mean" or "sum"
        Average the two (flows) or three (cellprob) views, or sum them as the reference does.
    """

    def __init__(self, shape: tuple[int, int, int], nz_net: int | None = None, combine: str = "mean"):
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {combine!r}")
        self.shape = tuple(int(s) for s in shape)
        nz, ny, nx = self.shape
        self.nz_net = int(nz_net or nz)
        self.combine = combine
        self.flows = np.zeros((3, nz, ny, nx), np.float32)
        self.cellprob = np.zeros((nz, ny, nx), np.float32)
        self.expected = {"yx": self.nz_net, "zx": ny, "zy": nx}
        self.seen = {v: np.zeros(n, bool) for v, n in self.expected.items()}
        if self.nz_net != nz:
            self._i0, self._i1, self._w = _taps(self.nz_net, nz)
            # YX plane k of the network volume → [(output plane, weight)]
            self._yx: list[list[tuple[int, float]]] = [[] for _ in range(self.nz_net)]
            for j in range(nz):
                w = float(self._w[j])
                self._yx[int(self._i0[j])].append((j, 1.0 - w))
                if w > 0:
                    self._yx[int(self._i1[j])].append((j, w))
        else:
            self._yx = [[(k, 1.0)] for k in range(nz)]

    def _down(self, y: np.ndarray) -> np.ndarray:
        """(..., nz_net, L) → (..., nz, L) along the second-last axis."""
        if self.nz_net == self.shape[0]:
            return y
        w = self._w[:, None]
        return y[..., self._i0, :] * (1 - w) + y[..., self._i1, :] * w

    def add(self, view: str, index: int, flows: np.ndarray, cellprob: np.ndarray) -> None:
        """Fold one slice's output in.

        ``view="yx"``: plane ``index`` (of ``nz_net``), flows ``[dY, dX]`` (2, Y, X).
        ``"zx"``: row ``y = index``, flows ``[dZ, dX]`` (2, nz_net, X).
        ``"zy"``: column ``x = index``, flows ``[dZ, dY]`` (2, nz_net, Y).
        """
        seen = self.seen[view]
        if seen[index]:
            raise ValueError(f"{view} slice {index} added twice")
        seen[index] = True
        F, P = self.flows, self.cellprob
        if view == "yx":
            for j, w in self._yx[index]:
                if w == 1.0:
                    F[1:, j] += flows
                    P[j] += cellprob
                else:
                    F[1:, j] += w * flows
                    P[j] += w * cellprob
        elif view == "zx":
            f, p = self._down(flows), self._down(cellprob)
            F[0, :, index, :] += f[0]
            F[2, :, index, :] += f[1]
            P[:, index, :] += p
        elif view == "zy":
            f, p = self._down(flows), self._down(cellprob)
            F[0, :, :, index] += f[0]
            F[1, :, :, index] += f[1]
            P[:, :, index] += p
        else:
            raise ValueError(f"unknown view {view!r}; one of {VIEWS}")

    @property
    def complete(self) -> bool:
        return all(s.all() for s in self.seen.values())

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(flows (3, Z, Y, X) [dZ, dY, dX], cellprob (Z, Y, X))``, combined in place."""
        missing = {v: int((~s).sum()) for v, s in self.seen.items() if not s.all()}
        if missing:
            raise RuntimeError(f"network outputs missing for {missing} slices")
        if self.combine == "mean":
            self.flows *= 0.5
            self.cellprob *= 1.0 / 3.0
        return self.flows, self.cellprob


def _slices(vol: np.ndarray, nz_net: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """Lazily cut (view, index, slice) from a (Z, Y, X, C) float32 volume resampled to
    ``nz_net`` planes: YX planes (Y, X, C), ZX rows (nz_net, X, C), ZY columns (nz_net, Y, C)."""
    nz = vol.shape[0]
    if nz_net == nz:
        for k in range(nz):
            yield "yx", k, vol[k]
    else:
        i0, i1, w = _taps(nz, nz_net)
        for k in range(nz_net):
            a = vol[i0[k]] * (1 - w[k])
            a += w[k] * vol[i1[k]]
            yield "yx", k, a
    for y in range(vol.shape[1]):
        yield "zx", y, resample_z(vol[:, y], nz_net)
    for x in range(vol.shape[2]):
        yield "zy", x, resample_z(vol[:, :, x], nz_net)


def predict_volume(
    model: CellposeSAM,
    vol: np.ndarray,
    *,
    anisotropy: float = 1.0,
    diameter: float | None = None,
    batch_size: int = 8,
    tile_overlap: float = 0.1,
    augment: bool = False,
    combine: str = "mean",
    progress: bool | Callable[[int], None] = False,
    name: str = "volume",
) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs of a normalised (Z, Y, X, C) float32 volume on its three slice stacks.

    Returns ``flows (3, Z, Y, X)`` ``[dZ, dY, dX]`` in network units of the resampled grid
    (about 5x unit vectors with ``combine="mean"``) and ``cellprob (Z, Y, X)`` logits.
    """
    nz, ny, nx = vol.shape[:3]
    nz_net = network_depth(nz, anisotropy)
    acc = FlowAccumulator((nz, ny, nx), nz_net, combine)
    order = [("yx", k) for k in range(nz_net)] + [("zx", y) for y in range(ny)]
    order += [("zy", x) for x in range(nx)]
    names = [f"{name} {v} slice {i}" for v, i in order]
    log.info("3D: %d YX, %d ZX, %d ZY slices (Z %d -> %d)", nz_net, ny, nx, nz, nz_net)
    outs = model.iter_predict(
        (s for _, _, s in _slices(vol, nz_net)),
        InputOptions(channel_axis=2, normalize=False, diameter=diameter),
        NetOptions(batch_size, tile_overlap, augment),
        names=names,
        progress=progress,
    )
    for (view, i), (flows, cellprob) in zip(order, outs, strict=True):
        acc.add(view, i, flows, cellprob)
    return acc.result()


# --------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeMaskOptions:
    """Post-processing of 3D flows into masks (see :func:`masks_from_volume_flows`).

    ``anisotropy`` is the Z spacing / XY spacing the flows were computed at (``dZ`` is then in
    units of 1/anisotropy planes); ``flow3d_smooth`` is a Gaussian sigma in XY pixels (scalar or
    ``(z, y, x)``), 0 = off; ``min_size`` is in voxels of the volume; ``niter`` None = 200
    (scaled with the diameter). ``stitch_threshold > 0`` marks results of the plane-stitching
    mode, whose post-processing is 2D (``flow_threshold`` applies there only).
    """

    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None
    flow3d_smooth: float | tuple[float, float, float] = 0.0
    anisotropy: float = 1.0
    stitch_threshold: float = 0.0
    flow_threshold: float = 0.4
    diameter: float | None = None
    dynamics_grid: str = "original"

    def validate(self) -> None:
        if not 0 < self.max_size_fraction <= 1:
            raise ValueError(f"max_size_fraction must be in (0, 1], got {self.max_size_fraction}")
        if self.niter is not None and self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")
        sig = np.atleast_1d(np.asarray(self.flow3d_smooth, dtype=float))
        if sig.size not in (1, 3) or (sig < 0).any() or not np.isfinite(sig).all():
            raise ValueError(
                f"flow3d_smooth must be a sigma >= 0 or (z, y, x) sigmas, got {self.flow3d_smooth}"
            )
        if not (self.anisotropy > 0 and np.isfinite(self.anisotropy)):
            raise ValueError(f"anisotropy must be a positive number, got {self.anisotropy}")
        if self.dynamics_grid not in ("original", "network"):
            raise ValueError(f"dynamics_grid must be 'original' or 'network', got {self.dynamics_grid!r}")
        if not 0 <= self.stitch_threshold <= 1:
            raise ValueError(f"stitch_threshold must be in [0, 1], got {self.stitch_threshold}")

    @property
    def iterations(self) -> int:
        if self.niter is not None:
            return int(self.niter)
        if self.diameter:
            return max(1, int(DEFAULT_NITER * self.diameter / 30.0))
        return DEFAULT_NITER


def smooth_flows(flows: np.ndarray, sigma: float | Sequence[float], anisotropy: float = 1.0) -> np.ndarray:
    """Gaussian-smoothed copy of (3, Z, Y, X) flows; ``sigma`` in XY pixels (Z divided by the
    anisotropy, since a plane is ``anisotropy`` pixels thick)."""
    from scipy.ndimage import gaussian_filter

    s = np.broadcast_to(np.asarray(sigma, dtype=float), (3,)).copy()
    s[0] /= anisotropy
    out = np.empty_like(flows)
    for c in range(flows.shape[0]):
        gaussian_filter(flows[c], s, output=out[c], mode="nearest")
    return out


def masks_from_volume_flows(
    flows: np.ndarray, cellprob: np.ndarray, opts: VolumeMaskOptions = VolumeMaskOptions()
) -> np.ndarray:
    """3D masks from combined flows: smoothing, Euler tracking with ``dZ`` rescaled to planes,
    hole filling and the size filters. (Z, Y, X) uint16/uint32 labels 1..N."""

    opts.validate()
    nz = cellprob.shape[0]
    nz_net = network_depth(nz, opts.anisotropy)
    if np.any(np.asarray(opts.flow3d_smooth) > 0):
        flows = smooth_flows(flows, opts.flow3d_smooth, opts.anisotropy)
    elif nz_net != nz and opts.dynamics_grid == "original":
        flows = flows.copy()
    kw = dict(niter=opts.iterations, cellprob_threshold=opts.cellprob_threshold, flow_threshold=0.0,
              max_size_fraction=opts.max_size_fraction)
    if nz_net == nz:
        return dynamics.compute_masks(flows, cellprob, min_size=opts.min_size, **kw)
    if opts.dynamics_grid == "network":
        # on the resampled grid, then the masks back with nearest neighbour
        masks = dynamics.compute_masks(
            resample_z(flows, nz_net, axis=1), resample_z(cellprob, nz_net), min_size=-1, **kw
        )
        masks = resample_z(masks, nz, order=0)
        return dynamics.fill_holes_and_remove_small_masks(masks, min_size=opts.min_size)
    # on the volume's own grid: dZ is in resampled planes, one plane here is nz_net/nz of them
    flows[0] *= nz / nz_net
    return dynamics.compute_masks(flows, cellprob, min_size=opts.min_size, **kw)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class VolumeResult(SegmentationResult):
    """Masks and network outputs of one volume.

    Attributes
    ----------
    masks : (Z, Y, X) uint16 or uint32
        Labels 1..N, 0 is background, on the input's grid (Z first).
    flows : (3, Z, Y, X) float32
        ``[dZ, dY, dX]``, the views combined (see ``options`` / module docstring); network units
        of the resampled grid. In stitching mode (``options.stitch_threshold > 0``) the 2D
        flows of each plane, (2, Z, Y, X) ``[dY, dX]``.
    cellprob : (Z, Y, X) float32
        Cell-probability logits (mean of the three views, or the plane's own in stitching mode).
    options : VolumeMaskOptions
        The post-processing that produced ``masks``.
    info : dict
        ``mode`` ("3d", "stitch" or "planes") and what the mode recorded.

    The one result type (:class:`~cpsam_toolkit.core.result.SegmentationResult`) for volumes:
    same ``masks``/``objects``/``select``; ``objects`` has ``volume`` and ``centroid_z``.
    """

    options: VolumeMaskOptions = field(default_factory=VolumeMaskOptions)  # type: ignore[assignment]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        return int(self.masks.max()) if self.masks.size else 0

    @cached_property
    def objects(self) -> dict[str, np.ndarray]:
        """Per-object ``label, volume`` (voxels), ``centroid_z, centroid_y, centroid_x`` and
        ``mean_cellprob`` (probability 0..1); row i is label i+1."""
        return object_table_3d(self.masks, self.cellprob)

    def select(self, keep: np.ndarray) -> VolumeResult:
        """Only some objects: ``keep`` is one boolean per object or the labels to keep; masks
        are relabelled 1..M and ``objects`` holds the same rows."""
        masks, table = select_objects(self.masks, self.objects, keep)
        new = VolumeResult(masks, self.flows, self.cellprob, self.options, self.name, info=dict(self.info))
        new.__dict__["objects"] = table
        return new

    def recompute(self, **changes: Any) -> VolumeResult:
        """New result from the stored flows with other post-processing settings."""
        if self.info.get("mode") == "planes":
            raise NotImplementedError("recompute() of plane-by-plane results: run segment_planes again")
        opts = replace(self.options, **changes)
        if opts.stitch_threshold > 0:
            masks = _masks_stitched(self.flows, self.cellprob, opts)
        else:
            masks = masks_from_volume_flows(self.flows, self.cellprob, opts)
        return VolumeResult(masks, self.flows, self.cellprob, opts, self.name, info=dict(self.info))


def object_table_3d(masks: np.ndarray, cellprob: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-object voxel count, centroid and mean cell probability of a 3D label volume
    (:func:`cpsam_toolkit.core.postprocess.object_table`)."""
    return object_table(masks, None, cellprob)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def prepare_volume(
    volume: Any,
    *,
    z_axis: int | None = 0,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    normalize_volume: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    lowhigh: Sequence[tuple[float, float]] | None = None,
    invert: bool = False,
    name: str = "volume",
) -> np.ndarray:
    """(Z, Y, X, C<=3) float32, normalised over the whole volume (one contrast for all planes)."""
    zyxc = to_zyxc(volume, z_axis, channel_axis, channels, name)
    check_finite(zyxc, name)
    if zyxc.dtype == bool:
        zyxc = zyxc.astype(np.float32)
    if not normalize_volume:
        out = np.array(zyxc, dtype=np.float32)
        return 1 - out if invert else out
    return normalize(zyxc, percentiles[0], percentiles[1], invert, 0, lowhigh)


def segment_volume(
    model: CellposeSAM,
    volume: Any,
    *,
    z_axis: int | None = 0,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    anisotropy: float | None = 1.0,
    diameter: float | None = None,
    normalize: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    lowhigh: Sequence[tuple[float, float]] | None = None,
    invert: bool = False,
    flow3d_smooth: float | Sequence[float] = 0.0,
    niter: int | None = None,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    batch_size: int = 8,
    tile_overlap: float = 0.1,
    augment: bool = False,
    combine: str = "mean",
    dynamics_grid: str = "original",
    progress: bool | Callable[[int], None] = False,
    name: str = "volume",
) -> VolumeResult:
    """Segment a volume in 3D: the network on its YX, ZX and ZY slices, flows combined, 3D
    Euler tracking (see the module docstring for each step).

    Parameters
    ----------
    model : CellposeSAM
        Anything with :meth:`CellposeSAM.iter_predict`.
    volume : array
        (Z, Y, X), or 4-D with channels; ``z_axis``/``channel_axis`` say which axis is which.
    anisotropy : float
        Z spacing / XY spacing (e.g. 2.0 for 1 um planes of 0.5 um pixels); None = 1.
    diameter : float, optional
        Object diameter in XY pixels; slices are resized so objects are ~30 px (and ``niter``
        scaled). None: as is.
    normalize, percentiles, lowhigh, invert
        Whole-volume percentile normalisation (``lowhigh``: fixed per-channel ``(lo, hi)``).
    flow3d_smooth : float or (z, y, x)
        Gaussian sigma (XY pixels) applied to the flows before tracking; 0 = off. The paper
        used 2.
    niter : int, optional
        Euler iterations (default 200, scaled with ``diameter``).
    cellprob_threshold : float
        Threshold on the (averaged) cellprob logits.
    min_size : int
        Objects smaller than this many voxels are removed (-1 keeps all).
    max_size_fraction : float
        Objects larger than this fraction of the volume are removed.
    batch_size, tile_overlap, augment
        Network tiling (as in 2D).
    combine : "mean" or "sum"
        Average the views (default, the paper) or sum them (the reference code).
    progress : bool or callable
        Tile progress bar (True) or a callback with the tiles of each batch.
    """
    aniso = 1.0 if anisotropy is None else float(anisotropy)
    opts = VolumeMaskOptions(
        cellprob_threshold,
        int(min_size),
        max_size_fraction,
        niter,
        tuple(flow3d_smooth) if isinstance(flow3d_smooth, (list, tuple)) else flow3d_smooth,
        aniso,
        0.0,
        0.4,
        diameter,
    )
    opts.validate()
    if diameter is not None and not (diameter > 0 and np.isfinite(diameter)):
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter}")
    vol = prepare_volume(
        volume,
        z_axis=z_axis,
        channel_axis=channel_axis,
        channels=channels,
        normalize_volume=normalize,
        percentiles=percentiles,
        lowhigh=lowhigh,
        invert=invert,
        name=name,
    )
    flows, cellprob = predict_volume(
        model,
        vol,
        anisotropy=aniso,
        diameter=diameter,
        batch_size=batch_size,
        tile_overlap=tile_overlap,
        augment=augment,
        combine=combine,
        progress=progress,
        name=name,
    )
    del vol
    masks = masks_from_volume_flows(flows, cellprob, opts)
    info = {"mode": "3d", "combine": combine, "nz_net": network_depth(masks.shape[0], aniso)}
    return VolumeResult(masks, flows, cellprob, opts, name, info=info)


# --------------------------------------------------------------------------------------------
# stitching 2D masks across planes
# --------------------------------------------------------------------------------------------
def stitch_planes(
    masks_per_plane: Sequence[np.ndarray] | np.ndarray, iou_threshold: float = 0.25
) -> np.ndarray:
    """Join 2D masks of consecutive planes into 3D objects by IoU.

    Plane by plane from the first, each object of plane ``z+1`` takes the id of the object of
    (already stitched) plane ``z`` it overlaps best, if that IoU is >= ``iou_threshold`` and
    it is also that object's best partner in plane ``z+1``; every other object gets a new id.
    This is the reference's ``stitch3D`` rule (ties aside), computed on the sparse overlap
    table, so cost grows with the number of touching pairs, not with objects squared.

    Parameters
    ----------
    masks_per_plane : (Z, Y, X) array or sequence of (Y, X) label images
        Labels of each plane (any ids, 0 = background).
    iou_threshold : float
        Minimum IoU to join two objects, in (0, 1].

    Returns
    -------
    (Z, Y, X) uint32 (uint16 when they fit) labels 1..N.
    """

    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    planes = [np.asarray(p) for p in masks_per_plane]
    if not planes:
        return np.zeros((0, 0, 0), np.uint16)
    if any(p.ndim != 2 or p.shape != planes[0].shape for p in planes):
        raise ValueError("stitch_planes needs 2D label planes of one shape")
    out = np.zeros((len(planes), *planes[0].shape), np.uint32)
    nxt = 1
    prev = None
    for z, plane in enumerate(planes):
        labels = np.unique(plane)
        labels = labels[labels > 0]
        lut = np.zeros(int(plane.max()) + 1 if plane.size else 1, np.uint32)
        if prev is not None and labels.size and prev.any():
            ov = label_overlap(plane, prev)  # rows: this plane, cols: previous (stitched) plane
            iou = ov.iou
            keep = iou >= iou_threshold
            r, c, v = ov.rows[keep], ov.cols[keep], iou[keep]
            if r.size:
                # each previous object keeps only its best partner in this plane
                o = np.lexsort((r, -v, c))
                first = np.ones(o.size, bool)
                first[1:] = c[o][1:] != c[o][:-1]
                r, c, v = r[o][first], c[o][first], v[o][first]
                # each object of this plane takes its best remaining previous object
                o = np.lexsort((c, -v, r))
                first = np.ones(o.size, bool)
                first[1:] = r[o][1:] != r[o][:-1]
                r, c = r[o][first], c[o][first]
                lut[ov.true_labels[r]] = ov.pred_labels[c]
        new = labels[lut[labels] == 0]
        lut[new] = np.arange(nxt, nxt + new.size, dtype=np.uint32)
        nxt += new.size
        out[z] = lut[plane]
        prev = out[z]
    if nxt - 1 < 2**16:
        return out.astype(np.uint16)
    return out


def _masks_stitched(flows: np.ndarray, cellprob: np.ndarray, opts: VolumeMaskOptions) -> np.ndarray:
    """2D masks per plane (no size filter), stitched, then 3D hole filling and size filter."""
    per_plane = MaskOptions(
        opts.flow_threshold, opts.cellprob_threshold, -1, opts.max_size_fraction, opts.iterations
    )
    planes = [masks_from_flows(flows[:, z], cellprob[z], per_plane) for z in range(cellprob.shape[0])]
    masks = stitch_planes(planes, opts.stitch_threshold)
    return dynamics.fill_holes_and_remove_small_masks(masks, min_size=opts.min_size)


def segment_stack_stitched(
    model: CellposeSAM,
    volume: Any,
    *,
    stitch_threshold: float,
    z_axis: int | None = 0,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    diameter: float | None = None,
    normalize: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    lowhigh: Sequence[tuple[float, float]] | None = None,
    invert: bool = False,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    niter: int | None = None,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    batch_size: int = 8,
    tile_overlap: float = 0.1,
    augment: bool = False,
    progress: bool | Callable[[int], None] = False,
    name: str = "volume",
) -> VolumeResult:
    """Segment each plane in 2D (stack normalised as a whole, tiles batched across planes) and
    stitch the planes' masks by IoU (:func:`stitch_planes`). ``min_size`` applies in 3D after
    stitching; ``flow_threshold`` is the 2D QC of each plane."""
    opts = VolumeMaskOptions(
        cellprob_threshold,
        int(min_size),
        max_size_fraction,
        niter,
        0.0,
        1.0,
        float(stitch_threshold),
        flow_threshold,
        diameter,
    )
    opts.validate()
    if not stitch_threshold > 0:
        raise ValueError(f"stitch_threshold must be > 0 for stitching, got {stitch_threshold}")
    vol = prepare_volume(
        volume,
        z_axis=z_axis,
        channel_axis=channel_axis,
        channels=channels,
        normalize_volume=normalize,
        percentiles=percentiles,
        lowhigh=lowhigh,
        invert=invert,
        name=name,
    )
    nz, ny, nx = vol.shape[:3]
    flows = np.zeros((2, nz, ny, nx), np.float32)
    cellprob = np.zeros((nz, ny, nx), np.float32)
    outs = model.iter_predict(
        (vol[z] for z in range(nz)),
        InputOptions(channel_axis=2, normalize=False, diameter=diameter),
        NetOptions(batch_size, tile_overlap, augment),
        names=[f"{name} plane {z}" for z in range(nz)],  # "<name> plane <z>"
        progress=progress,
    )
    for z, (f, p) in enumerate(outs):
        flows[:, z] = f
        cellprob[z] = p
    del vol
    masks = _masks_stitched(flows, cellprob, opts)
    return VolumeResult(masks, flows, cellprob, opts, name, info={"mode": "stitch"})


def segment_planes(
    model: CellposeSAM,
    volume: Any,
    settings: Settings | None = None,
    *,
    z_axis: int = 0,
    inputs: InputOptions = InputOptions(),
    net: NetOptions = NetOptions(),
    masks: MaskOptions = MaskOptions(),
    progress: bool | Callable[[int], None] = False,
    name: str = "volume",
) -> VolumeResult:
    """Each plane segmented on its own in 2D (normalised per plane, as a 2D image would be),
    labels offset so objects of different planes never share a label; no stitching.

    ``settings`` (a :class:`~cpsam_toolkit.settings.Settings`), when given, replaces
    ``inputs``/``net``/``masks``. The channel axis is the volume's (None for (Z, Y, X)). Returns a
    :class:`VolumeResult` (``info["mode"] == "planes"``) whose ``objects`` table has one row
    per plane object, with the 2D ``flow_error`` (and ``class_id``/``class_fraction`` for a
    panoptic network) of each.
    """
    if settings is not None:
        inputs, net, masks = split_settings(settings)
    arr = np.asarray(volume)
    if arr.ndim not in (3, 4):
        raise ImageInputError(f"{name}: expected (Z, Y, X) or 4-D with channels, got shape {arr.shape}")
    z = z_axis % arr.ndim
    ca = inputs.channel_axis
    if ca is not None:
        ca = ca % arr.ndim
        if ca == z:
            raise ImageInputError(f"{name}: z_axis and channel_axis are both {z_axis}")
        ca = ca - 1 if ca > z else ca
    planes = np.moveaxis(arr, z, 0)
    plane_inputs = replace(inputs, channel_axis=ca)
    if plane_inputs.diameter == "auto":  # one size for the whole volume, from its middle plane
        plane_inputs = model.resolve_inputs(planes[len(planes) // 2], plane_inputs,
                                            f"{name} middle plane")
    masks = scale_niter(masks, plane_inputs.diameter)
    masks.validate()
    classes = model.net.cfg.class_names
    names = [f"{name} plane {i}" for i in range(len(planes))]
    outs = model.iter_predict(iter(planes), plane_inputs, net, names, progress, bool(classes))
    results = iter_panoptic(outs, classes, masks, names) if classes else iter_planar(outs, masks, names)
    nz = planes.shape[0]
    labels = cellprob = flows = None
    extra: dict[str, list[np.ndarray]] = {}
    offset = 0
    for i, res in enumerate(results):
        m = np.asarray(res.masks)
        if labels is None:
            ny, nx = m.shape
            labels = np.zeros((nz, ny, nx), np.uint32)
            cellprob = np.zeros((nz, ny, nx), np.float32)
            flows = np.zeros((2, nz, ny, nx), np.float32)
        labels[i] = np.where(m > 0, m.astype(np.uint32) + offset, 0)
        cellprob[i], flows[:, i] = res.cellprob, res.flows
        for k in ("flow_error", "class_id", "class_fraction"):
            if k in res.objects:
                extra.setdefault(k, []).append(np.asarray(res.objects[k]))
        offset += res.n_objects
    if labels is None:  # no planes
        raise ImageInputError(f"{name}: the volume has no planes (shape {arr.shape})")
    if offset <= np.iinfo(np.uint16).max:
        labels = labels.astype(np.uint16)
    opts = VolumeMaskOptions(masks.cellprob_threshold, int(masks.min_size), masks.max_size_fraction,
                             masks.niter, 0.0, 1.0, 0.0, masks.flow_threshold, plane_inputs.diameter)
    out = VolumeResult(labels, flows, cellprob, opts, name,
                       info={"mode": "planes", "class_names": classes}, diameter=plane_inputs.diameter)
    table = object_table(labels, None, cellprob)
    for k, parts in extra.items():
        table[k] = np.concatenate(parts)
    out.__dict__["objects"] = table
    return out


def auto_diameter(model: CellposeSAM, volume: np.ndarray, z_axis: int, kwargs: dict[str, Any],
                  name: str = "volume") -> float | None:
    """``diameter="auto"`` for a volume: one resizing for all of it, from its middle plane
    (:meth:`CellposeSAM.resolve_inputs`); ``kwargs`` are ``segment``'s input keywords."""
    z = z_axis % volume.ndim
    ca = kwargs.get("channel_axis")
    ca = None if ca is None else ca % volume.ndim
    if ca is not None and ca > z:
        ca -= 1
    inputs = InputOptions(channel_axis=ca, channels=kwargs.get("channels"),
                          normalize=kwargs.get("normalize", True),
                          percentiles=kwargs.get("percentiles", (1.0, 99.0)),
                          invert=kwargs.get("invert", False), diameter="auto")
    mid = np.take(volume, volume.shape[z] // 2, axis=z)
    return model.resolve_inputs(mid, inputs, f"{name} middle plane").diameter


def segment_3d(model: CellposeSAM, image: Any, **kwargs: Any) -> VolumeResult | list[VolumeResult]:
    """The ``do_3d`` / ``stitch_threshold`` path of :meth:`CellposeSAM.segment` (one volume or a
    list of volumes). Translates ``segment``'s keyword arguments; see :func:`segment_volume`."""
    do_3d = kwargs.pop("do_3d", False)
    stitch = float(kwargs.pop("stitch_threshold", 0.0) or 0.0)
    z_axis = kwargs.pop("z_axis", None)
    anisotropy = kwargs.pop("anisotropy", None)
    smooth = kwargs.pop("flow3d_smooth", 0.0)
    flow_threshold = kwargs.pop("flow_threshold", 0.4)
    if kwargs.pop("tile_norm_blocksize", 0):
        raise ValueError("tile_norm_blocksize is not supported for volumes (do_3d / stitching)")
    if not do_3d and not stitch > 0:
        raise ValueError(
            f"z_axis={z_axis} is only used for volumes: pass do_3d=True (3D flows) or "
            "stitch_threshold > 0 (2D masks stitched across planes), or drop z_axis"
        )
    if do_3d and stitch > 0:
        raise ValueError("give either do_3d=True or stitch_threshold > 0, not both")
    single = isinstance(image, np.ndarray) or not isinstance(image, (list, tuple))
    volumes = [image] if single else list(image)
    results = []
    for i, vol in enumerate(volumes):
        name = "volume" if single else f"volume {i}"
        arr = np.asarray(vol)
        if z_axis is None:
            raise ImageInputError(
                f"{name}: {'do_3d' if do_3d else 'stitching'} needs z_axis= (the axis of the "
                f"planes; shape {arr.shape})" + (", and channel_axis= for 4-D input" if arr.ndim == 4 else "")
            )
        own = kwargs  # diameter="auto": resolved for each volume
        if kwargs.get("diameter") == "auto":
            own = {**kwargs, "diameter": auto_diameter(model, arr, z_axis, kwargs, name)}
        if do_3d:
            if flow_threshold not in (0, 0.4, None):
                warnings.warn("flow_threshold has no effect in 3D (no flow-error QC)", stacklevel=3)
            results.append(
                segment_volume(
                    model,
                    arr,
                    z_axis=z_axis,
                    anisotropy=anisotropy,
                    flow3d_smooth=smooth,
                    name=name,
                    **own,
                )
            )
        else:
            if anisotropy not in (None, 1, 1.0):
                warnings.warn("anisotropy has no effect when stitching 2D planes", stacklevel=3)
            results.append(
                segment_stack_stitched(
                    model,
                    arr,
                    stitch_threshold=stitch,
                    z_axis=z_axis,
                    flow_threshold=flow_threshold,
                    name=name,
                    **own,
                )
            )
        results[-1].diameter = own.get("diameter")
    return results[0] if single else results


def options_dict(res: VolumeResult) -> dict[str, Any]:
    """The post-processing options of a result as a plain dict (for logs and metadata)."""
    return {**asdict(res.options), **res.info}

