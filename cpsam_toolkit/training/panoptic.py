"""Training panoptic networks: class files, class targets, the class loss and the loop.

Label images come with ``<id>_classes.json`` files, ``{"<instance id>": "<class name>"}``.
The class target of a pixel is 0 (background) or the 1-based index of its object's class.
It is built from the *augmented* label crop through a per-image lookup table (instance id
-> class index), which is exactly a nearest-neighbour warp of the class map: class values
are never interpolated, and class and instance labels stay aligned pixel for pixel. The
class loss is cross-entropy over the ``1 + K`` maps weighted by the inverse per-pixel class
frequency of the training set; it is added to the segmentation loss through the
``aux_loss`` hook of :func:`cpsam_toolkit.training.train` (see :func:`train_panoptic`).

>>> net = make_panoptic(load_model("cpsam_toolkit_small").net, ["epithelial", "inflammatory"])
>>> train_panoptic(net, "train_folder", "val_folder", out="panoptic.pt")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..io import imread
from ..modes.panoptic import CLASSES_SUFFIX, _check_class_names, object_classes
from ..network.model import CPSAMNet
from .augment import (
    AugmentConfig,
    intensity_augment,
    pad_channels,
    random_affine_crop,
    sample_affine,
    warp,
)
from .data import FlowCache, LabelError, TrainingSet, find_pairs
from .loop import train
from .recipes import get_recipe

__all__ = [
    "ClassFileError",
    "ClassLoss",
    "PanopticData",
    "augment_with_classes",
    "class_lut",
    "class_target",
    "class_weights",
    "load_panoptic",
    "read_classes",
    "train_panoptic",
]


class ClassFileError(LabelError):
    """A class file (``<id>_classes.json``) or class assignment that cannot be used; the message
    names the file and the fix."""


# ============================================================================================
# class files and targets
# ============================================================================================


def read_classes(path: str | os.PathLike) -> dict[int, str]:
    """Read ``{"<instance id>": "<class name>"}`` from a JSON file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ClassFileError(
            f"{path}: class file not found; every label image needs a "
            f"'<id>{CLASSES_SUFFIX}' file next to it mapping instance ids to class names"
        ) from None
    except OSError as e:
        raise ClassFileError(f"{path}: cannot read the class file ({e})") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ClassFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ClassFileError(
            f"{path}: expected a JSON object {{\"<instance id>\": \"<class name>\"}}, got "
            f"{type(d).__name__}"
        )
    out: dict[int, str] = {}
    for k, v in d.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            raise ClassFileError(f"{path}: key {k!r} is not an instance id (an integer)") from None
        if i <= 0:
            raise ClassFileError(f"{path}: instance id {i} must be positive (0 is background)")
        if not isinstance(v, str) or not v:
            raise ClassFileError(f"{path}: class of instance {i} must be a non-empty name, got {v!r}")
        out[i] = v
    return out


def class_lut(
    masks: np.ndarray,
    classes: Mapping[int | str, str],
    class_names: Sequence[str],
    source: str = "classes",
) -> np.ndarray:
    """Lookup table ``lut[instance id] = class index`` (0 = background, k = ``class_names[k-1]``).

    Every instance in ``masks`` must have a class in ``classes`` and every class must be one of
    ``class_names`` (without background); otherwise :class:`ClassFileError` names ``source``.
    Ids in ``classes`` that are not in the image are ignored.
    """
    index = {n: k + 1 for k, n in enumerate(class_names)}
    lookup = {int(k): v for k, v in classes.items()}
    ids = np.unique(np.asarray(masks))
    ids = ids[ids > 0].astype(np.int64)
    missing = [int(i) for i in ids if int(i) not in lookup]
    if missing:
        raise ClassFileError(
            f"{source}: {len(missing)} instance(s) of the label image have no class, e.g. ids "
            f"{missing[:10]}; add them to the class file (or remove them from the labels)"
        )
    unknown = sorted({lookup[int(i)] for i in ids} - set(index))
    if unknown:
        raise ClassFileError(
            f"{source}: class name(s) {unknown} are not among the model's classes "
            f"{list(class_names)}; fix the names or train a model with these classes"
        )
    lut = np.zeros(int(ids.max(initial=0)) + 1, dtype=np.int64)
    for i in ids:
        lut[i] = index[lookup[int(i)]]
    return lut


