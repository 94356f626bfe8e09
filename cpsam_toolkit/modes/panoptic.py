"""Panoptic mode: instance masks plus one class per object (paper, Methods, "Semantic
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

Inference
    Masks come from flows and cell probability as usual; each pixel takes the class map with
    the largest value, and each mask the class with the most pixels inside it (ties go to the
    lower index, so a tie with background removes the mask). Masks whose majority is background
    are removed and the rest renumbered 1..N. :meth:`CellposeSAM.segment` returns a
    :class:`PanopticResult` for a network with classes (``.classes``, ``.class_image``, ...).

Training lives in :mod:`cpsam_toolkit.training.panoptic`, class scoring in
:func:`cpsam_toolkit.evaluate.evaluate_panoptic`; :mod:`cpsam_toolkit.panoptic` re-exports all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.options import MaskOptions
from ..core.postprocess import masks_from_flows, object_table, select_objects
from ..core.result import SegmentationResult
from ..io import write_atomic
from ..network import registry
from ..network.config import NetConfig, get_config
from ..network.model import CPSAMNet

__all__ = [
    "BACKGROUND",
    "CLASSES_SUFFIX",
    "PanopticResult",
    "assign_classes",
    "class_object_names",
    "is_panoptic",
    "iter_panoptic",
    "make_panoptic",
    "measurement_features",
    "measurement_values",
    "model_class_names",
    "object_classes",
    "panoptic_result",
    "save_classes_json",
    "split_by_class",
]

#: name of class map 0
BACKGROUND = "background"
CLASSES_SUFFIX = "_classes.json"


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

    def select(self, keep: np.ndarray) -> PanopticResult:
        """Only some objects (see :meth:`SegmentationResult.select`); classes follow them."""
        masks, table = select_objects(self.masks, self.objects, keep)
        new = PanopticResult(masks, self.flows, self.cellprob, options=self.options, name=self.name,
                             class_names=self.class_names, pixel_classes=self.pixel_classes,
                             class_ids=table["class_id"], class_fraction=table["class_fraction"],
                             n_removed=self.n_removed)
        new.__dict__["objects"] = table
        return new

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


def save_classes_json(path: str | os.PathLike, result: PanopticResult) -> Path:
    """Write ``{"<label>": "<class>"}`` for every object (the ``<id>_classes.json`` format),
    atomically."""
    text = json.dumps({str(k): v for k, v in result.class_dict.items()}, indent=1) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _measurement_name(class_name: str) -> str:
    """A class name reduced to letters, digits and ``_`` (CellProfiler measurement/object names)."""
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




def iter_panoptic(
    outputs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    options: MaskOptions,
    names: Sequence[str] | None = None,
) -> Iterator[PanopticResult]:
    """Results from a predictor's ``(flows, cellprob, class maps)`` stream, in input order."""
    for i, out in enumerate(outputs):
        name = names[i] if names is not None and i < len(names) else None
        yield panoptic_result(*out, class_names, options, name)
