"""Cut images into network tiles, run them in batches across images, blend them back.

Tiling agrees with the reference (``cellpose.core.run_net``): each image is zero-padded to a
multiple of 16 plus 8 px a side (or to the tile size), tiles start on an integer ``linspace``
with ``ceil((1 + 2 * overlap) * L / tile)`` tiles per axis, and outputs are blended with a
sigmoid taper (edge 20 px, sigma 7.5). With ``augment=True`` tiles overlap by half and
alternate tiles are flipped and flipped back.

Unlike the reference, tiles are streamed: a batch may hold tiles of several images, tiles are
cut only when their batch runs, and each image's blended result is released as soon as its
last tile is done, so memory stays bounded by the batch plus the images in flight.

Tiles whose input is constant (every channel one value: empty padding, blank background, a
saturated or masked-out area) are run through the network once per distinct value and the
output is reused (:func:`constant_tile_key`): the network is a deterministic function of its
input, so the reused output is the one the tile would have got (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

TILE = 256
PAD_DIV = 16


def pad_widths(length: int, tile: int = TILE, div: int = PAD_DIV) -> tuple[int, int]:
    """Zero padding (before, after) of one axis: to a multiple of ``div`` plus ``div/2`` per
    side, or up to ``tile`` for short axes."""
    if length >= tile:
        extra = int(div * np.ceil(length / div) - length)
    else:
        extra = max(0, tile - length - div)
    return div // 2 + extra // 2, div // 2 + extra - extra // 2


def tile_starts(length: int, tile: int = TILE, overlap: float = 0.1, augment: bool = False) -> np.ndarray:
    """Start offsets of the tiles along one (padded) axis."""
    if augment:
        n = max(2, int(np.ceil(2.0 * length / tile)))
    else:
        overlap = min(0.5, max(0.05, overlap))
        n = 1 if length <= tile else int(np.ceil((1.0 + 2 * overlap) * length / tile))
    return np.linspace(0, length - tile, n).astype(int)


@lru_cache(maxsize=4)
def taper_mask(tile: int = TILE, sigma: float = 7.5) -> np.ndarray:
    """(tile, tile) blending weights: ~1 in the centre, falling to ~0.07 at the edge."""
    size = max(224, tile)
    d = np.abs(np.arange(size) - (size - 1) / 2)
    m = 1 / (1 + np.exp((d - (size / 2 - 20)) / sigma))
    m = m * m[:, None]
    lo = size // 2 - tile // 2
    out = m[lo : lo + tile, lo : lo + tile]
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one (Y, X) image lie."""

    shape: tuple[int, int]
    pads: tuple[int, int, int, int]  # y before, y after, x before, x after
    ystarts: np.ndarray
    xstarts: np.ndarray
    tile: int = TILE
    augment: bool = False

    @classmethod
    def for_shape(
        cls, shape: tuple[int, int], tile: int = TILE, overlap: float = 0.1, augment: bool = False
    ) -> TilePlan:
        py, px = pad_widths(shape[0], tile), pad_widths(shape[1], tile)
        ly, lx = shape[0] + sum(py), shape[1] + sum(px)
        return cls(
            tuple(shape),
            (*py, *px),
            tile_starts(ly, tile, overlap, augment),
            tile_starts(lx, tile, overlap, augment),
            tile,
            augment,
        )

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.shape[0] + self.pads[0] + self.pads[1], self.shape[1] + self.pads[2] + self.pads[3]

    def __len__(self) -> int:
        return len(self.ystarts) * len(self.xstarts)

    def position(self, k: int) -> tuple[int, int, int, int]:
        """(row j, column i, y0, x0) of tile ``k`` in raster order."""
        j, i = divmod(k, len(self.xstarts))
        return j, i, int(self.ystarts[j]), int(self.xstarts[i])

    def flips(self, k: int) -> tuple[int, ...]:
        """Axes (of a (C, Y, X) tile) flipped for test-time augmentation of tile ``k``."""
        if not self.augment:
            return ()
        j, i, _, _ = self.position(k)
        return {(0, 1): (-2,), (1, 0): (-1,), (1, 1): (-2, -1)}.get((j % 2, i % 2), ())