def class_target(
    masks: np.ndarray,
    classes: Mapping[int | str, str],
    class_names: Sequence[str],
    source: str = "classes",
) -> np.ndarray:
    """Per-pixel class index (uint8; 0 = background) of an instance label image."""
    if len(class_names) > 254:
        raise ValueError("at most 254 object classes are supported")
    m = np.asarray(masks).astype(np.int64, copy=False)
    return class_lut(m, classes, class_names, source)[m].astype(np.uint8)


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights from per-class pixel counts (background first).

    ``w_c = N / ((1 + K) * n_c)``, so a pixel-weighted mean of the weights is 1; a class with no
    pixel gets weight 0 (it cannot appear in a target anyway).
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no pixels to compute class frequencies from")
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, total / (len(counts) * counts), 0.0)
    return w.astype(np.float32)


# ============================================================================================
# training data
# ============================================================================================


@dataclass
class PanopticData:
    """A :class:`~cpsam_toolkit.training.data.TrainingSet` plus one class lookup table per sample
    (``luts[i][instance id]`` = class index of sample i's validated, renumbered labels)."""

    data: TrainingSet
    luts: list[np.ndarray]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.data)

    def class_map(self, i: int) -> np.ndarray:
        """(H, W) uint8 class target of sample ``i`` (0 = background)."""
        return self.luts[i][self.data.samples[i].masks].astype(np.uint8)

    def pixel_counts(self) -> np.ndarray:
        """Pixels of each class (background first) over all samples."""
        n = np.zeros(len(self.class_names) + 1, dtype=np.int64)
        for i in range(len(self)):
            n += np.bincount(self.class_map(i).ravel(), minlength=n.size)[: n.size]
        return n

    def class_weights(self) -> np.ndarray:
        """Inverse per-pixel class frequency over this set (see :func:`class_weights`)."""
        return class_weights(self.pixel_counts())


def _classes_file(mask_path: Path, mask_suffix: str) -> Path:
    stem = mask_path.name[: -len("".join(mask_path.suffixes[-1:]))] if mask_path.suffix else mask_path.name
    base = stem[: -len(mask_suffix)] if mask_suffix and stem.endswith(mask_suffix) else stem
    return mask_path.with_name(base + CLASSES_SUFFIX)


