"""Panoptic Cellpose-SAM: instance masks plus one class per object (paper, Methods, "Semantic
segmentation training and evaluation").

Network
    :func:`make_panoptic` adds ``1 + K`` class maps (background first, then the K object
    classes) in front of ``[dY, dX, cellprob]``, so the output is
    ``[background, class_1 .. class_K, dY, dX, cellprob]`` (``nout = 3 + 1 + K``, the layout of
    the reference's semantic variant). The class readout starts from the cell-probability
    readout, multiplied by -0.5 for the background map and by +0.5 for every class map; the
    flow and cell-probability readouts and the encoder are copied unchanged, so at
    initialisation the segmentation outputs equal the base network's. The class names are
    stored in ``NetConfig.class_names`` (``("background", *classes)``), so a checkpoint written
    by :func:`~cpsam_toolkit.network.checkpoints.save_checkpoint` reloads with them.

Training
    Label images come with ``<id>_classes.json`` files, ``{"<instance id>": "<class name>"}``.
    The class target of a pixel is 0 (background) or the 1-based index of its object's class.
    It is built from the *augmented* label crop through a per-image lookup table (instance id
    -> class index), which is exactly a nearest-neighbour warp of the class map: class values
    are never interpolated, and class and instance labels stay aligned pixel for pixel. The
    class loss is cross-entropy over the ``1 + K`` maps weighted by the inverse per-pixel class
    frequency of the training set; it is added to the segmentation loss through the
    ``aux_loss`` hook of :func:`cpsam_toolkit.training.train` (see :func:`train_panoptic`).

Inference
    Masks come from flows and cell probability as usual; each pixel takes the class map with
    the largest value, and each mask the class with the most pixels inside it (ties go to the
    lower index, so a tie with background removes the mask). Masks whose majority is background
    are removed and the rest renumbered 1..N. :meth:`CellposeSAM.segment` returns a
    :class:`PanopticResult` for a network with classes (``.classes``, ``.class_image``, ...).

>>> net = make_panoptic(load_model("cpsam_toolkit_small").net, ["epithelial", "inflammatory"])
>>> train_panoptic(net, "train_folder", "val_folder", out="panoptic.pt")
>>> res = segment_panoptic(load_model("panoptic.pt"), image)
>>> res.masks, res.classes, res.class_image
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .network.config import NetConfig, get_config
from .network.model import CPSAMNet
from .segment import MaskOptions, SegmentationResult, masks_from_flows, object_table
from .training.data import FlowCache, LabelError, TrainingSet

__all__ = [
    "BACKGROUND",
    "ClassFileError",
    "ClassLoss",
    "PanopticData",
    "PanopticResult",
    "assign_classes",
    "augment_with_classes",
    "class_lut",
    "class_object_names",
    "class_target",
    "class_weights",
    "evaluate_panoptic",
    "is_panoptic",
    "load_panoptic",
    "make_panoptic",
    "measurement_features",
    "measurement_values",
    "model_class_names",
    "object_classes",
    "panoptic_result",
    "read_classes",
    "save_classes_json",
    "segment_panoptic",
    "split_by_class",
    "train_panoptic",
]

#: name of class map 0
BACKGROUND = "background"
CLASSES_SUFFIX = "_classes.json"


class ClassFileError(LabelError):
    """A class file (``<id>_classes.json``) or class assignment that cannot be used; the message
    names the file and the fix."""


# ============================================================================================
# network
# ============================================================================================


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a list of names, not the string {class_names!r}")
    names = tuple(class_names)
    if not names:
        raise ValueError("class_names is empty: a panoptic network needs at least one object class")
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"class names must be non-empty strings, got {n!r}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be unique; repeated: {dup}")
    if any(n.lower() == BACKGROUND for n in names):
        raise ValueError(
            f"{BACKGROUND!r} is reserved for class map 0 (added automatically); leave it out of "
            "class_names"
        )
    return names


def is_panoptic(net_or_model: Any) -> bool:
    """Whether a network / model / config has class maps."""
    return bool(object_classes(net_or_model))


def object_classes(net_or_model: Any) -> tuple[str, ...]:
    """The K object class names (without background) of a panoptic network, model or config;
    ``()`` for a plain one."""
    cfg = net_or_model
    if hasattr(cfg, "net"):  # CellposeSAM
        cfg = cfg.net
    if isinstance(cfg, CPSAMNet):
        cfg = cfg.cfg
    if not isinstance(cfg, NetConfig):
        raise TypeError(f"expected a CPSAMNet, CellposeSAM or NetConfig, got {type(net_or_model).__name__}")
    names = tuple(cfg.class_names)
    if not names:
        return ()
    if cfg.nout != 3 + len(names):
        raise ValueError(
            f"inconsistent network config: {len(names)} class names {names} but nout={cfg.nout} "
            f"(expected {3 + len(names)})"
        )
    return names[1:]


def make_panoptic(
    net_or_cfg: CPSAMNet | NetConfig | str | dict,
    class_names: Sequence[str],
    *,
    seed: int = 0,
) -> CPSAMNet:
    """A network with background + K class maps in front of ``[dY, dX, cellprob]``.

    Parameters
    ----------
    net_or_cfg
        A trained :class:`CPSAMNet` to start from (its encoder, flow and cell-probability
        readouts are copied; a panoptic net is re-headed with the new classes), or a config /
        preset name for a randomly initialised network (seeded by ``seed``).
    class_names
        The K object classes, in the order of their maps (``"background"`` is added first).

    Returns
    -------
    CPSAMNet
        A new network (the input is not modified) on the input's device and dtype, with
        ``cfg.nout = 4 + K`` and ``cfg.class_names = ("background", *class_names)``. Class
        readout = cell-probability readout (weights and bias) x -0.5 for background and x 0.5
        for every class, as in the paper.
    """
    names = _check_class_names(class_names)
    if isinstance(net_or_cfg, CPSAMNet):
        base = net_or_cfg
    else:
        cfg0 = get_config(net_or_cfg).replace(nout=3, class_names=())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = CPSAMNet(cfg0)
    p2 = base.cfg.patch**2
    cfg = base.cfg.replace(nout=3 + 1 + len(names), class_names=(BACKGROUND, *names))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CPSAMNet(cfg)
    src = base.state_dict()
    state: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        if k in ("out.weight", "out.bias", "W2"):
            state[k] = v  # W2 is the fixed pixel-shuffle identity of the new size
        else:
            state[k] = src[k].detach().clone()
    w = base.out.weight.detach().float().cpu()
    b = base.out.bias.detach().float().cpu()
    cp_w, cp_b = w[-p2:], b[-p2:]
    state["out.weight"] = torch.cat([-0.5 * cp_w] + [0.5 * cp_w] * len(names) + [w[-3 * p2 :]])
    state["out.bias"] = torch.cat([-0.5 * cp_b] + [0.5 * cp_b] * len(names) + [b[-3 * p2 :]])
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    net.encoder.layer_drop = getattr(base.encoder, "layer_drop", net.encoder.layer_drop)
    return net.to(device=base.device, dtype=base.dtype).train(base.training)


def model_class_names(name_or_path: str | os.PathLike | None) -> tuple[str, ...]:
    """Object class names recorded in a weights file (or registered name), without loading the
    network; ``()`` for plain models, unknown names and files not on this machine.

    Cheap (memory-mapped read, cached per file size and modification time): meant for callers
    that must declare outputs before segmenting (e.g. CellProfiler measurement columns).
    """
    try:
        from .network import registry

        path = registry.resolve_weights(name_or_path, download=False, progress=False, verify=False)
        st = path.stat()
    except Exception:  # noqa: BLE001 - not resolvable here: no classes to declare
        return ()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CLASS_NAME_CACHE:
        names: tuple[str, ...] = ()
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
                cn = tuple(obj["config"].get("class_names") or ())
                names = tuple(str(n) for n in cn[1:])
        except Exception:  # noqa: BLE001 - unreadable files fail later, with a real message
            names = ()
        _CLASS_NAME_CACHE[key] = names
    return _CLASS_NAME_CACHE[key]


_CLASS_NAME_CACHE: dict[tuple, tuple[str, ...]] = {}


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
    from .io import imread
    from .training.data import find_pairs

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
    from .training.augment import (
        AugmentConfig,
        intensity_augment,
        pad_channels,
        random_affine_crop,
        sample_affine,
        warp,
    )

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
    from .training import train
    from .training.recipes import get_recipe

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


# ============================================================================================
# inference
# ============================================================================================


def assign_classes(
    masks: np.ndarray, pixel_classes: np.ndarray, n_maps: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Majority vote of per-pixel classes inside each mask; background-majority masks removed.

    Parameters
    ----------
    masks
        (Y, X) labels 1..N (0 = background).
    pixel_classes
        (Y, X) per-pixel class index (argmax over the class maps; 0 = background).
    n_maps
        Number of class maps (1 + K); default ``pixel_classes.max() + 1``.

    Returns
    -------
    masks, class_ids, fraction, n_removed
        Relabelled masks (1..M, same dtype), the class index 1..K of each kept mask, the
        fraction of its pixels that voted for that class, and how many masks were removed.
        Ties go to the lower class index (so a tie with background removes the mask).
    """
    masks = np.asarray(masks)
    pc = np.asarray(pixel_classes).astype(np.int64)
    if masks.shape != pc.shape:
        raise ValueError(f"masks {masks.shape} and pixel classes {pc.shape} differ in shape")
    nc = int(n_maps) if n_maps is not None else int(pc.max(initial=0)) + 1
    n = int(masks.max(initial=0))
    if n == 0:
        return masks.copy(), np.zeros(0, np.int64), np.zeros(0), 0
    lab = masks.ravel().astype(np.int64)
    counts = np.bincount(lab * nc + pc.ravel(), minlength=(n + 1) * nc).reshape(n + 1, nc)[1:]
    area = counts.sum(1)
    winner = counts.argmax(1)
    present = area > 0
    keep = present & (winner > 0)
    lut = np.zeros(n + 1, dtype=masks.dtype)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    out = lut[masks]
    ids = winner[keep].astype(np.int64)
    frac = counts[keep, ids] / area[keep]
    return out, ids, frac, int((present & ~keep).sum())


