"""Object size from the image: a model's size model, for ``diameter="auto"``.

Cellpose-SAM's official weights are size-invariant and need no diameter. A small network is
not: the shipped ``cpsam_small`` segments objects of about 30 px well and cuts larger ones
(phase-contrast cells of 40-70 px) into ~30 px pieces, so the median diameter of its own
masks says nothing about the true size. Like cellpose's ``SizeModel`` (a linear regression
from the style vector to the log diameter), a :class:`SizeModel` is a ridge regression from
the network's pooled encoder features to the log median object diameter, fitted on the
training images at random scales (:func:`fit_size_model`) and stored in the model file
(``info["size_model"]``). ``diameter="auto"`` then resizes each image so its objects come out
at the model's ``target`` size: large objects are always shrunk; small ones are enlarged as
the model's ``grow`` rule says (never, always, or only on images with a dark background such
as fluorescence, see :func:`dark_background`).

Pure functions and one small frozen dataclass; imports nothing above the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["SizeModel", "size_features", "fit_size_model", "FEATURE_CROP", "resize_for_features",
           "dark_background", "GROW_RULES"]

#: side (px) of the central crop whose tiles give the features (at most 3x3 tiles of 256)
FEATURE_CROP = 768

#: when a size model enlarges small objects: ``"never"``, ``"always"``, or ``"dark_background"``
#: (only images whose background is dark, e.g. fluorescence; see :func:`dark_background`)
GROW_RULES = ("never", "dark_background", "always")

#: :func:`dark_background`: the background (median) lies in the lowest quarter of the range
DARK_MEDIAN = 0.25


def dark_background(image: np.ndarray) -> bool:
    """Whether an image has a dark background with bright objects (fluorescence), not a
    bright or mid-grey one (brightfield, phase contrast, stained tissue).

    ``image`` is (Y, X) or (Y, X, C) of any real dtype (e.g. the prepared network input). The
    channels are averaged; the image counts as dark when its median lies in the lowest
    :data:`DARK_MEDIAN` of its 1st-99th percentile range (validation images of split v2:
    fluorescence at most 0.14, brightfield, phase contrast and H&E at least 0.36).
    """
    a = np.asarray(image, np.float32)
    grey = a.mean(-1) if a.ndim == 3 else a
    step = max(1, int(math.sqrt(grey.size / 262144)))  # at most ~512x512 samples
    lo, med, hi = np.percentile(grey[::step, ::step], [1, 50, 99])
    return bool(hi > lo and (med - lo) / (hi - lo) < DARK_MEDIAN)


def resize_for_features(image: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear resize of a prepared (Y, X, C) float32 image by ``scale`` (for fitting at
    several scales)."""
    if scale == 1.0:
        return image
    size = (max(2, int(image.shape[0] * scale)), max(2, int(image.shape[1] * scale)))
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))[None].float()
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return np.ascontiguousarray(np.moveaxis(out[0].numpy(), 0, -1))


