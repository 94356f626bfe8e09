"""Masks → flows: unit vectors from heat diffusion out of each object's centre.

The flow field is the training target of the network (times 5) and the reference of the
flow-error quality control in :mod:`cpsam_toolkit.dynamics`.

Definition (the same as Cellpose 4.2 ``dynamics.masks_to_flows_gpu``):

* centre of an object: in 2D the mean of its pixel coordinates rounded half-to-even (inside its
  bounding box); if that point is not in the object, the object pixel closest to it (first in
  raster order on ties). In 3D always the voxel closest to the exact mean.
* ``n_iter`` (one value for the whole image): 2D ``2 * max(h + w + 2)``, 3D
  ``6 * max(d + h + w + 3)`` over the objects' bounding boxes.
* each iteration: ``T[centre] += 1`` and then ``T = mask * (sum of T over the 3x3 (2D) or
  6-connected + self (3D) neighbourhood) / 9 (or 7)``; pixels of other objects count as 0.
* flow = central differences of the image-wide ``T`` (so at an edge shared with another object
  its heat is read), normalised to unit length (0 where the gradient is 0).

Unlike the reference, which diffuses on the whole image in float64, each object is diffused on
its own bounding-box crop in float32: on the CPU by compiled per-object loops (numba), elsewhere
(or without numba) in batches of similar-sized crops zero-padded into one tensor; both give
the same bits. The result agrees with the reference to float32 rounding; see
:func:`masks_to_flows` for the measured tolerance.
"""

from __future__ import annotations

import fastremap
import numpy as np
import torch
from scipy import ndimage

from cpsam_toolkit._jit import jit, ready
from cpsam_toolkit.device import one_cpu_thread, resolve_device

__all__ = [
    "diffusion_heat",
    "diffusion_iterations",
    "labels_to_training_targets",
    "masks_to_flows",
    "object_centres",
    "object_pixel_flows",
]


def _check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D (Y,X) or 3D (Z,Y,X) labels, got shape {masks.shape}")
    if masks.dtype == bool:
        return masks.astype(np.int32)
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"masks must hold integer labels, got dtype {masks.dtype}")
    if masks.size and np.issubdtype(masks.dtype, np.signedinteger) and masks.min() < 0:
        raise ValueError("masks must not hold negative labels")
    return masks


