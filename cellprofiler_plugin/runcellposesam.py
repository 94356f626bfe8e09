"""
RunCellposeSAM
==============

**RunCellposeSAM** finds cells or nuclei with Cellpose-SAM (the cpsam-toolkit
re-implementation) and outputs them as objects, like **IdentifyPrimaryObjects**.

The module works on grayscale or colour images. Up to two additional grayscale
images (for example a nuclear stain and a membrane stain) can be added as extra
channels; Cellpose-SAM uses at most three channels in total.

It runs the shipped default model, the published ``cpsam`` / ``cpsam_v2``
weights, or your own fine-tuned model file. The model is loaded once per
CellProfiler process and reused for every image set.

|

============ ============ ===============
Supports 2D? Supports 3D? Respects masks?
============ ============ ===============
YES          YES          YES
============ ============ ===============

What do I need as input?
^^^^^^^^^^^^^^^^^^^^^^^^

An image of cells or nuclei, loaded with **NamesAndTypes**. cpsam-toolkit
must be installed in the Python environment that runs CellProfiler
(``pip install cpsam-toolkit``), and this file must be in the plugins folder.

What do I get as output?
^^^^^^^^^^^^^^^^^^^^^^^^

Objects, and optionally a probability image (0 to 1, the network's
cell-probability map).

Measurements made by this module
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

**Image measurements:**

-  *Count:* the number of objects found.
-  *CellposeSAM_Model_<objects>:* the model used.
-  *CellposeSAM_ModelVersion_<objects>:* the cpsam-toolkit version and the
   first digits of the SHA-256 of the weights, so results can be traced
   to the exact model.
-  *CellposeSAM_Settings_<objects>:* how to repeat the run: the model, the
   full SHA-256 of its weights, the settings and the equivalent
   ``cpsam segment`` command (one JSON text).
-  *CellposeSAM_BlockSize_<objects>:* 0 when the image was segmented whole,
   else the side (pixels) of the blocks it was segmented in ('RAM per worker').
-  *CellposeSAM_Diameter_<objects>:* the object diameter (pixels) the image
   was resized from so that such objects were 30 pixels for the network: the
   *diameter* you set, or the model's estimate for this image when it is
   'auto'; 0 when the image was not resized.

**Object measurements:**

-  *Location_Center_X, Location_Center_Y, Location_Center_Z:* object centres.
-  *Number_Object_Number:* 1..N.
-  *CellposeSAM_MeanCellProb:* (if confidence measurements are on) the
   mean cell probability (0..1) inside the object: low values mark
   uncertain objects.
-  *CellposeSAM_FlowError:* (if confidence measurements are on) how much
   the object's shape disagrees with the predicted flows; large values mark
   badly-shaped objects. Objects above the *flow threshold* are already
   removed.

Technical notes
^^^^^^^^^^^^^^^

The loaded model is kept in a per-process cache keyed by (model file or
name, device, precision). CellProfiler's analysis workers each hold one copy,
so N workers on one GPU hold N copies of the model. Headless runs
(``cellprofiler -c -r``) use a single process.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
from cellprofiler_core.constants.measurement import (
    C_CHILDREN,
    C_COUNT,
    C_LOCATION,
    C_NUMBER,
    C_PARENT,
    COLTYPE_FLOAT,
    COLTYPE_INTEGER,
    COLTYPE_VARCHAR_FORMAT,
    FF_CHILDREN_COUNT,
    FF_PARENT,
    FTR_CENTER_X,
    FTR_CENTER_Y,
    FTR_CENTER_Z,
    FTR_OBJECT_NUMBER,
    IMAGE,
)
from cellprofiler_core.image import Image
from cellprofiler_core.module.image_segmentation import ImageSegmentation
from cellprofiler_core.object import Objects
from cellprofiler_core.preferences import (
    ABSOLUTE_FOLDER_NAME,
    DEFAULT_INPUT_FOLDER_NAME,
    DEFAULT_INPUT_SUBFOLDER_NAME,
    DEFAULT_OUTPUT_FOLDER_NAME,
    DEFAULT_OUTPUT_SUBFOLDER_NAME,
)
from cellprofiler_core.setting import Binary, ValidationError
from cellprofiler_core.setting.choice import Choice
from cellprofiler_core.setting.subscriber import ImageSubscriber
from cellprofiler_core.setting.text import Directory, Filename, Float, ImageName, Integer, Text

__all__ = ["RunCellposeSAM", "clear_model_cache", "CellposeSAMError"]

LOGGER = logging.getLogger(__name__)

MODEL_DEFAULT = "Default (shipped with cpsam-toolkit)"
MODEL_CPSAM = "cpsam"
MODEL_CPSAM_V2 = "cpsam_v2"
MODEL_CUSTOM = "Custom model file"
MODEL_CHOICES = [MODEL_DEFAULT, MODEL_CPSAM, MODEL_CPSAM_V2, MODEL_CUSTOM]
#: registry name of the shipped model (cpsam_toolkit/models/cpsam_small.pt)
SHIPPED_MODEL = "cpsam_toolkit_small"

DEVICE_AUTO = "Automatic"
DEVICE_CPU = "CPU"
DEVICE_GPU = "GPU"
DEVICE_CHOICES = [DEVICE_AUTO, DEVICE_CPU, DEVICE_GPU]
_DEVICE_ARG = {DEVICE_AUTO: "auto", DEVICE_CPU: "cpu", DEVICE_GPU: "gpu"}

#: Measurement names. Image-level: ``CellposeSAM_Model_<objects>``,
#: ``CellposeSAM_ModelVersion_<objects>``; object-level: ``CellposeSAM_MeanCellProb``,
#: ``CellposeSAM_FlowError``.
C_CELLPOSESAM = "CellposeSAM"
FTR_MODEL = "Model"
FTR_MODEL_VERSION = "ModelVersion"
FTR_SETTINGS = "Settings"  # JSON: model, SHA-256, settings, the `cpsam segment` command
FTR_BLOCK_SIZE = "BlockSize"  # px side of the blocks a large 2D image was segmented in; 0: whole
FTR_DIAMETER = "Diameter"  # px the image was resized from (given or estimated); 0: not resized
FTR_MEAN_CELLPROB = "MeanCellProb"
FTR_FLOW_ERROR = "FlowError"
M_MEAN_CELLPROB = f"{C_CELLPOSESAM}_{FTR_MEAN_CELLPROB}"
M_FLOW_ERROR = f"{C_CELLPOSESAM}_{FTR_FLOW_ERROR}"
COLTYPE_MODEL_STRING = COLTYPE_VARCHAR_FORMAT % 255

FLOW_THRESHOLD_RANGE = (0.0, 3.0)
CELLPROB_THRESHOLD_RANGE = (-6.0, 6.0)
MAX_BATCH_SIZE = 1024


class CellposeSAMError(RuntimeError):
    """A failure of RunCellposeSAM, with the image (and file) it happened on named."""


# --------------------------------------------------------------------------------------------
# The library does the work: one process-wide model cache (cpsam_toolkit.model_cache, shared with
# batch runs; each CellProfiler worker process holds its own copy), one out-of-memory policy
# (the model halves its batch and remembers the size that fit), label filtering
# (result.select), plane-by-plane volumes (cpsam_toolkit.volume.segment_planes). cpsam_toolkit
# is imported on first use only, so CellProfiler can list this module without torch.
# --------------------------------------------------------------------------------------------
def _import_toolkit():
    try:
        import cpsam_toolkit
    except ImportError as e:
        raise CellposeSAMError(
            "cpsam-toolkit is not installed in the Python environment that runs CellProfiler "
            f"({sys.executable}). Install it there with: pip install cpsam-toolkit "
            f"(import failed: {e})"
        ) from e
    if not hasattr(cpsam_toolkit, "load_model"):
        raise CellposeSAMError(
            "the installed cpsam-toolkit has no load_model(); it is incomplete or too old. "
            "Reinstall it with: pip install --upgrade cpsam-toolkit"
        )
    return cpsam_toolkit


def get_model(spec: str | None, device: str = "auto", dtype=None):
    """``(model, key)``: the cached model for (weights, device, dtype), loaded on first use
    (:func:`cpsam_toolkit.model_cache.get_model`)."""
    _import_toolkit()
    from cpsam_toolkit import model_cache

    return model_cache.get_model(spec, device, dtype)


def clear_model_cache() -> None:
    """Forget every cached model and release cached GPU memory."""
    cache = sys.modules.get("cpsam_toolkit.model_cache")  # nothing cached if never imported
    if cache is not None:
        cache.clear_model_cache()


def model_sha256(model) -> str:
    """SHA-256 of the model's weights file ('' if unknown; hashed once per file)."""
    from cpsam_toolkit.model_cache import weights_sha256

    return weights_sha256(model)


