"""Training data: folders of image/label pairs or in-memory arrays, validated, normalised, with
flow targets computed once and cached (in memory, and optionally on disk).

A folder holds ``<id><img_suffix>.<ext>`` images next to ``<id><mask_suffix>.<ext>`` integer
label images (0 = background). Labels are checked: float values that are not whole numbers,
negative ids and a size different from the image's are errors naming the file; gaps in the ids
are renumbered 1..N.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..flows import masks_to_flows
from ..io import IMAGE_EXTENSIONS, imread
from ..preprocess import normalize, to_channels_last

__all__ = [
    "LabelError",
    "Sample",
    "TrainingSet",
    "find_pairs",
    "validate_labels",
    "prepare_image",
    "FlowCache",
]


class LabelError(ValueError):
    """A label image that cannot be used for training; the message names the file and the fix."""


def validate_labels(masks: Any, name: str = "labels", image_shape: tuple[int, int] | None = None
                    ) -> np.ndarray:
    """Check an instance label image and return it as consecutive int32 ids 0..N.

    Raises :class:`LabelError` for non-2D labels, non-integer (float) values, negative ids, or a
    size different from ``image_shape``. Gaps in the ids are renumbered.
    """
    m = np.asarray(masks)
    if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
        m = m.reshape([s for s in m.shape if s != 1] or [1, 1])
    if m.ndim != 2:
        raise LabelError(f"{name}: labels must be a 2D (Y, X) image of instance ids, got shape {m.shape}")
    if m.dtype == bool:
        raise LabelError(
            f"{name}: labels are boolean (a semantic/binary mask); training needs one integer id per "
            "object — label connected components first (e.g. scipy.ndimage.label)"
        )
    if not np.issubdtype(m.dtype, np.number) or np.iscomplexobj(m):
        raise LabelError(f"{name}: labels have dtype {m.dtype}; expected integers")
    if np.issubdtype(m.dtype, np.floating):
        if not np.isfinite(m).all() or not np.array_equal(m, np.round(m)):
            raise LabelError(
                f"{name}: labels are floating point with non-integer values (dtype {m.dtype}); "
                "they look like probabilities or an intensity image, not instance ids. Save labels "
                "as an integer image (0 = background, 1..N = objects)"
            )
    if m.size and m.min() < 0:
        raise LabelError(
            f"{name}: labels contain negative ids (min {m.min()}); use 0 for background and "
            "positive integers for objects"
        )
    if image_shape is not None and tuple(m.shape) != tuple(image_shape):
        raise LabelError(
            f"{name}: label size {m.shape[0]}x{m.shape[1]} differs from the image size "
            f"{image_shape[0]}x{image_shape[1]}; labels must match their image pixel for pixel"
        )
    m = m.astype(np.int64, copy=False)
    ids = np.unique(m)
    ids = ids[ids > 0]
    if len(ids) and (ids[-1] != len(ids)):  # gaps: renumber 1..N
        lut = np.zeros(int(ids[-1]) + 1, dtype=np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return lut[m]
    return m.astype(np.int32)


def prepare_image(image: Any, masks_shape: tuple[int, int], name: str = "image",
                  labels_name: str = "its labels") -> np.ndarray:
    """Image -> normalised (C<=3, H, W) float32 (per-channel 1-99 percentile, as at inference).

    The channel axis is the one whose removal leaves the label shape; RGBA drops alpha.
    """

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[:2] == tuple(masks_shape):
        axis = 2
    elif arr.ndim == 3 and arr.shape[1:] == tuple(masks_shape):
        axis = 0
    elif arr.ndim == 2 and arr.shape == tuple(masks_shape):
        axis = None
    else:
        raise LabelError(
            f"{labels_name}: label size {masks_shape[0]}x{masks_shape[1]} differs from the image "
            f"size of {name} (shape {arr.shape}); labels must match their image pixel for pixel"
        )
    if axis is not None and arr.shape[axis] == 4:
        arr = np.take(arr, [0, 1, 2], axis=axis)  # RGBA -> RGB
    x = to_channels_last(arr, channel_axis=axis, name=name)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise LabelError(f"{name}: image has NaN/Inf pixels; replace them first")
    x = normalize(x.astype(np.float32, copy=False))
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


class FlowCache:
    """Flow targets keyed by the label content: in memory, and as ``.npy`` files in ``folder``."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.mem: dict[str, np.ndarray] = {}

    @staticmethod
    def key(masks: np.ndarray) -> str:
        h = hashlib.sha1(str(masks.shape).encode())
        h.update(np.ascontiguousarray(masks, dtype=np.int32).tobytes())
        return h.hexdigest()

    def get(self, masks: np.ndarray) -> np.ndarray:
        k = self.key(masks)
        if k in self.mem:
            return self.mem[k]
        path = self.folder / f"{k}.npy" if self.folder else None
        flows = None
        if path is not None and path.is_file():
            try:
                flows = np.load(path, allow_pickle=False)
                if flows.shape != (2, *masks.shape):
                    flows = None
            except (OSError, ValueError):
                flows = None
        if flows is None:
            flows = np.asarray(masks_to_flows(masks), dtype=np.float16)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
                np.save(tmp, flows)
                os.replace(tmp, path)
        flows = flows.astype(np.float16, copy=False)
        self.mem[k] = flows
        return flows


