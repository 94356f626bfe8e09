"""Panoptic Cellpose-SAM (re-export facade): instance masks plus one class per object.

The code lives in :mod:`cpsam_toolkit.modes.panoptic` (network with class maps, inference,
results, CellProfiler naming), :mod:`cpsam_toolkit.training.panoptic` (class files, targets,
loss, :func:`train_panoptic`) and :func:`cpsam_toolkit.evaluate.evaluate_panoptic` (scoring);
:func:`segment_panoptic` is in :mod:`cpsam_toolkit.segment`. This module keeps the names that
used to be here.

>>> net = make_panoptic(load_model("cpsam_toolkit_small").net, ["epithelial", "inflammatory"])
>>> train_panoptic(net, "train_folder", "val_folder", out="panoptic.pt")
>>> res = segment_panoptic(load_model("panoptic.pt"), image)
>>> res.masks, res.classes, res.class_image
"""

from __future__ import annotations

from .core.options import MaskOptions  # noqa: F401
from .core.result import SegmentationResult  # noqa: F401
from .evaluate import evaluate_panoptic  # noqa: F401
from .modes.panoptic import (  # noqa: F401
    BACKGROUND,
    CLASSES_SUFFIX,
    PanopticResult,
    _build,
    _check_class_names,
    _measurement_name,
    assign_classes,
    class_object_names,
    is_panoptic,
    iter_panoptic,
    make_panoptic,
    measurement_features,
    measurement_values,
    model_class_names,
    object_classes,
    panoptic_result,
    save_classes_json,
    split_by_class,
)
from .segment import (  # noqa: F401
    segment_panoptic,
)
from .training.data import LabelError  # noqa: F401
from .training.panoptic import (  # noqa: F401
    ClassFileError,
    ClassLoss,
    PanopticData,
    _classes_file,
    augment_with_classes,
    class_lut,
    class_target,
    class_weights,
    load_panoptic,
    read_classes,
    train_panoptic,
)

__all__ = [
    "BACKGROUND",
    "ClassFileError",
    "ClassLoss",
    "PanopticData",
    "PanopticResult",
    "assign_classes",
    "augment_with_classes",
    "class_lut",
    "class_object_names",
    "class_target",
    "class_weights",
    "evaluate_panoptic",
    "is_panoptic",
    "load_panoptic",
    "make_panoptic",
    "measurement_features",
    "measurement_values",
    "model_class_names",
    "object_classes",
    "panoptic_result",
    "read_classes",
    "save_classes_json",
    "segment_panoptic",
    "split_by_class",
    "train_panoptic",
]