def shipped_model_name() -> str:
    """Registry name of the model shipped inside cpsam-toolkit."""
    try:
        from cpsam_toolkit.network.registry import DEFAULT_MODEL
    except ImportError:
        return SHIPPED_MODEL
    return DEFAULT_MODEL


class RunCellposeSAM(ImageSegmentation):
    category = "Object Processing"
    module_name = "RunCellposeSAM"
    variable_revision_number = 5

    # ------------------------------------------------------------------ settings
    def create_settings(self):
        super().create_settings()
        self.x_name.text = "Select the input image"
        self.x_name.doc = (
            "Select the image to segment: grayscale or colour (at most 3 channels), 2D or a "
            "3D volume (load it with NamesAndTypes' 'Process as 3D')."
        )
        self.y_name.text = "Name the objects to be identified"
        self.y_name.value = "Cells"
        self.y_name.doc = "Name the objects found, e.g. 'Nuclei' or 'Cells'."

        self.use_channel2 = Binary(
            "Use an additional channel image?", False,
            doc="Add a second grayscale image (for example a nuclear stain when segmenting "
                "cells) as an extra channel. It must have the same size as the input image.",
        )
        self.channel2_name = ImageSubscriber(
            "Select the second channel image", doc="A grayscale image of the same size.",
        )
        self.use_channel3 = Binary(
            "Use a third channel image?", False,
            doc="Add a third grayscale image (for example a membrane stain). Cellpose-SAM "
                "uses at most three channels in total.",
        )
        self.channel3_name = ImageSubscriber(
            "Select the third channel image", doc="A grayscale image of the same size.",
        )

        self.model_choice = Choice(
            "Model", MODEL_CHOICES, value=MODEL_DEFAULT,
            doc=f"""\
- *{MODEL_DEFAULT}:* the small, fast model that comes with cpsam-toolkit (works offline).
- *{MODEL_CPSAM}* / *{MODEL_CPSAM_V2}:* the published Cellpose-SAM weights (large; downloaded
  once into the cpsam-toolkit cache, so the first run needs internet access — pre-download
  them on cluster nodes with ``cpsam models download``).
- *{MODEL_CUSTOM}:* a model file you trained or fine-tuned (cpsam-toolkit or Cellpose-SAM
  format).""",
        )
        self.model_directory = Directory(
            "Location of the model file",
            dir_choices=[
                ABSOLUTE_FOLDER_NAME,
                DEFAULT_INPUT_FOLDER_NAME,
                DEFAULT_OUTPUT_FOLDER_NAME,
                DEFAULT_INPUT_SUBFOLDER_NAME,
                DEFAULT_OUTPUT_SUBFOLDER_NAME,
            ],
            doc="The folder that holds your model file.",
        )
        self.model_file_name = Filename(
            "Model file name", "model.pt",
            get_directory_fn=self._model_dir_for_browse,
            set_directory_fn=self._set_model_dir_from_browse,
            browse_msg="Choose the Cellpose-SAM model file",
            exts=[("PyTorch weights (*.pt, *.pth)", "*.pt;*.pth"), ("All files (*.*)", "*.*")],
            doc="The model file in the folder above.",
        )

        self.device = Choice(
            "Run on", DEVICE_CHOICES, value=DEVICE_AUTO,
            doc=f"*{DEVICE_AUTO}* uses a GPU when one is available, else the CPU. *{DEVICE_GPU}* "
                "stops with an error if there is no usable GPU (NVIDIA CUDA or Apple MPS).",
        )
        self.use_model_settings = Binary(
            "Use the model's recommended settings?", True,
            doc="A model file can carry the settings chosen for it on validation images (for "
                "example the shipped model's flow threshold 0.8). Yes: those values replace "
                "the flow threshold, cell probability threshold and diameter below where the "
                "model recommends one (the module window lists which came from the model). "
                "No: the values below are used as they are.",
        )
        self.batch_size = Integer(
            "Batch size", 8,
            doc="How many 256x256 tiles go through the network at once. Larger is faster on a "
                "GPU but needs more GPU memory; if the GPU runs out of memory the module "
                "retries with smaller batches automatically (and logs a warning).",
        )
        per_worker = ("Each CellProfiler worker process holds its own model and memory, so give "
                      "the machine's memory divided by the number of workers.")
        self.gpu_memory = Text(
            "GPU memory per worker", "",
            doc="Empty: the batch size above is used. A size such as 6GB: the largest batch of "
                "tiles that fits in it is used (measured on the GPU; ignored on the CPU). "
                + per_worker)
        self.host_memory = Text(
            "RAM per worker", "",
            doc="Above this much RAM a 2D image is segmented in blocks (nearly the same objects; "
                f"the image measurement {C_CELLPOSESAM}_{FTR_BLOCK_SIZE}_<objects> gives the block "
                "size, 0 when whole). Empty: automatic (half the free RAM, at most 4 GB); a size "
                "such as 8GB; 'unlimited': always whole. " + per_worker)
        self.flow_threshold = Float(
            "Flow threshold", 0.4,
            doc="Maximum allowed disagreement between an object's shape and the predicted flows "
                f"({FLOW_THRESHOLD_RANGE[0]:g} to {FLOW_THRESHOLD_RANGE[1]:g}). Increase it if "
                "too few objects are found; decrease it to drop badly-shaped objects. 0 turns "
                "the check off.",
        )
        self.cellprob_threshold = Float(
            "Cell probability threshold", 0.0,
            doc="Pixels whose cell probability (as a logit) is above this value belong to "
                f"objects ({CELLPROB_THRESHOLD_RANGE[0]:g} to {CELLPROB_THRESHOLD_RANGE[1]:g}; "
                "0 means probability 0.5). Decrease it to find more and larger objects, "
                "increase it for fewer and smaller ones.",
        )
        self.diameter = Float(
            "Typical object diameter (pixels)", 0.0,
            doc="0 (the default) segments the image as it is: Cellpose-SAM handles a wide range "
                "of sizes. With 'Use the model's recommended settings?', 0 leaves the size to the "
                "model: the shipped small model estimates each image's object size, shrinks "
                "images whose objects are over 30 pixels across and enlarges fluorescence images "
                "(dark background) whose nuclei are smaller (its recommended diameter 'auto'). "
                "A value resizes the image so objects are about 30 pixels across "
                "before segmenting (masks come back at the original size). Use it for a model "
                "trained at one size (its model card says so; e.g. 15 for a panoptic H&E "
                "model trained on 2x zoomed CoNSeP patches), or for objects far smaller or larger "
                "than about 10 to 100 pixels.",
        )
        self.min_size = Integer(
            "Minimum object size (pixels)", 15,
            doc="Objects smaller than this many pixels (voxels in 3D) are discarded. 0 keeps "
                "every object.",
        )
        self.remove_border = Binary(
            "Discard objects touching the border of the image?", True,
            doc="Discard objects that touch the edge of the image (or of its mask), because "
                "their size and shape are incomplete. In 3D all six faces count as border.",
        )
        self.do_3d = Binary(
            "Segment volumes in 3D?", False,
            doc="For 3D images: segment the whole volume at once (objects span planes). If No, "
                "each plane of a volume is segmented on its own (objects do not span planes).",
        )
        self.anisotropy = Float(
            "Z spacing relative to XY", 1.0,
            doc="Voxel spacing along Z divided by the pixel size in X/Y (e.g. 2.0 for 0.5 um "
                "pixels and 1 um steps).",
        )
        self.save_probabilities = Binary(
            "Save the probability map as an image?", False,
            doc="Output the cell probability (0 to 1) as an image for later modules or "
                "SaveImages.",
        )
        self.probabilities_name = ImageName(
            "Name the probability image", "CellProbability",
            doc="Name of the probability image.",
        )
        self.wants_confidence = Binary(
            "Measure per-object confidence?", True,
            doc=f"Measure {M_MEAN_CELLPROB} (mean cell probability inside each object) and "
                f"{M_FLOW_ERROR} (shape/flow disagreement) for quality control.",
        )
        self.split_by_class = Binary(
            "Save one object set per class?", False,
            doc="Only for panoptic models (models trained with object classes, e.g. nucleus "
                "types; plain models have none and this setting then does nothing). Besides "
                "the objects named above, output one object set per class, named "
                "'<objects>_<class>' (for example 'Nuclei_epithelial'), so later modules can "
                "measure, filter, relate or export each class on its own. Each class object is "
                "a child of the same object in the main set (Parent_/Children_ measurements). "
                "Every object also carries the class measurements CellposeSAM_ClassNumber and "
                "CellposeSAM_Class_<class> (0/1) either way.",
        )

    def _model_dir_for_browse(self):
        try:
            return self.model_directory.get_absolute_path()
        except Exception:
            return None

    def _set_model_dir_from_browse(self, path):
        dir_choice, custom_path = self.model_directory.get_parts_from_path(path)
        self.model_directory.join_parts(dir_choice, custom_path)

    def settings(self):
        return [
            self.x_name,
            self.y_name,
            self.use_channel2,
            self.channel2_name,
            self.use_channel3,
            self.channel3_name,
            self.model_choice,
            self.model_directory,
            self.model_file_name,
            self.device,
            self.batch_size,
            self.flow_threshold,
            self.cellprob_threshold,
            self.min_size,
            self.remove_border,
            self.do_3d,
            self.anisotropy,
            self.save_probabilities,
            self.probabilities_name,
            self.wants_confidence,
            self.split_by_class,
            self.diameter,
            self.use_model_settings,
            self.gpu_memory,
            self.host_memory,
        ]

    def visible_settings(self):
        result = [self.x_name, self.y_name, self.use_channel2]
        if self.use_channel2:
            result += [self.channel2_name, self.use_channel3]
            if self.use_channel3:
                result += [self.channel3_name]
        result += [self.model_choice]
        if self.model_choice == MODEL_CUSTOM:
            result += [self.model_directory, self.model_file_name]
        result += [self.device, self.batch_size, self.gpu_memory, self.host_memory,
                   self.use_model_settings, self.flow_threshold,
                   self.cellprob_threshold,
                   self.diameter, self.min_size, self.remove_border, self.do_3d]
        if self.do_3d:
            result += [self.anisotropy]
        result += [self.save_probabilities]
        if self.save_probabilities:
            result += [self.probabilities_name]
        result += [self.wants_confidence, self.split_by_class]
        return result

    def upgrade_settings(self, setting_values, variable_revision_number, module_name):
        if variable_revision_number == 1:
            # revision 1 had no "Measure per-object confidence?" setting; it always measured
            setting_values = list(setting_values) + ["Yes"]
            variable_revision_number = 2
        if variable_revision_number == 2:
            # revision 2 had no "Save one object set per class?" and no diameter setting
            setting_values = list(setting_values) + ["No", "0.0"]
            variable_revision_number = 3
        if variable_revision_number == 3:
            # revision 3 had no "Use the model's recommended settings?": its values were used
            setting_values = list(setting_values) + ["No"]
            variable_revision_number = 4
        if variable_revision_number == 4:
            # revision 4 had no memory budgets: both automatic
            setting_values = list(setting_values) + ["", ""]
            variable_revision_number = 5
        if variable_revision_number != self.variable_revision_number:
            raise ValueError(
                f"RunCellposeSAM settings revision {variable_revision_number} is newer than this "
                f"plugin understands (revision {self.variable_revision_number}); update the "
                "plugin (pip install --upgrade cpsam-toolkit) and copy its runcellposesam.py"
            )
        return setting_values, variable_revision_number

    # ------------------------------------------------------------------ helpers
    def _channel_names(self) -> list[str]:
        names = []
        if self.use_channel2:
            names.append(self.channel2_name.value)
            if self.use_channel3:
                names.append(self.channel3_name.value)
        return names

    def model_spec(self, measurements=None) -> str:
        """The shipped model's registry name, a registered name, or a custom file's path."""
        choice = self.model_choice.value
        if choice == MODEL_DEFAULT:
            # named explicitly: load_model(None) would prefer a downloaded cpsam_v2, so results
            # would depend on what happens to be in the cache of each machine
            return shipped_model_name()
        if choice == MODEL_CUSTOM:
            folder = self.model_directory.get_absolute_path(measurements)
            return os.path.join(folder, self.model_file_name.value)
        return choice

    def _check_numbers(self) -> list[tuple[str, object]]:
        """(message, setting) for every numeric setting out of range."""
        problems = []
        lo, hi = FLOW_THRESHOLD_RANGE
        if not lo <= self.flow_threshold.value <= hi:
            problems.append((
                f"The flow threshold must be between {lo:g} and {hi:g} (0 turns the shape "
                f"check off, 0.4 is usual); it is {self.flow_threshold.value:g}.",
                self.flow_threshold))
        lo, hi = CELLPROB_THRESHOLD_RANGE
        if not lo <= self.cellprob_threshold.value <= hi:
            problems.append((
                f"The cell probability threshold must be between {lo:g} and {hi:g} (0 is usual; "
                f"lower finds more and larger objects); it is {self.cellprob_threshold.value:g}.",
                self.cellprob_threshold))
        if not (self.diameter.value >= 0 and np.isfinite(self.diameter.value)):
            problems.append((
                "The typical object diameter must be 0 (no resizing) or a positive number of "
                f"pixels; it is {self.diameter.value:g}.", self.diameter))
        if self.min_size.value < 0:
            problems.append((
                "The minimum object size cannot be negative (use 0 to keep every object).",
                self.min_size))
        if not 1 <= self.batch_size.value <= MAX_BATCH_SIZE:
            problems.append((
                f"The batch size must be between 1 and {MAX_BATCH_SIZE} (8 is usual).",
                self.batch_size))
        if self.do_3d and not self.anisotropy.value > 0:
            problems.append((
                "The Z spacing relative to XY must be greater than 0 (1 means cubic voxels).",
                self.anisotropy))
        for setting, also in ((self.gpu_memory, ""), (self.host_memory, ", 'unlimited'")):
            text = setting.value.strip()
            if text and not (also and text.lower() == "unlimited") and not _is_memory_size(text):
                problems.append((
                    f"'{setting.text}' must be empty (automatic){also} or a size such as '6GB'; "
                    f"it is '{text}'.", setting))
        return problems

    def validate_module(self, pipeline):
        super().validate_module(pipeline)
        for message, setting in self._check_numbers():
            raise ValidationError(message, setting)

        names = [self.x_name.value] + self._channel_names()
        labels = [self.x_name, self.channel2_name, self.channel3_name]
        for i, name in enumerate(names[1:], start=1):
            if name in names[:i]:
                raise ValidationError(
                    f"The image '{name}' is selected twice; each channel must be a different "
                    "image.", labels[i])

        import importlib.util

        if importlib.util.find_spec("cpsam_toolkit") is None:
            raise ValidationError(
                "cpsam-toolkit is not installed in the Python environment that runs "
                "CellProfiler. Install it there with: pip install cpsam-toolkit",
                self.model_choice)

        if self.model_choice == MODEL_CUSTOM:
            folder_value = self.model_directory.value
            if "\\g<" not in folder_value and "\\g<" not in self.model_file_name.value:
                try:
                    path = self.model_spec()
                except Exception:
                    path = None
                if path is not None and not os.path.isfile(path):
                    raise ValidationError(
                        f"The model file '{path}' does not exist. Check the folder and the file "
                        "name, or choose the default model.", self.model_file_name)

        if self.device == DEVICE_GPU and not _gpu_available():
            raise ValidationError(
                "'Run on' is set to GPU but this computer has no usable GPU (or PyTorch was "
                "installed without GPU support). Choose 'Automatic' or 'CPU'.", self.device)

        if self.do_3d:
            volumetric = getattr(pipeline, "volumetric", None)
            if callable(volumetric) and not volumetric():
                raise ValidationError(
                    "3D segmentation needs images loaded as volumes: in NamesAndTypes set "
                    "'Process as 3D?' to Yes, or set 'Segment volumes in 3D?' to No.",
                    self.do_3d)

    def prepare_to_create_batch(self, workspace, fn_alter_path):
        self.model_directory.alter_for_create_batch_files(fn_alter_path)
        return True

    def is_object_identification_module(self):
        return True

    def volumetric(self):
        return True

    # ------------------------------------------------------------------ measurements
    def _image_features(self) -> list[str]:
        obj = self.y_name.value
        return [
            f"{C_CELLPOSESAM}_{FTR_MODEL}_{obj}",
            f"{C_CELLPOSESAM}_{FTR_MODEL_VERSION}_{obj}",
        ]

    def _class_names(self) -> tuple[str, ...]:
        """The model's object classes (panoptic models; read from the file's metadata)."""
        try:
            from cpsam_toolkit.modes.panoptic import model_class_names
        except ImportError:  # no toolkit here: nothing to declare (validation says so)
            return ()
        return tuple(model_class_names(self.model_spec()))

    def _class_features(self) -> list[str]:
        """Per-object class features when the model has classes (cpsam_toolkit.panoptic)."""
        names = self._class_names()
        if not names:
            return []
        from cpsam_toolkit.modes.panoptic import measurement_features

        return measurement_features(names)

    def _class_objects(self) -> list[str]:
        """Names of the per-class object sets ('Save one object set per class?')."""
        names = self._class_names() if self.split_by_class else ()
        if not names:
            return []
        from cpsam_toolkit.modes.panoptic import class_object_names

        return class_object_names(self.y_name.value, names)

    def other_providers(self, group):
        if group == "objectgroup":
            return list(super().other_providers(group)) + self._class_objects()
        return super().other_providers(group)

    def get_measurement_columns(self, pipeline, object_name=None):
        columns = list(super().get_measurement_columns(pipeline))
        columns += [(IMAGE, name, COLTYPE_MODEL_STRING) for name in self._image_features()]
        columns.append((IMAGE, f"{C_CELLPOSESAM}_{FTR_SETTINGS}_{self.y_name.value}",
                        COLTYPE_VARCHAR_FORMAT % 4000))
        columns.append((IMAGE, f"{C_CELLPOSESAM}_{FTR_BLOCK_SIZE}_{self.y_name.value}",
                        COLTYPE_INTEGER))
        columns.append((IMAGE, f"{C_CELLPOSESAM}_{FTR_DIAMETER}_{self.y_name.value}", COLTYPE_FLOAT))
        obj = self.y_name.value
        if self.wants_confidence:
            columns += [(obj, M_MEAN_CELLPROB, COLTYPE_FLOAT), (obj, M_FLOW_ERROR, COLTYPE_FLOAT)]
        columns += [(obj, f"{C_CELLPOSESAM}_{f}", COLTYPE_FLOAT) for f in self._class_features()]
        for name in self._class_objects():
            columns += super().get_measurement_columns(pipeline, name)
            columns += [(obj, FF_CHILDREN_COUNT % name, COLTYPE_INTEGER),
                        (name, FF_PARENT % obj, COLTYPE_INTEGER)]
        return columns

    def get_categories(self, pipeline, object_name):
        if object_name in self._class_objects():
            return [C_LOCATION, C_NUMBER, C_PARENT]
        categories = list(super().get_categories(pipeline, object_name))
        if object_name == IMAGE or (object_name == self.y_name.value and (
                self.wants_confidence or self._class_features())):
            categories.append(C_CELLPOSESAM)
        if object_name == self.y_name.value and self._class_objects():
            categories.append(C_CHILDREN)
        return categories

    def get_measurements(self, pipeline, object_name, category):
        class_objects = self._class_objects()
        if object_name in class_objects:
            return {C_LOCATION: [FTR_CENTER_X, FTR_CENTER_Y, FTR_CENTER_Z],
                    C_NUMBER: [FTR_OBJECT_NUMBER],
                    C_PARENT: [self.y_name.value]}.get(category, [])
        if object_name == self.y_name.value and category == C_CHILDREN:
            return [f"{name}_Count" for name in class_objects]
        if object_name == IMAGE and category == C_COUNT:
            return list(super().get_measurements(pipeline, object_name, category)) + class_objects
        if category == C_CELLPOSESAM:
            if object_name == IMAGE:
                return [FTR_MODEL, FTR_MODEL_VERSION, FTR_SETTINGS, FTR_BLOCK_SIZE, FTR_DIAMETER]
            if object_name == self.y_name.value:
                conf = [FTR_MEAN_CELLPROB, FTR_FLOW_ERROR] if self.wants_confidence else []
                return conf + self._class_features()
            return []
        return super().get_measurements(pipeline, object_name, category)

    def get_measurement_images(self, pipeline, object_name, category, measurement):
        if object_name == IMAGE and category == C_CELLPOSESAM and \
                measurement in (FTR_MODEL, FTR_MODEL_VERSION, FTR_SETTINGS, FTR_BLOCK_SIZE, FTR_DIAMETER):
            return [self.y_name.value]
        return []

    # ------------------------------------------------------------------ run
    def _describe(self, workspace) -> str:
        m = workspace.measurements
        where = f"image '{self.x_name.value}'"
        try:
            where += f" (image set {m.image_set_number}"
            feature = f"FileName_{self.x_name.value}"
            if m.has_feature(IMAGE, feature):
                where += f", file {m.get_current_image_measurement(feature)}"
            where += ")"
        except Exception:
            pass
        return where

    def _stack_channels(self, workspace, x) -> tuple[np.ndarray, int | None]:
        """The input as (Y,X[,C]) or (Z,Y,X[,C]) with channels last; returns (data, channel_axis)."""
        data = np.asarray(x.pixel_data)
        volumetric = bool(x.volumetric)
        spatial_nd = 3 if volumetric else 2
        if data.ndim == spatial_nd:
            channels = [data]
        elif data.ndim == spatial_nd + 1:
            channels = [data[..., c] for c in range(data.shape[-1])]
        else:
            raise CellposeSAMError(f"unsupported image shape {data.shape}")
        for name in self._channel_names():
            extra = workspace.image_set.get_image(name)
            arr = np.asarray(extra.pixel_data)
            if arr.ndim != spatial_nd:
                raise CellposeSAMError(
                    f"the channel image '{name}' must be grayscale; it has shape {arr.shape}. "
                    "Use ColorToGray to split colour images into channels.")
            if arr.shape != channels[0].shape:
                raise CellposeSAMError(
                    f"the channel image '{name}' ({arr.shape}) is not the same size as "
                    f"'{self.x_name.value}' ({channels[0].shape}).")
            channels.append(arr)
        if len(channels) > 3:
            raise CellposeSAMError(
                f"Cellpose-SAM uses at most 3 channels but {len(channels)} were given "
                f"('{self.x_name.value}' has {len(channels) - len(self._channel_names())}). "
                "Use ColorToGray or fewer additional channel images.")
        if len(channels) == 1:
            return channels[0].astype(np.float32, copy=False), None
        return np.stack(channels, axis=-1).astype(np.float32, copy=False), -1

    def library_settings(self, model, channel_axis):
        """The module's values as one cpsam_toolkit Settings: on top of the model's
        recommended settings ('Use the model's recommended settings?'), else the defaults."""
        from cpsam_toolkit.settings import Settings

        base = model.settings if self.use_model_settings else Settings()
        values = {"flow_threshold": float(self.flow_threshold.value),
                  "cellprob_threshold": float(self.cellprob_threshold.value),
                  "diameter": float(self.diameter.value) if self.diameter.value > 0 else None}
        if self.use_model_settings:
            values = {k: v for k, v in values.items() if base.sources[k] != "model"}
        # min_size 0: sizes are filtered here, so the unfiltered objects are kept too
        return base.replace(channel_axis=channel_axis, batch_size=int(self.batch_size.value),
                            min_size=0, gpu_memory=self.gpu_memory.value.strip() or None,
                            host_memory=self.host_memory.value.strip() or None, **values)

    def _segment(self, model, data, channel_axis, volumetric, settings):
        """The library's result (2D, 3D or plane by plane), before size and border filtering."""
        if volumetric and self.do_3d:
            return model.segment(data, settings, do_3d=True, z_axis=0,
                                 anisotropy=float(self.anisotropy.value))
        if volumetric:
            from cpsam_toolkit.volume import segment_planes

            return segment_planes(model, data, settings, z_axis=0)
        return model.segment(data, settings)

    def run(self, workspace):
        try:
            self._run(workspace)
        except CellposeSAMError as e:
            raise CellposeSAMError(f"RunCellposeSAM failed on {self._describe(workspace)}: {e}") \
                from e
        except Exception as e:
            raise CellposeSAMError(
                f"RunCellposeSAM failed on {self._describe(workspace)}: "
                f"{e.__class__.__name__}: {e}") from e

    def _run(self, workspace):
        problems = self._check_numbers()
        if problems:
            raise CellposeSAMError(" ".join(msg for msg, _ in problems))
        x = workspace.image_set.get_image(self.x_name.value)
        volumetric = bool(x.volumetric)
        if self.do_3d and not volumetric:
            raise CellposeSAMError(
                "'Segment volumes in 3D?' is Yes but the image is 2D. Load it as a volume "
                "(NamesAndTypes: 'Process as 3D?' Yes) or set 'Segment volumes in 3D?' to No.")
        data, channel_axis = self._stack_channels(workspace, x)

        spec = self.model_spec(workspace.measurements)
        if spec is not None and self.model_choice == MODEL_CUSTOM and not os.path.isfile(spec):
            raise CellposeSAMError(
                f"the model file '{spec}' does not exist. Check 'Location of the model file' "
                "and 'Model file name' (on a cluster, the path must exist on every node).")
        device = _DEVICE_ARG[self.device.value]
        try:
            model, _ = get_model(spec, device)
        except ValueError as e:
            if device == "gpu":
                raise CellposeSAMError(
                    f"'Run on' is GPU but no usable GPU was found ({e}). Choose 'Automatic' or "
                    "'CPU'.") from e
            raise

        from cpsam_toolkit.core.postprocess import sigmoid, touching_border

        settings = self.library_settings(model, channel_axis)
        # 2D: the library's block plan (None: whole), with the automatic RAM budget fixed now
        plan, run_settings = (None, settings) if volumetric else \
            model.plan_blocks(data, settings, self.x_name.value)
        t0 = time.perf_counter()
        result = self._segment(model, data, channel_axis, volumetric, run_settings)
        elapsed = time.perf_counter() - t0

        unedited = np.asarray(result.masks).astype(np.int32, copy=False)
        table = result.objects
        # size filter (objects smaller than min_size), then border/mask filter
        keep = np.ones(len(table["label"]), bool)
        if self.min_size.value > 0:
            keep &= table["area" if unedited.ndim == 2 else "volume"] >= self.min_size.value
        n_small = int((~keep).sum())
        small_removed = np.where(np.r_[False, keep][unedited], unedited, 0) if n_small else unedited
        n_border = 0
        if self.remove_border:
            mask = np.asarray(x.mask, bool) if x.has_mask else None
            border = touching_border(unedited, mask if mask is not None and mask.shape == unedited.shape
                                     else None)
            n_border = int((keep & border).sum())
            keep &= ~border
        kept = result.select(keep)  # masks relabelled 1..N, the object table in step with them
        segmented = np.asarray(kept.masks).astype(np.int32, copy=False)
        kept_table = kept.objects
        cellprob = result.cellprob

        class_counts = []
        objects = Objects()
        objects.segmented = segmented
        objects.unedited_segmented = unedited
        objects.small_removed_segmented = small_removed
        objects.parent_image = x
        workspace.object_set.add_objects(objects, self.y_name.value)
        self.add_measurements(workspace)

        m = workspace.measurements
        obj = self.y_name.value
        model_name, model_version = self._model_strings(model, spec)
        f_model, f_version = self._image_features()
        m.add_image_measurement(f_model, model_name)
        m.add_image_measurement(f_version, model_version)
        m.add_image_measurement(f"{C_CELLPOSESAM}_{FTR_SETTINGS}_{obj}",
                                self._settings_record(model, volumetric, settings))
        m.add_image_measurement(f"{C_CELLPOSESAM}_{FTR_BLOCK_SIZE}_{obj}",
                                plan.block_size if plan else 0)
        m.add_image_measurement(f"{C_CELLPOSESAM}_{FTR_DIAMETER}_{obj}",
                                float(getattr(result, "diameter", None) or 0.0))

        n_kept = len(kept_table["label"])
        if self.wants_confidence:
            m.add_measurement(obj, M_MEAN_CELLPROB, np.asarray(kept_table["mean_cellprob"], np.float64))
            m.add_measurement(obj, M_FLOW_ERROR, np.asarray(  # no flow-error QC in 3D
                kept_table.get("flow_error", np.full(n_kept, np.nan)), np.float64))

        net_cfg = getattr(getattr(model, "net", None), "cfg", None)
        classes = tuple(getattr(net_cfg, "class_names", ())[1:])
        if classes:  # panoptic model: the class of each object (cpsam_toolkit.panoptic)
            from cpsam_toolkit.modes.panoptic import measurement_values

            ids = np.asarray(kept_table.get("class_id", np.full(n_kept, np.nan)), np.float64)
            for f, v in measurement_values(ids, classes).items():
                m.add_measurement(obj, f"{C_CELLPOSESAM}_{f}", v)
            if self.split_by_class:
                class_counts = self._add_class_objects(workspace, objects, ids, classes)

        if self.save_probabilities:
            prob = sigmoid(cellprob).astype(np.float32)
            workspace.image_set.add(
                self.probabilities_name.value,
                Image(prob, parent_image=x, convert=False, dimensions=x.dimensions),
            )

        if self.show_window:
            workspace.display_data.x_data = x.pixel_data
            workspace.display_data.y_data = segmented
            workspace.display_data.dimensions = x.dimensions
            workspace.display_data.statistics = [
                ["Objects found", str(int(segmented.max(initial=0)))],
                ["Removed: smaller than minimum size", str(n_small)],
                ["Removed: touching the border", str(n_border)],
                ["Model", model_name],
                *[["Setting from the model", line[: -len(" (model)")]]
                  for line in settings.describe().splitlines() if line.endswith("(model)")],
                ["Device", str(getattr(model, "device", self.device.value))],
                ["Segmentation time", f"{elapsed:.2f} s"],
                ["Segmented in blocks", f"{plan.block_size} px" if plan else "no"],
                *class_counts,
            ]

    def _add_class_objects(self, workspace, objects, class_ids, classes) -> list[list[str]]:
        """Add one object set per class (children of ``objects``) with their measurements;
        returns ``[name, count]`` rows for the display."""
        from cpsam_toolkit.modes.panoptic import class_object_names, split_by_class

        obj = self.y_name.value
        m = workspace.measurements
        rows = []
        names = class_object_names(obj, classes)
        for name, labels in zip(names, split_by_class(objects.segmented, class_ids, len(classes))):
            child = Objects()
            child.segmented = labels
            child.parent_image = objects.parent_image
            workspace.object_set.add_objects(child, name)
            self.add_measurements(workspace, name)
            children_per_parent, parents = objects.relate_children(child)
            m.add_measurement(obj, FF_CHILDREN_COUNT % name, np.asarray(children_per_parent))
            m.add_measurement(name, FF_PARENT % obj, np.asarray(parents))
            rows.append([f"{name} objects", str(int(labels.max(initial=0)))])
        return rows

    @staticmethod
    def _model_strings(model, spec) -> tuple[str, str]:
        name = str(getattr(model, "name", None) or spec or "default")
        sha = model_sha256(model)[:12] or "unknown"
        from importlib.metadata import PackageNotFoundError, version

        try:
            toolkit = version("cpsam-toolkit")
        except PackageNotFoundError:  # run from a source checkout
            toolkit = getattr(sys.modules.get("cpsam_toolkit"), "__version__", "unknown")
        return name[:255], f"cpsam-toolkit {toolkit}; weights sha256 {sha}"[:255]

    def _settings_record(self, model, volumetric, used) -> str:
        """How to repeat this run (cpsam_toolkit.outputs.run_record), '' with an old toolkit;
        ``used``: the library Settings of the run (the model's values where they applied)."""
        settings = dict(
            flow_threshold=used.flow_threshold,
            cellprob_threshold=used.cellprob_threshold,
            min_size=int(self.min_size.value),
            diameter=used.diameter,
            do_3d=bool(volumetric and self.do_3d),
            anisotropy=float(self.anisotropy.value) if volumetric and self.do_3d else None,
            gpu_memory=used.gpu_memory,
            host_memory=used.host_memory,
        )
        if used.augment:
            settings["augment"] = True
        try:
            from cpsam_toolkit.outputs import run_record
        except ImportError:
            return ""
        return run_record(settings, model)

    def post_run(self, workspace):
        # models stay cached for the next run in this process; only cached GPU blocks go back
        cache = sys.modules.get("cpsam_toolkit.model_cache")
        if cache is not None:
            cache.release_gpu_memory()

    # ------------------------------------------------------------------ display (GUI only)
    def display(self, workspace, figure):
        d = workspace.display_data
        image, labels = d.x_data, d.y_data
        if d.dimensions == 3:
            super().display(workspace, figure)
            return
        figure.set_subplots((2, 2))
        title = f"Input image, cycle #{workspace.measurements.image_number}"
        if image.ndim == 3:
            ax = figure.subplot_imshow_color(0, 0, image, title)
        else:
            ax = figure.subplot_imshow_grayscale(0, 0, image, title)
        figure.subplot_imshow_labels(1, 0, labels, self.y_name.value, sharexy=ax)
        cplabels = [dict(name=self.y_name.value, labels=[labels])]
        outline_title = f"{self.y_name.value} outlines"
        if image.ndim == 3:
            figure.subplot_imshow_color(0, 1, image, outline_title, cplabels=cplabels, sharexy=ax)
        else:
            figure.subplot_imshow_grayscale(0, 1, image, outline_title, cplabels=cplabels,
                                            sharexy=ax)
        figure.subplot_table(1, 1, [[v] for _, v in d.statistics],
                             row_labels=[k for k, _ in d.statistics])


def _is_memory_size(text: str) -> bool:
    """Whether cpsam-toolkit reads ``text`` as a memory size ('6GB'); True without the toolkit
    (validation reports that it is missing)."""
    try:
        from cpsam_toolkit.settings import parse_memory
    except ImportError:
        return True
    try:
        return parse_memory(text) > 0
    except ValueError:
        return False


def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
