"""Flows → masks: Euler tracking, histogram seeds, flow-error QC, hole filling.

The numerics of the tracking and of the seeds are those of Cellpose 4.2
(``cellpose.dynamics.compute_masks`` followed by ``utils.fill_holes_and_remove_small_masks``), so
the masks are the same (tested label for label on real and synthetic inputs). What differs is
the cost:

* tracking: pixels that land on exactly the same float32 position have the same future, so they
  are merged and tracked once (exact; about 3x fewer point-steps); on the CPU tracking and
  diffusion run single-threaded (``device.one_cpu_thread``), as fast on idle cores as two
  threads and 10-35x faster on busy ones, in chunks of 65,536 points that stay in the cache,
  with the per-step update and the merge compiled (numba; NumPy/torch without it, same bits);
  the bilinear sampling is torch's vectorised ``grid_sample`` on every device;
* QC: the flows of the masks come from per-object crop diffusion in float32
  (:func:`cpsam_toolkit.flows.object_pixel_flows`; compiled per object on the CPU), evaluated
  at the mask pixels only;
* seeds, masks and hole filling: vectorised (hole filling falls back to the reference's
  per-mask loop in 3D, or when a hole holds another mask).
"""

from __future__ import annotations

import fastremap
import fill_voids
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cpsam_toolkit._jit import jit, ready
from cpsam_toolkit.device import one_cpu_thread, resolve_device
from cpsam_toolkit.flows import _bboxes, _buckets, _crop_shapes, _gather_crops, object_pixel_flows

__all__ = [
    "compute_masks",
    "fill_holes_and_remove_small_masks",
    "flow_errors",
    "follow_flows",
    "get_masks",
    "remove_bad_flow_masks",
]

_CPU_CHUNK = 65536  # points tracked together on the CPU
_MERGE_FIRST, _MERGE_EVERY, _MERGE_GAIN = 15, 5, 0.95  # first merge, interval, back-off
_HIST_PAD = 20  # histogram border (pixels), as the reference
_SEED_MIN = 10  # a seed bin needs more than this many pixels
_GROW_MIN = 2  # a bin joins a seed's mask with more than this many pixels
_SEED_RADIUS = 5  # seed windows are (2r+1)^ndim; r dilations grow the seed


# ---------------------------------------------------------------- tracking


