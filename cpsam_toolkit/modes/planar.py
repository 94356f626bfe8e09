"""Planar 2D mode: a predictor's ``(flows, cellprob)`` stream → one result per image."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ..core.options import MaskOptions
from ..core.postprocess import masks_from_flows, staged_masks
from ..core.result import SegmentationResult

__all__ = ["iter_planar"]


def iter_planar(
    outputs: Iterable[tuple[np.ndarray, np.ndarray]],
    options: MaskOptions,
    names: Sequence[str] | None = None,
) -> Iterator[SegmentationResult]:
    """Masks for each ``(flows (2, Y, X), cellprob (Y, X))`` of ``outputs``, in input order.

    Each result keeps its tracking cache, so a later ``recompute()`` reuses the tracking.
    """
    for i, (flows, cellprob) in enumerate(outputs):
        name = names[i] if names is not None and i < len(names) else None
        if flows.shape[0] != 2:
            labels = masks_from_flows(flows, cellprob, options)
            yield SegmentationResult(labels, flows, cellprob, options, name)
            continue
        stages: dict = {}
        labels, qc = staged_masks(flows, cellprob, options, stages)
        yield SegmentationResult(labels, flows, cellprob, options, name, stages, qc)
