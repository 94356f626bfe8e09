"""The public model object: load weights once, segment images or lists of images.

The API layer: :class:`CellposeSAM` is a :class:`~cpsam_toolkit.core.predictor.Predictor`
with a name, its file's recommended :class:`~cpsam_toolkit.settings.Settings`, and
:meth:`CellposeSAM.segment`, the one place that picks a mode (planar 2D, panoptic, volume).
Everything else lives below it (``core/``, ``modes/``); the names that used to be defined here
are re-exported.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core.options import (
    InputOptions,
    MaskOptions,
    NetOptions,
    options_dict,
    scale_niter,
    settings_from_options,
    split_settings,
)
from .core.postprocess import masks_from_flows, object_table, staged_masks, tracked_masks
from .core.predictor import Predictor, run_with_oom_fallback
from .core.predictor import is_oom as _is_oom  # noqa: F401 - former private names
from .core.predictor import resize_maps as _resize  # noqa: F401
from .core.result import SegmentationResult
from .core.size import SizeModel, dark_background, size_features
from .modes.blocks import BlockPlan, choose_blocks, host_memory_budget, segment_in_blocks
from .modes.panoptic import PanopticResult, is_panoptic, iter_panoptic
from .modes.planar import iter_planar
from .modes.volume import segment_3d
from .network import registry
from .network.checkpoints import load_checkpoint
from .network.model import CPSAMNet
from .preprocess import to_channels_last
from .settings import Settings

log = logging.getLogger("cpsam_toolkit")

__all__ = [
    "CellposeSAM", "InputOptions", "MaskOptions", "NetOptions", "SegmentationResult", "Settings",
    "default_model_name", "load_model", "masks_from_flows", "object_table", "options_dict",
    "run_with_oom_fallback", "segment_panoptic", "settings_from_options", "split_settings",
    "staged_masks", "tracked_masks",
]


class CellposeSAM(Predictor):
    """A Cellpose-SAM network ready for inference on one device.

    Parameters
    ----------
    net : CPSAMNet
        The network (moved to ``device``/``dtype`` and put in eval mode).
    device, dtype : optional
        See :func:`cpsam_toolkit.device.resolve_device` / ``resolve_dtype``.
    name : str
        Name shown to users (registry name or file name).
    info : dict, optional
        Where the weights came from (path, format, config, recommended_settings, ...).
    """

    def __init__(
        self,
        net: CPSAMNet,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        name: str = "custom",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(net, device=device, dtype=dtype)
        self.name = name
        self.info = dict(info or {})

    @property
    def settings(self) -> Settings:
        """Default settings with the model file's ``recommended_settings`` applied (source
        ``"model"``); what :meth:`segment` uses unless told otherwise."""
        rec = dict(self.info.get("recommended_settings") or {})
        if rec.get("diameter") == "auto" and not self.info.get("size_model"):
            log.warning("cpsam: %s recommends diameter='auto' but has no size model; using no resizing",
                        self.name)
            del rec["diameter"]
        return Settings.from_model(rec)

    @property
    def size_model(self) -> SizeModel | None:
        """The model file's :class:`~cpsam_toolkit.core.size.SizeModel` (``info["size_model"]``),
        which ``diameter="auto"`` uses; None when the file has none."""
        d = self.info.get("size_model")
        return SizeModel.from_dict(d) if d else None

    def estimate_diameter(
        self, image: np.ndarray, inputs: InputOptions = InputOptions(), name: str = "image"
    ) -> float:
        """Median object diameter (px) of a 2D ``image``, from the model's size model.

        Raises ``ValueError`` for a model without one (e.g. the official weights, which are
        size-invariant: leave ``diameter`` None or give it in pixels)."""
        return self._size_estimate(image, inputs, name)[0]

    def _size_estimate(self, image: np.ndarray, inputs: InputOptions, name: str) -> tuple[float, bool]:
        """(median object diameter in px, dark background?) of a 2D image."""
        sm = self.size_model
        if sm is None:
            raise ValueError(
                f"diameter='auto' needs a model with a size model, and {self.name!r} has none; "
                "give the median object diameter in pixels, or None for no resizing "
                "(Cellpose-SAM's official weights need none)")
        x = self._prepare(image, replace(inputs, diameter=None), name)
        est = sm.predict(size_features(self.net.encoder, x, self.net.cfg.tile, sm.crop,
                                       self.device, self.dtype))
        return est, dark_background(x)

    def resolve_inputs(
        self, image: np.ndarray, inputs: InputOptions, name: str = "image"
    ) -> InputOptions:
        """``inputs`` with ``diameter="auto"`` replaced by the resizing it stands for on this
        2D ``image`` (px, or None for none; see :meth:`SizeModel.resize_diameter`); other
        inputs are returned unchanged."""
        if inputs.diameter != "auto":
            return inputs
        est, dark = self._size_estimate(image, inputs, name)
        d = self.size_model.resize_diameter(est, dark)
        log.info("cpsam: %s: diameter=auto: objects about %.0f px%s -> %s", name, est,
                 " (dark background)" if dark else "", f"resized by {30.0 / d:.2f}" if d else "not resized")
        return replace(inputs, diameter=d)

    def __repr__(self) -> str:
        c = self.net.cfg
        return (
            f"CellposeSAM(name={self.name!r}, width={c.width}, depth={c.depth}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    # -- modes -----------------------------------------------------------------------------
    def iter_segment(
        self,
        images: Iterable[np.ndarray],
        inputs: InputOptions = InputOptions(),
        net: NetOptions = NetOptions(),
        masks: MaskOptions = MaskOptions(),
        names: Sequence[str] | None = None,
        progress: bool | Callable[[int], None] = False,
    ) -> Iterator[SegmentationResult]:
        """Stream 2D results in input order (for folders and plates): the planar mode, or
        the panoptic mode for a network with class maps.

        An image whose whole-image segmentation would need more host memory than
        ``net.host_memory`` allows (:func:`cpsam_toolkit.modes.blocks.choose_blocks`) is
        segmented in blocks (:func:`cpsam_toolkit.modes.blocks.segment_in_blocks`), with a log
        line saying so; the others stream through the network together."""
        masks.validate()
        classes = self.net.cfg.class_names
        budget = self.host_budget(inputs, net)

        def label(i: int) -> str:
            return names[i] if names is not None and i < len(names) else f"image {i}"

        def planned() -> Iterator[tuple[int, np.ndarray, BlockPlan | None, InputOptions]]:
            for i, img in enumerate(images):
                own = self.resolve_inputs(img, inputs, label(i))  # diameter="auto": per image
                yield i, img, self.block_plan(img, own, budget, label(i)), own

        # consecutive images with the same resizing share network batches
        for (in_blocks, own), group in itertools.groupby(
            planned(), key=lambda t: (t[2] is not None, t[3])
        ):
            if in_blocks:
                for i, img, plan, _ in group:
                    log.warning("cpsam: %s", plan.describe(label(i)))
                    res = segment_in_blocks(self, img, own, net, masks, plan.block_size,
                                            plan.halo, label(i) if names is not None else None)
                    res.diameter = own.diameter
                    yield res
                continue
            group_names: list[str] = []  # filled as the network pulls the images
            whole = _tap_names(group, label, group_names)
            outs = self.iter_predict(whole, own, net, group_names, progress, bool(classes))
            scaled = scale_niter(masks, own.diameter)
            result_names = group_names if names is not None else None
            results = (iter_panoptic(outs, classes, scaled, result_names) if classes
                       else iter_planar(outs, scaled, result_names))
            for res in results:
                res.diameter = own.diameter
                yield res

    def host_budget(self, inputs: InputOptions, net: NetOptions) -> int | None:
        """Bytes of host memory a 2D image's whole-image segmentation may need before it is
        segmented in blocks; None when it is always segmented whole (no limit set, a panoptic
        network, or ``tile_norm_blocksize``)."""
        if self.net.cfg.class_names or inputs.tile_norm_blocksize:
            return None
        return host_memory_budget(net.host_memory)

    def plan_blocks(
        self, image: np.ndarray, settings: Settings | None = None, name: str = "image"
    ) -> tuple[BlockPlan | None, Settings]:
        """How :meth:`segment` would run a 2D ``image``: the :class:`BlockPlan` (None: whole)
        and ``settings`` (default :attr:`settings`) with the automatic host-memory budget
        fixed in bytes and ``diameter="auto"`` replaced by its estimate for this image, so that
        segmenting with them decides the same way even if the free RAM changes meanwhile, and
        does not estimate the size again (for adapters that report the block size, e.g.
        CellProfiler)."""
        s = self.settings if settings is None else settings
        inputs, net, _ = split_settings(s)
        inputs = self.resolve_inputs(image, inputs, name)
        budget = host_memory_budget(s.host_memory)
        s = s.replace(host_memory=f"{budget}B" if budget else "unlimited")
        if s.diameter == "auto":  # estimated once: segmenting with s does not estimate again
            s = s.replace(_source=s.sources["diameter"], diameter=inputs.diameter)
        if self.host_budget(inputs, net) is None:
            return None, s
        return self.block_plan(image, inputs, budget, name), s

    def block_plan(
        self, image: np.ndarray, inputs: InputOptions, budget: int | None, name: str = "image"
    ) -> BlockPlan | None:
        """How ``image`` would be segmented in blocks under a host-memory ``budget`` (bytes;
        None: no limit), or None when it is segmented whole."""
        if budget is None or not isinstance(image, np.ndarray) or image.ndim < 2:
            return None
        with warnings.catch_warnings():  # only the shape is needed; preparing the image warns
            warnings.simplefilter("ignore")
            shape = to_channels_last(
                image, channel_axis=inputs.channel_axis, channels=inputs.channels, name=name
            ).shape[:2]
        return choose_blocks(shape, budget, inputs.diameter, self.net.cfg.tile)

    def segment(
        self,
        image: np.ndarray | Sequence[np.ndarray],
        settings: Settings | None = None,
        *,
        progress: bool = False,
        do_3d: bool = False,
        z_axis: int | None = None,
        anisotropy: float | None = None,
        flow3d_smooth: float = 0.0,
        stitch_threshold: float = 0.0,
        **overrides: Any,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one 2D image (returns a result) or a list of them (returns a list).

        Images are (Y, X), (Y, X, C) or (C, Y, X) of any real dtype; see
        :mod:`cpsam_toolkit.preprocess` for the channel rules. Tiles of all images in a list
        share network batches.

        ``settings`` (:class:`cpsam_toolkit.settings.Settings`) defaults to
        :attr:`settings` (the defaults plus the model file's recommended values); keyword
        ``overrides`` (any setting name: ``channel_axis``, ``diameter``, ``flow_threshold``,
        ``batch_size`` ...) win over it. ``diameter`` (px) resizes so cells are ~30 px for the
        network and maps the outputs back; leave it None for Cellpose-SAM's size-invariant
        default.

        Volumes: ``do_3d=True`` (3D flows from the YX, ZX and ZY slices) or
        ``stitch_threshold > 0`` (2D masks stitched across planes) with ``z_axis`` (and
        ``channel_axis`` for 4-D input), ``anisotropy`` (Z / XY spacing) and ``flow3d_smooth``;
        returns :class:`cpsam_toolkit.volume.VolumeResult` (see :mod:`cpsam_toolkit.volume`).
        """
        s = self.settings if settings is None else settings
        if overrides:
            s = s.replace(**overrides)
        log.debug("cpsam: settings %s", s.describe().replace("\n", ", ") or "defaults")
        if do_3d or stitch_threshold or z_axis is not None:  # volumes: cpsam_toolkit.volume
            # 3D flows have no flow-error QC: only a value the user set is passed on (and warned
            # about); stitching uses it for the QC of each plane
            user_flow = stitch_threshold or s.sources["flow_threshold"] == "user"

            return segment_3d(
                self, image, do_3d=do_3d, z_axis=z_axis, anisotropy=anisotropy,
                flow3d_smooth=flow3d_smooth, stitch_threshold=stitch_threshold,
                channel_axis=s.channel_axis, channels=s.channels, normalize=s.normalize,
                percentiles=s.percentiles, invert=s.invert, tile_norm_blocksize=s.tile_norm_blocksize,
                diameter=s.diameter, batch_size=s.batch_size, tile_overlap=s.tile_overlap,
                augment=s.augment, cellprob_threshold=s.cellprob_threshold, min_size=s.min_size,
                max_size_fraction=s.max_size_fraction, niter=s.niter, progress=progress,
                flow_threshold=s.flow_threshold if user_flow else None,
            )
        single = isinstance(image, np.ndarray) or not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            return []
        results = list(self.iter_segment(images, *split_settings(s), progress=progress))
        return results[0] if single else results


