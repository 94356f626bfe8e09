"""Training augmentations (Cellpose-SAM paper, Methods) and the public image degradations.

Spatial: random rotation, flip, scale and a 256x256 crop (zero-padded where the image is smaller),
applied with one affine map to the image (bilinear), the masks (nearest) and the flow field
(components bilinearly resampled, then the vectors rotated/flipped with the same map, so they keep
pointing at the same cell centres).

Intensity: random grayscale (10%), inversion (25%), dropping the third channel (10%), channel
permutation, brightness/contrast jitter, and on half of the images one of four degradations —
Poisson noise, Gaussian blur, downsampling, anisotropic blur with downsampling — after which the
image is renormalised (1st percentile -> 0, 99th -> 1).

The degradation functions (:func:`poisson_noise`, :func:`gaussian_blur`, :func:`downsample`,
:func:`anisotropic_blur`, :func:`renormalize`) take explicit levels and are the one implementation
used both for training and for the robustness report. They accept numpy arrays or torch tensors of
shape (H, W) or (C, H, W) (spatial axes last) and return the same kind.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a seed reproduces a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "AugmentConfig",
    "Affine",
    "sample_affine",
    "warp",
    "transform_flows",
    "random_affine_crop",
    "intensity_augment",
    "degrade",
    "augment_sample",
    "poisson_noise",
    "gaussian_blur",
    "downsample",
    "anisotropic_blur",
    "renormalize",
    "pad_channels",
    "to_grayscale",
    "DEGRADATIONS",
]

DEGRADATIONS = ("poisson", "blur", "downsample", "anisotropic")


# ----------------------------------------------------------------------------- array helpers


def _as_numpy(img: Any) -> tuple[np.ndarray, Any]:
    """Return a float32 numpy view of ``img`` and a function that converts back to its kind."""
    if isinstance(img, torch.Tensor):
        dev, dt = img.device, img.dtype
        arr = img.detach().cpu().float().numpy()
        return arr, lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dt)
    arr = np.asarray(img)
    dt = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
    return arr.astype(np.float32, copy=False), lambda a: a.astype(dt, copy=False)


def _check_spatial(arr: np.ndarray, name: str) -> None:
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name}: expected an (H, W) or (C, H, W) image, got shape {arr.shape}")


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes of a float32 (H,W) or (C,H,W) array."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]
    return (out[0] if squeeze else out).numpy()


# ----------------------------------------------------------------------------- degradations


def renormalize(img: Any, lower: float = 1.0, upper: float = 99.0) -> Any:
    """Per-channel percentile normalisation: ``lower`` percentile -> 0, ``upper`` -> 1.

    Channels with no spread (e.g. all zero) become 0.
    """
    arr, back = _as_numpy(img)
    _check_spatial(arr, "renormalize")
    a = arr[None] if arr.ndim == 2 else arr
    out = np.zeros_like(a, dtype=np.float32)
    for c in range(a.shape[0]):
        lo, hi = np.percentile(a[c], [lower, upper])
        if hi - lo > 1e-6:
            out[c] = (a[c] - lo) / (hi - lo)
    return back(out[0] if arr.ndim == 2 else out)


def poisson_noise(img: Any, mean_photons: float, rng: np.random.Generator) -> Any:
    """Shot noise: each pixel becomes ``Poisson(mean_photons * x) / mean_photons``.

    ``img`` should be normalised (about 0..1); negative values are clipped to 0. Lower
    ``mean_photons`` is noisier (the paper's test levels are 5, 2.5 and 0.5).
    """
    if mean_photons <= 0:
        raise ValueError(f"poisson_noise: mean_photons must be > 0, got {mean_photons}")
    arr, back = _as_numpy(img)
    _check_spatial(arr, "poisson_noise")
    lam = np.clip(arr, 0, None).astype(np.float64) * mean_photons
    return back((rng.poisson(lam) / mean_photons).astype(np.float32))


def gaussian_blur(img: Any, sigma: float) -> Any:
    """Isotropic Gaussian blur of the two spatial axes with standard deviation ``sigma`` pixels."""
    arr, back = _as_numpy(img)
    _check_spatial(arr, "gaussian_blur")
    if sigma <= 0:
        return back(arr.copy())
    s = (0, sigma, sigma) if arr.ndim == 3 else (sigma, sigma)
    return back(ndimage.gaussian_filter(arr, s, mode="reflect"))


def downsample(img: Any, factor: float) -> Any:
    """Larger pixels: blur (sigma = factor/2), downsample by ``factor`` and bilinearly upsample
    back to the original size (as in the paper's pixel-size test)."""
    if factor < 1:
        raise ValueError(f"downsample: factor must be >= 1, got {factor}")
    arr, back = _as_numpy(img)
    _check_spatial(arr, "downsample")
    h, w = arr.shape[-2:]
    blurred = np.asarray(gaussian_blur(arr, factor / 2))
    small = _resize(blurred, (max(1, round(h / factor)), max(1, round(w / factor))))
    return back(_resize(small, (h, w)))


def anisotropic_blur(img: Any, factor: float, axis: int = 0) -> Any:
    """Anisotropic degradation along one spatial axis (0 = Y, 1 = X): blur with sigma
    factor/2 along it, downsample it by ``factor`` and upsample back bilinearly."""
    if factor < 1:
        raise ValueError(f"anisotropic_blur: factor must be >= 1, got {factor}")
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"anisotropic_blur: axis must be 0 (Y) or 1 (X), got {axis}")
    arr, back = _as_numpy(img)
    _check_spatial(arr, "anisotropic_blur")
    ax = axis % 2
    h, w = arr.shape[-2:]
    sig = [0.0] * arr.ndim
    sig[arr.ndim - 2 + ax] = factor / 2
    blurred = ndimage.gaussian_filter(arr, sig, mode="reflect")
    size = (max(1, round(h / factor)), w) if ax == 0 else (h, max(1, round(w / factor)))
    return back(_resize(_resize(blurred, size), (h, w)))


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AugmentConfig:
    """What augmentations to apply; the defaults are the paper's whole-dataset settings.

    ``scale_range`` is (low, high) of the zoom factor, drawn ``"uniform"`` or ``"loguniform"``.
    Intensity probabilities of 0 switch an augmentation off; ``degrade_p`` is the probability that
    an image gets one of the four degradations (chosen uniformly).
    """

    size: int = 256
    rotate: bool = True
    flip: bool = True
    scale_range: tuple[float, float] = (0.25, 4.0)
    scale_dist: str = "loguniform"
    grayscale_p: float = 0.1
    invert_p: float = 0.25
    drop_third_p: float = 0.1
    permute_channels: bool = True
    brightness_sd: float = 0.2
    contrast_range: tuple[float, float] = (0.5, 2.0)  # log-uniform factor on the channel sd
    degrade_p: float = 0.5
    poisson_photons: tuple[float, float] = (1.0, 40.0)  # log-uniform mean photons at intensity 1
    blur_sigma: tuple[float, float] = (1.0, 4.0)
    downsample_factor: tuple[float, float] = (2.0, 6.0)
    aniso_factor: tuple[float, float] = (2.0, 8.0)

    @classmethod
    def spatial_only(cls, scale_range=(0.75, 1.25), scale_dist="uniform", size=256) -> AugmentConfig:
        """The fine-tuning augmentations of the paper: rotate, flip, scale, crop."""
        return cls(
            size=size, scale_range=tuple(scale_range), scale_dist=scale_dist, grayscale_p=0.0,
            invert_p=0.0, drop_third_p=0.0, permute_channels=False, brightness_sd=0.0,
            contrast_range=(1.0, 1.0), degrade_p=0.0,
        )

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# ----------------------------------------------------------------------------- spatial


@dataclass(frozen=True)
class Affine:
    """Output pixel ``o`` (y, x) samples the source at ``inv @ o + offset``.

    ``matrix`` is the forward linear map (source -> output, in (y, x) coordinates) =
    ``scale * rotation @ flip``; flow vectors transform with ``matrix / scale``.
    """

    matrix: np.ndarray
    offset: np.ndarray
    scale: float
    out_shape: tuple[int, int]

    @property
    def inv(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)


def make_affine(
    in_shape: tuple[int, int],
    out_size: int = 256,
    angle: float = 0.0,
    scale: float = 1.0,
    flip: bool = False,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Affine:
    """Affine map rotating by ``angle`` radians about the image centre, flipping X first if
    ``flip``, zooming by ``scale``, with the source centre landing at the output centre + shift."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    fl = np.diag([1.0, -1.0]) if flip else np.eye(2)
    m = scale * rot @ fl
    src_c = (np.asarray(in_shape, float) - 1) / 2
    out_c = (np.array([out_size, out_size], float) - 1) / 2 + np.asarray(shift, float)
    # o = m @ (s - src_c) + out_c  ->  s = inv @ o + (src_c - inv @ out_c)
    inv = np.linalg.inv(m)
    return Affine(m, src_c - inv @ out_c, float(scale), (out_size, out_size))


def sample_affine(
    in_shape: tuple[int, int], rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()
) -> Affine:
    """Draw a random rotation/flip/scale/crop for an image of ``in_shape``."""
    lo, hi = cfg.scale_range
    if cfg.scale_dist == "loguniform":
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    elif cfg.scale_dist == "uniform":
        scale = float(rng.uniform(lo, hi))
    else:
        raise ValueError(f"scale_dist must be 'uniform' or 'loguniform', not {cfg.scale_dist!r}")
    angle = float(rng.uniform(-np.pi, np.pi)) if cfg.rotate else 0.0
    flip = bool(rng.random() < 0.5) if cfg.flip else False
    # random crop: the source centre may move by up to half the overhang of the scaled image
    span = np.maximum(0.0, np.asarray(in_shape, float) * scale - cfg.size) / 2
    shift = rng.uniform(-span, span) if np.any(span > 0) else np.zeros(2)
    return make_affine(in_shape, cfg.size, angle, scale, flip, tuple(shift))


def _coords(aff: Affine) -> np.ndarray:
    h, w = aff.out_shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()])
    return aff.inv @ pts + aff.offset[:, None]


def warp(arr: np.ndarray, aff: Affine, order: int = 1, coords: np.ndarray | None = None) -> np.ndarray:
    """Resample an (H, W) or (C, H, W) array through ``aff``; outside the source is 0."""
    coords = _coords(aff) if coords is None else coords
    a = arr[None] if arr.ndim == 2 else arr
    out = np.empty((a.shape[0], *aff.out_shape), dtype=a.dtype if order == 0 else np.float32)
    for c in range(a.shape[0]):
        src = a[c] if order == 0 else a[c].astype(np.float32, copy=False)
        out[c] = ndimage.map_coordinates(
            src, coords, order=order, mode="constant", cval=0, prefilter=False
        ).reshape(aff.out_shape)
    return out[0] if arr.ndim == 2 else out


def transform_flows(flows: np.ndarray, aff: Affine, coords: np.ndarray | None = None) -> np.ndarray:
    """Warp a (2, H, W) [dY, dX] field: resample both components, then rotate/flip each vector."""
    moved = warp(flows, aff, order=1, coords=coords)
    rot = aff.matrix / aff.scale
    return np.einsum("ij,jhw->ihw", rot, moved).astype(np.float32)


def random_affine_crop(
    image: np.ndarray,
    masks: np.ndarray,
    flows: np.ndarray | None,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    aff: Affine | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply one random rotation/flip/scale/crop to ``image`` (C,H,W), ``masks`` (H,W) and
    ``flows`` (2,H,W). Returns arrays of spatial size ``cfg.size``."""
    aff = sample_affine(masks.shape, rng, cfg) if aff is None else aff
    coords = _coords(aff)
    img = warp(image, aff, 1, coords)
    msk = warp(masks, aff, 0, coords)
    flw = transform_flows(flows, aff, coords) if flows is not None else None
    return img, msk, flw


# ----------------------------------------------------------------------------- intensity


def pad_channels(image: np.ndarray, n: int = 3) -> np.ndarray:
    """(C,H,W) with C <= n -> (n,H,W), zero-filled."""
    if image.shape[0] == n:
        return image
    if image.shape[0] > n:
        raise ValueError(f"image has {image.shape[0]} channels; at most {n} are supported")
    out = np.zeros((n, *image.shape[1:]), dtype=image.dtype)
    out[: image.shape[0]] = image
    return out


def _active(image: np.ndarray) -> np.ndarray:
    return np.array([np.ptp(c) > 0 or np.any(c != 0) for c in image])


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Paper's grayscale conversion: one non-empty channel is replicated to all channels,
    otherwise the channel mean is."""
    act = _active(image)
    g = image[act][0] if act.sum() == 1 else image[act].mean(0) if act.any() else image[0]
    return np.repeat(g[None], image.shape[0], axis=0)


def degrade(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
            kind: str | None = None, level: float | None = None,
            axis: int | None = None) -> tuple[np.ndarray, str]:
    """Apply one degradation (random ``kind`` if None) with random level, then renormalise.

    ``level`` fixes the level instead of drawing it from ``cfg`` (mean photons for
    ``"poisson"``, sigma for ``"blur"``, the factor for ``"downsample"`` and ``"anisotropic"``)
    and ``axis`` fixes the anisotropic axis (0 = Y, 1 = X); the robustness report uses them.
    """
    kind = DEGRADATIONS[rng.integers(len(DEGRADATIONS))] if kind is None else kind
    if kind == "poisson":
        lo, hi = cfg.poisson_photons
        photons = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if level is None else float(level)
        out = poisson_noise(image, photons, rng)
    elif kind == "blur":
        out = gaussian_blur(image, float(rng.uniform(*cfg.blur_sigma)) if level is None else float(level))
        out = poisson_noise(out, 120.0, rng)  # the paper adds a little shot noise to blurred images
    elif kind == "downsample":
        out = downsample(image, float(rng.uniform(*cfg.downsample_factor)) if level is None else float(level))
    elif kind == "anisotropic":
        factor = float(rng.uniform(*cfg.aniso_factor)) if level is None else float(level)
        out = anisotropic_blur(image, factor, int(rng.integers(2)) if axis is None else int(axis))
    else:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {DEGRADATIONS}")
    act = _active(image)
    out = np.asarray(renormalize(out))
    out[~act] = 0
    return out.astype(np.float32), kind


def intensity_augment(image: np.ndarray, rng: np.random.Generator,
                      cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Grayscale, inversion, third-channel drop, channel permutation, degradation and
    brightness/contrast jitter (in the paper's order) on a normalised (3, H, W) crop."""
    img = image.astype(np.float32, copy=True)
    if cfg.grayscale_p and rng.random() < cfg.grayscale_p:
        img = to_grayscale(img)
    act = _active(img)
    if cfg.invert_p and rng.random() < cfg.invert_p:
        img[act] = 1.0 - img[act]
    if cfg.drop_third_p and img.shape[0] == 3 and act.sum() > 1 and rng.random() < cfg.drop_third_p:
        img[2] = 0
        act[2] = False
    if cfg.permute_channels:
        perm = rng.permutation(img.shape[0])
        img, act = img[perm], act[perm]
    if cfg.degrade_p and rng.random() < cfg.degrade_p:
        img, _ = degrade(img, rng, cfg)
    if cfg.brightness_sd or cfg.contrast_range != (1.0, 1.0):
        lo, hi = cfg.contrast_range
        for c in np.flatnonzero(act):
            m = img[c].mean()
            f = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else lo
            img[c] = (img[c] - m) * f + m + (rng.normal(0, cfg.brightness_sd) if cfg.brightness_sd else 0)
    return img


def augment_sample(
    image: np.ndarray,
    masks: np.ndarray,
    flows: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample: spatial then intensity augmentation.

    Parameters: normalised ``image`` (C<=3, H, W), ``masks`` (H, W) integer labels, unit
    ``flows`` (2, H, W). Returns ``(image (3,S,S) float32, flows (2,S,S) float32, masks (S,S))``.
    """
    img, msk, flw = random_affine_crop(pad_channels(image), masks, flows, rng, cfg)
    img = intensity_augment(img, rng, cfg)
    return img.astype(np.float32, copy=False), flw, msk
