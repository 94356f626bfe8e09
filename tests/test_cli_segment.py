"""``cpsam segment`` and the output writers, on real DSB images with a tiny random-weights model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import stems

from cpsam_toolkit import batch, outputs
from cpsam_toolkit.cli import main

DSB = "dsb2018_stage1_train_fixed"
#: with random weights about half the pixels pass cellprob > 0 and tracking them is slow, while
#: QC then removes every object; plumbing tests skip that work (content is tested with
#: :class:`GradientNet`)
FAST = ("--cellprob-threshold", "8")


class GradientNet:
    """A deterministic stand-in network for CI (random weights find no cells, so masks would be
    empty and comparisons trivial): flows point up the gradient of the smoothed first channel
    (x5, like the trained network's output) and the cell probability is the smoothed intensity
    above a level. On dark-background nuclei it finds most nuclei. It is convolutional, so like a
    trained network it is almost translation-invariant, with tile-edge effects."""

    def __new__(cls, sigma: float = 3.0, level: float = 0.25):
        import torch
        import torch.nn.functional as F

        from cpsam_toolkit.network import get_config

        class _Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.cfg = get_config("tiny")
                r = int(3 * sigma)
                t = torch.arange(-r, r + 1, dtype=torch.float32)
                g = torch.exp(-(t**2) / (2 * sigma**2))
                self.register_buffer("g", g / g.sum())
                self.r = r

            def forward(self, x):
                s = F.pad(x[:, :1].float(), (self.r,) * 4, mode="reflect")
                s = F.conv2d(F.conv2d(s, self.g.view(1, 1, 1, -1)), self.g.view(1, 1, -1, 1))
                dy = F.pad(s[:, :, 2:] - s[:, :, :-2], (0, 0, 1, 1), mode="replicate")
                dx = F.pad(s[..., 2:] - s[..., :-2], (1, 1, 0, 0), mode="replicate")
                mag = torch.sqrt(dy**2 + dx**2) + 1e-6
                return torch.cat([5 * dy / mag, 5 * dx / mag, 20 * (s - level)], 1).to(x.dtype)

        return _Net().eval()


def gradient_cellpose():
    """A :class:`CellposeSAM` around :class:`GradientNet` (no weights file)."""
    from cpsam_toolkit.segment import CellposeSAM

    return CellposeSAM(GradientNet(), device="cpu", dtype="fp32", name="gradient")


@pytest.fixture(scope="module")
def gradient_model():
    return gradient_cellpose()


def small_stems(data_dir: Path, n: int) -> list[str]:
    """The first ``n`` DSB fluorescence (dark background) images of 256 x 256 pixels."""
    out = []
    for s in stems(data_dir, DSB):
        path = data_dir / DSB / "train" / f"{s}_img.tif"
        with tifffile.TiffFile(path) as t:
            if t.pages[0].shape[:2] != (256, 256):
                continue
        if np.median(tifffile.imread(path)) < 60:
            out.append(s)
        if len(out) == n:
            break
    return out


def make_plate(data_dir: Path, folder: Path, n: int, broken: bool = True) -> tuple[list[str], list[str]]:
    """Copy ``n`` real images into ``folder`` (plus broken files); return (good, bad) stems."""
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for s in small_stems(data_dir, n):
        src = data_dir / DSB / "train" / f"{s}_img.tif"
        (folder / f"{s[:10]}.tif").write_bytes(src.read_bytes())
        good.append(s[:10])
    bad = []
    if broken:
        first = folder / f"{good[0]}.tif"
        (folder / "zz_truncated.tif").write_bytes(first.read_bytes()[:3000])
        (folder / "zz_text.tif").write_text("this is not an image\n")
        tifffile.imwrite(folder / "zz_tiny.tif", np.zeros((1, 1), np.uint8))
        tifffile.imwrite(folder / "zz_4d.tif", np.zeros((3, 4, 40, 40), np.uint8), photometric="minisblack")
        (folder / "zz_garbage.png").write_bytes(np.random.default_rng(9).bytes(500))
        bad = ["zz_truncated", "zz_text", "zz_tiny", "zz_4d", "zz_garbage"]
    return good, bad


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".part" in p.name or ".tmp" in p.name]


# --------------------------------------------------------------------------------------------
# output writers
# --------------------------------------------------------------------------------------------
def test_outlines_mark_object_borders():
    m = np.zeros((8, 9), np.uint16)
    m[1:5, 1:5] = 1
    m[1:5, 5:8] = 2
    o = outputs.outlines(m)
    assert o.dtype == bool and not o[m == 0].any()
    assert o[1, 1:5].all() and o[4, 1:5].all() and o[1:5, 1].all()
    assert o[2:4, 4].all() and o[2:4, 5].all()  # touching objects both get a border
    assert not o[2:4, 2:4].any()  # interior


def test_masks_dtype_and_atomic_failure(tmp_path, monkeypatch):
    big = np.arange(70000, dtype=np.int64).reshape(280, 250) + 1
    p = outputs.save_masks(tmp_path / "a_masks.tif", big)
    back = tifffile.imread(p)
    assert back.dtype == np.uint32 and (back == big).all()
    small = outputs.save_masks(tmp_path / "b_masks.tif", np.ones((5, 5), np.int32))
    assert tifffile.imread(small).dtype == np.uint16

    # a writer that dies half-way leaves neither a partial file nor a temporary one,
    # and an existing file stays as it was
    real = tifffile.imwrite

    def dying(path, *a, **k):
        Path(path).write_bytes(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", dying)
    with pytest.raises(OSError):
        outputs.save_masks(tmp_path / "c_masks.tif", np.ones((5, 5), np.uint16))
    with pytest.raises(OSError):
        outputs.save_masks(p, np.ones((5, 5), np.uint16))
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert not (tmp_path / "c_masks.tif").exists()
    assert (tifffile.imread(p) == big).all()
    assert temp_files(tmp_path) == []


def test_rois_enclose_exactly_the_object_pixels(tmp_path, data_dir):
    import roifile
    from skimage.draw import polygon2mask

    s = small_stems(data_dir, 1)[0]
    masks = tifffile.imread(data_dir / DSB / "train" / f"{s}_masks.tif")
    path = outputs.save_rois(tmp_path / "r.zip", masks)
    rois = roifile.roiread(path)
    labels = np.unique(masks[masks > 0])
    assert len(rois) == len(labels)
    assert sorted(int(r.name) for r in rois) == labels.tolist()
    agree = []
    for r in rois[:20]:
        c = r.coordinates()  # (x, y) in ImageJ pixel-edge coordinates
        filled = polygon2mask(masks.shape, np.stack([c[:, 1] - 0.5, c[:, 0] - 0.5], 1))
        obj = masks == int(r.name)
        agree.append((filled & obj).sum() / (filled | obj).sum())
    assert np.mean(agree) > 0.97
    assert outputs.save_rois(tmp_path / "none.zip", np.zeros((9, 9), np.uint16)) is None
    assert not (tmp_path / "none.zip").exists()


def test_flow_picture_is_rgb_uint8():
    rng = np.random.default_rng(0)
    rgb = outputs.flow_rgb(rng.normal(size=(2, 30, 40)).astype(np.float32))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8 and rgb.max() > 100
    assert outputs.flow_rgb(np.zeros((2, 5, 5), np.float32)).max() == 0


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def test_folder_with_broken_files(tmp_path, data_dir, tiny_model, capsys):
    good, bad = make_plate(data_dir, tmp_path / "plate", 3)
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "plate"), "--out", str(out), "--model", str(tiny_model),
               "--batch-size", "4", "--no-progress", *FAST])
    cap = capsys.readouterr()
    assert rc == 1
    for s in good:
        m = tifffile.imread(out / f"{s}_masks.tif")
        assert m.shape == (256, 256) and m.dtype == np.uint16
    for s in bad:
        assert not list(out.glob(f"{s}*")), f"output written for broken file {s}"
        assert f"failed: {tmp_path / 'plate'}" in cap.err and s in cap.err
    with open(out / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).stem for r in rows) == sorted(bad)
    reasons = {Path(r["path"]).stem: r["reason"] for r in rows}
    assert "truncated" in reasons["zz_truncated"] or "corrupt" in reasons["zz_truncated"]
    assert "too small" in reasons["zz_tiny"]
    assert "4-D" in reasons["zz_4d"]
    assert temp_files(out) == []
    assert "3 segmented, 0 skipped, 5 failed" in cap.out
    assert "model: tiny.pt" in cap.err
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_skip_overwrite_and_redo(tmp_path, data_dir, tiny_model, capsys):
    good, _ = make_plate(data_dir, tmp_path / "plate", 2, broken=False)
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "plate"), "--out", str(out), "--model", str(tiny_model),
            "--no-progress", "--save-outlines", *FAST]
    assert main(args) == 0
    first = {s: (out / f"{s}_masks.tif").stat().st_mtime_ns for s in good}
    capsys.readouterr()

    assert main(args) == 0  # everything finished: skipped
    assert "0 segmented, 2 skipped, 0 failed" in capsys.readouterr().out
    assert {s: (out / f"{s}_masks.tif").stat().st_mtime_ns for s in good} == first

    # a requested output that the first run did not write: redone
    assert main([*args, "--save-rois"]) == 0
    assert "2 segmented, 0 skipped" in capsys.readouterr().out
    entries = batch.Manifest(out).entries
    assert all("rois" in entries[s]["kinds"] for s in good)  # (no zip when there are no objects)

    # an output without a manifest entry (a run killed after writing it) is redone
    (out / "manifest.jsonl").write_text((out / "manifest.jsonl").read_text().splitlines()[0][:40])
    assert main([*args, "--save-rois"]) == 0
    assert "2 segmented, 0 skipped" in capsys.readouterr().out

    # a changed input is redone, an unchanged one skipped
    img = tifffile.imread(tmp_path / "plate" / f"{good[0]}.tif")
    tifffile.imwrite(tmp_path / "plate" / f"{good[0]}.tif", img[::-1].copy())
    assert main([*args, "--save-rois"]) == 0
    assert "1 segmented, 1 skipped" in capsys.readouterr().out

    # other settings: redone
    assert main([*args, "--save-rois", "--flow-threshold", "0.5"]) == 0
    assert "2 segmented, 0 skipped" in capsys.readouterr().out

    assert main([*args, "--save-rois", "--flow-threshold", "0.5", "--overwrite"]) == 0
    assert "2 segmented, 0 skipped" in capsys.readouterr().out


def test_all_outputs_readable(tmp_path, data_dir, gradient_model):
    import roifile
    from PIL import Image

    good, _ = make_plate(data_dir, tmp_path / "plate", 3, broken=False)
    out = tmp_path / "out"
    rep = batch.run_plate(tmp_path / "plate" / "*.tif", out, gradient_model, summary=True,
                          outputs=batch.OutputOptions(flows=True, outlines=True, rois=True, table=True))
    assert rep.ok and sorted(rep.segmented) == sorted(good)
    with open(out / "summary.csv") as f:
        summary = {r["stem"]: r for r in csv.DictReader(f)}
    assert sorted(summary) == sorted(good)
    assert all(r["diameter"] == "" for r in summary.values())  # not resized
    total = 0
    for s in good:
        m = tifffile.imread(out / f"{s}_masks.tif")
        n = len(np.unique(m[m > 0]))
        assert n == m.max() > 5  # consecutive labels, real objects
        total += n
        png = np.asarray(Image.open(out / f"{s}_outlines.png"))
        assert png.shape == (256, 256, 3) and png.dtype == np.uint8
        assert (png[outputs.outlines(m)] == [255, 0, 0]).all()
        rois = roifile.roiread(out / f"{s}_rois.zip")
        assert len(rois) == n and sorted(int(r.name) for r in rois) == list(range(1, n + 1))
        with open(out / f"{s}_objects.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n and list(rows[0]) == list(outputs.OBJECT_COLUMNS)
        assert [int(r["area"]) for r in rows] == np.bincount(m.ravel())[1:].tolist()
        assert all(0 <= float(r["mean_cellprob"]) <= 1 for r in rows)
        assert int(summary[s]["count"]) == n
        assert float(summary[s]["mean_area"]) == pytest.approx(np.mean(np.bincount(m.ravel())[1:]), rel=1e-5)
        assert tifffile.imread(out / f"{s}_flows.tif").shape == (256, 256, 3)
        dp = tifffile.imread(out / f"{s}_dP.tif")
        assert dp.shape == (2, 256, 256) and dp.dtype == np.float32
        assert tifffile.imread(out / f"{s}_cellprob.tif").dtype == np.float32
    assert rep.n_objects == total


def test_cli_output_flags(tmp_path, data_dir, tiny_model, capsys):
    good, _ = make_plate(data_dir, tmp_path / "plate", 1, broken=False)
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "plate" / "*.tif"), "--out", str(out), "--model", str(tiny_model),
               "--no-progress", "--save-flows", "--save-outlines", "--save-rois", "--save-table",
               "--summary", str(tmp_path / "s.csv"), "--channels", "0", "--invert", "--augment",
               "--tile-overlap", "0.2", "--niter", "50", "--min-size", "5"])
    assert rc == 0
    assert "1 segmented, 0 skipped, 0 failed" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    for suffix in ("_masks.tif", "_flows.tif", "_dP.tif", "_cellprob.tif", "_outlines.png", "_objects.csv"):
        assert f"{good[0]}{suffix}" in names
    assert (tmp_path / "s.csv").read_text().startswith("stem,count,mean_area")
    run = __import__("json").loads((out / "run.json").read_text())
    assert run["options"]["inputs"]["channels"] == [0] and run["options"]["inputs"]["invert"] is True
    assert run["options"]["masks"]["niter"] == 50 and run["options"]["net"]["augment"] is True


def test_bad_out_and_inputs_fail_before_work(tmp_path, tiny_model, capsys, data_dir):
    make_plate(data_dir, tmp_path / "plate", 1, broken=False)
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc = main(["segment", str(tmp_path / "plate"), "--out", str(f / "sub"), "--model", str(tiny_model)])
    assert rc == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    rc = main(["segment", str(tmp_path / "plate"), "--out", str(f), "--model", str(tiny_model)])
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    rc = main(["segment", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--model", str(tiny_model)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["segment", str(tmp_path / "plate"), "--out", str(tmp_path / "o"), "--model",
               str(tmp_path / "file.txt")])
    assert rc == 2 and "file.txt" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*_masks.tif"))


def test_same_stem_in_subfolders(tmp_path, data_dir, tiny_model, capsys):
    s = small_stems(data_dir, 2)
    for well, stem in zip(("A01", "A02"), s, strict=True):
        (tmp_path / "plate" / well).mkdir(parents=True)
        src = data_dir / DSB / "train" / f"{stem}_img.tif"
        (tmp_path / "plate" / well / "field1.tif").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "plate"), "--recursive", "--out", str(out),
                 "--model", str(tiny_model), "--no-progress", *FAST]) == 0
    assert sorted(p.name for p in out.glob("*_masks.tif")) == ["A01__field1_masks.tif",
                                                               "A02__field1_masks.tif"]
