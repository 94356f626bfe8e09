"""Data and model for the example notebooks (and quick tries): the bundled examples and the
shipped model, with a tiny untrained stand-in while a source checkout has no shipped model."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("cpsam_toolkit")

SHIPPED = "cpsam_toolkit_small"


def example_dir() -> Path:
    """The bundled examples: ``<name>_img.tif`` with ground truth ``<name>_masks.tif``."""
    return Path(__file__).resolve().parents[1] / "examples"


def example_images() -> list[Path]:
    """The bundled example images (without their label files), sorted by name."""
    from ..io import find_images

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
    from ..network import registry

    try:
        registry.resolve_weights(SHIPPED, download=False)
    except Exception:  # noqa: BLE001 - any reason means "not here"
        return False
    return True


def notebook_model(device: Any = None) -> Any:
    """The shipped small model (fast on a CPU), or — only when this installation has no shipped
    model file, as in a source checkout before it is trained — a tiny network with random
    weights, with a warning (results are then meaningless, but every step runs)."""
    from ..segment import load_model

    if shipped_model_available():
        return load_model(SHIPPED, device=device)
    import torch

    from ..network.checkpoints import save_checkpoint
    from ..network.config import get_config
    from ..network.model import CPSAMNet

    warnings.warn(f"the shipped model ({SHIPPED}) is not installed: using a tiny UNTRAINED network, "
                  "so masks will be meaningless", stacklevel=2)
    path = Path(tempfile.gettempdir()) / "cpsam_toolkit_tiny_untrained.pt"
    if not path.is_file():
        torch.manual_seed(0)
        save_checkpoint(CPSAMNet(get_config("tiny")), path, {"note": "random weights, for tests"})
    return load_model(path, device=device)