@dataclass
class PanopticResult(SegmentationResult):
    """A :class:`~cpsam_toolkit.segment.SegmentationResult` with one class per object.

    Attributes
    ----------
    class_names : tuple of str
        Names of the class maps, background first.
    pixel_classes : (Y, X) uint8
        Per-pixel argmax of the class maps (0 = background).
    class_ids : (N,) int64
        Class index (1..K) of masks 1..N.
    class_fraction : (N,) float64
        Fraction of each mask's pixels whose argmax is its class (a confidence).
    n_removed : int
        Masks removed because most of their pixels were background.
    """

    class_names: tuple[str, ...] = ()
    pixel_classes: np.ndarray | None = None
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_removed: int = 0

    @property
    def classes(self) -> list[str]:
        """Class name of each object (index i for label i+1)."""
        return [self.class_names[int(k)] for k in self.class_ids]

    @property
    def class_dict(self) -> dict[int, str]:
        """``{label: class name}`` (the content of ``<stem>_classes.json``)."""
        return {i + 1: c for i, c in enumerate(self.classes)}

    @property
    def class_image(self) -> np.ndarray:
        """(Y, X) uint8: the class index of the object at each pixel (0 = background)."""
        lut = np.zeros(len(self.class_ids) + 1, dtype=np.uint8)
        lut[1:] = self.class_ids
        return lut[np.asarray(self.masks).astype(np.int64)]

    @cached_property
    def objects(self) -> dict[str, np.ndarray]:
        """The plain object table plus ``class_id`` (1..K) and ``class_fraction``."""
        table = object_table(self.masks, self.flows, self.cellprob)
        table["class_id"] = np.asarray(self.class_ids, np.int64)
        table["class_fraction"] = np.asarray(self.class_fraction, np.float64)
        return table

    def recompute(self, **changes: Any) -> PanopticResult:
        """New result from the cached flows and class maps with other post-processing settings
        (the masks as :meth:`SegmentationResult.recompute` makes them, then the class vote)."""
        base = SegmentationResult.recompute(self, **changes)
        out = _build(base.masks, self.flows, self.cellprob, self.pixel_classes, self.class_names,
                     base.options, self.name)
        if hasattr(base, "_stages"):  # share the tracking cache of the plain result
            out._stages = base._stages
        return out


