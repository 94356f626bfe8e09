"""Arrays → network maps: device, precision, tiling, batching and the one out-of-memory policy.

:class:`Predictor` holds a network on one device. :meth:`Predictor.iter_predict` turns 2D
images (any layout :mod:`cpsam_toolkit.preprocess` accepts) into ``(flows (2, Y, X),
cellprob (Y, X))`` maps (plus the class maps of a panoptic network), tiles of all images
sharing network batches. Every mode (planar, volume, panoptic, blockwise) runs the network
through it.

Out of memory, one policy: a batch that does not fit is halved and retried (the smaller size
is kept for later batches), so no image is lost; only a single tile that does not fit raises
a ``MemoryError`` saying what to change. ``gpu_memory`` (a budget such as ``"6GB"``) picks the
largest batch that fits it, measured once by trial forwards on CUDA; elsewhere it changes
nothing.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import preprocess, tiling
from ..device import resolve_device, resolve_dtype
from ..network.model import CPSAMNet
from ..settings import parse_memory
from .options import InputOptions, NetOptions

log = logging.getLogger("cpsam_toolkit")

__all__ = ["Predictor", "run_with_oom_fallback", "is_oom", "resize_maps"]

#: the largest batch a memory budget may choose
MAX_BUDGET_BATCH = 256


def is_oom(e: BaseException) -> bool:
    """True for a CUDA (or other torch) out-of-memory error."""
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
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_oom(e):
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


def resize_maps(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, Y, X) float32 maps to ``shape``."""
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0].numpy()


class Predictor:
    """A Cellpose-SAM network ready for inference on one device.

    Parameters
    ----------
    net : CPSAMNet
        The network (moved to ``device``/``dtype`` and put in eval mode).
    device, dtype : optional
        See :func:`cpsam_toolkit.device.resolve_device` / ``resolve_dtype``.
    """

    def __init__(
        self,
        net: CPSAMNet,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.net = net.to(device=self.device, dtype=self.dtype).eval()
        self._chunk: int | None = None  # batch size that survived an out-of-memory error
        self._budget_batch: dict[int, int] = {}  # memory budget (bytes) -> measured batch

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

    def batch_for_memory(self, budget: str | int | None, batch_size: int) -> int:
        """The largest batch whose forward pass fits ``budget`` (e.g. ``"6GB"``) on CUDA.

        Measured once per budget: the peak memory of trial forwards of 1 and 2 tiles gives
        the fixed and per-tile cost. ``budget=None`` or a non-CUDA device returns
        ``batch_size`` unchanged.
        """
        if budget is None or self.device.type != "cuda":
            return batch_size
        nbytes = parse_memory(budget)
        if nbytes not in self._budget_batch:
            tile = self.net.cfg.tile
            peaks = []
            for b in (1, 2):
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                self._forward(np.zeros((b, 3, tile, tile), np.float32))
                torch.cuda.synchronize(self.device)
                peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
            per_tile = max(1, peaks[1] - peaks[0])
            fixed = max(0, peaks[0] - per_tile)
            fit = int((nbytes - fixed) // per_tile)
            if fit < 1:
                raise MemoryError(
                    f"gpu_memory={budget!r} is less than one tile needs ({peaks[0] / 1e9:.2f} GB); "
                    "give a larger budget or leave gpu_memory unset"
                )
            self._budget_batch[nbytes] = min(MAX_BUDGET_BATCH, fit)
            log.info("cpsam: gpu_memory=%s -> batch size %d (%.1f MB per tile)", budget,
                     self._budget_batch[nbytes], per_tile / 1e6)
        return self._budget_batch[nbytes]

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
        if inputs.diameter == "auto":
            raise ValueError("diameter='auto' is resolved per image by CellposeSAM.resolve_inputs "
                             "(it needs the model's size model); give pixels or None here")
        scale = 30.0 / inputs.diameter if inputs.diameter else 1.0
        if scale <= 0 or not np.isfinite(scale):
            raise ValueError(f"diameter must be a positive number of pixels, got {inputs.diameter}")
        batch_size = self.batch_for_memory(getattr(net, "gpu_memory", None), net.batch_size)

        def prepared() -> Iterator[np.ndarray]:
            for i, img in enumerate(images):
                name = names[i] if names is not None and i < len(names) else f"image {i}"
                x = self._prepare(img, inputs, name)
                shapes.append(x.shape[:2])
                if scale != 1.0:
                    size = (max(2, int(x.shape[0] * scale)), max(2, int(x.shape[1] * scale)))
                    x = np.moveaxis(resize_maps(np.moveaxis(x, -1, 0), size), 0, -1)
                yield x

        bar = None
        on_batch = progress if callable(progress) else None
        if progress is True:
            bar = tqdm(unit="tile", desc="network", leave=False)
            on_batch = bar.update
        try:
            outs = tiling.run_tiled(
                self.predict_tiles,
                prepared(),
                batch_size=batch_size,
                tile=self.net.cfg.tile,
                overlap=net.tile_overlap,
                augment=net.augment,
                on_batch=on_batch,
            )
            for i, y in enumerate(outs):
                if y.shape[1:] != shapes[i]:
                    y = resize_maps(y, shapes[i])
                yield (y[-3:-1], y[-1], y[:-3]) if class_maps else (y[-3:-1], y[-1])
        finally:
            if bar is not None:
                bar.close()

    def describe(self) -> dict[str, Any]:
        """Device and precision, for logs and run records."""
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}
