"""cpsam-toolkit: Cellpose-SAM cell segmentation, compatible with the published weights.

>>> import cpsam_toolkit as cp
>>> model = cp.load_model()            # cpsam_v2/cpsam if present locally, else the shipped model
>>> result = model.segment(image)      # result.masks, result.flows, result.cellprob
>>> model.settings                     # defaults + the model file's recommended settings

The data path and the stage modules are available as ``cp.io``, ``cp.preprocess``,
``cp.flows``, ``cp.dynamics`` and ``cp.metrics``; see ``docs/architecture.md`` for the layers.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import dynamics, flows, io, metrics, preprocess, settings  # noqa: E402
from .segment import CellposeSAM, SegmentationResult, load_model  # noqa: E402
from .settings import Settings  # noqa: E402

__all__ = ["CellposeSAM", "SegmentationResult", "Settings", "load_model", "__version__",
           "dynamics", "flows", "io", "metrics", "preprocess", "settings"]
