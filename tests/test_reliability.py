"""Bad inputs and faults, end to end: the API (``model.segment``), the CLI (``cpsam segment``,
in-process), training-data loading, model files and the CellProfiler module.

Each case either fails with an error that names the input and says what to do (checked on key
words), with a non-zero exit status and no partial output file for the CLI, or is handled
correctly. The unit-level versions live elsewhere and are not repeated here (see
docs/reliability.md): tests/test_preprocess.py (to_channels_last), tests/test_checkpoints.py
(load_checkpoint), tests/test_training.py (validate_labels), tests/test_cli_segment.py (a plate
with broken files, bad --out), tests/test_batch.py / tests/test_training.py (SIGKILL and
resume), tests/test_segment.py (simulated CUDA OOM), tests/test_registry.py (SHA-256 of
downloads).

The tests run as root, so ``chmod 000`` does not make a file unreadable; "unreadable path" is
covered with a missing path and a folder named like an image file instead.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cpsam_toolkit import io as cio
from cpsam_toolkit import outputs
from cpsam_toolkit.cli import main
from cpsam_toolkit.network import CPSAMNet, get_config
from cpsam_toolkit.network.checkpoints import CheckpointError
from cpsam_toolkit.preprocess import ImageInputError
from cpsam_toolkit.segment import load_model
from cpsam_toolkit.training.data import LabelError, TrainingSet

#: random weights: skip tracking the ~half of pixels with cellprob > 0 in plumbing cases
FAST = {"cellprob_threshold": 8.0}
FAST_CLI = ("--cellprob-threshold", "8")


@pytest.fixture(scope="module")
def tiny_path(tiny_model) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_model(tiny_path, device="cpu")


def leftovers(folder: Path) -> list[str]:
    """Partial/temporary files the atomic writers would leave if they failed."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or ".tmp" in p.name)


def rng_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