def _bboxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels present, bbox starts and stops, each (n,) / (n, ndim) int64."""
    slices = ndimage.find_objects(masks)
    present = [i for i, s in enumerate(slices) if s is not None]
    ndim = masks.ndim
    starts = np.array([[s.start for s in slices[i]] for i in present], np.int64).reshape(-1, ndim)
    stops = np.array([[s.stop for s in slices[i]] for i in present], np.int64).reshape(-1, ndim)
    return np.array(present, np.int64) + 1, starts, stops


def diffusion_iterations(starts: np.ndarray, stops: np.ndarray) -> int:
    """Reference number of diffusion iterations for objects with these bounding boxes.

    Parameters
    ----------
    starts, stops : (n, ndim) int arrays
        Bounding boxes (stop exclusive) of the objects of one image.

    Returns
    -------
    int
        2D: ``2 * max(h + w + 2)``; 3D: ``6 * max(d + h + w + 3)``; 0 if there is no object.
    """
    if len(starts) == 0:
        return 0
    ext = (stops - starts).sum(axis=1)
    if starts.shape[1] == 2:
        return int(2 * (ext + 2).max())
    return int(6 * (ext + 3).max())


def _closest_pixels(
    masks: np.ndarray, labels: np.ndarray, starts: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """For each label, its pixel closest to ``target`` (local bbox coordinates, float64).

    Distances are summed in the reference's order (2D: x then y; 3D: z, x, y); ties go to the
    first pixel in raster order. Returns (n, ndim) int64 local coordinates.
    """
    lut = np.zeros(int(masks.max()) + 1, np.int64)
    lut[labels] = np.arange(1, len(labels) + 1)
    flat = np.flatnonzero(lut[masks.ravel()])
    obj = lut[masks.ravel()[flat]] - 1
    coords = np.stack(np.unravel_index(flat, masks.shape), 1) - starts[obj]
    diff = coords - target[obj]
    sq = diff**2
    if masks.ndim == 2:
        dist = sq[:, 1] + sq[:, 0]
    else:
        dist = sq[:, 0] + sq[:, 2] + sq[:, 1]
    order = np.lexsort((flat, dist, obj))
    first = np.ones(len(order), bool)
    first[1:] = obj[order][1:] != obj[order][:-1]
    out = np.zeros((len(labels), masks.ndim), np.int64)
    out[obj[order][first]] = coords[order][first]
    return out


def object_centres(masks: np.ndarray, labels: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Diffusion source of each object, in image coordinates.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int array
    labels : (n,) int array
        Labels to locate (all present in ``masks``).
    starts : (n, ndim) int array
        Their bounding-box starts.

    Returns
    -------
    (n, ndim) int64 array
        2D: rounded mean (half to even, in bbox coordinates), or the closest object pixel if the
        rounded mean is outside the object. 3D: the voxel closest to the mean.
    """
    n, ndim = len(labels), masks.ndim
    if n == 0:
        return np.zeros((0, ndim), np.int64)
    fg = np.flatnonzero(masks)
    lab = masks.ravel()[fg].astype(np.int64)
    size = int(masks.max()) + 1
    counts = np.bincount(lab, minlength=size)[labels].astype(np.float64)
    coords = np.unravel_index(fg, masks.shape)
    # integer sums are exact in float64 up to 2**53
    sums = np.stack([np.bincount(lab, weights=c, minlength=size)[labels] for c in coords], 1)
    if ndim == 3:
        # the reference works in 1-padded coordinates; keep its arithmetic exactly
        mean = (sums - counts[:, None] * (starts - 1)) / counts[:, None]
        return _closest_pixels(masks, labels, starts - 1, mean) + starts - 1
    mean = np.round((sums - counts[:, None] * starts) / counts[:, None]).astype(np.int64)
    centre = mean + starts
    shape = np.array(masks.shape)
    inside = np.all((centre >= 0) & (centre < shape), axis=1)
    ok = np.zeros(n, bool)
    ok[inside] = masks[tuple(centre[inside].T)] == labels[inside]
    if not ok.all():
        bad = ~ok
        sub = np.isin(masks, labels[bad]) * masks
        centre[bad] = _closest_pixels(sub, labels[bad], starts[bad], mean[bad]) + starts[bad]
    return centre


