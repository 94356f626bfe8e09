"""cpsam-toolkit: Cellpose-SAM cell segmentation, compatible with the published weights.

>>> import cpsam_toolkit as cp
>>> model = cp.load_model()            # cpsam_v2/cpsam if present locally, else the shipped model
>>> result = model.segment(image)      # result.masks, result.flows, result.cellprob
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CellposeSAM", "SegmentationResult", "load_model", "__version__"]


def __getattr__(name: str):
    # keep `import cpsam_toolkit` light (no torch) for the CLI's --help and the CellProfiler
    # plugin's module list; the model API is imported on first use
    if name in ("CellposeSAM", "SegmentationResult", "load_model"):
        from . import segment

        return getattr(segment, name)
    raise AttributeError(f"module 'cpsam_toolkit' has no attribute {name!r}")
