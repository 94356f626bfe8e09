"""Segmentation of images larger than memory, in blocks with a halo, into a zarr label array.

``segment_blockwise(source, model, "out_masks.zarr", block_size=2048, halo=64)``:

1. **Global normalisation.** Each channel's percentiles are computed once on the whole image,
   exactly as whole-image segmentation computes them (the same pixel subsample), and every
   block is normalised with those values — so a block sees the same network input as the
   corresponding part of the whole image.
2. **Blocks with a halo.** The image is cut into ``block_size`` cores; each is segmented
   (network + dynamics) with ``halo`` pixels of context on every side, the crops streaming
   through :meth:`CellposeSAM.iter_segment` so tiles of several blocks share network batches.
   An object is kept by the block whose core holds its centroid, so no cell is cut at a core
   border or kept twice; the halo (default 64 px, at least twice a typical cell diameter)
   must be larger than the cells.
3. **Stitching.** Kept objects get global ids (block offsets). Each output core is painted
   from its own block's objects and the parts of its neighbours' objects that reach into it;
   an object found by two neighbouring blocks (IoU > 0.5, when its centroid moves across the
   border between their segmentations) is merged into one id. Ids are then made consecutive.
4. **Atomic output.** Everything is written under a temporary folder next to the target and
   the finished zarr array is renamed into place; a failure leaves no partial output.

Inputs: numpy arrays, dask arrays, zarr arrays or paths (``.zarr`` folders, TIFFs read lazily
through ``tifffile.imread(aszarr=True)``, ``.npy`` memory-mapped). With a ``dask.distributed``
client, blocks are tasks on the workers (each loads the model once).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .batch import ModelSpec, WorkerSetup, model_file, model_for_workers, worker_model
from .core.size import FEATURE_CROP
from .io import imread, imwrite_tiff
from .modes.blocks import (
    Block,
    aligned_outputs,
    compose_core,
    keep_core_objects,
    neighbours,
    plan_blocks,
)
from .preprocess import (
    MAX_AUTO_CHANNELS,
    ImageInputError,
    check_finite,
    normalize,
    percentile_lowhigh,
    to_channels_last,
)
from .segment import (
    InputOptions,
    MaskOptions,
    NetOptions,
    SegmentationResult,
    load_model,
    masks_from_flows,
    settings_from_options,
    split_settings,
)
from .settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from .segment import CellposeSAM, InputOptions, MaskOptions, NetOptions

#: pixels per channel above which percentiles use a strided subsample (as preprocess does)
SUBSAMPLE_ABOVE = 224**3

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A 2D image (optionally with channels) read lazily by regions.

    Picklable when it refers to a file (``path``); in-memory arrays are carried as they are.
    """

    path: str | None = None
    kind: str = "memory"  # "zarr", "tiff", "npy", "image", "memory"
    component: str | None = None
    channel_axis: int | None = None  # of the stored array; None: no channel axis (2D)
    shape: tuple[int, ...] = ()
    dtype: str = ""
    _array: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if self.path is not None:
            d["_array"] = None  # reopened on the worker
        return d

    @property
    def shape2d(self) -> tuple[int, int]:
        if self.channel_axis is None:
            return tuple(self.shape)  # type: ignore[return-value]
        return tuple(s for i, s in enumerate(self.shape) if i != self.channel_axis)  # type: ignore[return-value]

    def array(self) -> Any:
        if self._array is None:
            self._array = _open_path(self.path, self.kind, self.component)
        return self._array

    def read(self, y0: int, y1: int, x0: int, x1: int, step: int = 1, xstep: int | None = None) -> np.ndarray:
        """(Y, X, C) region (C = 1 for 2D) in the stored dtype."""
        arr = self.array()
        sy, sx = slice(y0, y1, step), slice(x0, x1, xstep or step)
        if self.channel_axis is None:
            out = np.asarray(_get(arr, (sy, sx)))[..., None]
        elif self.channel_axis == 0:
            out = np.moveaxis(np.asarray(_get(arr, (slice(None), sy, sx))), 0, -1)
        elif self.channel_axis == 1:
            out = np.moveaxis(np.asarray(_get(arr, (sy, slice(None), sx))), 1, -1)
        else:
            out = np.asarray(_get(arr, (sy, sx, slice(None))))
        return out


