"""The public model object: load weights once, segment images or lists of images.

``io → preprocess → tiling → network → dynamics → masks``; this module only wires the
stages together and holds the results.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import dynamics, preprocess, tiling
from .device import resolve_device, resolve_dtype
from .network.model import CPSAMNet

log = logging.getLogger("cpsam_toolkit")


@dataclass(frozen=True)
class InputOptions:
    """How raw arrays become network input."""

    channel_axis: int | None = None
    channels: tuple[int, ...] | None = None
    normalize: bool = True
    percentiles: tuple[float, float] = (1.0, 99.0)
    invert: bool = False
    tile_norm_blocksize: int = 0
    diameter: float | None = None  # median cell diameter in px; None = use as is (30 px ideal)


@dataclass(frozen=True)
class NetOptions:
    """How tiles are run through the network."""

    batch_size: int = 8
    tile_overlap: float = 0.1
    augment: bool = False


@dataclass(frozen=True)
class MaskOptions:
    """Post-processing of flows into masks (see :func:`cpsam_toolkit.dynamics.compute_masks`)."""

    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None  # None: 200, scaled with the diameter when resizing

    def validate(self) -> None:
        if self.flow_threshold < 0:
            raise ValueError(f"flow_threshold must be >= 0 (0 disables QC), got {self.flow_threshold}")
        if not 0 < self.max_size_fraction <= 1:
            raise ValueError(f"max_size_fraction must be in (0, 1], got {self.max_size_fraction}")
        if self.niter is not None and self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")


@dataclass
class SegmentationResult:
    """Masks and network outputs of one image.

    Attributes
    ----------
    masks : (Y, X) uint16 or uint32
        Labels 1..N, 0 is background.
    flows : (2, Y, X) float32
        ``[dY, dX]`` in network units (about 5x unit vectors).
    cellprob : (Y, X) float32
        Cell-probability logits.
    options : MaskOptions
        The post-processing settings that produced ``masks``.
    """

    masks: np.ndarray
    flows: np.ndarray
    cellprob: np.ndarray
    options: MaskOptions = field(default_factory=MaskOptions)
    name: str | None = None

    @property
    def n_objects(self) -> int:
        return int(self.masks.max()) if self.masks.size else 0

    @cached_property
    def objects(self) -> dict[str, np.ndarray]:
        """Per-object measurements, row i for label i+1: ``label, area, centroid_y,
        centroid_x, mean_cellprob`` (mean probability 0..1) and ``flow_error`` (the error the
        flow QC computed for the mask, on the mask as tracked, before hole filling — the number
        compared with ``flow_threshold``; lower is better)."""
        return object_table(self.masks, self.flows, self.cellprob, flow_error=self._qc)

    _stages: dict = field(default_factory=dict, repr=False, compare=False)
    _qc: np.ndarray | None = field(default=None, repr=False, compare=False)

    def recompute(self, **changes: Any) -> SegmentationResult:
        """New result from the cached flows with other post-processing settings.

        Flow tracking (the slow step) is cached per ``(cellprob_threshold, niter,
        max_size_fraction)``, together with the flow error of every tracked mask, so changing
        only ``flow_threshold`` or ``min_size`` costs just the filtering and hole filling.
        Results are identical to a fresh :func:`cpsam_toolkit.dynamics.compute_masks`.
        """
        opts = replace(self.options, **changes)
        opts.validate()
        if self.flows.shape[0] != 2:  # 3D: no staged cache
            return SegmentationResult(
                masks_from_flows(self.flows, self.cellprob, opts), self.flows, self.cellprob, opts, self.name
            )
        masks, qc = staged_masks(self.flows, self.cellprob, opts, self._stages)
        return SegmentationResult(masks, self.flows, self.cellprob, opts, self.name, self._stages, qc)


def staged_masks(
    flows: np.ndarray, cellprob: np.ndarray, opts: MaskOptions, stages: dict
) -> tuple[np.ndarray, np.ndarray | None]:
    """2D masks as :func:`masks_from_flows`, through a cache of the tracking stage.

    ``stages`` maps ``(cellprob_threshold, niter, max_size_fraction)`` to the tracked masks and
    their flow errors (at most 8 entries; filled here). Returns the masks and the QC flow error
    of each final mask (float64, row i for label i+1), or None when the QC is off.
    """
    key = (opts.cellprob_threshold, opts.niter or 200, opts.max_size_fraction)
    if key not in stages:
        if len(stages) >= 8:
            stages.pop(next(iter(stages)))
        stages[key] = (tracked_masks(flows, cellprob, opts), None)
    raw, errors = stages[key]
    qc_on = opts.flow_threshold is not None and opts.flow_threshold > 0
    if errors is None and qc_on and raw.max() > 0:
        errors = np.asarray(dynamics.flow_errors(raw, flows), dtype=np.float64)
        stages[key] = (raw, errors)
    masks = raw
    if qc_on and raw.max() > 0:
        lut = np.ones(int(raw.max()) + 1, bool)
        lut[1:] = errors[: len(lut) - 1] <= opts.flow_threshold
        masks = np.where(lut[raw], raw, 0).astype(raw.dtype)
    masks = dynamics.fill_holes_and_remove_small_masks(masks, min_size=opts.min_size)
    if not qc_on:
        return masks, None
    # final labels are renumbered in raster order; the raster-first pixel of a final mask is
    # never a filled hole (holes lie strictly inside the mask's bounding box), so it names the
    # tracked mask it came from
    labels, first = np.unique(masks.ravel(), return_index=True)
    first = first[labels > 0]
    qc = errors[raw.ravel()[first].astype(np.int64) - 1] if len(first) else np.zeros(0)
    return masks, qc


def object_table(
    masks: np.ndarray, flows: np.ndarray, cellprob: np.ndarray, flow_error: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-object area, centroid, mean cell probability and flow error of a 2D label image.

    ``flow_error`` (one per label, e.g. the QC errors from :func:`staged_masks`) is used as given;
    otherwise it is computed from ``masks`` with :func:`cpsam_toolkit.dynamics.flow_errors`.
    """
    n = int(masks.max()) if masks.size else 0
    lab = masks.ravel().astype(np.int64)
    area = np.bincount(lab, minlength=n + 1)[1:]
    safe = np.maximum(area, 1)
    yy, xx = np.indices(masks.shape)
    prob = 1 / (1 + np.exp(-cellprob.astype(np.float64).ravel()))
    table = {
        "label": np.arange(1, n + 1, dtype=np.int64),
        "area": area.astype(np.int64),
        "centroid_y": np.bincount(lab, yy.ravel(), n + 1)[1:] / safe,
        "centroid_x": np.bincount(lab, xx.ravel(), n + 1)[1:] / safe,
        "mean_cellprob": np.bincount(lab, prob, n + 1)[1:] / safe,
    }
    if flow_error is not None and len(flow_error) == n:
        table["flow_error"] = np.asarray(flow_error, dtype=np.float64)
    else:
        table["flow_error"] = (
            np.asarray(dynamics.flow_errors(masks, flows), dtype=np.float64)[:n] if n else np.zeros(0)
        )
    return table


