"""Shared fixtures: the real annotated data in ../shared/data and opt-in slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

# Tests never reach the real model server: with no model named, the shipped one is used.
# (tests/test_registry.py clears this and downloads from a server on 127.0.0.1.)
os.environ.setdefault("CPSAM_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DSB = "dsb2018_stage1_train_fixed"
DATA = Path(os.environ.get("CPSAM_DATA", ROOT.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run full-size (ViT-L) and long tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"annotated data not found at {DATA}; set CPSAM_DATA to the shared/data folder")
    return DATA


def load_pair(data_dir: Path, dataset: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, masks) of ``<dataset>/train/<stem>_img.tif``."""
    d = data_dir / dataset / "train"
    return tifffile.imread(d / f"{stem}_img.tif"), tifffile.imread(d / f"{stem}_masks.tif")


def stems(data_dir: Path, dataset: str) -> list[str]:
    d = data_dir / dataset / "train"
    return sorted(p.name[: -len("_img.tif")] for p in d.glob("*_img.tif"))


SHIPPED_MODEL = ROOT / "cpsam_toolkit" / "models" / "cpsam_small.pt"


def _shipped_meta() -> dict:
    """The shipped model file's metadata ({} if the file is absent)."""
    if not SHIPPED_MODEL.exists():
        return {}
    import torch

    return torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True).get("meta", {})


def shipped_val_ap50() -> float | None:
    """DSB validation AP@0.5 recorded in the shipped model's metadata (None if absent): the
    accuracy checks all run on DSB nuclei, so they are gated on the DSB figure."""
    meta = _shipped_meta()
    val = ((meta.get("val") or {}).get("val_ap50_groups") or {}).get("dsb2018")
    return None if val is None else float(val)


def _trained_reason() -> str:
    ap = shipped_val_ap50()
    if ap is None:
        return "the shipped model (or its recorded DSB validation AP) is not committed yet"
    return (f"the shipped model is too weak for accuracy checks on DSB nuclei: its recorded DSB "
            f"validation AP@0.5 is {ap:.2f} (< 0.5, see cpsam_toolkit/models/MODEL_CARD.md)")


#: accuracy checks (all on DSB nuclei) that need a usefully trained shipped model
requires_trained_shipped_model = pytest.mark.skipif(
    (shipped_val_ap50() or 0.0) < 0.5, reason=_trained_reason()
)


def shipped_recommended_flow_threshold() -> float:
    """The flow threshold the shipped model's metadata recommends for nuclei (0.4 if none)."""
    meta = _shipped_meta()
    return float((meta.get("recommended_settings") or {}).get("flow_threshold", 0.4))


def shipped_split_stems(data_dir: Path, part: str, kind: str, n: int = 100) -> list[str]:
    """The first ``n`` DSB images of modality ``kind`` ("fluorescence", "brightfield") in the
    ``part`` ("train" or "val") of the shipped model's split, in split order (the selection of
    ``scripts/finetune_record.py``)."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from finetune_record import select
    finally:
        sys.path.pop(0)
    split = json.loads((SHIPPED_MODEL.parent / "shipped_split.json").read_text())
    return select(data_dir, split[part]["dsb2018"], n, kind)


def dsb_fluorescence_val_stems(data_dir: Path) -> list[str]:
    """The 40 fluorescence images of the shipped model's DSB validation split (held out from its
    training): the images of the count-vs-ground-truth checks."""
    return shipped_split_stems(data_dir, "val", "fluorescence")


def assert_counts_close(counts: dict[str, float], data_dir: Path) -> None:
    """Predicted object counts per DSB stem vs the annotated counts: at least 75% of the images
    within max(3, 25%) of the truth, and a median relative count error of at most 0.2."""
    ok, rel = [], []
    for stem, got in counts.items():
        truth = len(np.unique(tifffile.imread(data_dir / DSB / "train" / f"{stem}_masks.tif"))) - 1
        ok.append(abs(got - truth) <= max(3, 0.25 * truth))
        rel.append(abs(got - truth) / max(truth, 1))
    assert len(ok) >= 10, counts
    assert np.mean(ok) >= 0.75 and np.median(rel) <= 0.2, (
        f"{sum(ok)}/{len(ok)} counts within tolerance, median relative error {np.median(rel):.2f}")


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: the machine is small and shared, and spin-waiting
    threads slow the dynamics down badly on busy cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 'tiny' checkpoint (seed 0), saved once per test module."""
    import torch

    from cpsam_toolkit.network import CPSAMNet, get_config
    from cpsam_toolkit.network.checkpoints import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(CPSAMNet(get_config("tiny")), path)
    return path