def _get(arr: Any, key: tuple) -> Any:
    out = arr[key]
    if hasattr(out, "compute"):  # dask
        out = out.compute()
    return out


def _open_path(path: str | None, kind: str, component: str | None) -> Any:
    if path is None:
        raise ValueError("this source has no path and no array")
    if kind == "zarr":
        import zarr

        node = zarr.open(path, mode="r")
        return _pick_array(node, component, path)
    if kind == "tiff":
        import tifffile
        import zarr

        store = tifffile.imread(path, aszarr=True)
        node = zarr.open(store, mode="r")
        return _pick_array(node, component, path)
    if kind == "npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)

    return imread(path)


def _pick_array(node: Any, component: str | None, path: str) -> Any:
    import zarr

    if isinstance(node, zarr.Array):
        return node
    if component is not None:
        return node[component]
    keys = sorted(node.array_keys())
    if "0" in keys:  # OME-Zarr / pyramidal TIFF: full resolution
        return node["0"]
    if not keys:
        raise ImageInputError(f"{path}: the zarr group holds no array; give component=")
    return node[keys[0]]


def _guess_channel_axis(shape: tuple[int, ...], channel_axis: int | None, name: str) -> int | None:
    if len(shape) == 2:
        if channel_axis is not None:
            raise ImageInputError(f"{name}: channel_axis={channel_axis} given for a 2-D array {shape}")
        return None
    if len(shape) != 3:
        raise ImageInputError(
            f"{name}: blockwise segmentation needs a 2D image (Y, X) or (Y, X, C)/(C, Y, X), "
            f"got shape {tuple(shape)}"
        )
    if channel_axis is None:
        channel_axis = 0 if shape[0] < shape[-1] else 2
        if shape[channel_axis] > MAX_AUTO_CHANNELS:
            raise ImageInputError(
                f"{name}: cannot tell the channel axis of shape {tuple(shape)}; pass channel_axis="
            )
    if not -3 <= channel_axis <= 2:
        raise ImageInputError(f"{name}: channel_axis={channel_axis} is out of range for {tuple(shape)}")
    return channel_axis % 3


