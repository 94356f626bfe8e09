"""Data and model for the example notebooks (and quick tries): the bundled examples and the
shipped model, with a tiny untrained stand-in while a source checkout has no shipped model."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..io import find_images
from ..network import registry
from ..network.checkpoints import save_checkpoint
from ..network.config import get_config
from ..network.model import CPSAMNet
from ..segment import load_model

log = logging.getLogger("cpsam_toolkit")

SHIPPED = "cpsam_toolkit_small"


def example_dir() -> Path:
    """The bundled examples: ``<name>_img.tif`` with ground truth ``<name>_masks.tif``."""
    return Path(__file__).resolve().parents[1] / "examples"


def example_images() -> list[Path]:
    """The bundled example images (without their label files), sorted by name."""
    d = example_dir()
    if not d.is_dir():
        raise FileNotFoundError(f"no bundled examples at {d}: reinstall cpsam-toolkit with its package data")
    return find_images(d)


def example_masks(image: str | Path) -> Path:
    """The ground-truth label file of a bundled example image."""
    p = Path(image)
    stem = p.stem[: -len("_img")] if p.stem.endswith("_img") else p.stem
    return p.with_name(f"{stem}_masks.tif")


def shipped_model_available() -> bool:
    try:
        registry.resolve_weights(SHIPPED, download=False)
    except Exception:  # noqa: BLE001 - any reason means "not here"
        return False
    return True


class _DropRecommendation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "recommends" not in record.getMessage()


def notebook_model(device: Any = None) -> Any:
    """The shipped small model (fast on a CPU; the widgets use its recommended settings,
    ``model.info["recommended_settings"]``), or — only when this installation has no shipped
    model file, as in a source checkout before it is trained — a tiny network with random
    weights, with a warning (results are then meaningless, but every step runs)."""

    if shipped_model_available():
        # the load-time "recommends flow_threshold=0.8" message is for scripts; the widgets apply
        # the recommended settings themselves and show each value with its source
        quiet = _DropRecommendation()
        log.addFilter(quiet)
        try:
            return load_model(SHIPPED, device=device)
        finally:
            log.removeFilter(quiet)
    import torch

    warnings.warn(f"the shipped model ({SHIPPED}) is not installed: using a tiny UNTRAINED network, "
                  "so masks will be meaningless", stacklevel=2)
    path = Path(tempfile.gettempdir()) / "cpsam_toolkit_tiny_untrained.pt"
    if not path.is_file():
        torch.manual_seed(0)
        save_checkpoint(CPSAMNet(get_config("tiny")), path, {"note": "random weights, for tests"})
    return load_model(path, device=device)


# ------------------------------------------------------------------ finetuning demo data

DSB = "dsb2018_stage1_train_fixed"


def shared_data_dir() -> Path:
    """The annotated data sets: ``$CPSAM_DATA``, else ``../shared/data`` beside this checkout."""
    import os

    env = os.environ.get("CPSAM_DATA")
    d = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (d / DSB).is_dir():
        raise FileNotFoundError(f"no annotated data at {d}: set CPSAM_DATA to the folder holding {DSB}/")
    return d


def _modality(img: Any) -> str:
    """DSB2018 image kind, as ``scripts/finetune_record.py``: "fluorescence" (grey, dark
    background), "brightfield" (grey, light background) or "stained" (colour)."""
    import numpy as np

    grey = img if img.ndim == 2 else img[..., 0]
    if img.ndim == 3 and not all(np.array_equal(grey, img[..., c]) for c in range(img.shape[-1])):
        return "stained"
    return "fluorescence" if grey.mean() < 100 else "brightfield"


def brightfield_pairs(part: str, n: int, crop: int | None = None) -> list[tuple[str, Any, Any]]:
    """``(name, image, masks)`` of the first ``n`` DSB2018 brightfield images (dark nuclei on a
    light background) of the shipped model's training (``part="train"``) or validation
    (``"val"``) split — carved from the data set's ``train/`` folder, never a test split. The
    shipped model saw few such images, so it does poorly on them (AP@0.5 about 0.2).

    ``crop``: keep the top-left ``crop`` x ``crop`` pixels (labels relabelled 1..N), so a demo
    stays quick on a CPU; grey images are returned as (Y, X).
    """
    import json

    import fastremap
    import tifffile

    data = shared_data_dir() / DSB / "train"
    split = json.loads((Path(__file__).resolve().parents[1] / "models" / "shipped_split.json").read_text())
    out = []
    for stem in split[part]["dsb2018"]:
        img = tifffile.imread(data / f"{stem}_img.tif")
        if _modality(img) != "brightfield":
            continue
        masks = tifffile.imread(data / f"{stem}_masks.tif")
        img = img[..., 0] if img.ndim == 3 else img
        if crop:
            img, masks = img[:crop, :crop], masks[:crop, :crop]
            masks, _ = fastremap.renumber(masks, in_place=False)
        out.append((f"bf_{stem[:8]}", img, masks.astype("uint16")))
        if len(out) == n:
            break
    return out
