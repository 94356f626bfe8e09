"""Blocks mode: one large 2D image segmented block by block, with bounded host memory.

Whole-image segmentation of a (Y, X) image holds about :data:`BYTES_PER_PIXEL` bytes per
pixel at its peak (network input and output maps, their blend weights, flow tracking); a
10240² image needs about 8.5 GB. This mode cuts the image into ``block_size`` cores, each
segmented with ``halo`` pixels of context, and keeps per pixel only the result (labels and,
the flows and cell probability): a fraction of that peak.

The blocks see exactly the whole image's network outputs (the same tiles of the whole
image's tile grid, normalised with the whole image's percentiles, blended the same way:
:func:`aligned_outputs`), so they differ from whole-image segmentation only in flow tracking
near crop edges, which the halo keeps away from the objects that are kept:

1. an object is kept by the block whose core holds its centroid (:func:`keep_core_objects`);
2. each core is painted with its neighbours' kept objects that reach into it, then its own;
   an object found by two neighbouring blocks (IoU > 0.5) is merged into one id
   (:func:`compose_core`);
3. ids are made consecutive.

:func:`segment_in_blocks` is the in-memory mode that
:meth:`cpsam_toolkit.segment.CellposeSAM.segment` picks by itself when an image's estimated
peak (:func:`estimate_whole_image_bytes`) is above the host-memory budget
(:func:`choose_blocks`); :mod:`cpsam_toolkit.blockwise` drives the same pieces for images
larger than memory (lazy inputs, a zarr output, dask workers).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fastremap
import numpy as np

from .. import tiling
from ..core.options import InputOptions, MaskOptions, NetOptions, scale_niter
from ..core.postprocess import masks_from_flows
from ..core.result import SegmentationResult
from ..preprocess import check_finite, normalize, percentile_lowhigh, to_channels_last
from ..settings import parse_memory

log = logging.getLogger("cpsam_toolkit")

__all__ = [
    "BYTES_PER_PIXEL", "Block", "BlockPlan", "CACHE_BYTES_PER_COLUMN", "TileCache",
    "aligned_outputs", "available_memory",
    "block_tiles", "choose_blocks", "compose_core", "duplicate_pairs", "estimate_whole_image_bytes",
    "host_memory_budget", "keep_core_objects", "plan_blocks", "segment_in_blocks",
]

#: measured peak host memory of whole-image segmentation per pixel at network scale (bytes),
#: result included: 65-84 B/px between 1024² and 3072² (peak RSS above the loaded model) and
#: 81 B/px on a 10240² image (8.5 GB); see docs/benchmarks.md
BYTES_PER_PIXEL = 80
#: fixed part of that peak (network activations of one batch, buffers), bytes
FIXED_BYTES = 250e6
#: what blocks mode holds per pixel of the image: labels (4), flows and cellprob (12)
RESULT_BYTES_PER_PIXEL = 16
#: what the tile cache of blocks mode holds per image column at network scale (bytes): a band
#: of tile outputs across the width, measured 182 MB at 10240² with ``augment`` (78 MB without)
CACHE_BYTES_PER_COLUMN = 18_000
#: the budget when ``host_memory`` is not set: this share of the memory available now, at
#: most :data:`AUTO_MAX` bytes (so several CellProfiler or Dask workers on one machine fit)
AUTO_SHARE = 0.5
AUTO_MAX = 4e9

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One block: its grid index, its core and its crop (core + halo), ``(y0, y1, x0, x1)``."""

    index: tuple[int, int]
    core: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"b{self.index[0]}_{self.index[1]}"