def _crop_shapes(sizes: np.ndarray) -> np.ndarray:
    """Round (n, ndim) crop sizes up so that similar objects share a batch (≤ 25% per axis)."""
    sizes = np.maximum(sizes, 4)
    step = np.maximum(2 ** (np.floor(np.log2(sizes)).astype(np.int64) - 2), 1)
    return -(-sizes // step) * step


def _buckets(
    crop_shapes: np.ndarray, max_elements: int
) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """Batches of objects with one crop shape each, at most ``max_elements`` crop pixels each."""
    shapes, group = np.unique(crop_shapes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    out = []
    for g, shape in enumerate(shapes):
        idx = np.flatnonzero(group == g)
        per = max(1, max_elements // int(np.prod(shape)))
        for j in range(0, len(idx), per):
            out.append((idx[j : j + per], tuple(int(s) for s in shape)))
    return out


def _gather_crops(
    masks_pad: np.ndarray, labels: np.ndarray, origin: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """(B, *shape) bool crops of ``masks_pad == label`` starting at ``origin`` (+1 pad offset)."""
    ndim = len(shape)
    idx = []
    for d in range(ndim):
        ax = [1] * (ndim + 1)
        ax[0] = -1
        ax[d + 1] = shape[d]
        idx.append(origin[:, d].reshape(-1, *([1] * ndim)) + 1 + np.arange(shape[d]).reshape(ax))
    return masks_pad[tuple(idx)] == labels.reshape(-1, *([1] * ndim))


def _diffuse(inside: torch.Tensor, centre: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Run the heat diffusion on a batch of crops.

    Parameters
    ----------
    inside : (B, *crop) bool tensor
        Object pixels; the crop border (1 pixel) must be outside.
    centre : (B,) int64 tensor
        Flat index of each source within its crop.
    n_iter : int

    Returns
    -------
    (B, *crop) float32 tensor
        Heat ``T`` after ``n_iter`` iterations (0 outside the object).

    Notes
    -----
    On the CPU the loop runs in NumPy: the same float32 operations in the same order (so the
    same bits as with torch), but single-threaded. Each step is a few small element-wise ops,
    which torch's intra-op threads do not speed up (measured: equal times with 1 and 2 threads)
    and which become 10-30x slower when the cores are shared (spin-waiting threads; several
    CellProfiler or Dask workers, a JupyterHub node).
    """
    ndim = inside.ndim - 1
    B = inside.shape[0]
    inner = (slice(None),) + (slice(1, -1),) * ndim
    if inside.device.type == "cpu":
        xp, ins = np, inside.numpy()
        w = ins[inner].astype(np.float32) / np.float32(9.0 if ndim == 2 else 7.0)
        T = np.zeros(ins.shape, np.float32)
        src = np.arange(B) * T[0].size + centre.numpy()
    else:
        xp = torch
        w = inside[inner].to(torch.float32) / (9.0 if ndim == 2 else 7.0)
        T = torch.zeros(inside.shape, dtype=torch.float32, device=inside.device)
        src = torch.arange(B, device=T.device) * T[0].numel() + centre
    T_next = xp.zeros_like(T)
    buf = xp.empty_like(w)
    rows = xp.empty_like(T[:, 1:-1]) if ndim == 2 else None
    for _ in range(n_iter):
        T.reshape(-1)[src] += 1.0
        # sums in mirror-symmetric order, so symmetric objects get exactly symmetric heat
        if ndim == 2:
            xp.add(T[:, :-2], T[:, 2:], out=rows)
            rows += T[:, 1:-1]
            xp.add(rows[:, :, :-2], rows[:, :, 2:], out=buf)
            buf += rows[:, :, 1:-1]
        else:
            xp.add(T[:, :-2, 1:-1, 1:-1], T[:, 2:, 1:-1, 1:-1], out=buf)
            buf += T[:, 1:-1, :-2, 1:-1] + T[:, 1:-1, 2:, 1:-1]
            buf += T[:, 1:-1, 1:-1, :-2] + T[:, 1:-1, 1:-1, 2:]
            buf += T[:, 1:-1, 1:-1, 1:-1]
        xp.multiply(buf, w, out=T_next[inner])
        T, T_next = T_next, T
    return torch.from_numpy(T) if xp is np else T


def _diffuse_2d_kernel(masks, labels, starts, stops, centres, n_iter, weight, heat):  # pragma: no cover
    """:func:`_diffuse` of every 2D object on its own bounding box, written into ``heat`` (numba).

    The same float32 operations in the same order as the NumPy path: ``T[centre] += 1``, row
    sums ``(T[y-1] + T[y+1]) + T[y]``, then ``((r[x-1] + r[x+1]) + r[x]) * weight`` inside the
    object. One object at a time: its buffers stay in the L1/L2 cache and no crop is rounded up.
    """
    one = np.float32(1.0)
    mh, mw = 0, 0
    for o in range(labels.shape[0]):
        mh = max(mh, stops[o, 0] - starts[o, 0])
        mw = max(mw, stops[o, 1] - starts[o, 1])
    ta = np.zeros((mh + 2, mw + 2), np.float32)
    tb = np.zeros((mh + 2, mw + 2), np.float32)
    wt = np.zeros((mh, mw), np.float32)
    rows = np.zeros(mw + 2, np.float32)
    for o in range(labels.shape[0]):
        y0, x0 = starts[o, 0], starts[o, 1]
        h, w = stops[o, 0] - y0, stops[o, 1] - x0
        lab = labels[o]
        for y in range(h):
            for x in range(w):
                wt[y, x] = weight if masks[y0 + y, x0 + x] == lab else np.float32(0.0)
        for y in range(h + 2):
            for x in range(w + 2):
                ta[y, x] = 0.0
                tb[y, x] = 0.0
        sy, sx = centres[o, 0] - y0 + 1, centres[o, 1] - x0 + 1
        t, t2 = ta, tb
        for _ in range(n_iter):
            t[sy, sx] += one
            for y in range(1, h + 1):
                up, dn, md, out, wy = t[y - 1], t[y + 1], t[y], t2[y], wt[y - 1]
                for x in range(w + 2):
                    rows[x] = (up[x] + dn[x]) + md[x]
                for x in range(1, w + 1):
                    out[x] = ((rows[x - 1] + rows[x + 1]) + rows[x]) * wy[x - 1]
            t, t2 = t2, t
        for y in range(h):
            for x in range(w):
                if masks[y0 + y, x0 + x] == lab:
                    heat[y0 + y + 1, x0 + x + 1] = t[y + 1, x + 1]


def _diffuse_3d_kernel(masks, labels, starts, stops, centres, n_iter, weight, heat):  # pragma: no cover
    """The 3D (6-connected + self) counterpart of :func:`_diffuse_2d_kernel` (numba).

    Sums in the NumPy path's order: ``(T[z-1] + T[z+1]) + (T[y-1] + T[y+1])``, then
    ``+ (T[x-1] + T[x+1])``, then ``+ T``, times ``weight`` inside the object.
    """
    one = np.float32(1.0)
    md_, mh, mw = 0, 0, 0
    for o in range(labels.shape[0]):
        md_ = max(md_, stops[o, 0] - starts[o, 0])
        mh = max(mh, stops[o, 1] - starts[o, 1])
        mw = max(mw, stops[o, 2] - starts[o, 2])
    ta = np.zeros((md_ + 2, mh + 2, mw + 2), np.float32)
    tb = np.zeros((md_ + 2, mh + 2, mw + 2), np.float32)
    wt = np.zeros((md_, mh, mw), np.float32)
    for o in range(labels.shape[0]):
        z0, y0, x0 = starts[o, 0], starts[o, 1], starts[o, 2]
        d, h, w = stops[o, 0] - z0, stops[o, 1] - y0, stops[o, 2] - x0
        lab = labels[o]
        for z in range(d):
            for y in range(h):
                for x in range(w):
                    inside = masks[z0 + z, y0 + y, x0 + x] == lab
                    wt[z, y, x] = weight if inside else np.float32(0.0)
        for z in range(d + 2):
            for y in range(h + 2):
                for x in range(w + 2):
                    ta[z, y, x] = 0.0
                    tb[z, y, x] = 0.0
        sz, sy, sx = centres[o, 0] - z0 + 1, centres[o, 1] - y0 + 1, centres[o, 2] - x0 + 1
        t, t2 = ta, tb
        for _ in range(n_iter):
            t[sz, sy, sx] += one
            for z in range(1, d + 1):
                for y in range(1, h + 1):
                    zu, zd, yu, yd, c = t[z - 1, y], t[z + 1, y], t[z, y - 1], t[z, y + 1], t[z, y]
                    out, wy = t2[z, y], wt[z - 1, y - 1]
                    for x in range(1, w + 1):
                        acc = (zu[x] + zd[x]) + (yu[x] + yd[x])
                        acc = acc + (c[x - 1] + c[x + 1])
                        out[x] = (acc + c[x]) * wy[x - 1]
            t, t2 = t2, t
        for z in range(d):
            for y in range(h):
                for x in range(w):
                    if masks[z0 + z, y0 + y, x0 + x] == lab:
                        heat[z0 + z + 1, y0 + y + 1, x0 + x + 1] = t[z + 1, y + 1, x + 1]


_diffuse_jit = {2: jit(_diffuse_2d_kernel), 3: jit(_diffuse_3d_kernel)}
_JIT_DTYPES = (np.uint16, np.int32, np.uint32, np.int64)


@one_cpu_thread()
def diffusion_heat(
    masks: np.ndarray,
    *,
    niter: int | None = None,
    device: str | torch.device | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Heat of every object after diffusion from its centre, on one padded image.

    Each object is diffused on its own bounding-box crop (other objects count as 0): on the CPU
    one object at a time by a compiled loop (numba), on GPUs (or without numba) in batches of
    crops of similar size. The crops are then written back into one image. Both paths give the
    same bits.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int array
        Labels, 0 = background; labels need not be consecutive.
    niter : int, optional
        Diffusion iterations; default :func:`diffusion_iterations` of all objects.
    device : str or torch.device, optional
        Default: CUDA, then MPS, then CPU.
    max_elements : int, optional
        Crop pixels per batch of the batched path (default 2**19 on the CPU, 2**24 on GPUs);
        the compiled CPU path works one object at a time and ignores it.

    Returns
    -------
    (Y+2, X+2) or (Z+2, Y+2, X+2) float32 tensor on ``device``
        Heat ``T`` with a 1-pixel zero border; 0 on background.
    """
    masks = _check_masks(masks)
    if masks.size and masks.max() >= 2**16:  # sparse big labels: keep the per-label tables small
        masks = fastremap.renumber(masks)[0]
    dev = resolve_device(device)
    pshape = tuple(n + 2 for n in masks.shape)
    heat = torch.zeros(int(np.prod(pshape)), dtype=torch.float32, device=dev)
    labels, starts, stops = _bboxes(masks)
    if len(labels) == 0:
        return heat.view(pshape)
    n_iter = diffusion_iterations(starts, stops) if niter is None else int(niter)
    centres = object_centres(masks, labels, starts)
    kernel = _diffuse_jit.get(masks.ndim)
    if dev.type == "cpu" and ready(kernel):
        if masks.dtype not in _JIT_DTYPES:  # one compiled variant per label dtype
            masks = masks.astype(np.int64)
        out = np.zeros(pshape, np.float32)
        weight = np.float32(1.0) / np.float32(9.0 if masks.ndim == 2 else 7.0)
        kernel(masks, labels, starts, stops, centres, n_iter, weight, out)
        return torch.from_numpy(out)
    if max_elements is None:
        max_elements = 2**19 if dev.type == "cpu" else 2**24
    crop_shapes = _crop_shapes(stops - starts + 2)
    masks_pad = np.pad(masks, [(1, int(p)) for p in crop_shapes.max(0)])
    for idx, shape in _buckets(crop_shapes, max_elements):
        origin = starts[idx] - 1
        inside_np = _gather_crops(masks_pad, labels[idx], origin, shape)
        flat_centre = np.ravel_multi_index(tuple((centres[idx] - origin).T), shape)
        inside = torch.from_numpy(inside_np).to(dev)
        T = _diffuse(inside, torch.from_numpy(flat_centre).to(dev), n_iter)
        # write the object pixels back: crop (b, local) -> padded image (start + local)
        where = np.flatnonzero(inside_np)
        b, local = np.divmod(where, int(np.prod(shape)))
        coords = np.stack(np.unravel_index(local, shape), 0) + starts[idx][b].T
        target = torch.from_numpy(np.ravel_multi_index(tuple(coords), pshape)).to(dev)
        heat.index_copy_(0, target, T.view(-1).index_select(0, torch.from_numpy(where).to(dev)))
    return heat.view(pshape)


def _unit_gradient(heat: torch.Tensor, fg: np.ndarray) -> torch.Tensor:
    """(ndim, N) float32 unit central differences of padded ``heat`` at flat padded indices."""
    flat = heat.reshape(-1)
    idx = torch.from_numpy(fg).to(heat.device)
    strides = [int(np.prod(heat.shape[d + 1 :])) for d in range(heat.ndim)]
    grads = [flat.index_select(0, idx + s) - flat.index_select(0, idx - s) for s in strides]
    # the float32 difference is exact to rounding; normalising in float32 would underflow for
    # the tiny gradients at the far end of long objects
    g = torch.stack(grads).to(_wide_float(heat.device))
    norm = torch.sqrt((g * g).sum(0))
    return (g / torch.where(norm > 0, norm, torch.ones_like(norm))).to(torch.float32)


def _wide_float(device: torch.device) -> torch.dtype:
    """float64 where the device has it (not on MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@one_cpu_thread()
def masks_to_flows(
    masks: np.ndarray,
    *,
    niter: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Unit flow field of labelled masks (heat diffusion from each object's centre).

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int array
        Labels, 0 = background.
    niter : int, optional
        Diffusion iterations; default as the reference (see :func:`diffusion_iterations`).
    device : str or torch.device, optional
        Where to run the diffusion; default CUDA, then MPS, then CPU.

    Returns
    -------
    (2, Y, X) or (3, Z, Y, X) float32 array
        ``[dY, dX]`` or ``[dZ, dY, dX]`` unit vectors inside objects, 0 outside.

    Notes
    -----
    Like the reference, the central differences at an object's edge read the heat of a touching
    neighbour object (the heat image is shared by all objects); only the diffusion itself is
    confined to each object.

    Equals ``cellpose.dynamics.masks_to_flows_gpu(masks)[0]`` (2D; 4.2 returns ``(mu, slices)``
    in float64) and ``masks_to_flows_gpu_3d(masks)`` (3D) up to float32 rounding. Measured on
    real label images (DSB 2018 nuclei 520x696, usiigaci phase contrast, CoNSeP, the QCANet
    embryo volume; ``tests/test_flows.py``): mean cosine similarity > 1 - 1e-10, 99th percentile
    of the angle difference < 3e-5 degree, 99.9th < 0.0015 degree, largest component difference
    < 1e-3, no pixel over 1 degree. The exception is a pixel whose exact gradient is zero (the
    centre of an object symmetric about it): there both directions are rounding noise, and one
    side may be 0 while the other is a unit vector (4 of 66,000 pixels in one DSB image).
    """
    masks = _check_masks(masks)
    fg, mu = object_pixel_flows(masks, niter=niter, device=device)
    out = np.zeros((masks.ndim, masks.size), np.float32)
    out[:, fg] = mu.cpu().numpy()
    return out.reshape(masks.ndim, *masks.shape)


def object_pixel_flows(
    masks: np.ndarray,
    *,
    niter: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """:func:`masks_to_flows` at the object pixels only (no full-size output).

    Returns
    -------
    (N,) int64 array and (ndim, N) float32 tensor on ``device``
        Flat indices (``np.flatnonzero(masks)``) and the unit flows there.
    """
    masks = _check_masks(masks)
    heat = diffusion_heat(masks, niter=niter, device=device)
    fg = np.flatnonzero(masks)
    if len(fg) == 0:
        return fg, torch.zeros((masks.ndim, 0), dtype=torch.float32, device=heat.device)
    padded = np.ravel_multi_index(tuple(c + 1 for c in np.unravel_index(fg, masks.shape)),
                                  heat.shape)
    return fg, _unit_gradient(heat, padded)


def labels_to_training_targets(masks: np.ndarray, *, device: str | torch.device | None = None) -> np.ndarray:
    """Training target of one label image: cell probability target and unit flows.

    Parameters
    ----------
    masks : (Y, X) or (Z, Y, X) int array
        Labels, 0 = background.
    device : str or torch.device, optional

    Returns
    -------
    (3, Y, X) or (4, Z, Y, X) float32 array
        ``[masks > 0, dY, dX]`` (2D) or ``[masks > 0, dZ, dY, dX]`` (3D). The network is trained on
        ``5 *`` the flows and on the 0/1 target with a logit loss.
    """
    masks = _check_masks(masks)
    flows = masks_to_flows(masks, device=device)
    return np.concatenate([(masks > 0)[None].astype(np.float32), flows], axis=0)
