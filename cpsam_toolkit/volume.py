"""Volumes (re-export facade): 3D flows, stitching, training slices and volume files.

The code lives in :mod:`cpsam_toolkit.modes.volume` (the mode: its docstring gives the method
and the measured choices), :mod:`cpsam_toolkit.training.volume` (2D training pairs from
labelled volumes) and :func:`cpsam_toolkit.batch.segment_volume_files` (files); this module
keeps the names that used to be here.
"""

from __future__ import annotations

from .batch import segment_volume_files  # noqa: F401
from .modes.volume import (  # noqa: F401
    DEFAULT_NITER,
    VIEWS,
    FlowAccumulator,
    VolumeMaskOptions,
    VolumeResult,
    _masks_stitched,
    _slices,
    _taps,
    masks_from_volume_flows,
    network_depth,
    object_table_3d,
    options_dict,
    predict_volume,
    prepare_volume,
    resample_z,
    segment_3d,
    segment_planes,
    segment_stack_stitched,
    segment_volume,
    smooth_flows,
    stitch_planes,
    to_zyxc,
)
from .modes.volume import __all__ as _mode_all
from .preprocess import ImageInputError  # noqa: F401
from .training.volume import slices_from_volume  # noqa: F401

__all__ = [*_mode_all, "slices_from_volume", "segment_volume_files"]