def plan_blocks(shape: tuple[int, int], block_size: int, halo: int) -> list[Block]:
    """Blocks of ``block_size`` covering a (Y, X) image, in raster order, with crops grown by
    ``halo`` and clipped to the image."""
    if block_size < 16:
        raise ValueError(f"block_size must be >= 16 pixels, got {block_size}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    ly, lx = shape
    blocks = []
    for by in range(math.ceil(ly / block_size)):
        for bx in range(math.ceil(lx / block_size)):
            y0, x0 = by * block_size, bx * block_size
            y1, x1 = min(ly, y0 + block_size), min(lx, x0 + block_size)
            crop = (max(0, y0 - halo), min(ly, y1 + halo), max(0, x0 - halo), min(lx, x1 + halo))
            blocks.append(Block((by, bx), (y0, y1, x0, x1), crop))
    return blocks


def neighbours(block: Block, by_index: dict[tuple[int, int], Block]) -> list[Block]:
    """The up to 8 blocks around ``block`` (``by_index``: all blocks by grid index)."""
    by, bx = block.index
    return [by_index[(by + dy, bx + dx)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if (dy or dx) and (by + dy, bx + dx) in by_index]


# --------------------------------------------------------------------------------------------
# memory: estimate, budget, plan
# --------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of host memory available now (Linux ``MemAvailable``, else ``os.sysconf``), or
    None when the platform does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def host_memory_budget(host_memory: str | None) -> int | None:
    """Bytes of the ``host_memory`` setting: a size (``"8GB"``), ``"unlimited"`` (None: never
    in blocks), or None for :data:`AUTO_SHARE` of the memory available now, at most
    :data:`AUTO_MAX`."""
    if host_memory is not None:
        if str(host_memory).strip().lower() == "unlimited":
            return None
        return parse_memory(host_memory)
    avail = available_memory()
    return int(AUTO_MAX) if avail is None else int(min(AUTO_MAX, AUTO_SHARE * avail))


def estimate_whole_image_bytes(shape: tuple[int, int], diameter: float | None = None) -> int:
    """Estimated peak host memory (bytes) of segmenting a (Y, X) image whole: the network
    and tracking work at the network scale (``30 / diameter`` when resizing)."""
    scale = (30.0 / diameter) ** 2 if diameter else 1.0
    px = shape[0] * shape[1]
    return int(FIXED_BYTES + BYTES_PER_PIXEL * px * max(1.0, scale))


@dataclass(frozen=True)
class BlockPlan:
    """Why and how an image is segmented in blocks (None from :func:`choose_blocks`: whole)."""

    block_size: int
    halo: int
    estimate: int  # bytes, whole image
    budget: int  # bytes

    def describe(self, name: str = "image") -> str:
        return (f"{name}: whole-image segmentation would need about {_gb(self.estimate)} of RAM, "
                f"above the host memory budget of {_gb(self.budget)}; segmenting it in blocks of "
                f"{self.block_size} px (halo {self.halo} px). Set host_memory (--host-memory) to "
                "change the budget, 'unlimited' to always segment whole.")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_blocks(
    shape: tuple[int, int], budget: int | None, diameter: float | None = None,
    tile: int = tiling.TILE,
) -> BlockPlan | None:
    """A :class:`BlockPlan` when segmenting the (Y, X) image whole would exceed ``budget``
    (bytes, from :func:`host_memory_budget`; None: no limit), else None.

    The block is the largest multiple of the tile (at most 4096 px, at least 2 tiles) whose
    crop's whole-image estimate fits half of what the budget leaves after the result arrays
    and the tile cache (:data:`CACHE_BYTES_PER_COLUMN`);
    the halo is 64 px or two cell diameters, whichever is larger.
    """
    est = estimate_whole_image_bytes(shape, diameter)
    if budget is None or est <= budget or min(shape) <= 2 * tile:
        return None
    halo = int(max(64, math.ceil(2 * diameter))) if diameter else 64
    scale = max(1.0, (30.0 / diameter) ** 2 if diameter else 1.0)
    held = (RESULT_BYTES_PER_PIXEL * shape[0] * shape[1]
            + CACHE_BYTES_PER_COLUMN * shape[1] * math.sqrt(scale))
    room = max(budget - held, budget / 4) / 2
    side = math.sqrt(max(room - FIXED_BYTES, 0) / (BYTES_PER_PIXEL * scale)) - 2 * halo
    block = int(min(4096, max(2 * tile, (side // tile) * tile)))
    return BlockPlan(block, halo, est, int(budget))


# --------------------------------------------------------------------------------------------
# network outputs of blocks: the whole image's tiles, each run once
# --------------------------------------------------------------------------------------------
class TileCache:
    """Network outputs of whole-grid tiles kept for the blocks that still need them.

    ``tiles`` maps a tile's index in the whole image's grid to ``(y, (y0, x0))``: the part of
    its network output (flips undone) that the blocks still to take it need, ``(nout, h, w)``,
    and where that part lies in the image. :func:`aligned_outputs` trims an entry to what the
    remaining blocks need each time one takes it, and drops it when the last has.
    ``peak_tiles`` and ``peak_bytes`` record the largest it grew.
    """

    def __init__(self) -> None:
        self.tiles: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
        self.nbytes = 0
        self.peak_tiles = 0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self.tiles)

    def __contains__(self, k: int) -> bool:
        return k in self.tiles

    def __getitem__(self, k: int) -> tuple[np.ndarray, tuple[int, int]]:
        return self.tiles[k]

    def put(self, k: int, y: np.ndarray, origin: tuple[int, int]) -> None:
        if k in self.tiles:
            self.drop(k)
        self.tiles[k] = (y, origin)
        self.nbytes += y.nbytes
        self.peak_tiles = max(self.peak_tiles, len(self.tiles))
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def drop(self, k: int) -> None:
        self.nbytes -= self.tiles.pop(k)[0].nbytes


def block_tiles(plan: tiling.TilePlan, crop: Box) -> list[tuple[int, int, int]]:
    """``(k, y0, x0)`` of the tiles of the whole image's grid ``plan`` that overlap ``crop``
    (image coordinates, so ``y0``/``x0`` may be negative: the padding), in raster order."""
    cy0, cy1, cx0, cx1 = crop
    tile = plan.tile
    iys = np.asarray(plan.ystarts) - plan.pads[0]
    ixs = np.asarray(plan.xstarts) - plan.pads[2]
    rows = np.flatnonzero((iys < cy1) & (iys + tile > cy0))
    cols = np.flatnonzero((ixs < cx1) & (ixs + tile > cx0))
    nx = len(ixs)
    return [(int(j) * nx + int(i), int(iys[j]), int(ixs[i])) for j in rows for i in cols]


def aligned_outputs(
    predict_tiles: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, int],
    read: Callable[[Box], np.ndarray],
    blocks: Sequence[Block],
    net: NetOptions,
    tile: int = tiling.TILE,
    cache: TileCache | None = None,
) -> Iterator[tuple[Block, np.ndarray]]:
    """Network outputs ``(nout, Y, X)`` over each block's crop, in block order.

    Computed from the tiles of the *whole image's* tile grid that cover the crop and blended
    as whole-image segmentation blends them: the same tiles, the same inputs, the same sums in
    the same order per pixel, so the outputs are the whole image's outputs (bit-identical on
    the CPU). ``read(box)`` returns the normalised ``(C, Y, X)`` float32 network input of an
    image region; it is called once per block, for the region under the tiles no earlier
    block needed. Tiles of consecutive blocks share network batches of ``net.batch_size``.

    Each tile of the grid runs through the network exactly once (``len(TilePlan)`` tiles in
    all, as the whole image): the output of a tile that later blocks (in ``blocks`` order) also
    need is kept in ``cache`` (a :class:`TileCache`, made here when not given) and dropped as
    soon as the last of them has taken it (trimmed, meanwhile, to the part the remaining ones
    need). With blocks in raster order the cache holds about one band of tiles across the
    image width (the tile rows that cross a boundary between block rows: at most
    ``(2 * halo + tile) / stride + 1`` rows, stride about ``tile / 1.2``, ``tile / 2`` with
    ``augment``) plus the tile columns crossing one boundary between blocks and the blocks in
    flight; a whole tile is ``nout * tile² * 4`` bytes (0.8 MB for 3 outputs of 256²).
    Measured peaks with a 64-px halo and 2048-px blocks: 78 MB for a 10240² image (182 MB with
    ``augment``), 59 MB for 4096² with ``augment``; 30 % less than whole tiles.
    """
    ly, lx = shape
    plan = tiling.TilePlan.for_shape((ly, lx), tile, net.tile_overlap, net.augment)
    taper = tiling.taper_mask(tile)
    batch = max(1, net.batch_size)
    cache = TileCache() if cache is None else cache
    # the crops of the blocks that need each tile: a tile leaves the cache when the last took it
    users: dict[int, list[Box]] = {}
    for b in blocks:
        for k, _, _ in block_tiles(plan, b.crop):
            users.setdefault(k, []).append(b.crop)

    def keep(k: int, y: np.ndarray, origin: tuple[int, int]) -> None:
        """Cache the part of tile ``k``'s output ``y`` (at ``origin``) its users still need."""
        oy, ox = origin
        h, w = y.shape[-2:]
        box = (max(min(c[0] for c in users[k]), oy), min(max(c[1] for c in users[k]), oy + h),
               max(min(c[2] for c in users[k]), ox), min(max(c[3] for c in users[k]), ox + w))
        if box != (oy, oy + h, ox, ox + w):  # a copy: the larger array is freed
            y = np.array(y[:, box[0] - oy : box[1] - oy, box[2] - ox : box[3] - ox])
        elif len(users[k]) > 1 and y.base is not None:
            y = np.array(y)  # kept for later blocks: not a view of the whole network batch
        cache.put(k, y, (box[0], box[2]))
    scheduled: set[int] = set()  # tiles queued for (or through) the network

    pending: list[dict[str, Any]] = []  # blocks in flight, in order
    queue: list[tuple[dict[str, Any], int, int, int]] = []  # (input, k, y0, x0) to run

    def start(block: Block) -> None:
        tiles = block_tiles(plan, block.crop)
        new = [t for t in tiles if t[0] not in scheduled]
        cy0, cy1, cx0, cx1 = block.crop
        pending.append({"block": block, "tiles": tiles, "next": 0, "sum": None,
                        "weight": np.zeros((cy1 - cy0, cx1 - cx0), np.float64)})
        if not new:
            return
        # one read per block: the image region under its new tiles (clipped to the image)
        span = (max(0, min(t[1] for t in new)), min(ly, max(t[1] for t in new) + tile),
                max(0, min(t[2] for t in new)), min(lx, max(t[2] for t in new) + tile))
        src = {"x": read(span), "span": span}
        scheduled.update(t[0] for t in new)
        queue.extend((src, k, iy, ix) for k, iy, ix in new)

    def cut(src: dict[str, Any], iy: int, ix: int) -> np.ndarray:
        x, (sy0, sy1, sx0, sx1) = src["x"], src["span"]
        t = np.zeros((x.shape[0], tile, tile), np.float32)  # zero padding, as pad_image
        y0, y1, x0, x1 = max(iy, sy0), min(iy + tile, sy1), max(ix, sx0), min(ix + tile, sx1)
        t[:, y0 - iy : y1 - iy, x0 - ix : x1 - ix] = x[:, y0 - sy0 : y1 - sy0, x0 - sx0 : x1 - sx0]
        return t

    def flush() -> None:
        items = queue[:batch]
        del queue[:batch]
        tiles = []
        for src, k, iy, ix in items:
            t = cut(src, iy, ix)
            axes = plan.flips(k)
            tiles.append(np.flip(t, axes) if axes else t)
        y = np.asarray(predict_tiles(np.stack(tiles)), dtype=np.float32)
        for (_, k, iy, ix), yk in zip(items, y, strict=True):
            axes = plan.flips(k)
            if axes:  # undo the flip; a flip along Y negates dY, along X negates dX
                yk = np.flip(yk, axes).copy()
                for ax in axes:
                    yk[-3 if ax == -2 else -2] *= -1
            keep(k, yk, (iy, ix))

    def accumulate(st: dict[str, Any]) -> None:
        """Add the block's tiles that are ready, in raster order (the whole image's order)."""
        cy0, cy1, cx0, cx1 = st["block"].crop
        tiles = st["tiles"]
        while st["next"] < len(tiles) and tiles[st["next"]][0] in cache:
            k, iy, ix = tiles[st["next"]]
            yk, (oy, ox) = cache[k]
            y0, y1, x0, x1 = max(iy, cy0), min(iy + tile, cy1), max(ix, cx0), min(ix + tile, cx1)
            if st["sum"] is None:
                st["sum"] = np.zeros((yk.shape[0], cy1 - cy0, cx1 - cx0), np.float32)
            tsl = (slice(y0 - iy, y1 - iy), slice(x0 - ix, x1 - ix))  # in the tile
            ysl = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))  # in the kept part
            csl = (slice(y0 - cy0, y1 - cy0), slice(x0 - cx0, x1 - cx0))  # in the crop
            st["sum"][(slice(None), *csl)] += yk[(slice(None), *ysl)] * taper[tsl]
            st["weight"][csl] += taper[tsl]
            st["next"] += 1
            users[k].remove(st["block"].crop)
            if users[k]:
                keep(k, yk, (oy, ox))
            else:
                cache.drop(k)

    it = iter(blocks)
    exhausted = False
    while True:
        while not exhausted and len(queue) < batch:
            b = next(it, None)
            if b is None:
                exhausted = True
            else:
                start(b)
        if queue:
            flush()
        for st in pending:
            accumulate(st)
        while pending and pending[0]["next"] == len(pending[0]["tiles"]):
            st = pending.pop(0)
            yield st["block"], np.ascontiguousarray(st["sum"] / st["weight"], dtype=np.float32)
        if exhausted and not queue and not pending:
            return


# --------------------------------------------------------------------------------------------
# stitching
# --------------------------------------------------------------------------------------------
def keep_core_objects(masks: np.ndarray, block: Block) -> tuple[np.ndarray, int]:
    """Crop labels → labels 1..k of the objects whose centroid lies in the block's core
    (others set to 0), uint32."""
    n = int(masks.max()) if masks.size else 0
    if n == 0:
        return np.zeros(masks.shape, np.uint32), 0
    # centroids from the object pixels only (the same sums, in the same raster order)
    fg = np.flatnonzero(masks)
    lab = masks.ravel()[fg].astype(np.intp)
    yy, xx = np.divmod(fg, masks.shape[1])
    area = np.bincount(lab, minlength=n + 1).astype(np.float64)
    safe = np.maximum(area, 1)
    cy = np.bincount(lab, yy.astype(np.float64), n + 1) / safe
    cx = np.bincount(lab, xx.astype(np.float64), n + 1) / safe
    y0, y1, x0, x1 = block.core
    oy, ox = block.crop[0], block.crop[2]
    gy, gx = np.floor(cy) + oy, np.floor(cx) + ox
    keep = (area > 0) & (gy >= y0) & (gy < y1) & (gx >= x0) & (gx < x1)
    keep[0] = False
    lut = np.zeros(n + 1, np.uint32)
    k = int(keep.sum())
    lut[keep] = np.arange(1, k + 1, dtype=np.uint32)
    return lut[masks], k


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None."""
    y0, y1 = max(a[0], b[0]), min(a[1], b[1])
    x0, x1 = max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def local(region: Box, origin: Box) -> tuple[slice, slice]:
    """Slices of ``region`` in the coordinates of the box ``origin``."""
    return (slice(region[0] - origin[0], region[1] - origin[0]),
            slice(region[2] - origin[2], region[3] - origin[2]))


def duplicate_pairs(
    a: np.ndarray, ba: Block, area_a: np.ndarray,
    b: np.ndarray, bb: Block, area_b: np.ndarray,
    iou_min: float = 0.5,
) -> list[tuple[int, int]]:
    """Local-id pairs of objects of two overlapping crops that are the same cell (IoU >
    ``iou_min`` over their full extents; ``area_*`` are the crops' label bincounts)."""
    region = intersect(ba.crop, bb.crop)
    if region is None:
        return []
    ra, rb = a[local(region, ba.crop)], b[local(region, bb.crop)]
    both = (ra > 0) & (rb > 0)
    if not both.any():
        return []
    key = (ra[both].astype(np.uint64) << np.uint64(32)) | rb[both].astype(np.uint64)
    uniq, inter = np.unique(key, return_counts=True)
    ida = (uniq >> np.uint64(32)).astype(np.int64)
    idb = (uniq & np.uint64(0xFFFFFFFF)).astype(np.int64)
    iou = inter / (area_a[ida] + area_b[idb] - inter)
    sel = iou > iou_min
    return list(zip(ida[sel].tolist(), idb[sel].tolist(), strict=True))


def compose_core(
    block: Block,
    group: Sequence[Block],
    crops: dict[tuple[int, int], np.ndarray],
    offsets: dict[tuple[int, int], int],
    areas: dict[tuple[int, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The ``block``'s core of the label image (uint32, global ids) and the same-cell pairs
    merged there.

    ``group`` is the block's neighbours; ``crops`` holds each block's kept objects (local ids
    1..k, :func:`keep_core_objects`) and ``offsets`` its first global id minus one. The core is
    painted with the neighbours' objects that reach into it, then with its own (which win
    where they overlap). Objects of two overlapping crops with IoU > 0.5 are one cell found by
    both blocks: both get the smaller id. Every core that sees such a pair sees the same two
    crops and applies the same rule, so they all merge it the same way. ``areas`` (optional)
    keeps each crop's label bincount across calls, so each is counted once, not once per core
    that sees it.
    """
    group = [block, *sorted(group, key=lambda b: b.index)]
    areas = {} if areas is None else areas
    for b in group:
        if b.index not in areas:
            areas[b.index] = np.bincount(crops[b.index].ravel())
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.get(i, i) != i:
            i = parent[i]
        return i

    pairs = []
    for i, bi in enumerate(group):
        for bj in group[i + 1:]:
            for p, q in duplicate_pairs(crops[bi.index], bi, areas[bi.index],
                                        crops[bj.index], bj, areas[bj.index]):
                gp, gq = p + offsets[bi.index], q + offsets[bj.index]
                pairs.append((gp, gq))
                rp, rq = find(gp), find(gq)
                if rp != rq:
                    parent[max(rp, rq)] = min(rp, rq)
    y0, y1, x0, x1 = block.core
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint32)
    for b in (*group[1:], block):  # own objects painted last
        region = intersect(b.crop, block.core)
        if region is None:
            continue
        src = crops[b.index][local(region, b.crop)]
        dst = canvas[local(region, block.core)]
        np.copyto(dst, src.astype(np.uint32) + np.uint32(offsets[b.index]), where=src > 0)
    if parent:
        ids = np.array(sorted(parent), dtype=np.uint32)
        roots = np.array([find(int(i)) for i in ids], dtype=np.uint32)
        idx = np.minimum(np.searchsorted(ids, canvas), len(ids) - 1)
        canvas = np.where(ids[idx] == canvas, roots[idx], canvas)
    return canvas, pairs


def _small(labels: np.ndarray, k: int) -> np.ndarray:
    return labels.astype(np.uint16) if k < 2**16 else labels


# --------------------------------------------------------------------------------------------
# the in-memory mode
# --------------------------------------------------------------------------------------------
def segment_in_blocks(
    predictor: Any,
    image: np.ndarray,
    inputs: InputOptions,
    net: NetOptions,
    masks: MaskOptions,
    block_size: int,
    halo: int = 64,
    name: str | None = None,
) -> SegmentationResult:
    """Segment one 2D image block by block (see the module docstring).

    ``predictor`` is a :class:`~cpsam_toolkit.core.predictor.Predictor`; the image and the
    options are those of :meth:`~cpsam_toolkit.core.predictor.Predictor.iter_predict`
    (``tile_norm_blocksize`` is not supported: normalisation is global). Returns a
    :class:`SegmentationResult` with the whole image's labels, flows and cell probability (those
    of the blocks' cores); ``max_size_fraction`` applies to each block's crop.
    """
    label = name or "image"
    if inputs.tile_norm_blocksize:
        raise ValueError(f"{label}: tile_norm_blocksize is not supported in blocks (normalisation "
                         "is global); set host_memory='unlimited' to segment it whole")
    arr = to_channels_last(image, channel_axis=inputs.channel_axis, channels=inputs.channels, name=label)
    check_finite(arr, label)
    ly, lx = arr.shape[:2]
    lowhigh = percentile_lowhigh(arr, *inputs.percentiles) if inputs.normalize else None
    masks = scale_niter(masks, inputs.diameter)

    def read(box: Box) -> np.ndarray:
        """(C, Y, X) float32 network input of a region, normalised with the global values."""
        y0, y1, x0, x1 = box
        x = arr[y0:y1, x0:x1]
        if x.dtype == bool:
            x = x.astype(np.float32)
        if inputs.normalize:
            x = normalize(x, *inputs.percentiles, invert=inputs.invert, lowhigh=lowhigh)
        else:
            x = x.astype(np.float32)
            x = 1 - x if inputs.invert else x
        return np.moveaxis(x, -1, 0)

    blocks = plan_blocks((ly, lx), block_size, halo)
    if not inputs.diameter:
        outputs: Iterator[tuple[Block, np.ndarray]] = aligned_outputs(
            predictor.predict_tiles, (ly, lx), read, blocks, net, predictor.net.cfg.tile)
    else:  # resizing: each crop is an image of its own (resized, predicted, resized back)
        pre = InputOptions(channel_axis=0, normalize=False, diameter=inputs.diameter)
        maps = predictor.iter_predict((read(b.crop) for b in blocks), pre, net)
        outputs = ((b, np.concatenate([f, c[None]])) for b, (f, c) in zip(blocks, maps, strict=True))

    flows = np.zeros((2, ly, lx), np.float32)
    cellprob = np.zeros((ly, lx), np.float32)
    crops: dict[tuple[int, int], np.ndarray] = {}
    offsets: dict[tuple[int, int], int] = {}
    total = 0
    for b, y in outputs:
        kept, k = keep_core_objects(masks_from_flows(y[-3:-1], y[-1], masks), b)
        crops[b.index] = _small(kept, k)
        offsets[b.index], total = total, total + k
        core, whole = local(b.core, b.crop), local(b.core, (0, ly, 0, lx))
        flows[(slice(None), *whole)] = y[(slice(-3, -1), *core)]
        cellprob[whole] = y[(-1, *core)]
        log.debug("cpsam: %s block %s: %d objects", label, b.index, k)
    if total >= 2**32 - 1:
        raise OverflowError(f"{label}: {total} objects do not fit uint32 labels")
    labels = np.zeros((ly, lx), np.uint32)
    by_index = {b.index: b for b in blocks}
    areas: dict[tuple[int, int], np.ndarray] = {}
    for b in blocks:
        canvas, _ = compose_core(b, neighbours(b, by_index), crops, offsets, areas)
        labels[local(b.core, (0, ly, 0, lx))] = canvas
    del crops
    fastremap.renumber(labels, in_place=True)  # ids 1..N in raster order
    if labels.max(initial=0) < 2**16:
        labels = labels.astype(np.uint16)
    return SegmentationResult(labels, flows, cellprob, masks, name)