def _tap_names(
    items: Iterable[tuple[int, np.ndarray, Any]], label: Callable[[int], str], sink: list[str]
) -> Iterator[np.ndarray]:
    """The images of ``(index, image, plan)`` items, appending each one's name to ``sink``."""
    for i, img, *_ in items:
        sink.append(label(i))
        yield img


def segment_panoptic(model: Any, image: Any, **kwargs: Any) -> PanopticResult | list[PanopticResult]:
    """Segment with a panoptic model: :meth:`CellposeSAM.segment` (same arguments), which returns
    :class:`PanopticResult` for a network with class maps. ``model`` may be a model object or a
    name/path for :func:`cpsam_toolkit.load_model`."""
    if not hasattr(model, "segment"):
        model = load_model(model)
    if not is_panoptic(model):
        raise ValueError(
            f"model {getattr(model, 'name', '?')!r} has no class maps (it is a plain segmentation "
            "model); train a panoptic one with make_panoptic + train_panoptic"
        )
    return model.segment(image, **kwargs)


def default_model_name() -> str:
    """``cpsam_v2`` if present locally, then ``cpsam``, else the shipped small model."""
    return registry.cached_default() or registry.DEFAULT_MODEL


def load_model(
    name_or_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> CellposeSAM:
    """Load a Cellpose-SAM model by registry name or file path.

    With no name: ``cpsam_v2`` (or ``cpsam``) if present locally, else ``cpsam_v2`` downloaded,
    else -- offline or unreachable only -- the small model shipped inside this package, with one
    line saying so (:func:`cpsam_toolkit.network.registry.choose_default_model`).
    Official files (``cpsam``, ``cpsam_v2``) are downloaded on first use into ``$CPSAM_HOME``
    (default ``~/.cache/cpsam``); files already in ``~/.cellpose/models`` are used.
    Settings that a model file recommends (``info["recommended_settings"]``, e.g. the shipped
    model's ``flow_threshold=0.8``) are in ``model.settings`` and used by :meth:`segment`
    unless the caller sets a value; they are logged here.
    """
    if name_or_path is None:
        choice = registry.choose_default_model()  # published model, else shipped + why
        name, path = choice.name, choice.path
        log.warning("%s", choice.message or f"cpsam: no model named; using {name!r} ({path})")
    elif isinstance(name_or_path, Path) or Path(str(name_or_path)).exists():
        path = Path(name_or_path)
        name = path.name
    else:
        name = str(name_or_path)
        path = registry.resolve_weights(name)
    net, meta = load_checkpoint(path)
    info = {"path": str(path), **meta}
    info["config"] = meta["config"].to_dict()
    rec = meta.get("recommended_settings")
    if rec:
        log.warning("cpsam: %r recommends %s (used unless you set a value; see its model card)",
                    name, ", ".join(f"{k}={v}" for k, v in rec.items()))
    return CellposeSAM(net, device=device, dtype=dtype, name=name, info=info)
