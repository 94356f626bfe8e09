"""The result of segmenting one image: masks, the network maps and one per-object table."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from .options import MaskOptions
from .postprocess import masks_from_flows, object_table, select_objects, staged_masks

__all__ = ["SegmentationResult"]


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
    diameter : float or None
        The object diameter (px) the image was resized from, so that such objects were 30 px
        for the network (``diameter`` given, or estimated by ``diameter="auto"``); None when
        the image was not resized.
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
    diameter: float | None = field(default=None, compare=False)

    def select(self, keep: np.ndarray) -> SegmentationResult:
        """A result with only some objects: ``keep`` is one boolean per object (e.g.
        ``res.objects["area"] > 50``) or the labels to keep. Masks are relabelled 1..M and
        ``objects`` holds the same rows, so both stay in step."""
        masks, table = select_objects(self.masks, self.objects, keep)
        new = replace(self, masks=masks, _stages={}, _qc=None)
        new.__dict__["objects"] = table
        return new

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
                masks_from_flows(self.flows, self.cellprob, opts), self.flows, self.cellprob, opts, self.name,
                diameter=self.diameter,
            )
        masks, qc = staged_masks(self.flows, self.cellprob, opts, self._stages)
        return SegmentationResult(masks, self.flows, self.cellprob, opts, self.name, self._stages, qc,
                                  diameter=self.diameter)
