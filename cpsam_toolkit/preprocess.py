"""From any 2D microscopy array to a normalised (Y, X, C<=3) float32 image.

Channel-axis rule (``channel_axis=None``): a 2-D array is one channel; for a 3-D array the
channel axis is the first or the last axis, whichever is shorter (the last on a tie), and it
must have at most 16 entries — a longer "channel" axis is almost always Z or time, so we ask
for ``channel_axis`` (or 3D mode) instead of guessing. This agrees with the reference
(``shape[0] < shape[-1]`` → first) on every unambiguous input.

More than three channels: pass ``channels=[i, j, k]`` (up to three indices, in the order the
network should see them); without it the first three are used with a warning, as the reference
does. RGBA images therefore use R, G, B.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

MAX_AUTO_CHANNELS = 16


class ImageInputError(ValueError):
    """An input array that cannot be segmented; the message says why and what to do."""


def to_channels_last(
    image: np.ndarray,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    name: str = "image",
) -> np.ndarray:
    """Return a (Y, X, C) view/copy of a 2D image with 1 <= C <= 3, original dtype.

    Parameters
    ----------
    image : ndarray
        (Y, X), (Y, X, C) or (C, Y, X).
    channel_axis : int, optional
        Axis of the channels; guessed when None (see module docstring).
    channels : sequence of int, optional
        Up to three channel indices to keep, in order.
    name : str
        Used in error messages (e.g. the file name).
    """
    arr = np.asarray(image)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == bool
    ) or np.iscomplexobj(arr):
        raise ImageInputError(f"{name}: unsupported dtype {arr.dtype}; give a real-valued array")
    if arr.ndim < 2:
        raise ImageInputError(f"{name}: a 2D image needs 2 or 3 dimensions, got shape {arr.shape}")
    if arr.ndim == 2:
        if channel_axis is not None:
            raise ImageInputError(
                f"{name}: channel_axis={channel_axis} given for a 2-D array {arr.shape}; omit it"
            )
        arr = arr[..., None]
    elif arr.ndim == 3:
        if channel_axis is None:
            first, last = arr.shape[0], arr.shape[-1]
            channel_axis = 0 if first < last else 2
            if arr.shape[channel_axis] > MAX_AUTO_CHANNELS:
                raise ImageInputError(
                    f"{name}: cannot tell the channel axis of shape {arr.shape} (no axis has "
                    f"<= {MAX_AUTO_CHANNELS} entries); pass channel_axis=, or use 3D mode "
                    "(do_3d=True, z_axis=) if this is a volume"
                )
        if not -3 <= channel_axis <= 2:
            raise ImageInputError(
                f"{name}: channel_axis={channel_axis} is out of range for shape {arr.shape}"
            )
        arr = np.moveaxis(arr, channel_axis, -1)
    else:
        raise ImageInputError(
            f"{name}: {arr.ndim}-D array {arr.shape} is not a 2D image; pass a list of 2D images, "
            "or a volume with do_3d=True and z_axis= (and channel_axis= if it has channels)"
        )
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageInputError(
            f"{name}: image of size {arr.shape[0]}x{arr.shape[1]} is too small (at least 2x2)"
        )
    n = arr.shape[-1]
    if channels is not None:
        channels = list(channels)
        if not 1 <= len(channels) <= 3:
            raise ImageInputError(f"{name}: channels= must list 1 to 3 channel indices")
        bad = [c for c in channels if not -n <= c < n]
        if bad:
            raise ImageInputError(f"{name}: channels {bad} out of range for {n} channels")
        arr = arr[..., channels]
    elif n > 3:
        warnings.warn(
            f"{name}: {n} channels; using the first 3. Pass channels=[i, j, k] to choose.",
            stacklevel=3,
        )
        arr = arr[..., :3]
    return arr


def check_finite(image: np.ndarray, name: str = "image") -> None:
    """Raise if a floating image holds NaN or Inf."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise ImageInputError(
            f"{name}: {bad} NaN/Inf pixel values; replace them (e.g. np.nan_to_num) first"
        )


