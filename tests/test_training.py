"""Training: loss goes down, guard rails (base vs final, best kept), resume after SIGKILL,
reproducibility, stopping, and clear errors for bad labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import load_pair, shipped_split_stems, stems

from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.network.checkpoints import load_checkpoint
from cpsam_toolkit.training import AugmentConfig, LabelError, Recipe, TrainingSet, train, validate_labels

DSB = "dsb2018_stage1_train_fixed"

FAST = Recipe(
    name="test", lr=2e-3, epochs=4, batch_size=2, warmup_epochs=0, schedule="constant",
    layer_drop=0.0, min_masks=1, min_nimg_per_epoch=1, val_every=1,
    augment=AugmentConfig.spatial_only((0.9, 1.1)),
)


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise reproducibility on the CPU needs one thread (with more, torch's parallel reductions
    differ in the last bits between runs); it is also faster on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_pairs(data_dir: Path, n: int = 4, offset: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` real 256x256 DSB image/label pairs."""
    out = []
    for s in stems(data_dir, DSB)[offset:]:
        img, m = load_pair(data_dir, DSB, s)
        if img.shape[:2] == (256, 256) and 5 <= m.max() <= 80:
            out.append((img, m))
        if len(out) == n:
            break
    return out


def write_folder(folder: Path, pairs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, m) in enumerate(pairs):
        tifffile.imwrite(folder / f"im{i}_img.tif", img)
        tifffile.imwrite(folder / f"im{i}_masks.tif", m)
    return folder


def tiny(seed: int = 0) -> CPSAMNet:
    torch.manual_seed(seed)
    return CPSAMNet(get_config("tiny"))


# ----------------------------------------------------------------------------- labels