def masks_from_flows(flows: np.ndarray, cellprob: np.ndarray, opts: MaskOptions) -> np.ndarray:
    opts.validate()
    return dynamics.compute_masks(
        flows,
        cellprob,
        niter=opts.niter or 200,
        cellprob_threshold=opts.cellprob_threshold,
        flow_threshold=opts.flow_threshold,
        min_size=opts.min_size,
        max_size_fraction=opts.max_size_fraction,
    )


def tracked_masks(flows: np.ndarray, cellprob: np.ndarray, opts: MaskOptions) -> np.ndarray:
    """Masks straight from flow tracking (before flow QC, hole filling and the size filter)."""
    fg = cellprob > opts.cellprob_threshold
    if not fg.any():
        return np.zeros(cellprob.shape, np.uint16)
    inds = np.nonzero(fg)
    final = dynamics.follow_flows(flows * fg / 5.0, inds, niter=opts.niter or 200)
    return dynamics.get_masks(final, inds, cellprob.shape, max_size_fraction=opts.max_size_fraction)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def run_with_oom_fallback(
    fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, chunk: int
) -> tuple[np.ndarray, int]:
    """Run ``fn`` over ``x`` in chunks; on out-of-memory, halve the chunk and retry.

    Returns the outputs and the chunk size that worked (callers keep it for later batches).
    """
    outs = []
    i = 0
    while i < len(x):
        try:
            outs.append(fn(x[i : i + chunk]))
            i += chunk
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if chunk == 1:
                raise MemoryError(
                    "out of memory running the network on a single tile; use a smaller model, "
                    "dtype='bf16', or device='cpu'"
                ) from e
            chunk = max(1, chunk // 2)
            warnings.warn(f"out of memory: retrying with batch_size={chunk}", stacklevel=2)
    return np.concatenate(outs), chunk


def _resize(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, Y, X) float32."""
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0].numpy()


class CellposeSAM:
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
        Where the weights came from (path, format, config, ...).
    """

    def __init__(
        self,
        net: CPSAMNet,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        name: str = "custom",
        info: dict[str, Any] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.net = net.to(device=self.device, dtype=self.dtype).eval()
        self.name = name
        self.info = dict(info or {})
        self._chunk: int | None = None

    def __repr__(self) -> str:
        c = self.net.cfg
        return (
            f"CellposeSAM(name={self.name!r}, width={c.width}, depth={c.depth}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    # -- network ---------------------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, self.dtype)
            return self.net(t).float().cpu().numpy()

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(B, C<=3, 256, 256) float32 → (B, nout, 256, 256) float32, halving the batch on OOM."""
        chunk = min(len(tiles), self._chunk or len(tiles))
        y, used = run_with_oom_fallback(self._forward, tiles, chunk)
        if used < chunk:
            self._chunk = used
        return y

    def _prepare(self, image: np.ndarray, opts: InputOptions, name: str) -> np.ndarray:
        return preprocess.prepare_image(
            image,
            channel_axis=opts.channel_axis,
            channels=opts.channels,
            normalize_image=opts.normalize,
            invert=opts.invert,
            percentiles=opts.percentiles,
            tile_norm_blocksize=opts.tile_norm_blocksize,
            name=name,
        )

    def iter_predict(
        self,
        images: Iterable[np.ndarray],
        inputs: InputOptions = InputOptions(),
        net: NetOptions = NetOptions(),
        names: Sequence[str] | None = None,
        progress: bool | Callable[[int], None] = False,
        class_maps: bool = False,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Yield ``(flows (2,Y,X), cellprob (Y,X))`` per image; tiles batched across images.

        ``class_maps=True`` adds the ``(nout-3, Y, X)`` class maps of a panoptic network."""
        shapes: list[tuple[int, int]] = []
        scale = 30.0 / inputs.diameter if inputs.diameter else 1.0
        if scale <= 0 or not np.isfinite(scale):
            raise ValueError(f"diameter must be a positive number of pixels, got {inputs.diameter}")

        def prepared() -> Iterator[np.ndarray]:
            for i, img in enumerate(images):
                name = names[i] if names is not None and i < len(names) else f"image {i}"
                x = self._prepare(img, inputs, name)
                shapes.append(x.shape[:2])
                if scale != 1.0:
                    size = (max(2, int(x.shape[0] * scale)), max(2, int(x.shape[1] * scale)))
                    x = np.moveaxis(_resize(np.moveaxis(x, -1, 0), size), 0, -1)
                yield x

        bar = None
        on_batch = progress if callable(progress) else None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(unit="tile", desc="network", leave=False)
            on_batch = bar.update
        try:
            outs = tiling.run_tiled(
                self.predict_tiles,
                prepared(),
                batch_size=net.batch_size,
                tile=self.net.cfg.tile,
                overlap=net.tile_overlap,
                augment=net.augment,
                on_batch=on_batch,
            )
            for i, y in enumerate(outs):
                if y.shape[1:] != shapes[i]:
                    y = _resize(y, shapes[i])
                yield (y[-3:-1], y[-1], y[:-3]) if class_maps else (y[-3:-1], y[-1])
        finally:
            if bar is not None:
                bar.close()

    # -- public ----------------------------------------------------------------------------
    def iter_segment(
        self,
        images: Iterable[np.ndarray],
        inputs: InputOptions = InputOptions(),
        net: NetOptions = NetOptions(),
        masks: MaskOptions = MaskOptions(),
        names: Sequence[str] | None = None,
        progress: bool | Callable[[int], None] = False,
    ) -> Iterator[SegmentationResult]:
        """Stream results in input order (for folders and plates)."""
        masks.validate()
        if masks.niter is None and inputs.diameter:
            masks = replace(masks, niter=max(1, int(200 * inputs.diameter / 30.0)))
        classes = self.net.cfg.class_names  # panoptic network: classes per object (panoptic.py)
        for i, out in enumerate(self.iter_predict(images, inputs, net, names, progress, bool(classes))):
            name = names[i] if names is not None and i < len(names) else None
            if classes:
                from .panoptic import panoptic_result

                yield panoptic_result(*out, classes, masks, name)
                continue
            flows, cellprob = out
            if flows.shape[0] != 2:
                labels = masks_from_flows(flows, cellprob, masks)
                yield SegmentationResult(labels, flows, cellprob, masks, name)
                continue
            stages: dict = {}  # kept with the result, so a later recompute() reuses the tracking
            labels, qc = staged_masks(flows, cellprob, masks, stages)
            yield SegmentationResult(labels, flows, cellprob, masks, name, stages, qc)

    def segment(
        self,
        image: np.ndarray | Sequence[np.ndarray],
        *,
        channel_axis: int | None = None,
        channels: Sequence[int] | None = None,
        normalize: bool = True,
        invert: bool = False,
        tile_norm_blocksize: int = 0,
        diameter: float | None = None,
        batch_size: int = 8,
        tile_overlap: float = 0.1,
        augment: bool = False,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        min_size: int = 15,
        max_size_fraction: float = 0.4,
        niter: int | None = None,
        progress: bool = False,
        do_3d: bool = False,
        z_axis: int | None = None,
        anisotropy: float | None = None,
        flow3d_smooth: float = 0.0,
        stitch_threshold: float = 0.0,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one 2D image (returns a result) or a list of them (returns a list).

        Images are (Y, X), (Y, X, C) or (C, Y, X) of any real dtype; see
        :mod:`cpsam_toolkit.preprocess` for the channel rules. Tiles of all images in a list
        share network batches. ``diameter`` (px) resizes so cells are ~30 px for the network
        and maps the outputs back; leave it None for Cellpose-SAM's size-invariant default.

        Volumes: ``do_3d=True`` (3D flows from the YX, ZX and ZY slices) or
        ``stitch_threshold > 0`` (2D masks stitched across planes) with ``z_axis`` (and
        ``channel_axis`` for 4-D input), ``anisotropy`` (Z / XY spacing) and ``flow3d_smooth``;
        returns :class:`cpsam_toolkit.volume.VolumeResult` (see :mod:`cpsam_toolkit.volume`).
        """
        if do_3d or stitch_threshold or z_axis is not None:  # volumes: cpsam_toolkit.volume
            from .volume import segment_3d

            return segment_3d(
                self, image, do_3d=do_3d, z_axis=z_axis, anisotropy=anisotropy,
                flow3d_smooth=flow3d_smooth, stitch_threshold=stitch_threshold,
                channel_axis=channel_axis, channels=channels, normalize=normalize, invert=invert,
                tile_norm_blocksize=tile_norm_blocksize, diameter=diameter, batch_size=batch_size,
                tile_overlap=tile_overlap, augment=augment, flow_threshold=flow_threshold,
                cellprob_threshold=cellprob_threshold, min_size=min_size,
                max_size_fraction=max_size_fraction, niter=niter, progress=progress,
            )
        single = isinstance(image, np.ndarray) or not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            return []
        results = list(
            self.iter_segment(
                images,
                InputOptions(
                    channel_axis,
                    tuple(channels) if channels is not None else None,
                    normalize,
                    (1.0, 99.0),
                    invert,
                    tile_norm_blocksize,
                    diameter,
                ),
                NetOptions(batch_size, tile_overlap, augment),
                MaskOptions(flow_threshold, cellprob_threshold, min_size, max_size_fraction, niter),
                progress=progress,
            )
        )
        return results[0] if single else results


def options_dict(*opts: Any) -> dict[str, Any]:
    """Flatten option dataclasses into one dict (for logs and metadata)."""
    out: dict[str, Any] = {}
    for o in opts:
        out.update(asdict(o))
    return out


def default_model_name() -> str:
    """``cpsam_v2`` if present locally, then ``cpsam``, else the shipped small model."""
    from .network import registry

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
    model's ``flow_threshold=0.8``) are logged, not applied: pass them to :meth:`segment`.
    """
    from .network import registry
    from .network.checkpoints import load_checkpoint

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
        log.warning("cpsam: %r recommends %s (see its model card)", name,
                    ", ".join(f"{k}={v}" for k, v in rec.items()))
    return CellposeSAM(net, device=device, dtype=dtype, name=name, info=info)