def _percentiles(x: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    """Percentiles of one channel; subsampled on grids of > 224^3 pixels (as the reference)."""
    if x.size > 224**3:
        step = [max(1, s // 224) for s in x.shape]
        if x.ndim == 3:
            step[0] = max(1, x.shape[0] // 50)
        x = x[tuple(slice(None, None, s) for s in step)]
    lo, hi = np.percentile(x, [lower, upper])
    return float(lo), float(hi)


def normalize(
    image: np.ndarray,
    lower: float = 1.0,
    upper: float = 99.0,
    invert: bool = False,
    tile_norm_blocksize: int = 0,
    lowhigh: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Per-channel percentile normalisation of a (..., C) image to float32.

    Each channel maps its ``lower`` percentile to 0 and ``upper`` to 1. A constant channel, or
    one whose percentile range is <= 1e-3, becomes all zeros (never NaN). ``invert`` gives
    ``1 - x``. ``tile_norm_blocksize > 0`` normalises in overlapping blocks of that many pixels
    (smoothed, for uneven illumination). ``lowhigh`` gives each channel's ``(lo, hi)`` instead
    of computing percentiles (e.g. from :func:`percentile_lowhigh` on a whole large image, so
    that its blocks are normalised alike).
    """
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
    x = np.array(image, dtype=np.float32, copy=True)
    if lowhigh is not None and len(lowhigh) != x.shape[-1]:
        raise ValueError(f"lowhigh has {len(lowhigh)} (lo, hi) pairs for {x.shape[-1]} channels")
    for c in range(x.shape[-1]):
        ch = x[..., c]
        if tile_norm_blocksize > 0:
            x[..., c] = _tile_normalize(ch, tile_norm_blocksize, lower, upper)
            continue
        if lowhigh is not None:
            lo, hi = (float(v) for v in lowhigh[c])
        elif ch.size == 0 or np.ptp(ch) == 0:
            ch[...] = 0
            continue
        else:
            lo, hi = _percentiles(ch, lower, upper)
        if hi - lo > 1e-3:
            ch -= lo
            ch /= hi - lo
        else:
            ch[...] = 0
    if invert:
        x = 1 - x
    return x


def percentile_lowhigh(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> list[tuple[float, float]]:
    """Each channel's ``(lo, hi)`` percentiles of a (..., C) image, exactly as :func:`normalize`
    computes them (``(0, 0)`` for a constant channel, which normalises to zeros)."""
    x = np.asarray(image)
    out = []
    for c in range(x.shape[-1]):
        ch = x[..., c].astype(np.float32)
        out.append((0.0, 0.0) if ch.size == 0 or np.ptp(ch) == 0 else _percentiles(ch, lower, upper))
    return out


def _tile_normalize(ch: np.ndarray, block: int, lower: float, upper: float) -> np.ndarray:
    """Normalise a (Y, X) channel by percentiles of overlapping blocks, smoothly interpolated."""
    from scipy.ndimage import gaussian_filter

    ly, lx = ch.shape[-2:]
    by, bx = min(block, ly), min(block, lx)
    ny = max(1, int(np.ceil(1.2 * ly / by)))
    nx = max(1, int(np.ceil(1.2 * lx / bx)))
    ys = np.linspace(0, ly - by, ny).astype(int)
    xs = np.linspace(0, lx - bx, nx).astype(int)
    lo = np.zeros((ny, nx), np.float32)
    hi = np.zeros((ny, nx), np.float32)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            lo[i, j], hi[i, j] = np.percentile(ch[y0 : y0 + by, x0 : x0 + bx], [lower, upper])
    lo, hi = gaussian_filter(lo, 0.5, mode="nearest"), gaussian_filter(hi, 0.5, mode="nearest")
    # bilinear interpolation between block centres (constant beyond the outer centres)
    cy, cx = ys + by / 2 - 0.5, xs + bx / 2 - 0.5
    py, px = np.arange(ly), np.arange(lx)

    def interp(grid: np.ndarray) -> np.ndarray:
        rows = np.stack([np.interp(px, cx, g) for g in grid])  # (ny, lx)
        return np.stack([np.interp(py, cy, rows[:, j]) for j in range(lx)], axis=1)

    lo, hi = interp(lo), interp(hi)
    rng = hi - lo
    out = np.where(rng > 1e-3, (ch - lo) / np.maximum(rng, 1e-3), 0)
    return out.astype(np.float32)


def prepare_image(
    image: np.ndarray,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    normalize_image: bool = True,
    invert: bool = False,
    percentiles: tuple[float, float] = (1.0, 99.0),
    tile_norm_blocksize: int = 0,
    name: str = "image",
) -> np.ndarray:
    """Validate, reorder and normalise a 2D image: returns (Y, X, C<=3) float32."""
    arr = to_channels_last(image, channel_axis=channel_axis, channels=channels, name=name)
    check_finite(arr, name)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not normalize_image:
        out = arr.astype(np.float32)
        return 1 - out if invert else out
    return normalize(arr, percentiles[0], percentiles[1], invert, tile_norm_blocksize)