def _dedupe(pt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tracked points with bit-identical positions (one hash-table pass, exact).

    Parameters
    ----------
    pt : (ndim, N) float32 tensor
        Active positions.

    Returns
    -------
    (ndim, M) float32 tensor and (N,) int64 tensor
        The merged positions (hash collisions may leave some duplicates, which is harmless) and
        for each input column its column in the output.
    """
    n = pt.shape[1]
    ar = torch.arange(n, device=pt.device)
    keys = [row.view(torch.int32) for row in pt]
    h = keys[0].to(torch.int64)
    for k in keys[1:]:  # masked before the multiply: no int64 overflow
        h = ((h & 0xFFFFFFFF) * 92821) ^ k.to(torch.int64)
    size = 1 << max(n - 1, 1).bit_length()
    slot = h & (size - 1)
    # any point may win a slot; it represents the points whose key equals its own
    table = torch.empty(size, dtype=torch.int64, device=pt.device).scatter_(0, slot, ar)
    cand = table.index_select(0, slot)
    dup = cand != ar
    for k in keys:
        dup &= k.index_select(0, cand) == k
    new_index = torch.cumsum(~dup, 0) - 1
    remap = new_index.index_select(0, torch.where(dup, cand, ar))
    kept = torch.nonzero(~dup).squeeze(1)
    return pt.index_select(1, kept), remap


def _add_clip_kernel(p, s):  # pragma: no cover - compiled
    """``p = clip(p + s, -1, 1)`` in place, float32, one pass (numba; NumPy's operations)."""
    lo, hi = np.float32(-1.0), np.float32(1.0)
    for d in range(p.shape[0]):
        for j in range(p.shape[1]):
            p[d, j] = min(max(p[d, j] + s[d, j], lo), hi)


def _dedupe_kernel(pos):  # pragma: no cover - compiled
    """:func:`_dedupe` on the CPU (numba): an exact open-addressing table of the position bits.

    Returns ``remap`` (each column's output column) and ``kept`` (each output's input column).
    """
    ndim, n = pos.shape
    bits = pos.view(np.uint32)
    size = 2
    while size < 2 * n:
        size *= 2
    mask = size - 1
    table = np.full(size, -1, np.int32)
    remap = np.empty(n, np.int64)
    kept = np.empty(n, np.int64)
    k = 0
    for j in range(n):
        h = np.uint64(0)
        for d in range(ndim):
            h = (h ^ np.uint64(bits[d, j])) * np.uint64(0x9E3779B97F4A7C15)
        slot = np.int64((h >> np.uint64(40)) & np.uint64(mask))
        while True:
            o = table[slot]
            if o < 0:
                table[slot] = j
                remap[j] = k
                kept[k] = j
                k += 1
                break
            same = True
            for d in range(ndim):
                same = same and bits[d, o] == bits[d, j]
            if same:
                remap[j] = remap[o]
                break
            slot = (slot + 1) & mask
    return remap, kept[:k]


_add_clip = jit(_add_clip_kernel)
_dedupe_cpu = jit(_dedupe_kernel)


def _track(
    im: torch.Tensor, pt: torch.Tensor, niter: int, dedupe: bool
) -> torch.Tensor:
    """Euler steps ``pt += grid_sample(im, pt)``, clamped to [-1, 1] (normalised coordinates).

    Parameters
    ----------
    im : (1, ndim, *shape) float32 tensor
        Step field, channels x-first, scaled to normalised units.
    pt : (ndim, N) float32 tensor
        Start positions, x-first rows, in [-1, 1]. Updated in place unless merged.
    niter : int
    dedupe : bool
        Merge points with identical positions every few steps.

    Returns
    -------
    (ndim, N) float32 tensor
        Final positions.
    """
    ndim, n0 = pt.shape
    # On the CPU the per-step update runs in NumPy on views of the same memory (same float32
    # operations, same bits) and grid_sample gets one batch: single-threaded. Two torch threads
    # were no faster on 2 idle cores and 10-35x slower on busy ones (spin-waiting threads).
    cpu = pt.device.type == "cpu"
    remaps = []
    next_check, interval = _MERGE_FIRST, _MERGE_EVERY
    for t in range(niter):
        if dedupe and t == next_check and niter - t > 10:
            before = pt.shape[1]
            if cpu and ready(_dedupe_cpu):
                remap, kept = _dedupe_cpu(pt.numpy())
                pt, remap = pt.index_select(1, torch.from_numpy(kept)), torch.from_numpy(remap)
            else:
                pt, remap = _dedupe(pt)
            remaps.append(remap)
            # back off while merging does not pay (a merge costs a few steps)
            interval = interval if pt.shape[1] < _MERGE_GAIN * before else 2 * interval
            next_check = t + interval
        # planar storage viewed as a (1, [1,] 1, N, ndim) grid: no copies per step
        n = pt.shape[1]
        grid = pt.T.reshape(1, *([1] * (ndim - 1)), n, ndim)
        step = F.grid_sample(im, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if cpu and ready(_add_clip):
            _add_clip(pt.numpy(), step.numpy().reshape(ndim, n))
        elif cpu:
            p = pt.numpy()
            np.add(p, step.numpy().reshape(ndim, n), out=p)
            np.clip(p, -1.0, 1.0, out=p)
        else:
            pt.add_(step.view(ndim, n))
            pt.clamp_(-1.0, 1.0)
    if not remaps:
        return pt[:, :n0]
    # compose the merges last to first: the sizes shrink, so this is cheaper than updating an
    # owner per original pixel at every merge
    owner = remaps[-1]
    for remap in remaps[-2::-1]:
        owner = owner.index_select(0, remap)
    return pt.index_select(1, owner[:n0])


@one_cpu_thread()
def follow_flows(
    dP: np.ndarray,
    inds: tuple[np.ndarray, ...],
    *,
    niter: int = 200,
    device: str | torch.device | None = None,
    dedupe: bool = True,
) -> torch.Tensor:
    """Track pixels along a step field (Euler, bilinear interpolation), as Cellpose 4.2.

    Parameters
    ----------
    dP : (2, Y, X) or (3, Z, Y, X) float array
        Step per iteration in pixels, ``[dY, dX]`` or ``[dZ, dY, dX]`` (network flows / 5, zero
        outside the cell-probability mask).
    inds : tuple of ndim (N,) int arrays
        Start pixels (``np.nonzero`` of the cell-probability mask).
    niter : int
        Number of steps.
    device : str or torch.device, optional
        Default CUDA, then MPS, then CPU.
    dedupe : bool
        Track points with bit-identical positions once (exact; many pixels of a cell converge
        onto the same float32 position). ``False`` gives the reference's loop.

    Returns
    -------
    (ndim, N) int32 tensor on ``device``
        Final pixel of each start pixel (coordinates truncated towards zero).

    Notes
    -----
    Reproduces the reference numerics: positions normalised with ``2 p / (L - 1) - 1`` but
    sampled with ``grid_sample(align_corners=False)``, float32 throughout, clamped to [-1, 1],
    mapped back with ``(p + 1) / 2 * (L - 1)`` and truncated.
    """
    dev = resolve_device(device)
    ndim = dP.shape[0]
    if len(inds[0]) == 0:
        return torch.zeros((ndim, 0), dtype=torch.int32, device=dev)
    shape = dP.shape[1:]
    im = torch.empty((1, ndim, *shape), dtype=torch.float32, device=dev)
    pt = torch.empty((ndim, len(inds[0])), dtype=torch.float32, device=dev)
    for n in range(ndim):  # x-first for grid_sample
        pt[ndim - n - 1] = torch.from_numpy(np.asarray(inds[n])).to(dev, torch.float32)
        im[0, ndim - n - 1] = torch.from_numpy(np.asarray(dP[n])).to(dev, torch.float32)
    sizes = [float(s) - 1.0 for s in shape[::-1]]
    for k in range(ndim):  # same operations, in the same order, as the reference
        im[:, k] *= 2.0 / sizes[k]
        pt[k] /= sizes[k]
    pt *= 2
    pt -= 1
    # on the CPU, in chunks of points: each chunk's positions, steps and hash table stay in
    # the cache (merges between chunks are missed, which costs a few point-steps)
    chunk = _CPU_CHUNK if dev.type == "cpu" else pt.shape[1]
    for s in range(0, pt.shape[1], chunk):
        pt[:, s : s + chunk] = _track(im, pt[:, s : s + chunk].clone(), niter, dedupe)
    pt += 1
    pt *= 0.5
    for k in range(ndim):
        pt[k] *= sizes[k]
    return pt.flip(0).int()


# ---------------------------------------------------------------- seeds and masks


def _window_offsets(radius: int, strides: list[int], device: torch.device) -> torch.Tensor:
    """Flat offsets of a (2r+1)^ndim window, raster order, for an array with these strides."""
    r = torch.arange(-radius, radius + 1, device=device)
    grids = torch.meshgrid(*([r] * len(strides)), indexing="ij")
    return sum(g.flatten() * s for g, s in zip(grids, strides, strict=True))


def _strides(shape: tuple[int, ...]) -> list[int]:
    return [int(np.prod(shape[d + 1 :])) for d in range(len(shape))]


def _find_seeds(hist: torch.Tensor, hshape: tuple[int, ...]) -> torch.Tensor:
    """Flat indices of seed bins, sorted as the reference (count ascending, torch argsort).

    A seed is a bin with more than 10 pixels that is a maximum of its 5^ndim neighbourhood.
    """
    cand = torch.nonzero(hist > _SEED_MIN).flatten()
    if len(cand) == 0:
        return cand
    offs = _window_offsets(2, _strides(hshape), hist.device)
    neigh = hist[cand[:, None] + offs[None, :]]
    seeds = cand[(neigh <= hist[cand][:, None]).all(1)]
    counts = hist[seeds].to(torch.int32)
    return seeds[counts.argsort()]


def _grow_seeds(
    hist: torch.Tensor, seeds: torch.Tensor, hshape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins claimed by each seed: 5 dilations (3^ndim) inside bins with more than 2 pixels.

    Returns
    -------
    (K,) int64 tensor, (K,) int64 tensor
        Seed rank (0-based, in ``seeds`` order) and flat bin index of every claimed bin.
    """
    ndim = len(hshape)
    w = 2 * _SEED_RADIUS + 1
    offs = _window_offsets(_SEED_RADIUS, _strides(hshape), hist.device)
    bins = seeds[:, None] + offs[None, :]
    allowed = (hist[bins] > _GROW_MIN).view(len(seeds), *([w] * ndim))
    grown = torch.zeros(allowed.shape, dtype=torch.float32, device=hist.device)
    grown[(slice(None),) + (_SEED_RADIUS,) * ndim] = 1
    pool = F.max_pool2d if ndim == 2 else F.max_pool3d
    for _ in range(_SEED_RADIUS):
        grown = pool(grown[:, None], 3, stride=1, padding=1)[:, 0] * allowed
    rank, pos = torch.nonzero(grown.view(len(seeds), -1), as_tuple=True)
    return rank, bins[rank, pos]


@one_cpu_thread()
def get_masks(
    p_final: torch.Tensor | np.ndarray,
    inds: tuple[np.ndarray, ...],
    shape: tuple[int, ...],
    *,
    max_size_fraction: float = 0.4,
) -> np.ndarray:
    """Masks from the final pixel positions (histogram seeds), as Cellpose 4.2 ``get_masks_torch``.

    Parameters
    ----------
    p_final : (ndim, N) int tensor or array
        Final pixel of each tracked pixel (from :func:`follow_flows`).
    inds : tuple of ndim (N,) int arrays
        The tracked pixels.
    shape : tuple of int
        Image shape (Y, X) or (Z, Y, X).
    max_size_fraction : float
        Masks with more than this fraction of the image's pixels are removed.

    Returns
    -------
    (Y, X) or (Z, Y, X) uint16 array (uint32 if more than 65535 masks)
        Labels 1..N in raster first-appearance order.
    """
    shape = tuple(int(s) for s in shape)
    pt = torch.as_tensor(p_final)
    if pt.device.type == "mps":  # bincount / scatter_reduce support varies there
        pt = pt.cpu()
    pt = pt.to(torch.int64)
    dev = pt.device
    hshape = tuple(s + 2 * _HIST_PAD for s in shape)
    pt = pt + _HIST_PAD
    for d in range(len(shape)):
        pt[d].clamp_(0, shape[d] + _HIST_PAD - 1)
    flat = sum(pt[d] * s for d, s in enumerate(_strides(hshape)))
    hist = torch.bincount(flat, minlength=int(np.prod(hshape)))
    seeds = _find_seeds(hist, hshape)
    if len(seeds) == 0:
        return np.zeros(shape, np.uint16)
    rank, bins = _grow_seeds(hist, seeds, hshape)
    bin_label = torch.zeros(int(np.prod(hshape)), dtype=torch.int64, device=dev)
    bin_label.scatter_reduce_(0, bins, rank + 1, reduce="amax", include_self=False)
    labels = bin_label[flat].cpu().numpy()
    masks = np.zeros(shape, np.uint32)
    masks[tuple(np.asarray(i) for i in inds)] = labels
    masks = _remove_big(masks, max_size_fraction)
    return _renumber(masks)


def _drop_labels(masks: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """Set the given labels to 0 (lookup table; ``drop`` is a bool array indexed by label)."""
    if drop[1:].any():
        lut = np.arange(len(drop), dtype=masks.dtype)
        lut[drop] = 0
        masks = lut[masks]
    return masks


def _remove_big(masks: np.ndarray, max_size_fraction: float) -> np.ndarray:
    counts = np.bincount(masks.ravel())
    return _drop_labels(masks, counts > masks.size * max_size_fraction)


def _renumber(masks: np.ndarray) -> np.ndarray:
    """Labels 1..N in raster first-appearance order; uint16 if N < 2**16, else uint32."""
    masks = np.ascontiguousarray(masks, dtype=np.uint32)
    fastremap.renumber(masks, in_place=True)
    return masks.astype(np.uint16) if masks.max(initial=0) < 2**16 else masks


# ---------------------------------------------------------------- quality control


@one_cpu_thread()
def flow_errors(
    masks: np.ndarray, flows: np.ndarray, *, device: str | torch.device | None = None
) -> np.ndarray:
    """Per-mask mean squared difference between the masks' own flows and ``flows / 5``.

    Parameters
    ----------
    masks : (Y, X) int array
        Labels 1..N (0 = background).
    flows : (2, Y, X) float array
        Network flows (about 5 x unit vectors).
    device : str or torch.device, optional

    Returns
    -------
    (N,) float64 array
        ``err[i]`` for label ``i + 1``: mean over its pixels of ``sum_c (mu_c - flows_c / 5)^2``
        with ``mu = masks_to_flows(masks)``. NaN for labels that are absent.
    """
    masks = np.asarray(masks)
    flows = np.asarray(flows)
    if flows.shape[1:] != masks.shape:
        raise ValueError(f"flows {flows.shape} do not match masks {masks.shape}")
    fg, mu = object_pixel_flows(masks, device=device)
    net = flows.reshape(flows.shape[0], -1)[:, fg] / 5.0  # in the flows' precision, as the reference
    err = ((mu.cpu().numpy().astype(np.float64) - net) ** 2).sum(0)
    lab = masks.reshape(-1)[fg].astype(np.int64)
    n = int(masks.max(initial=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(lab, weights=err, minlength=n + 1) / np.bincount(lab, minlength=n + 1))[1:]


def remove_bad_flow_masks(
    masks: np.ndarray,
    flows: np.ndarray,
    *,
    threshold: float = 0.4,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Remove masks whose :func:`flow_errors` exceed ``threshold``; renumber.

    Returns
    -------
    (Y, X) uint16/uint32 array
        Labels 1..N in raster first-appearance order.
    """
    err = flow_errors(masks, flows, device=device)
    bad = np.concatenate([[False], err > threshold])
    return _renumber(_drop_labels(np.array(masks, dtype=np.uint32), bad))


# ---------------------------------------------------------------- holes and small masks


def _remove_small(masks: np.ndarray, min_size: int) -> np.ndarray:
    counts = np.bincount(masks.ravel())
    return _renumber(_drop_labels(masks, counts < min_size)).astype(np.uint32)


_FOUR_CONNECTED_PER_CROP = np.array(
    [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
     [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], bool
)


def _holes_2d(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Holes of every 2D mask within its bounding box, as ``fill_voids.fill`` finds them.

    A hole of mask ``i`` is a 4-connected region of pixels that are not ``i`` inside the
    bounding box and do not touch its edge. Masks are processed as batches of padded crops
    with one connected-component labelling per batch.

    Returns
    -------
    (K,) int64 array, (K,) int64 array
        Flat pixel index and label of every hole pixel.
    """
    labels, starts, stops = _bboxes(masks)
    pix, lab = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if len(labels) == 0:
        return pix[0], lab[0]
    crop_shapes = _crop_shapes(stops - starts + 2)
    masks_pad = np.pad(masks, [(1, int(p)) for p in crop_shapes.max(0)])
    for idx, shape in _buckets(crop_shapes, 2**20):
        inside = _gather_crops(masks_pad, labels[idx], starts[idx] - 1, shape)
        comp, _ = ndimage.label(~inside, structure=_FOUR_CONNECTED_PER_CROP)
        holes = (comp != comp[:, :1, :1]) & ~inside
        if holes.any():
            b, y, x = np.nonzero(holes)
            coords = np.stack([y, x]) + starts[idx][b].T - 1
            pix.append(np.ravel_multi_index(tuple(coords), masks.shape))
            lab.append(labels[idx][b])
    return np.concatenate(pix), np.concatenate(lab)


def _fill_holes_sequential(masks: np.ndarray) -> np.ndarray:
    """The reference's loop: fill each mask's holes in label order (a fill may cover a mask)."""
    for i, slc in enumerate(ndimage.find_objects(masks)):
        if slc is not None:
            masks[slc][fill_voids.fill(masks[slc] == i + 1)] = i + 1
    return masks


def _fill_holes(masks: np.ndarray) -> np.ndarray:
    """Fill holes of every mask; batched in 2D when no hole holds another mask (then the
    holes are disjoint background and the order does not matter), else the sequential loop."""
    if masks.ndim == 2:
        pix, lab = _holes_2d(masks)
        flat = masks.reshape(-1)
        if not flat[pix].any():
            flat[pix] = lab
            return masks
    # 3D, or nested masks: fill_voids itself, in label order (its 3D connectivity is its own)
    return _fill_holes_sequential(masks)


def fill_holes_and_remove_small_masks(masks: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Fill holes in each mask and drop masks smaller than ``min_size`` pixels.

    Same result as Cellpose 4.2 ``utils.fill_holes_and_remove_small_masks``: drop small masks,
    fill each mask's holes inside its bounding box in label order (a fill may cover a mask
    inside the hole), drop small masks again.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int array
        Labels, 0 = background.
    min_size : int
        Minimum pixels per mask; ``<= 0`` keeps all sizes.

    Returns
    -------
    uint16 array (uint32 if more than 65535 masks)
        Labels 1..N in raster first-appearance order (always renumbered, unlike the reference
        with ``min_size <= 0``).
    """
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got shape {masks.shape}")
    masks = np.array(masks, dtype=np.uint32)
    if min_size > 0:
        masks = _remove_small(masks, min_size)
    masks = _fill_holes(masks)
    if min_size > 0:
        masks = _remove_small(masks, min_size)
    return _renumber(masks)


# ---------------------------------------------------------------- pipeline


@one_cpu_thread()
def compute_masks(
    flows: np.ndarray,
    cellprob: np.ndarray,
    *,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Masks from network flows and cell probability.

    Parameters
    ----------
    flows : (2, Y, X) or (3, Z, Y, X) float array
        Network flows ``[dY, dX]`` / ``[dZ, dY, dX]`` (about 5 x unit vectors).
    cellprob : (Y, X) or (Z, Y, X) float array
        Cell-probability logits.
    niter : int
        Euler steps.
    cellprob_threshold : float
        Pixels with ``cellprob > cellprob_threshold`` are tracked.
    flow_threshold : float
        Masks with a larger flow error are removed (2D only; ``<= 0`` or None disables).
    min_size : int
        Smaller masks are removed (after hole filling); ``<= 0`` disables.
    max_size_fraction : float
        Masks covering more than this fraction of the image are removed.
    device : str or torch.device, optional
        Default CUDA, then MPS, then CPU.

    Returns
    -------
    uint16 array of ``cellprob.shape`` (uint32 if more than 65535 masks)
        Labels 1..N in raster first-appearance order; equal to Cellpose 4.2 ``compute_masks``
        followed by ``fill_holes_and_remove_small_masks(min_size)``.
    """
    flows = np.asarray(flows)
    cellprob = np.asarray(cellprob)
    if flows.ndim != cellprob.ndim + 1 or flows.shape[0] != cellprob.ndim:
        raise ValueError(
            f"flows {flows.shape} must be ({cellprob.ndim}, *cellprob.shape) for cellprob "
            f"{cellprob.shape}"
        )
    if flows.shape[1:] != cellprob.shape:
        raise ValueError(f"flows {flows.shape} and cellprob {cellprob.shape} differ in size")
    if flows.dtype not in (np.float32, np.float64):
        flows = flows.astype(np.float32)
    fg = cellprob > cellprob_threshold
    if not fg.any():
        return np.zeros(cellprob.shape, np.uint16)
    inds = np.nonzero(fg)
    p_final = follow_flows(flows * fg / 5.0, inds, niter=niter, device=device)
    masks = get_masks(p_final, inds, cellprob.shape, max_size_fraction=max_size_fraction)
    if cellprob.ndim == 2 and flow_threshold and flow_threshold > 0 and masks.max() > 0:
        masks = remove_bad_flow_masks(masks, flows, threshold=flow_threshold, device=device)
    return fill_holes_and_remove_small_masks(masks, min_size=min_size)