def size_features(
    encoder: torch.nn.Module, image: np.ndarray, tile: int = 256, crop: int = FEATURE_CROP,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Pooled encoder features of a prepared image, shape ``(2 * channels,)`` float64.

    ``image`` is (Y, X, C<=3) float32 as the network sees it (normalised, at the scale to be
    judged). Its central ``crop`` x ``crop`` region, zero-padded to whole ``tile``-sized tiles,
    goes through ``encoder``; the features are the mean of every output channel over all tiles
    and positions, then the per-tile spatial standard deviation averaged over tiles.
    """
    if image.ndim != 3:
        raise ValueError(f"size_features expects a prepared (Y, X, C) image, got shape {image.shape}")
    h, w = image.shape[:2]
    y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    x = image[y0 : y0 + crop, x0 : x0 + crop]
    x = np.pad(x, ((0, -x.shape[0] % tile), (0, -x.shape[1] % tile), (0, 0)))
    tiles = [x[i : i + tile, j : j + tile] for i in range(0, x.shape[0], tile)
             for j in range(0, x.shape[1], tile)]
    t = torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy()).to(device, dtype)
    with torch.inference_mode():
        f = encoder(t).float().flatten(2)  # (tiles, channels, positions)
    return torch.cat([f.mean((0, 2)), f.std(2).mean(0)]).double().cpu().numpy()


@dataclass(frozen=True, eq=False)  # arrays: compare to_dict() instead
class SizeModel:
    """Ridge regression from :func:`size_features` to the log median object diameter.

    Attributes
    ----------
    mean, scale, coef : (F,) float64
        Feature standardisation and weights; ``log(d) = ((f - mean) / scale) @ coef + intercept``.
    intercept : float
    target : float
        Object diameter (px) the network segments best; ``"auto"`` resizes by ``target / d``.
    grow : str
        When objects estimated below ``target`` are enlarged (one of :data:`GROW_RULES`):
        ``"never"`` (segmented at full size), ``"always"``, or ``"dark_background"``.
    max_scale : float
        The largest enlargement (``target / d`` is capped there).
    crop : int
        Side of the central crop the features come from (px).
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    target: float = 30.0
    grow: str = "never"
    max_scale: float = 5.0
    crop: int = FEATURE_CROP

    def __post_init__(self) -> None:
        if self.grow not in GROW_RULES:
            raise ValueError(f"size model: grow must be one of {GROW_RULES}, got {self.grow!r}")
        if not self.max_scale >= 1:
            raise ValueError(f"size model: max_scale must be at least 1, got {self.max_scale}")

    def predict(self, features: np.ndarray) -> float:
        """Median object diameter (px) from one feature vector."""
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return float(math.exp(float(z @ self.coef) + self.intercept))

    def resize_diameter(self, estimate: float, dark: bool = False) -> float | None:
        """The ``diameter`` setting (px; the network scale is ``30 / diameter``) that brings
        objects of ``estimate`` px to :attr:`target`; None where no resizing is wanted.
        ``dark``: the image has a dark background (:func:`dark_background`), for the
        ``"dark_background"`` rule."""
        if not (estimate > 0 and math.isfinite(estimate)):
            return None
        if estimate <= self.target:
            if not (self.grow == "always" or (self.grow == "dark_background" and dark)):
                return None
            estimate = max(estimate, self.target / self.max_scale)
            if estimate == self.target:
                return None
        return estimate * 30.0 / self.target

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (stored in the model file, loaded with ``weights_only``)."""
        return {"kind": "ridge_log_diameter", "features": "encoder_mean_std",
                "mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale],
                "coef": [float(v) for v in self.coef], "intercept": float(self.intercept),
                "target": float(self.target), "grow": self.grow, "max_scale": float(self.max_scale),
                "crop": int(self.crop)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SizeModel:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming what is wrong."""
        if d.get("kind") != "ridge_log_diameter":
            raise ValueError(f"unknown size model kind {d.get('kind')!r}; this version reads "
                             "'ridge_log_diameter' (upgrade cpsam-toolkit to read newer files)")
        arrs = [np.asarray(d[k], np.float64) for k in ("mean", "scale", "coef")]
        if len({a.shape for a in arrs}) != 1 or arrs[0].ndim != 1:
            raise ValueError("size model: 'mean', 'scale' and 'coef' must be vectors of one length")
        grow = d.get("grow")
        if grow is None:  # files of session 9: a shrink_only flag
            grow = "never" if d.get("shrink_only", True) else "always"
        return cls(*arrs, intercept=float(d["intercept"]), target=float(d.get("target", 30.0)),
                   grow=str(grow), max_scale=float(d.get("max_scale", 5.0)),
                   crop=int(d.get("crop", FEATURE_CROP)))


def fit_size_model(
    features: np.ndarray, diameters: Sequence[float], alpha: float = 1.0, target: float = 30.0,
    grow: str = "never", crop: int = FEATURE_CROP, max_scale: float = 5.0,
) -> SizeModel:
    """Fit a :class:`SizeModel`: ridge regression (penalty ``alpha`` on standardised features)
    of ``log(diameters)`` on ``features`` (N, F). ``diameters`` are the true median object
    diameters (px) at the scale each feature vector was taken."""
    x = np.asarray(features, np.float64)
    y = np.log(np.asarray(diameters, np.float64))
    if x.ndim != 2 or len(x) != len(y) or len(y) < 2 or not np.isfinite(y).all():
        raise ValueError(f"fit_size_model needs (N, F) features and N > 1 positive diameters, "
                         f"got {x.shape} and {y.shape}")
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return SizeModel(mean, scale, coef, float(y.mean()), target, grow, max_scale, crop)