def load_panoptic(
    source: Any,
    class_names: Sequence[str] | None = None,
    *,
    img_suffix: str = "_img",
    mask_suffix: str = "_masks",
    min_masks: int = 0,
    cache_dir: str | os.PathLike | None = None,
    group: str = "",
) -> PanopticData:
    """Images, instance labels and per-instance classes for panoptic training.

    Parameters
    ----------
    source
        A folder of ``<id>_img.*``, ``<id>_masks.*`` and ``<id>_classes.json`` files; a list
        of folders, of ``(image_path, label_path)`` pairs (the class file is found next to the
        label file) or of ``(image, masks, classes)`` triples of arrays and a ``{id: class}``
        dict; or a ``{group: source}`` dict (validation AP is then reported per group).
    class_names
        The object classes in model order; ``None``: the sorted names found in the class files.
    min_masks
        Skip images with fewer objects.
    """

    items: list[tuple[Any, Any, dict, str, str, str]] = []  # image, masks, classes, names, group

    def add(src: Any, grp: str) -> None:
        if isinstance(src, Mapping):
            for g, s in src.items():
                add(s, str(g))
            return
        if isinstance(src, (str, os.PathLike)):
            for ip, mp in find_pairs(src, img_suffix, mask_suffix):
                cf = _classes_file(Path(mp), mask_suffix)
                items.append((ip, mp, read_classes(cf), str(ip), str(cf), grp))
            return
        for k, it in enumerate(src):
            if isinstance(it, (str, os.PathLike)) and Path(it).is_dir():
                add(it, grp)
            elif isinstance(it, (tuple, list)) and len(it) == 2:
                ip, mp = it
                cf = _classes_file(Path(mp), mask_suffix)
                items.append((ip, mp, read_classes(cf), str(ip), str(cf), grp))
            elif isinstance(it, (tuple, list)) and len(it) == 3:
                img, msk, cls = it
                name = f"{grp + ' ' if grp else ''}item {k}"
                items.append((img, msk, dict(cls), name, f"{name} (classes)", grp))
            else:
                raise TypeError(
                    f"panoptic data item {k}: expected a folder, an (image_path, label_path) pair "
                    f"or an (image, masks, classes) triple, got {type(it).__name__}"
                )

    add(source, group)
    if not items:
        raise ValueError("no panoptic training images given")
    if class_names is None:
        class_names = sorted({c for it in items for c in it[2].values()})
    names = _check_class_names(class_names)

    data = TrainingSet(cache=FlowCache(cache_dir))
    luts: list[np.ndarray] = []
    for img, msk, cls, name, cname, grp in items:
        # labels are validated (and renumbered if ids have gaps) by TrainingSet, whose errors
        # name the label file; class targets are built from the original instance ids
        one = TrainingSet.build([(img, msk)], names=[name], min_masks=0)
        s = one.samples[0]
        s.name, s.group = name, grp
        raw = np.asarray(imread(msk) if isinstance(msk, (str, os.PathLike)) else msk)
        if raw.ndim == 3 and 1 in (raw.shape[0], raw.shape[-1]):
            raw = raw.reshape([d for d in raw.shape if d != 1] or [1, 1])
        target = class_target(raw.astype(np.int64), cls, names, cname)
        m = s.masks
        lut = np.zeros(int(m.max(initial=0)) + 1, dtype=np.int64)
        lut[m.ravel()] = target.ravel()
        if np.any(lut[m] != target):  # cannot happen with one class per instance
            raise ClassFileError(f"{cname}: inconsistent classes within an instance")
        if s.n_masks < min_masks:
            data.skipped.append(name)
            continue
        data.samples.append(s)
        luts.append(lut)
    if not data.samples:
        raise ValueError(f"no usable panoptic training images ({len(data.skipped)} skipped with "
                         f"< {min_masks} masks)")
    data.description.append(f"{len(data.samples)} panoptic images" +
                            (f" ({', '.join(sorted({i[5] for i in items if i[5]}))})"
                             if any(i[5] for i in items) else ""))
    return PanopticData(data, luts, names)