def pad_image(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(Y, X, C) float32 → padded (C, Y', X') float32."""
    y1, y2, x1, x2 = plan.pads
    return np.pad(np.moveaxis(image, -1, 0), ((0, 0), (y1, y2), (x1, x2)))


def cut_tile(padded: np.ndarray, plan: TilePlan, k: int) -> np.ndarray:
    _, _, y0, x0 = plan.position(k)
    t = padded[:, y0 : y0 + plan.tile, x0 : x0 + plan.tile]
    axes = plan.flips(k)
    return np.flip(t, axes) if axes else t


def constant_tile_key(tile: np.ndarray) -> bytes | None:
    """Key of a tile whose every channel is constant (its values, as bytes), else ``None``.

    Parameters
    ----------
    tile : (C, tile, tile) float32 array
        One network input, channels zero-padded to the batch's channel count.

    Returns
    -------
    bytes or None
        Equal keys mean equal inputs, hence equal network outputs: such tiles need the network
        once. NaN never matches (a NaN tile is run).
    """
    flat = tile.reshape(tile.shape[0], -1)
    first = flat[:, :1]
    if not (flat == first).all():
        return None
    return first.tobytes() + str(tile.shape).encode()


class _Accumulator:
    """Running taper-weighted sum of one image's tile outputs."""

    def __init__(self, plan: TilePlan, nout: int) -> None:
        self.plan = plan
        self.sum = np.zeros((nout, *plan.padded_shape), np.float32)
        self.weight = np.zeros(plan.padded_shape, np.float64)
        self.done = 0

    def add(self, k: int, y: np.ndarray) -> None:
        plan = self.plan
        axes = plan.flips(k)
        if axes:
            y = np.flip(y, axes).copy()
            for ax in axes:  # a flip along Y negates dY (channel -3), along X negates dX (-2)
                y[-3 if ax == -2 else -2] *= -1
        _, _, y0, x0 = plan.position(k)
        mask = taper_mask(plan.tile)
        sl = (slice(y0, y0 + plan.tile), slice(x0, x0 + plan.tile))
        self.sum[(slice(None), *sl)] += y * mask
        self.weight[sl] += mask
        self.done += 1

    def result(self) -> np.ndarray:
        y1, _, x1, _ = self.plan.pads
        ly, lx = self.plan.shape
        out = self.sum / self.weight
        return np.ascontiguousarray(out[:, y1 : y1 + ly, x1 : x1 + lx], dtype=np.float32)


def run_tiled(
    predict: Callable[[np.ndarray], np.ndarray],
    images: Iterable[np.ndarray],
    batch_size: int = 8,
    tile: int = TILE,
    overlap: float = 0.1,
    augment: bool = False,
    on_batch: Callable[[int], None] | None = None,
    skip_constant: bool = True,
) -> Iterator[np.ndarray]:
    """Run ``predict`` over the tiles of many images, batching across image boundaries.

    Parameters
    ----------
    predict : callable
        (B, C, tile, tile) float32 → (B, nout, tile, tile) float32.
    images : iterable of ndarray
        Normalised (Y, X, C) float32 images. In a batch mixing channel counts, tiles are
        zero-padded to the largest C; the network treats absent channels as zeros, so this
        changes nothing.
    batch_size : int
        Tiles per network call.
    on_batch : callable, optional
        Called with the number of tiles after each network call (progress bars).
    skip_constant : bool
        Run tiles of constant input once per distinct value and reuse the output (the same
        output; see :func:`constant_tile_key`). Up to 16 such outputs are kept per run.

    Yields
    ------
    ndarray
        (nout, Y, X) float32 per image, in input order, as soon as each is complete.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[_Accumulator | None, np.ndarray, TilePlan]] = []  # per image in flight
    queue: list[tuple[int, int]] = []  # (index into pending, tile k)
    it = iter(images)
    exhausted = False
    first = 0  # index in `pending` of the oldest unfinished image
    cache: dict[bytes, np.ndarray] = {}  # network outputs of constant tiles

    def flush(n: int) -> None:
        batch = queue[:n]
        del queue[:n]
        cmax = max(pending[i][1].shape[0] for i, _ in batch)
        x = np.zeros((len(batch), cmax, tile, tile), np.float32)
        for b, (i, k) in enumerate(batch):
            t = cut_tile(pending[i][1], pending[i][2], k)
            x[b, : t.shape[0]] = t
        y = _predict_skipping(predict, x, cache) if skip_constant else np.asarray(
            predict(x), dtype=np.float32)
        for b, (i, k) in enumerate(batch):
            acc, padded, plan = pending[i]
            if acc is None:
                acc = _Accumulator(plan, y.shape[1])
                pending[i] = (acc, padded, plan)
            acc.add(k, y[b])
        if on_batch is not None:
            on_batch(len(batch))

    while True:
        while not exhausted and len(queue) < batch_size:
            try:
                img = next(it)
            except StopIteration:
                exhausted = True
                break
            plan = TilePlan.for_shape(img.shape[:2], tile, overlap, augment)
            pending.append((None, pad_image(img, plan), plan))
            queue.extend((len(pending) - 1, k) for k in range(len(plan)))
        if queue:
            flush(min(batch_size, len(queue)))
        # release finished images in order
        while first < len(pending):
            acc, _, plan = pending[first]
            if acc is None or acc.done < len(plan):
                break
            yield acc.result()
            pending[first] = (None, np.empty(0), plan)  # free memory
            first += 1
        if exhausted and not queue and first == len(pending):
            return


_MAX_CONSTANT_OUTPUTS = 16


def _predict_skipping(
    predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, cache: dict[bytes, np.ndarray]
) -> np.ndarray:
    """``predict(x)``, with tiles of constant input run once per distinct value (``cache``)."""
    keys = [constant_tile_key(t) for t in x]
    run, first_of = [], {}
    for b, key in enumerate(keys):
        if key is None or (key not in cache and key not in first_of):
            run.append(b)
            if key is not None:
                first_of[key] = b
    if len(run) == len(x):
        y = np.asarray(predict(x), dtype=np.float32)
    else:
        y_run = np.asarray(predict(x[run]), dtype=np.float32) if run else None
        shape = y_run.shape[1:] if y_run is not None else next(
            cache[k] for k in keys if k is not None).shape
        y = np.empty((len(x), *shape), np.float32)
        if y_run is not None:
            y[run] = y_run
    for key, b in first_of.items():
        if len(cache) < _MAX_CONSTANT_OUTPUTS:
            cache[key] = y[b].copy()
    for b, key in enumerate(keys):
        if key is not None and b not in run:
            y[b] = cache[key] if key in cache else y[first_of[key]]
    return y