def open_source(
    image: Any, channel_axis: int | None = None, component: str | None = None
) -> Source:
    """A :class:`Source` for a path (``.zarr``, TIFF, ``.npy``, other image files), a zarr
    array, a dask array or a numpy array."""
    if isinstance(image, Source):
        return image
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.exists():
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
        suffix = p.suffix.lower()
        if p.is_dir() or suffix == ".zarr":
            kind = "zarr"
        elif suffix in (".tif", ".tiff"):
            kind = "tiff"
        elif suffix == ".npy":
            kind = "npy"
        else:
            kind = "image"
        try:
            arr = _open_path(str(p), kind, component)
        except (ImageInputError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001
            raise ImageInputError(f"{p}: cannot open as an image ({e.__class__.__name__}: {e})") from None
        src = Source(str(p), kind, component)
    else:
        arr = image
        src = Source(None, "memory")
    shape = tuple(int(s) for s in arr.shape)
    src.channel_axis = _guess_channel_axis(shape, channel_axis, src.path or "image")
    src.shape = shape
    src.dtype = str(arr.dtype)
    src._array = arr
    if min(src.shape2d) < 2:
        raise ImageInputError(f"{src.path or 'image'}: image of size {src.shape2d} is too small")
    return src


# --------------------------------------------------------------------------------------------
# global normalisation
# --------------------------------------------------------------------------------------------
def _select(x: np.ndarray, channels: Sequence[int] | None, name: str) -> np.ndarray:
    """Channel choice on a (Y, X, C) array, as the model would do it."""
    return to_channels_last(x, channel_axis=2, channels=channels, name=name)


def global_lowhigh(source: Source, inputs: InputOptions) -> list[tuple[float, float]]:
    """Per-channel (lo, hi) percentiles of the whole image, identical to what whole-image
    normalisation computes (a strided subsample above 224³ pixels per channel, as
    :func:`cpsam_toolkit.preprocess.normalize` does), read region by region."""
    ly, lx = source.shape2d
    lower, upper = inputs.percentiles
    if ly * lx > SUBSAMPLE_ABOVE:
        sy, sx = max(1, ly // 224), max(1, lx // 224)
        rows = []
        band = max(sy, (4096 // sy) * sy)  # whole multiples of the step: same rows as [::sy]
        for y0 in range(0, ly, band):
            rows.append(source.read(y0, min(ly, y0 + band), 0, lx, sy, sx))
        sample = np.concatenate(rows, axis=0)
    else:
        sample = source.read(0, ly, 0, lx)
    sample = _select(sample, inputs.channels, source.path or "image")
    return percentile_lowhigh(sample, lower, upper)


def prepare_crop(
    source: Source, block: Block, inputs: InputOptions, lowhigh: Sequence[tuple[float, float]] | None
) -> np.ndarray:
    """(Y, X, C<=3) float32 network input of a block's crop, normalised with global values."""
    y0, y1, x0, x1 = block.crop
    x = _select(source.read(y0, y1, x0, x1), inputs.channels, source.path or "image")
    if inputs.normalize:
        return normalize(x, *inputs.percentiles, invert=inputs.invert, lowhigh=lowhigh)
    x = x.astype(np.float32)
    return 1 - x if inputs.invert else x


# --------------------------------------------------------------------------------------------
# pass 1: segment blocks, keep the objects whose centroid is in the core
# --------------------------------------------------------------------------------------------
def _crop_file(tmp: Path, block: Block) -> Path:
    return tmp / "blocks" / f"{block.name}.tif"


def _save_crop(tmp: Path, block: Block, kept: np.ndarray) -> None:
    imwrite_tiff(_crop_file(tmp, block), kept)


def _load_crop(tmp: Path, block: Block) -> np.ndarray:
    import tifffile

    return tifffile.imread(_crop_file(tmp, block))


@dataclass(frozen=True)
class _Settings:
    inputs: InputOptions  # what prepare_crop uses
    model_inputs: InputOptions  # what the model gets (already normalised)
    net: NetOptions
    masks: MaskOptions


def _region(source: Source, box: Box, inputs: InputOptions,
            lowhigh: Sequence[tuple[float, float]] | None) -> np.ndarray:
    """(C, Y, X) float32 network input of an image region, normalised with global values."""
    y0, y1, x0, x1 = box
    x = _select(source.read(y0, y1, x0, x1), inputs.channels, source.path or "image")
    check_finite(x, source.path or "image")
    if inputs.normalize:
        x = normalize(x, *inputs.percentiles, invert=inputs.invert, lowhigh=lowhigh)
    else:
        x = x.astype(np.float32)
        x = 1 - x if inputs.invert else x
    return np.moveaxis(x, -1, 0)


def _auto_diameter(model: Any, source: Source, inputs: InputOptions,
                   lowhigh: Sequence[tuple[float, float]] | None) -> float | None:
    """``diameter="auto"`` resolved on the central crop of the image (globally normalised)."""
    if not hasattr(model, "resolve_inputs"):
        raise ValueError("diameter='auto' needs a CellposeSAM model with a size model; give pixels or None")
    h, w = source.shape2d
    c = FEATURE_CROP
    y0, x0 = max(0, (h - c) // 2), max(0, (w - c) // 2)
    x = np.moveaxis(_region(source, (y0, min(h, y0 + c), x0, min(w, x0 + c)), inputs, lowhigh), 0, -1)
    pre = InputOptions(channel_axis=2, normalize=False, diameter="auto")
    return model.resolve_inputs(x, pre, f"{source.path or 'image'} centre").diameter


def _aligned_outputs(
    model: CellposeSAM,
    source: Source,
    blocks: Sequence[Block],
    settings: _Settings,
    lowhigh: Sequence[tuple[float, float]] | None,
) -> Iterator[tuple[Block, np.ndarray]]:
    """Network outputs ``(nout, Y, X)`` over each block's crop: the whole image's outputs
    (:func:`cpsam_toolkit.modes.blocks.aligned_outputs`), read from ``source``."""
    return aligned_outputs(model.predict_tiles, source.shape2d,
                           lambda box: _region(source, box, settings.inputs, lowhigh),
                           blocks, settings.net, model.net.cfg.tile)


def segment_blocks(
    model: CellposeSAM,
    source: Source,
    blocks: Sequence[Block],
    settings: _Settings,
    lowhigh: Sequence[tuple[float, float]] | None,
    tmp: str | os.PathLike,
    on_block: Any = None,
) -> dict[tuple[int, int], int]:
    """Pass 1 over ``blocks`` (tiles batched across blocks); returns kept counts per block.

    With a :class:`~cpsam_toolkit.segment.CellposeSAM` (and no ``diameter`` resizing), the
    network outputs of each crop are those of the whole image (:func:`_aligned_outputs`), so
    blocks differ from whole-image segmentation only through the dynamics near crop edges,
    which the halo keeps away from the objects that are kept. Other models (or resizing) run
    each crop as an image of its own through ``iter_segment``.
    """

    tmp = Path(tmp)
    counts: dict[tuple[int, int], int] = {}
    if hasattr(model, "predict_tiles") and getattr(model, "net", None) is not None \
            and not settings.inputs.diameter:
        results: Iterator[Any] = (
            SegmentationResult(masks_from_flows(y[-3:-1], y[-1], settings.masks), y[-3:-1], y[-1],
                               settings.masks)
            for _, y in _aligned_outputs(model, source, blocks, settings, lowhigh)
        )
    else:
        crops = (prepare_crop(source, b, settings.inputs, lowhigh) for b in blocks)
        results = model.iter_segment(crops, settings.model_inputs, settings.net, settings.masks,
                                     names=[f"{source.path or 'image'} block {b.index}" for b in blocks])
    for b, res in zip(blocks, results, strict=True):
        kept, k = keep_core_objects(res.masks, b)
        _save_crop(tmp, b, kept)
        counts[b.index] = k
        if on_block is not None:
            on_block(b)
    return counts


def _pass1_task(spec: Any, source: Source, blocks: Sequence[Block], settings: _Settings,
                lowhigh: Any, tmp: str) -> dict[tuple[int, int], int]:
    return segment_blocks(worker_model(spec), source, blocks, settings, lowhigh, tmp)


# --------------------------------------------------------------------------------------------
# pass 2: compose each core from its block and its neighbours; merge duplicates
# --------------------------------------------------------------------------------------------
def compose_block(
    block: Block,
    neighbours: Sequence[Block],
    offsets: dict[tuple[int, int], int],
    tmp: str | os.PathLike,
    labels_path: str,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pass 2 for one block: write its core of the label array
    (:func:`cpsam_toolkit.modes.blocks.compose_core`); return the global ids present and the
    same-cell pairs it merged."""
    import zarr

    tmp = Path(tmp)
    crops = {b.index: _load_crop(tmp, b) for b in (block, *neighbours)}
    canvas, pairs = compose_core(block, neighbours, crops, offsets)
    y0, y1, x0, x1 = block.core
    out = zarr.open_array(labels_path, mode="r+")
    out[y0:y1, x0:x1] = canvas
    return np.unique(canvas[canvas > 0]), pairs


def _relabel_block(block: Block, labels_path: str, ids: np.ndarray) -> None:
    """Pass 3: map the ids of a core to 1..N (``ids`` sorted, id ``ids[i]`` → ``i + 1``)."""
    import zarr

    out = zarr.open_array(labels_path, mode="r+")
    y0, y1, x0, x1 = block.core
    a = out[y0:y1, x0:x1]
    if not a.any():
        return
    nz = a > 0
    a[nz] = (np.searchsorted(ids, a[nz]) + 1).astype(np.uint32)
    out[y0:y1, x0:x1] = a


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------
@dataclass
class BlockwiseResult:
    """Where the labels went and how the run went."""

    path: Path
    shape: tuple[int, int]
    n_objects: int
    n_blocks: int
    block_size: int
    halo: int
    lowhigh: list[tuple[float, float]] | None
    n_merged: int = 0
    seconds: float = 0.0

    def open(self) -> Any:
        """The label array (zarr, read-only)."""
        import zarr

        return zarr.open_array(str(self.path), mode="r")

    def read(self) -> np.ndarray:
        """All labels in memory (only for images that fit)."""
        return self.open()[:]


def _replace_dir(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
        os.replace(src, dst)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(src, dst)


def segment_blockwise(
    image: Any,
    model: CellposeSAM | str | os.PathLike | None,
    out_path: str | os.PathLike,
    *,
    block_size: int = 2048,
    halo: int = 64,
    settings: Settings | None = None,
    input_options: InputOptions | None = None,
    net_options: NetOptions | None = None,
    mask_options: MaskOptions | None = None,
    component: str | None = None,
    overwrite: bool = False,
    client: Any = None,
    blocks_per_task: int | None = None,
    progress: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> BlockwiseResult:
    """Segment a large 2D image in blocks and write a uint32 zarr label array to ``out_path``.

    Parameters
    ----------
    image
        numpy/dask/zarr array, or a path: ``.zarr`` (array or group; ``component`` picks the
        array, default ``"0"`` or the first), TIFF (read lazily by tiles/strips), ``.npy``.
        (Y, X), (Y, X, C) or (C, Y, X); ``input_options.channel_axis`` as for ``segment``.
    model
        A loaded model, a registry name, a weights path, or None for the default.
    out_path
        Target zarr array folder (e.g. ``slide_masks.zarr``); written atomically.
    block_size, halo
        Core size of a block, and context added around it (>= 2 cell diameters). Output
        chunks are ``block_size`` squares.
    settings
        A :class:`~cpsam_toolkit.settings.Settings` (default: the model's ``settings``).
        ``tile_norm_blocksize`` is not supported; ``max_size_fraction`` applies to each block's
        crop.
    input_options, net_options, mask_options
        The older form (as for :meth:`CellposeSAM.iter_segment`), used when ``settings`` is
        not given; stages not given take the model's settings.
    client
        A ``dask.distributed.Client``: blocks run as tasks (the workers need the input as a
        file; in-memory arrays are first copied into the temporary folder).
    """

    t0 = time.perf_counter()
    if not hasattr(model, "iter_segment"):  # a name or path (a model object is used as is)
        model = load_model(model, device=device, dtype=dtype)
    if settings is None:
        settings = settings_from_options(input_options, net_options, mask_options,
                                         base=getattr(model, "settings", None))
    inputs, net, masks = split_settings(settings)
    masks.validate()
    if inputs.tile_norm_blocksize:
        raise ValueError("tile_norm_blocksize is not supported blockwise (normalisation is global)")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to replace it")
    source = open_source(image, inputs.channel_axis, component)
    shape = source.shape2d
    blocks = plan_blocks(shape, block_size, halo)
    by_index = {b.index: b for b in blocks}
    lowhigh = global_lowhigh(source, inputs) if inputs.normalize else None
    if inputs.diameter == "auto":  # one size for the whole image, from its centre
        inputs = replace(inputs, diameter=_auto_diameter(model, source, inputs, lowhigh))
    if masks.niter is None and inputs.diameter:  # as iter_segment does, for the whole image
        masks = replace(masks, niter=max(1, int(200 * inputs.diameter / 30.0)))
    settings = _Settings(
        inputs,
        InputOptions(channel_axis=2, normalize=False, diameter=inputs.diameter),
        net,
        masks,
    )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_path.parent.glob(f".{out_path.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "blocks").mkdir(parents=True)
    labels_path = str(tmp / "labels.zarr")
    bar = None
    try:
        import zarr

        zarr.open_array(labels_path, mode="w", shape=shape, chunks=(block_size, block_size),
                        dtype="uint32", fill_value=0)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(blocks), unit="block", desc="blocks", dynamic_ncols=True)
        if client is None:
            counts = segment_blocks(model, source, blocks, settings, lowhigh, tmp,
                                    on_block=(lambda b: bar.update(1)) if bar else None)
        else:
            counts = _pass1_distributed(client, model, source, blocks, settings, lowhigh, tmp,
                                        blocks_per_task, bar, device)
        offsets, total = {}, 0
        for b in blocks:
            offsets[b.index] = total
            total += counts[b.index]
        if total >= 2**32 - 1:
            raise OverflowError(f"{total} objects do not fit uint32 labels")
        # pass 2
        args = [(b, neighbours(b, by_index)) for b in blocks]
        if client is None:
            results = [compose_block(b, nb, offsets, tmp, labels_path) for b, nb in args]
        else:
            futs = [client.submit(compose_block, b, nb, offsets, str(tmp), labels_path, pure=False)
                    for b, nb in args]
            results = client.gather(futs)
        present = np.unique(np.concatenate([r[0] for r in results])) if results else np.zeros(0)
        merged = {tuple(sorted(p)) for r in results for p in r[1]}
        n_objects = int(present.size)
        # pass 3: consecutive ids
        if n_objects and int(present[-1]) != n_objects:
            ids = present.astype(np.uint32)
            if client is None:
                for b in blocks:
                    _relabel_block(b, labels_path, ids)
            else:
                ids_f = client.scatter(ids, broadcast=True)
                client.gather([client.submit(_relabel_block, b, labels_path, ids_f, pure=False)
                               for b in blocks])
        lowhigh_list = [tuple(map(float, lh)) for lh in lowhigh] if lowhigh is not None else None
        arr = zarr.open_array(labels_path, mode="r+")
        arr.attrs["cpsam"] = json.loads(json.dumps({
            "model": model.name, "block_size": block_size, "halo": halo, "n_objects": n_objects,
            "lowhigh": lowhigh_list, "source": source.path, "merged_duplicates": len(merged),
        }, default=str))
        _replace_dir(Path(labels_path), out_path, overwrite)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return BlockwiseResult(out_path, shape, n_objects, len(blocks), block_size, halo,
                           lowhigh_list, len(merged), time.perf_counter() - t0)


def _pass1_distributed(
    client: Any, model: CellposeSAM, source: Source, blocks: Sequence[Block], settings: _Settings,
    lowhigh: Any, tmp: Path, blocks_per_task: int | None, bar: Any, device: str | None,
) -> dict[tuple[int, int], int]:
    from distributed import as_completed

    client.register_plugin(WorkerSetup(), name=WorkerSetup.name)
    spec = model_for_workers(client, ModelSpec.from_model(model, device) if model_file(model) else model)
    if source.path is None:  # workers need a file: copy the array into the temporary folder
        source = _to_zarr(source, tmp / "input.zarr")
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    if blocks_per_task is None:
        blocks_per_task = max(1, min(4, math.ceil(len(blocks) / (2 * n_workers))))
    groups = [list(blocks[i : i + blocks_per_task]) for i in range(0, len(blocks), blocks_per_task)]
    futs = [client.submit(_pass1_task, spec, source, g, settings, lowhigh, str(tmp), pure=False)
            for g in groups]
    counts: dict[tuple[int, int], int] = {}
    for fut in as_completed(futs):
        c = fut.result()
        counts.update(c)
        if bar is not None:
            bar.update(len(c))
    return counts


def _to_zarr(source: Source, path: Path) -> Source:
    import zarr

    arr = source.array()
    z = zarr.open_array(str(path), mode="w", shape=source.shape, dtype=source.dtype,
                        chunks=tuple(min(s, 2048) for s in source.shape))
    step = 2048
    ly = source.shape2d[0]
    for y0 in range(0, ly, step):
        sl = [slice(None)] * len(source.shape)
        sl[0 if source.channel_axis != 0 else 1] = slice(y0, min(ly, y0 + step))
        z[tuple(sl)] = np.asarray(_get(arr, tuple(sl)))
    new = Source(str(path), "zarr", None, source.channel_axis, source.shape, source.dtype)
    return new


def iter_block_crops(image: Any, block_size: int, halo: int) -> Iterator[tuple[Block, np.ndarray]]:
    """(block, crop as (Y, X, C)) pairs of an image, for custom per-block processing."""
    src = open_source(image)
    for b in plan_blocks(src.shape2d, block_size, halo):
        yield b, src.read(*b.crop)