@dataclass
class Sample:
    """One training image: normalised (C,H,W) float16 image, int32 labels, (2,H,W) unit flows."""

    name: str
    image: np.ndarray
    masks: np.ndarray
    flows: np.ndarray | None = None
    group: str = ""

    @property
    def n_masks(self) -> int:
        return int(self.masks.max()) if self.masks.size else 0


def find_pairs(folder: str | os.PathLike, img_suffix: str = "_img", mask_suffix: str = "_masks"
               ) -> list[tuple[Path, Path]]:
    """``(image, labels)`` paths of a training folder; an image without labels is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training folder {folder} does not exist")
    files = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    by_stem: dict[str, Path] = {}
    for p in files.values():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(p.stem, p)
    pairs = []
    for stem, p in sorted(by_stem.items()):
        if mask_suffix and stem.endswith(mask_suffix):
            continue
        if img_suffix and not stem.endswith(img_suffix):
            continue
        base = stem[: len(stem) - len(img_suffix)] if img_suffix else stem
        m = by_stem.get(base + mask_suffix)
        if m is None:
            raise FileNotFoundError(
                f"{p}: no label image '{base}{mask_suffix}.*' next to it (set the label suffix with "
                f"--mask-suffix / mask_suffix=, or remove the image)"
            )
        pairs.append((p, m))
    if not pairs:
        raise FileNotFoundError(
            f"{folder}: no '*{img_suffix}.<ext>' images with '*{mask_suffix}.<ext>' labels found "
            "(set img_suffix / mask_suffix)"
        )
    return pairs


@dataclass
class TrainingSet:
    """Validated samples plus their flow targets (computed lazily, once, cached)."""

    samples: list[Sample] = field(default_factory=list)
    cache: FlowCache = field(default_factory=FlowCache)
    skipped: list[str] = field(default_factory=list)
    description: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def groups(self) -> list[str]:
        return sorted({s.group for s in self.samples})

    def flows(self, i: int) -> np.ndarray:
        s = self.samples[i]
        if s.flows is None:
            s.flows = self.cache.get(s.masks)
        return s.flows

    def compute_flows(self, progress: bool = False) -> None:
        it: Iterable[int] = range(len(self))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="flow targets", unit="img")
        for i in it:
            self.flows(i)

    @classmethod
    def build(
        cls,
        source: Any,
        *,
        img_suffix: str = "_img",
        mask_suffix: str = "_masks",
        min_masks: int = 0,
        cache_dir: str | os.PathLike | None = None,
        group: str = "",
        names: Sequence[str] | None = None,
    ) -> TrainingSet:
        """Build from a folder, a list of folders / ``(image_path, label_path)`` pairs /
        ``(image, masks)`` arrays, a dict ``{group: source}`` or a TrainingSet (returned as is)."""
        if isinstance(source, TrainingSet):
            return source
        out = cls(cache=FlowCache(cache_dir))
        out._add(source, img_suffix, mask_suffix, min_masks, group, names)
        if not out.samples:
            raise ValueError(
                f"no usable training images in {out.description or 'the data given'}"
                + (f" ({len(out.skipped)} skipped with < {min_masks} masks)" if out.skipped else "")
            )
        return out

    def _add(self, source, img_suffix, mask_suffix, min_masks, group, names=None) -> None:
        if isinstance(source, Mapping):
            for g, src in source.items():
                self._add(src, img_suffix, mask_suffix, min_masks, str(g))
            return
        if isinstance(source, (str, os.PathLike)):
            self.description.append(str(source))
            for ip, mp in find_pairs(source, img_suffix, mask_suffix):
                self._add_one(imread(ip), imread(mp), str(ip), str(mp), min_masks, group)
            return
        items = list(source)
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                self._add(item, img_suffix, mask_suffix, min_masks, group)
                continue
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"training data item {i}: expected an (image, masks) pair, a folder or a "
                    f"(image_path, mask_path) pair, got {type(item).__name__}"
                )
            img, msk = item
            if isinstance(img, (str, os.PathLike)):
                self._add_one(imread(img), imread(msk), str(img), str(msk), min_masks, group)
            else:
                name = names[i] if names is not None else f"{group + ' ' if group else ''}item {i}"
                self._add_one(img, msk, name, f"{name} (labels)", min_masks, group)
        if items and not isinstance(items[0], (str, os.PathLike)):
            self.description.append(f"{len(items)} arrays" + (f" ({group})" if group else ""))

    def _add_one(self, image, masks, img_name, mask_name, min_masks, group) -> None:
        m = validate_labels(masks, mask_name)
        img = prepare_image(image, m.shape, img_name, mask_name)
        s = Sample(img_name, img.astype(np.float16), m, None, group)
        if s.n_masks < max(min_masks, 1 if min_masks else 0):
            self.skipped.append(img_name)
            return
        self.samples.append(s)