def _build(raw, flows, cellprob, pixel_classes, class_names, opts, name) -> PanopticResult:
    masks, ids, frac, removed = assign_classes(raw, pixel_classes, len(class_names))
    return PanopticResult(masks, flows, cellprob, options=opts, name=name,
                          class_names=tuple(class_names), pixel_classes=pixel_classes,
                          class_ids=ids, class_fraction=frac, n_removed=removed)


def panoptic_result(
    flows: np.ndarray,
    cellprob: np.ndarray,
    class_logits: np.ndarray,
    class_names: Sequence[str],
    options: MaskOptions = MaskOptions(),
    name: str | None = None,
) -> PanopticResult:
    """Masks from flows, then classes from the ``(1+K, Y, X)`` class maps (background first)."""
    class_logits = np.asarray(class_logits)
    if class_logits.shape[0] != len(class_names):
        raise ValueError(f"{class_logits.shape[0]} class maps but {len(class_names)} class names")
    raw = masks_from_flows(flows, cellprob, options)
    pixel = np.argmax(class_logits, axis=0).astype(np.uint8)
    return _build(raw, flows, cellprob, pixel, class_names, options, name)


def segment_panoptic(model: Any, image: Any, **kwargs: Any) -> PanopticResult | list[PanopticResult]:
    """Segment with a panoptic model: :meth:`CellposeSAM.segment` (same arguments), which returns
    :class:`PanopticResult` for a network with class maps. ``model`` may be a model object or a
    name/path for :func:`cpsam_toolkit.load_model`."""
    if not hasattr(model, "segment"):
        from .segment import load_model

        model = load_model(model)
    if not is_panoptic(model):
        raise ValueError(
            f"model {getattr(model, 'name', '?')!r} has no class maps (it is a plain segmentation "
            "model); train a panoptic one with make_panoptic + train_panoptic"
        )
    return model.segment(image, **kwargs)