# ============================================================================ API: model.segment
BAD_ARRAYS = {
    "empty 0x10": (np.zeros((0, 10)), {}, ["too small"]),
    "empty 0x0": (np.zeros((0, 0)), {}, ["too small"]),
    "0-d scalar": (np.array(3.0), {}, ["2 or 3 dimensions"]),
    "1-d": (np.zeros(10), {}, ["2 or 3 dimensions"]),
    "1x1": (np.zeros((1, 1)), {}, ["too small", "2x2"]),
    "1x40": (np.zeros((1, 40)), {}, ["too small"]),
    "NaN": (np.where(np.eye(16) > 0, np.nan, 1.0), {}, ["NaN/Inf", "nan_to_num"]),
    "Inf": (np.where(np.eye(16) > 0, np.inf, 1.0), {}, ["NaN/Inf"]),
    "-Inf float32": (np.where(np.eye(16) > 0, -np.inf, 1.0).astype(np.float32), {}, ["NaN/Inf"]),
    "4-D no hints": (np.zeros((2, 3, 16, 16)), {}, ["4-D", "do_3d=True", "z_axis="]),
    "5-D no hints": (np.zeros((1, 2, 3, 16, 16)), {}, ["5-D", "not a 2D image"]),
    "no axis <= 16": (np.zeros((20, 24, 24)), {}, ["channel axis", "channel_axis="]),
    "channel_axis 5": (np.zeros((3, 16, 16)), {"channel_axis": 5}, ["channel_axis=5", "out of range"]),
    "channel_axis on 2-D": (np.zeros((16, 16)), {"channel_axis": 0}, ["2-D", "omit it"]),
    "channels out of range": (np.zeros((16, 16, 3)), {"channels": [0, 7]}, ["[7]", "out of range"]),
    "4 channel indices": (np.zeros((16, 16, 5)), {"channels": [0, 1, 2, 3]}, ["1 to 3"]),
    "strings": (np.array([["a", "b"], ["c", "d"]]), {}, ["unsupported dtype"]),
    "complex": (np.ones((16, 16), np.complex64), {}, ["unsupported dtype", "real-valued"]),
    "object": (np.empty((16, 16), object), {}, ["unsupported dtype"]),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_api_bad_arrays_raise_clear_errors(model, case):
    img, kw, words = BAD_ARRAYS[case]
    with pytest.raises(ImageInputError) as e:
        model.segment(img, **kw, **FAST)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg


def test_api_error_names_the_image_in_a_list(model):
    """In a list the failing image is the one named (by index or name), not the first."""
    good = rng_image((32, 32))
    with pytest.raises(ImageInputError, match="^image 1: .*NaN/Inf"):
        model.segment([good, np.full((32, 32), np.nan)], **FAST)


@pytest.mark.parametrize(
    "dtype", [bool, np.uint8, np.uint16, np.uint32, np.int8, np.int64, np.float16, np.float64]
)
def test_api_dtypes_accepted(model, dtype):
    img = (rng_image((48, 40)) * 200).astype(dtype)
    res = model.segment(img, **FAST)
    assert res.masks.shape == (48, 40) and res.masks.dtype == np.uint16
    assert np.isfinite(res.flows).all() and np.isfinite(res.cellprob).all()


@pytest.mark.parametrize("value", [0.0, 1000.0, -5.0])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_api_constant_image_gives_no_objects_and_no_nan(model, value, dtype):
    """Constant images normalise to zeros: no NaN from the 1-99 percentile division by zero."""
    res = model.segment(np.full((64, 64), value).astype(dtype))  # default thresholds
    assert np.isfinite(res.flows).all() and np.isfinite(res.cellprob).all()
    assert res.n_objects == 0 and res.masks.max() == 0


def test_api_negative_values_and_2x2(model):
    img = rng_image((40, 40)) * 100 - 150  # all negative
    res = model.segment(img, **FAST)
    assert res.masks.shape == (40, 40) and np.isfinite(res.cellprob).all()
    res = model.segment(np.arange(4.0).reshape(2, 2), **FAST)  # the smallest image accepted
    assert res.masks.shape == (2, 2) and np.isfinite(res.cellprob).all()


def test_api_more_than_three_channels(model):
    rgba = (rng_image((32, 32, 4)) * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match="4 channels; using the first 3.*channels="):
        a = model.segment(rgba, **FAST)
    b = model.segment(rgba[..., :3], **FAST)
    np.testing.assert_array_equal(a.cellprob, b.cellprob)
    five = rng_image((5, 32, 32))  # channel-first, 5 channels, explicit choice: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = model.segment(five, channels=[4, 0], **FAST)
    d = model.segment(np.stack([five[4], five[0]]), **FAST)
    np.testing.assert_array_equal(c.cellprob, d.cellprob)


# ============================================================================ CLI: cpsam segment
def _write_bad(kind: str, folder: Path) -> Path:
    """One bad input file of the given kind; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    good = (rng_image((64, 64)) * 255).astype(np.uint8)
    if kind == "corrupt tiff":
        p = folder / "corrupt.tif"
        tifffile.imwrite(p, good)
        raw = bytearray(p.read_bytes())
        raw[8:200] = np.random.default_rng(7).bytes(192)  # smash the first IFD and the data start
        p.write_bytes(bytes(raw))
    elif kind == "truncated tiff":
        p = folder / "trunc.tif"
        tifffile.imwrite(p, good)
        p.write_bytes(p.read_bytes()[:100])
    elif kind == "text as .tif":
        p = folder / "notes.tif"
        p.write_text("plate map, not an image\n" * 10)
    elif kind == "garbage .png":
        p = folder / "garbage.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(8).bytes(300))
    elif kind == "empty file":
        p = folder / "empty.tif"
        p.write_bytes(b"")
    elif kind == "zero-size array":
        p = folder / "zero.npy"
        np.save(p, np.zeros((0, 16), np.float32))
    elif kind == "pickled .npy":
        p = folder / "objs.npy"
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "1x1":
        p = folder / "one.tif"
        tifffile.imwrite(p, np.zeros((1, 1), np.uint16))
    elif kind == "NaN":
        p = folder / "nan.tif"
        tifffile.imwrite(p, np.where(np.eye(64) > 0, np.nan, 1.0).astype(np.float32))
    elif kind == "5-D":
        p = folder / "five_d.tif"
        tifffile.imwrite(p, np.zeros((2, 2, 2, 32, 32), np.uint8), photometric="minisblack")
    else:  # pragma: no cover
        raise AssertionError(kind)
    return p


CLI_BAD_FILES = {
    # kind: key words of the reason (in failures.csv and on stderr)
    "corrupt tiff": ["corrupt.tif", "truncated/corrupt"],
    "truncated tiff": ["trunc.tif", "truncated/corrupt"],
    "text as .tif": ["notes.tif", "not a readable .tif"],
    "garbage .png": ["garbage.png", "not a readable .png"],
    "empty file": ["empty.tif", "empty file"],
    "zero-size array": ["zero.npy", "empty"],
    "pickled .npy": ["objs.npy", "not a readable .npy"],
    "1x1": ["one.tif", "too small"],
    "NaN": ["nan.tif", "NaN/Inf"],
    "5-D": ["five_d.tif", "not a 2D image"],
}


@pytest.mark.parametrize("kind", list(CLI_BAD_FILES))
def test_cli_bad_file_fails_with_reason_and_no_output(tmp_path, tiny_path, capsys, kind):
    src = _write_bad(kind, tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["segment", str(src), "--out", str(out), "--model", str(tiny_path), "--no-progress",
               *FAST_CLI])
    err = capsys.readouterr().err
    assert rc == 1, err
    reason = (out / "failures.csv").read_text()
    for w in CLI_BAD_FILES[kind]:
        assert w in reason, reason
    assert src.name in err
    assert not list(out.glob("*_masks.tif")) and leftovers(out) == []


def test_cli_missing_path_and_folder_named_like_a_file(tmp_path, tiny_path, capsys):
    """Unreadable inputs (root ignores chmod 000, so: missing, and a folder called x.tif)."""
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "gone.tif"), "--out", str(out), "--model", str(tiny_path)])
    assert rc == 2 and "gone.tif" in capsys.readouterr().err
    (tmp_path / "dir.tif").mkdir()
    rc = main(["segment", str(tmp_path / "dir.tif"), "--out", str(out), "--model", str(tiny_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no images found" in err and "dir.tif" in err
    assert not list(out.glob("*_masks.tif")) if out.exists() else True
    with pytest.raises(cio.ImageReadError, match="dir.tif: not a file"):
        cio.imread(tmp_path / "dir.tif")
    with pytest.raises(cio.ImageReadError, match="gone.tif: no such file"):
        cio.imread(tmp_path / "gone.tif")


def test_cli_odd_but_valid_inputs(tmp_path, tiny_path, capsys):
    """RGBA PNG, constant image, uint32/int64/float64/float16/bool/negative TIFFs all segment."""
    import imageio.v3 as iio

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(1)
    iio.imwrite(d / "rgba.png", (rng.random((48, 48, 4)) * 255).astype(np.uint8))
    tifffile.imwrite(d / "const.tif", np.full((48, 48), 7, np.uint16))
    for dt in (np.uint32, np.int64, np.float64, np.float16, bool):
        tifffile.imwrite(d / f"t_{np.dtype(dt).name}.tif", (rng.random((48, 48)) * 3).astype(dt))
    tifffile.imwrite(d / "neg.tif", (rng.random((48, 48)) - 2).astype(np.float32))
    out = tmp_path / "out"
    rc = main(["segment", str(d), "--out", str(out), "--model", str(tiny_path), "--no-progress",
               *FAST_CLI])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    stems = sorted(p.stem for p in d.iterdir())
    for s in stems:
        m = tifffile.imread(out / f"{s}_masks.tif")
        assert m.shape == (48, 48) and m.dtype == np.uint16
    assert tifffile.imread(out / "const_masks.tif").max() == 0
    assert not (out / "failures.csv").exists() or len((out / "failures.csv").read_text().splitlines()) <= 1


def test_cli_output_folder_not_writable(tmp_path, tiny_path, capsys):
    """--out under a regular file: exit 2 before any work (also in test_cli_segment.py)."""
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, (rng_image((32, 32)) * 255).astype(np.uint8))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["segment", str(src), "--out", str(blocker / "out"), "--model", str(tiny_path)])
    assert rc == 2 and "cannot write to output folder" in capsys.readouterr().err


# ============================================================================ CLI: model files
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_model(kind: str, folder: Path, tiny_path: Path) -> Path:
    p = folder / f"{kind.replace(' ', '_')}.pt"
    if kind == "truncated":
        data = tiny_path.read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif kind == "wrong architecture":
        state = torch.load(tiny_path, weights_only=True)
        torch.save({**state, "config": get_config("small").to_dict()}, p)
    elif kind == "cellpose 3":
        torch.save({"downsample.down.res_down_0.conv.conv_0.2.weight": torch.zeros(32, 2, 3, 3),
                    "upsample.up.res_up_0.conv.conv_0.0.weight": torch.zeros(32),
                    "output.2.weight": torch.zeros(3, 32, 1, 1),
                    "style": torch.zeros(1)}, p)
    elif kind == "code payload":
        torch.save({"w": torch.zeros(2), "x": _Payload(folder / "EXECUTED")}, p)
    elif kind == "not weights":
        p.write_text("hello\n" * 100)
    return p


BAD_MODELS = {
    "truncated": ["truncated", "download or copy it again"],
    "wrong architecture": ["does not fit"],
    "cellpose 3": ["Cellpose 3", "CP4"],
    "code payload": ["refusing to load", "nothing in it was executed"],
    "not weights": ["not a PyTorch weights file"],
}


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_cli_bad_model_file(tmp_path, tiny_path, capsys, kind):
    mp = _bad_model(kind, tmp_path, tiny_path)
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, (rng_image((32, 32)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    rc = main(["segment", str(src), "--out", str(out), "--model", str(mp), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert mp.name in err
    for w in BAD_MODELS[kind]:
        assert w in err, err
    assert not (tmp_path / "EXECUTED").exists()
    assert not list(out.glob("*_masks.tif")) if out.exists() else True


def test_wrong_architecture_state_dict_via_api(tmp_path, tiny_path):
    """A 'small' network state dict saved where a tiny-config file is expected is refused."""
    from cpsam_toolkit.network.checkpoints import CheckpointError

    p = tmp_path / "mix.pt"
    torch.save({"format": "cpsam-toolkit", "format_version": 1,
                "config": get_config("tiny").to_dict(),
                "state_dict": CPSAMNet(get_config("small")).state_dict(), "meta": {}}, p)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(p, device="cpu")


def test_pickle_payload_in_plain_pickle_not_run(tmp_path):
    from cpsam_toolkit.network.checkpoints import CheckpointError

    marker = tmp_path / "EXECUTED"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="Python objects or code"):
        load_model(tmp_path / "evil.pth", device="cpu")
    assert not marker.exists()


# ============================================================================ training data
def _pair(shape=(32, 32)):
    img = rng_image(shape)
    m = np.zeros(shape, np.int32)
    m[2:10, 2:10] = 1
    m[12:20, 12:22] = 2
    return img, m


def test_training_labels_with_gaps_are_renumbered():
    img, m = _pair()
    ts = TrainingSet.build([(img, m * 7)])
    lbl = ts.samples[0].masks
    assert sorted(np.unique(lbl)) == [0, 1, 2]


BAD_LABELS = {
    "float labels": (lambda m: m.astype(np.float32) + 0.5, ["floating point", "integer image"]),
    "negative ids": (lambda m: m - 1, ["negative", "0 for background"]),
    "boolean": (lambda m: m > 0, ["boolean", "scipy.ndimage.label"]),
    "NaN labels": (lambda m: np.where(m > 0, np.nan, 0.0), ["floating point"]),
    "3-D labels": (lambda m: np.stack([m, m, m]), ["2D (Y, X)"]),
    "smaller labels": (lambda m: m[:20], ["differs from the image size", "pixel for pixel"]),
    "transposed size": (lambda m: np.zeros((32, 40), np.int32), ["differs from the image size"]),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_training_bad_labels(case):
    img, m = _pair()
    fn, words = BAD_LABELS[case]
    with pytest.raises(LabelError) as e:
        TrainingSet.build([(img, fn(m))], names=["well_A01"])
    msg = str(e.value)
    assert "well_A01" in msg, msg
    for w in words:
        assert w in msg, msg


def test_training_image_nan_and_file_errors(tmp_path):
    img, m = _pair()
    with pytest.raises(LabelError, match="NaN/Inf"):
        TrainingSet.build([(np.where(m > 0, np.nan, img), m)])
    tifffile.imwrite(tmp_path / "a_masks.tif", m.astype(np.uint16))
    (tmp_path / "a_img.tif").write_bytes(b"II*\x00broken")
    with pytest.raises(cio.ImageReadError, match="a_img.tif"):
        TrainingSet.build(tmp_path)


# ============================================================================ faults: disk full
def test_disk_full_at_rename_keeps_previous_output(tmp_path, monkeypatch):
    old = np.arange(1, 26, dtype=np.uint16).reshape(5, 5)
    target = outputs.save_masks(tmp_path / "x_masks.tif", old)
    real_replace = os.replace

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        outputs.save_masks(target, np.ones((5, 5), np.uint16))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "replace", real_replace)
    np.testing.assert_array_equal(tifffile.imread(target), old)
    assert leftovers(tmp_path) == []


def test_disk_full_half_way_through_write(tmp_path, monkeypatch):
    """The writer fills part of the temp file, then ENOSPC: old file intact, no temp file."""
    old = np.full((5, 5), 3, np.uint16)
    target = outputs.save_masks(tmp_path / "y_masks.tif", old)

    def half(path, data, *a, **k):
        with open(path, "wb") as f:
            f.write(b"II*\x00" + b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tifffile, "imwrite", half)
    with pytest.raises(OSError):
        cio.imwrite_tiff(target, np.zeros((5, 5), np.uint16))
    with pytest.raises(OSError):
        cio.write_atomic(tmp_path / "new.bin", lambda p: half(p, None))
    monkeypatch.undo()
    np.testing.assert_array_equal(tifffile.imread(target), old)
    assert not (tmp_path / "new.bin").exists()
    assert leftovers(tmp_path) == []


def test_disk_full_during_cli_run(tmp_path, tiny_path, capsys, monkeypatch):
    """ENOSPC while writing masks in a CLI run: exit 1, reason recorded, no partial outputs."""
    src = tmp_path / "in" / "a.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, (rng_image((32, 32)) * 255).astype(np.uint8))
    real = tifffile.imwrite

    def half(path, data, *a, **k):
        if str(path).endswith(".tif") and "_masks" in str(path):
            with open(path, "wb") as f:
                f.write(b"II*\x00" + b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, *a, **k)

    monkeypatch.setattr(tifffile, "imwrite", half)
    out = tmp_path / "out"
    rc = main(["segment", str(src), "--out", str(out), "--model", str(tiny_path), "--no-progress",
               *FAST_CLI])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "No space left" in (out / "failures.csv").read_text()
    assert not list(out.glob("a_*")) and leftovers(out) == []


# ============================================================================ CellProfiler module
_HAS_CP = importlib.util.find_spec("cellprofiler_core") is not None


@pytest.mark.skipif(not _HAS_CP, reason="cellprofiler-core is not installed")
@pytest.mark.parametrize(
    "case,image,words",
    [
        ("NaN", np.where(np.eye(64) > 0, np.nan, 0.5).astype(np.float32), ["NaN/Inf"]),
        ("1x1", np.zeros((1, 1), np.float32), ["too small"]),
    ],
)
def test_cellprofiler_bad_image_names_the_image(tiny_path, case, image, words):
    import test_cellprofiler_plugin as tcp  # the plugin tests' helpers (CellProfiler set up)

    module = tcp.configure(tcp.new_module(), str(tiny_path), {})
    with pytest.raises(Exception) as e:
        tcp.run_module(module, {"DNA": image})
    msg = str(e.value)
    assert "DNA" in msg, msg
    for w in words:
        assert w in msg, msg


# ============================================================================ training resume state
def test_training_resume_state_with_code_payload_is_not_executed(tmp_path):
    from cpsam_toolkit.training import train

    out = tmp_path / "m.pt"
    run = tmp_path / "m.pt.run"
    run.mkdir()
    marker = tmp_path / "EXECUTED"
    torch.save({"version": 1, "x": _Payload(marker)}, run / "state.pt")
    img, m = _pair()
    with pytest.raises(CheckpointError, match="refusing to resume"):
        train(CPSAMNet(get_config("tiny")), [(img, m)], out=out, resume=True, epochs=1,
              min_masks=1, device="cpu")
    assert not marker.exists(), "the pickled payload in state.pt was executed"