def test_bad_labels_give_clear_errors(tmp_path, data_dir):
    (img, m), = small_pairs(data_dir, 1)
    with pytest.raises(LabelError, match="lbl.tif.*floating point"):
        validate_labels(m.astype(np.float32) / 2.5, "lbl.tif")
    with pytest.raises(LabelError, match="negative"):
        validate_labels(m.astype(np.int32) - 3, "lbl.tif")
    with pytest.raises(LabelError, match="boolean"):
        validate_labels(m > 0, "lbl.tif")
    # whole-number floats are fine; gaps are renumbered 1..N
    gapped = m.astype(np.int32) * 3
    out = validate_labels(gapped.astype(np.float32), "lbl.tif")
    assert out.max() == len(np.unique(m)) - 1 and np.array_equal(out > 0, m > 0)
    # through a folder: the message names the offending file
    bad = write_folder(tmp_path / "bad", [(img, m)])
    tifffile.imwrite(bad / "im0_masks.tif", m[:200])
    with pytest.raises(LabelError, match=r"im0_masks\.tif.*differs from the image size"):
        TrainingSet.build(bad)
    tifffile.imwrite(bad / "im0_masks.tif", m.astype(np.float32) + 0.5)
    with pytest.raises(LabelError, match=r"im0_masks\.tif"):
        TrainingSet.build(bad)
    (bad / "im0_masks.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"im0_img\.tif.*no label image"):
        TrainingSet.build(bad)
    # too few masks everywhere -> a clear error rather than an empty run
    few = write_folder(tmp_path / "few", [(img, (m == 1).astype(np.uint16))])
    with pytest.raises(ValueError, match="no usable training images.*skipped"):
        TrainingSet.build(few, min_masks=5)


# ----------------------------------------------------------------------------- recipes


def test_recipes_follow_the_paper_schedules():
    from cpsam_toolkit.training import get_recipe

    ft = get_recipe("finetune")
    assert (ft.lr, ft.epochs, ft.batch_size, ft.weight_decay, ft.layer_drop) == (1e-5, 100, 1, 0.1, 0.4)
    lrs = [ft.lr_at(e) for e in range(100)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[9] == pytest.approx(1e-5)  # linear warm-up
    assert lrs[49] == pytest.approx(1e-5) and lrs[50] == pytest.approx(5e-6)  # halving starts
    assert lrs[59] == pytest.approx(5e-6) and lrs[60] == pytest.approx(2.5e-6)  # every 10 epochs
    assert lrs[99] == pytest.approx(1e-5 / 32)
    assert ft.augment.scale_range == (0.75, 1.25) and ft.augment.degrade_p == 0
    full = get_recipe("full")
    lrs = [full.lr_at(e) for e in range(2000)]
    assert lrs[1899] == pytest.approx(5e-5) and lrs[1900] == pytest.approx(5e-6)
    assert lrs[1950] == pytest.approx(5e-7)
    assert full.augment.scale_range == (0.25, 4.0) and full.augment.scale_dist == "loguniform"
    assert Recipe.from_dict(full.to_dict()) == full
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


# ----------------------------------------------------------------------------- training


def test_few_steps_lower_the_loss_and_report_base_vs_final(tmp_path, data_dir):
    pairs = small_pairs(data_dir, 4)
    rows = []
    res = train(tiny(), pairs, pairs, recipe=FAST, out=tmp_path / "m.pt", val_ap=False,
                progress=False, callback=rows.append)
    assert res.base["val_loss"] > res.final["val_loss"], res.report()
    assert res.history[1]["train_loss"] > res.history[-1]["train_loss"]
    # the log has the base evaluation, one row per epoch and a summary comparing base/final/best
    lines = [json.loads(s) for s in (tmp_path / "m.pt.run" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["epoch"] == -1 and lines[0]["base"]
    assert [r["epoch"] for r in lines[1:-1]] == [0, 1, 2, 3]
    for r in lines[1:-1]:
        assert {"epoch", "lr", "train_loss", "val_loss", "val_ap50", "time"} <= set(r)
    assert lines[-1]["summary"] and {"base", "final", "best"} <= set(lines[-1])
    assert [r["epoch"] for r in rows] == [-1, 0, 1, 2, 3]
    rep = res.report()
    assert "base" in rep and "final" in rep and "best" in rep
    # the output is the best checkpoint, in our format, with the metrics in its metadata
    net, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["format"] == "cpsam-toolkit" and meta["recipe"] == "test"
    assert meta["best_val"]["val_loss"] == pytest.approx(res.best["val_loss"])
    assert "base_val" in meta and meta["epochs"] == 4
    # an existing run is never overwritten silently
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny(), pairs, recipe=FAST, out=tmp_path / "m.pt", progress=False)


def test_same_seed_same_weights_and_stop_event(tmp_path, data_dir):
    pairs = small_pairs(data_dir, 2)
    rec = FAST.replace(epochs=2, batch_size=1, layer_drop=0.3, augment=AugmentConfig(scale_range=(0.5, 2)))
    nets = []
    for i, seed in enumerate([5, 5, 6]):
        net = tiny()
        train(net, pairs, recipe=rec, out=tmp_path / f"r{i}.pt", seed=seed, progress=False)
        nets.append(net.state_dict())
    for k in nets[0]:
        assert torch.equal(nets[0][k], nets[1][k]), k
    assert any(not torch.equal(nets[0][k], nets[2][k]) for k in nets[0])

    stop = threading.Event()
    res = train(tiny(), pairs, recipe=rec.replace(epochs=5), out=tmp_path / "s.pt", progress=False,
                stop_event=stop, callback=lambda row: stop.set())
    assert res.stopped and res.epochs_done == 1
    assert (tmp_path / "s.pt").exists()


def test_layer_drop_override_is_checked_applied_and_recorded(tmp_path, data_dir):
    pairs = small_pairs(data_dir, 2)
    with pytest.raises(ValueError, match="layer_drop must be in"):
        train(tiny(), pairs, recipe=FAST, out=tmp_path / "bad.pt", layer_drop=1.5, progress=False)
    net = tiny()
    train(net, pairs, recipe=FAST.replace(epochs=1), out=tmp_path / "m.pt", layer_drop=0.25, progress=False)
    assert net.encoder.layer_drop == 0.25
    _, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["recipe_params"]["layer_drop"] == 0.25


def test_cli_run_survives_sigkill_and_resumes(tmp_path, data_dir):
    folder = write_folder(tmp_path / "train", small_pairs(data_dir, 2))
    out = tmp_path / "model.pt"
    cmd = [sys.executable, "-m", "cpsam_toolkit", "train", "--train", str(folder), "--model", "tiny",
           "--out", str(out), "--epochs", "4", "--nimg-per-epoch", "2", "--batch-size", "1",
           "--lr", "1e-3", "--quiet", "--seed", "1"]
    state = out.with_name(out.name + ".run") / "state.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if state.exists() and torch.load(state, weights_only=False)["epoch"] >= 1:
                break
            if p.poll() is not None:
                pytest.fail(f"training ended before it could be killed:\n{p.stdout.read().decode()}")
            time.sleep(0.05)
        else:
            pytest.fail("no epoch checkpoint within 120 s")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    saved = torch.load(state, weights_only=False)["epoch"]
    assert 1 <= saved < 4 and not out.exists()
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming {state.parent} after epoch {saved} of 4" in r.stderr
    log = [json.loads(s) for s in (state.parent / "log.jsonl").read_text().splitlines()]
    epochs = [row["epoch"] for row in log if not row.get("summary")]
    assert epochs == [0, 1, 2, 3]  # each epoch exactly once, none repeated or lost
    assert next(row for row in log if row.get("epoch") == saved)["resumed_from"] == saved
    net, meta = load_checkpoint(out)
    assert meta["epochs"] == 4 and meta["start_model"] == "preset:tiny"


# ----------------------------------------------------------------------------- shipped model


def test_finetuning_the_shipped_model_improves_validation_ap(tmp_path, data_dir):
    """Fine-tuning on 8 images of one modality (DSB brightfield nuclei, 1024 x 1024, from the
    shipped model's training split) beats the starting model's AP@0.5 on the 4 brightfield
    images (353 nuclei) of its validation split: the ``train`` guard rail compares base and best
    on the same images."""
    import cpsam_toolkit

    models = Path(cpsam_toolkit.__file__).parent / "models"
    train_ids = shipped_split_stems(data_dir, "train", "brightfield", 8)
    train_pairs = [load_pair(data_dir, DSB, s) for s in train_ids]
    val_pairs = [load_pair(data_dir, DSB, s) for s in shipped_split_stems(data_dir, "val", "brightfield")]
    assert len(train_pairs) == 8 and len(val_pairs) == 4
    net, _ = load_checkpoint(models / "cpsam_small.pt")
    rec = Recipe(name="finetune-test", lr=3e-4, epochs=20, batch_size=2, warmup_epochs=2,
                 schedule="constant", layer_drop=0.1, min_masks=1, val_every=20,
                 augment=AugmentConfig.spatial_only((0.75, 1.25)))
    res = train(net, train_pairs, val_pairs, recipe=rec, out=tmp_path / "ft.pt", progress=False)
    print(res.report())
    assert res.base["val_ap50"] is not None
    assert res.final["val_loss"] < res.base["val_loss"], res.report()
    assert res.best["val_ap50"] > res.base["val_ap50"] + 0.02, res.report()
    _, meta = load_checkpoint(tmp_path / "ft.pt")
    assert meta["val"]["val_ap50"] == pytest.approx(res.best["val_ap50"])  # the best one is written