def save_classes_json(path: str | os.PathLike, result: PanopticResult) -> Path:
    """Write ``{"<label>": "<class>"}`` for every object (the ``<id>_classes.json`` format),
    atomically."""
    from .io import write_atomic

    text = json.dumps({str(k): v for k, v in result.class_dict.items()}, indent=1) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _measurement_name(class_name: str) -> str:
    """A class name reduced to letters, digits and ``_`` (CellProfiler measurement/object names)."""
    import re

    return re.sub(r"[^0-9A-Za-z_]", "_", class_name)


def measurement_features(class_names: Sequence[str]) -> list[str]:
    """Per-object feature names for the classes (used by the CellProfiler module, after its
    ``CellposeSAM_`` category): ``ClassNumber`` (1..K) and one 0/1 ``Class_<name>`` per class
    (names reduced to letters, digits and ``_``)."""
    return ["ClassNumber", *[f"Class_{_measurement_name(n)}" for n in class_names]]


def measurement_values(class_ids: np.ndarray, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``{feature: (N,) float64}`` for :func:`measurement_features` from per-object class
    numbers (1..K; NaN or 0 where unknown, which gives NaN in every feature)."""
    ids = np.asarray(class_ids, dtype=np.float64).ravel()
    known = np.isfinite(ids) & (ids > 0)
    feats = measurement_features(class_names)
    out = {feats[0]: np.where(known, ids, np.nan)}
    for k, f in enumerate(feats[1:], start=1):
        out[f] = np.where(known, (ids == k).astype(np.float64), np.nan)
    return out


def class_object_names(objects_name: str, class_names: Sequence[str]) -> list[str]:
    """Names of the per-class object sets: ``<objects>_<class>`` (e.g. ``Nuclei_epithelial``),
    class names reduced to letters, digits and ``_`` as in :func:`measurement_features`."""
    return [f"{objects_name}_{_measurement_name(n)}" for n in class_names]


def split_by_class(labels: np.ndarray, class_ids: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """One label image per class from an object label image and its objects' classes.

    Parameters
    ----------
    labels : (Y, X) or (Z, Y, X) int array
        Objects 1..N (0 = background).
    class_ids : (N,) array
        Class number 1..K of object ``i + 1``; 0 or NaN where unknown (such objects go in no set).
    n_classes : int
        K.

    Returns
    -------
    list of K int32 arrays shaped like ``labels``: class ``k``'s objects renumbered 1..n_k in the
    order of their labels in ``labels``.
    """
    lab = np.asarray(labels)
    ids = np.asarray(class_ids, dtype=np.float64).ravel()
    n = int(lab.max(initial=0))
    if ids.size != n:
        raise ValueError(f"split_by_class: {ids.size} class ids for {n} objects (labels 1..{n})")
    ids = np.where(np.isfinite(ids), ids, 0).astype(np.int64)
    out = []
    for k in range(1, int(n_classes) + 1):
        lut = np.zeros(n + 1, np.int32)
        members = np.flatnonzero(ids == k) + 1
        lut[members] = np.arange(1, members.size + 1, dtype=np.int32)
        out.append(lut[lab])
    return out


# ============================================================================================
# evaluation
# ============================================================================================


def evaluate_panoptic(
    masks_true: Sequence[np.ndarray],
    classes_true: Sequence[Mapping[int | str, str]],
    masks_pred: Sequence[np.ndarray],
    classes_pred: Sequence[Mapping[int | str, str]],
    thresholds: float | Sequence[float] = (0.5,),
) -> dict[str, Any]:
    """Per-class instance metrics (a prediction only matches a true object of its class).

    Returns a JSON-ready dict with, at each threshold:

    * ``class_mean``: the paper's convention, per image the mean over the classes present in
      its ground truth, then the mean over images (``ap``, ``error_rate``, ...);
    * ``per_class[c]``: mean over the images that contain class ``c`` (``ap``, ``error_rate``,
      ``n_images``), and ``pooled`` counts (``tp``, ``fp``, ``fn``, pooled ``ap``);
    * ``class_agnostic``: plain instance AP (mean per image);
    * ``classification_accuracy``: among true objects matched (IoU >= the first threshold)
      to a prediction regardless of class, the fraction whose predicted class is right.
    """
    from . import metrics as M

    if not (len(masks_true) == len(classes_true) == len(masks_pred) == len(classes_pred)):
        raise ValueError("masks_true, classes_true, masks_pred and classes_pred must be equally long")
    th = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    per_images = [M.matching_per_class(t, p, ct, cp, th)
                  for t, p, ct, cp in zip(masks_true, masks_pred, classes_true, classes_pred, strict=True)]
    agg = M.aggregate_classes(per_images)
    plain = M.aggregate([M.matching(t, p, th) for t, p in zip(masks_true, masks_pred, strict=True)],
                        "mean_per_image")
    right = total = 0
    for t, p, ct, cp in zip(masks_true, masks_pred, classes_true, classes_pred, strict=True):
        tl, pl, _ = M.match_pairs(t, p, float(th[0]))
        ctd = {int(k): v for k, v in ct.items()}
        cpd = {int(k): v for k, v in cp.items()}
        total += len(tl)
        right += sum(ctd.get(int(a)) == cpd.get(int(b)) for a, b in zip(tl, pl, strict=True))

    def plain_list(x):
        return [float(v) for v in np.atleast_1d(x)]

    cm = agg["class_mean_per_image"]
    out: dict[str, Any] = {
        "thresholds": plain_list(th),
        "n_images": len(masks_true),
        "class_mean": {k: plain_list(cm[k]) for k in ("ap", "error_rate", "precision", "recall", "f1", "pq")},
        "per_class": {},
        "class_agnostic": {k: plain_list(plain[k]) for k in ("ap", "error_rate")},
        "classification_accuracy": (right / total) if total else float("nan"),
        "n_matched": int(total),
    }
    for c, pooled in agg["per_class_pooled"].items():
        mean = agg["per_class_mean_per_image"].get(c)
        out["per_class"][c] = {
            "ap": plain_list(mean["ap"]) if mean else None,
            "error_rate": plain_list(mean["error_rate"]) if mean else None,
            "n_images": int(mean["n_images"]) if mean else 0,
            "tp": [int(v) for v in np.atleast_1d(pooled["tp"])],
            "fp": [int(v) for v in np.atleast_1d(pooled["fp"])],
            "fn": [int(v) for v in np.atleast_1d(pooled["fn"])],
            "ap_pooled": plain_list(pooled["ap"]),
        }
    return out