def augment_with_classes(
    image: np.ndarray,
    masks: np.ndarray,
    flows: np.ndarray,
    class_map: np.ndarray,
    rng: np.random.Generator,
    cfg: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~cpsam_toolkit.training.augment.augment_sample` that also carries a class map.

    The class map goes through the same affine map as the labels with nearest-neighbour
    sampling (values outside the image become 0 = background), so it stays integral and
    aligned with the masks. Draws the same random numbers as ``augment_sample``, so for the
    same ``rng`` state image, flows and masks are identical to it.

    Returns ``(image (3,S,S), flows (2,S,S), masks (S,S), class_map (S,S))``.
    """
    cfg = AugmentConfig() if cfg is None else cfg
    aff = sample_affine(masks.shape, rng, cfg)
    img, msk, flw = random_affine_crop(pad_channels(image), masks, flows, rng, cfg, aff=aff)
    cls = warp(np.asarray(class_map), aff, order=0)
    img = intensity_augment(img, rng, cfg)
    return img.astype(np.float32, copy=False), flw, msk, cls


# ============================================================================================
# loss and training
# ============================================================================================


class ClassLoss:
    """The class term of the panoptic loss, for :func:`cpsam_toolkit.training.train`'s
    ``aux_loss`` hook: weighted cross-entropy of the ``1 + K`` class maps (``y[:, :1+K]``)
    against ``luts[i][augmented label crop]`` (a nearest-neighbour warp of the class map).

    ``history`` keeps every step's value (for reports).
    """

    def __init__(self, luts: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray,
                 weight: float = 1.0) -> None:
        self.luts = list(luts)
        self.weights = np.asarray(weights, dtype=np.float32)
        self.weight = float(weight)
        self.history: list[float] = []

    @property
    def n_maps(self) -> int:
        return int(self.weights.size)

    def targets(self, idx: Sequence[int], masks: Sequence[np.ndarray]) -> np.ndarray:
        """(B, S, S) int64 class targets of augmented label crops of samples ``idx``."""
        return np.stack([self.luts[int(i)][np.asarray(m).astype(np.int64)]
                         for i, m in zip(idx, masks, strict=True)])

    def loss(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nc = self.n_maps
        if y.shape[1] != nc + 3:
            raise ValueError(
                f"the network has {y.shape[1]} output maps but the class loss expects "
                f"{nc} class maps + 3 (make the network with make_panoptic)"
            )
        w = torch.as_tensor(self.weights, device=y.device)
        return F.cross_entropy(y[:, :nc].float(), target.long(), weight=w)

    def __call__(self, y: torch.Tensor, idx: Sequence[int], masks: Sequence[np.ndarray]) -> torch.Tensor:
        t = torch.from_numpy(self.targets(idx, masks)).to(y.device)
        val = self.loss(y, t)
        self.history.append(float(val.detach()))
        return self.weight * val


def train_panoptic(
    net: CPSAMNet,
    train_data: Any,
    val_data: Any = None,
    *,
    class_weights: Sequence[float] | None = None,
    img_suffix: str = "_img",
    mask_suffix: str = "_masks",
    loss_weight: float = 1.0,
    meta: dict[str, Any] | None = None,
    **train_kwargs: Any,
):
    """Train a panoptic network (from :func:`make_panoptic`) with
    :func:`cpsam_toolkit.training.train`, adding the class loss.

    ``train_data`` / ``val_data`` are anything :func:`load_panoptic` accepts (or
    :class:`PanopticData`); class weights default to the inverse per-pixel class frequencies of
    the training set. Other keyword arguments go to ``train`` (``recipe``, ``out``, ``epochs``,
    ...). The loop's validation (loss and AP@0.5 that pick the best checkpoint) is about the
    masks; use :func:`evaluate_panoptic` for class metrics. Returns the ``TrainResult``, with
    the class loss of every step in ``result.class_loss``.
    """
    names = object_classes(net)
    if not names:
        raise ValueError(
            "train_panoptic needs a network with class maps: make one with "
            "make_panoptic(net, class_names)"
        )
    run = train_kwargs.get("run_dir") or (
        Path(str(train_kwargs["out"]) + ".run") if train_kwargs.get("out") else None)
    cache = Path(run) / "flows" if run is not None else None
    rec = get_recipe(train_kwargs.get("recipe", "finetune"))
    min_masks = train_kwargs.get("min_masks")
    min_masks = rec.min_masks if min_masks is None else min_masks

    def load(src, mm):
        if isinstance(src, PanopticData):
            if tuple(src.class_names) != names:
                raise ValueError(f"data classes {src.class_names} differ from the network's {names}")
            return src
        return load_panoptic(src, names, img_suffix=img_suffix, mask_suffix=mask_suffix,
                             min_masks=mm, cache_dir=cache)

    tr = load(train_data, min_masks)
    va = load(val_data, 1) if val_data is not None else None
    w = np.asarray(class_weights, np.float32) if class_weights is not None else tr.class_weights()
    if w.shape != (len(names) + 1,):
        raise ValueError(f"class_weights needs {len(names) + 1} values (background first), got {w.shape}")
    aux = ClassLoss(tr.luts, w, loss_weight)
    m = {"class_names": list(names), "class_weights": [float(x) for x in w],
         "class_pixel_counts": [int(x) for x in tr.pixel_counts()], **(meta or {})}
    result = train(net, tr.data, va.data if va is not None else None, aux_loss=aux, meta=m,
                   **train_kwargs)
    result.class_loss = aux.history
    return result


