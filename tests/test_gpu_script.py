"""The GPU run's CPU dry run: pack a few real images, run benchmarks/gpu_run.sh end to end at tiny
sizes (tiny network, ~12 s of training, benchmarks with a one-block ViT-L and the reference
cellpose as the oracle), and check what would come back from the device machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import pack_gpu_inputs as pack  # noqa: E402
import train_gpu  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """Two train and one validation image per set, the benchmark sources; no wheels."""
    if not DATA.is_dir():
        pytest.fail(f"annotated data not found at {DATA}")
    out = tmp_path_factory.mktemp("gpu") / ".gpu"
    rc = pack.main(["--data", str(DATA), "--out", str(out), "--limit", "2", "1", "--no-wheels"])
    assert rc == 0
    return out


def test_pack_fits_and_round_trips(packed: Path) -> None:
    z = np.load(packed / "train_data.npz")
    s = json.loads(str(z["summary"]))
    assert s["train"] == {g: 2 for g in pack.GROUPS} and s["val"] == {g: 1 for g in pack.GROUPS}
    assert s["split"] == pack.split_path().name
    # what travels: checkout + packed folder under the device tool's 64 MiB
    assert pack.tree_size() + pack.folder_size(packed) < pack.LIMIT
    items = pack.load_packed(packed / "train_data.npz", "val")
    split = pack.load_split()
    for it in items:
        g, stem = it["name"].split("/")
        assert stem in split["val"][g]
        folder = DATA / pack.DATASETS[g] / "train"
        import tifffile

        m = tifffile.imread(folder / f"{stem}_masks.tif")
        if it["scale"] == 1.0:  # labels are lossless; images within JPEG error of the normalised source
            np.testing.assert_array_equal(it["masks"], m)
            from cpsam_toolkit.training.data import prepare_image

            x = prepare_image(tifffile.imread(folder / f"{stem}_img.tif"), m.shape)
            x = np.clip(x[: it["image"].shape[0]], 0, 255 / pack.QUANT)
            assert np.abs(it["image"] - x).mean() < 0.02
        else:  # shrunk: objects larger than the packing diameter
            assert it["scale"] < 1 and it["masks"].shape[0] < m.shape[0]
            assert pack.median_diameter(it["masks"]) <= s["diameter"] * 1.2


def test_gpu_augmentation_matches_library(packed: Path) -> None:
    """The on-device rotation/flip/zoom/crop gives the library's crop (augment.random_affine_crop)."""
    from cpsam_toolkit.flows import masks_to_flows
    from cpsam_toolkit.training.augment import make_affine, pad_channels, random_affine_crop

    data = train_gpu.load_device_data(packed / "train_data.npz", "train", torch.device("cpu"), threads=1)
    items = pack.load_packed(packed / "train_data.npz", "train")
    cases = [(0, (0.7, 0.9, True, 10.0, -20.0)), (2, (1.6, -2.0, False, -30.0, 5.0))]
    for i, (sc, ang, flip, sy, sx) in cases:
        m = items[i]["masks"].astype(np.int32)
        aff = make_affine(m.shape, 256, ang, sc, flip, (sy, sx))
        img, msk, flw = random_affine_crop(pad_channels(items[i]["image"]), m, masks_to_flows(m), None,
                                           aff=aff)
        p = {k: torch.tensor([v])
             for k, v in dict(scale=sc, angle=ang, flip=flip, shift_y=sy, shift_x=sx).items()}
        x, f, fg = train_gpu.spatial_batch(data, torch.tensor([i]), 256, params=p)
        np.testing.assert_allclose(x[0].numpy(), img, atol=1e-4)
        np.testing.assert_array_equal(fg[0].numpy(), msk > 0)
        np.testing.assert_allclose(f[0].numpy(), flw * (msk > 0), atol=2e-3)  # fp16 flow storage
    # intensity augmentation keeps shapes, finite values, and zero channels where there is no data
    g = torch.Generator().manual_seed(0)
    x, _, _ = train_gpu.spatial_batch(data, torch.arange(len(data)), 64, gen=g)
    y = train_gpu.intensity_batch(x, data.c, degrade_p=1.0, gen=g)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_network_choice_fits_returned_file() -> None:
    cfg = train_gpu.choose_config()
    assert cfg.width == 384 and cfg.depth == 8
    assert train_gpu.model_bytes(cfg) <= train_gpu.FILE_LIMIT


def test_gpu_run_dry_run(packed: Path, tmp_path: Path) -> None:
    pytest.importorskip("cellpose", reason="the reference cellpose is the benchmarks' oracle")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_DIR": str(packed), "TINY": "1", "NO_INSTALL": "1",
           "PYTHON": sys.executable, "TOTAL_S": "900", "BENCH_S": "400", "TRAIN_S": "12",
           "TRAIN_ARGS": "--panoptic-seconds 4",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env, capture_output=True,
                       text=True, timeout=800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["status"] == "done" and not res["errors"] and not res["skipped"], res
    for k in ("device", "end_to_end_speedup", "encoder_tflops", "peak_tflops", "masks_identical",
              "peak_memory_gb", "date"):
        assert k in res, k
    assert res["masks_identical"] is True  # the shipped model through both pipelines
    assert res["dynamics"]["flows_to_masks"]["identical"] is True
    assert res["oom"]["ours"]["finished"] and res["oom"]["ours"]["batch_used"] < res["oom"]["batch_size"]
    # training: log, checkpoints loadable by the library with recommended settings
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = rows[-1]["final"]
    assert final["samples"] > 0 and set(final["val_ap50"]["0.4"]["groups"]) == set(pack.GROUPS)
    import cpsam_toolkit as cp

    for name in ("cpsam_gpu.pt", "cpsam_gpu_best.pt"):
        m = cp.load_model(out / name, device="cpu")
        assert m.net.cfg.depth == 2  # tiny
    m = cp.load_model(out / "cpsam_gpu.pt", device="cpu")
    assert "flow_threshold" in m.info["recommended_settings"]
    # the panoptic variant: background + the CoNSeP classes in front of the flows
    m = cp.load_model(out / "cpsam_gpu_panoptic.pt", device="cpu")
    assert m.net.cfg.class_names[0] == "background" and len(m.net.cfg.class_names) >= 3
    assert m.net.cfg.nout == 3 + len(m.net.cfg.class_names)
    assert final["panoptic"]["samples"] > 0
    # the docs table is made from these files, and docs/benchmarks.md has its place
    import gpu_results_to_docs as docs

    text = docs.table(res, rows)
    assert "end to end" in text and "masks → flows" in text and "Training" in text
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    assert docs.START in doc and docs.END in doc
    # what comes back from the device: <= 8 files of <= 16 MiB, at most 2 folders down
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8, files
    assert all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert all(len(f.relative_to(out).parts) <= 3 for f in files)
