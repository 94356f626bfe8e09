"""OME-Zarr HCS plates in and out: a plate made here (2x2 wells, 2 fields, 2 channels of real DSB
nuclei) is segmented by ``cpsam segment`` with the shipped model; the labels are found by the
``ome-zarr`` package's reader (what napari-ome-zarr uses); a SIGKILLed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import DSB, stems

from cpsam_toolkit import omezarr
from cpsam_toolkit.cli import main

pytest.importorskip("ome_zarr")

WELLS = ("A/1", "A/2", "B/1", "B/2")
# the shipped model with its recommended flow threshold
MODEL = ("--model", "cpsam_toolkit_small", "--no-progress", "--flow-threshold", "0.8")


def make_plate(path: Path, data_dir: Path, size: int = 192) -> dict[str, np.ndarray]:
    """An NGFF plate written with ome_zarr.writer; returns {image path: (C, Y, X) pixels}."""
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    train = data_dir / DSB / "train"
    crowded = [s for s in stems(data_dir, DSB)[:40]  # fluorescence crops with many nuclei
               if len(np.unique(tifffile.imread(train / f"{s}_masks.tif")[:size, :size])) > 12
               and tifffile.imread(train / f"{s}_img.tif")[..., :3].std(-1).max() == 0][:8]
    imgs = [tifffile.imread(train / f"{s}_img.tif")[:size, :size] for s in crowded]
    root = zarr.open_group(str(path), mode="w")
    write_plate_metadata(root, ["A", "B"], ["1", "2"], list(WELLS), field_count=2, name="test")
    pixels, k = {}, 0
    for well in WELLS:
        row, col = well.split("/")
        wg = root.require_group(row).require_group(col)
        write_well_metadata(wg, [{"path": "0"}, {"path": "1"}])
        for field in ("0", "1"):
            # channel 0: nuclei; channel 1: a dimmer second stain of the same field
            data = np.stack([imgs[k][..., 0], imgs[k][..., 1] // 3]).astype(np.uint8)
            k += 1
            write_image(data, wg.require_group(field), axes="cyx", scale_factors=[2])
            pixels[str(path / well / field)] = data
    return pixels


@pytest.fixture(scope="module")
def plate(tmp_path_factory, data_dir):
    path = tmp_path_factory.mktemp("hcs") / "plate.zarr"
    return path, make_plate(path, data_dir)


def _label_nodes(image: Path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    return [n for n in Reader(parse_url(str(image)))() if n.load(Label)]


def test_plate_walked_and_read(plate):
    path, pixels = plate
    images = omezarr.find_images(path)
    assert [str(p) for p in images] == list(pixels)
    img = omezarr.read_image(images[0])
    assert img.shape == (192, 192, 2)  # channels last
    np.testing.assert_array_equal(np.moveaxis(img, -1, 0), pixels[str(images[0])])


def test_segment_plate_into_input_labels_found_by_ome_zarr_reader(tmp_path, data_dir):
    path = tmp_path / "plate.zarr"
    pixels = make_plate(path, data_dir, size=128)
    assert main(["segment", str(path), "--out", str(path), *MODEL]) == 0
    run = path / omezarr.RUN_FOLDER
    assert len((run / "manifest.jsonl").read_text().splitlines()) == 8
    total = 0
    for image in pixels:
        stem = "__".join(Path(image).relative_to(path).parts)
        masks = tifffile.imread(run / f"{stem}_masks.tif")
        nodes = _label_nodes(Path(image))
        assert len(nodes) == 1, f"ome_zarr's reader found no labels for {image}"
        node = nodes[0]
        assert len(node.data) >= 2  # a resolution pyramid
        np.testing.assert_array_equal(np.asarray(node.data[0]), masks)
        meta = omezarr.attrs(Path(image) / "labels" / "cpsam")["image-label"]
        assert meta["source"] == {"image": "../../"}
        props = meta["properties"]
        assert [p["label-value"] for p in props] == list(range(1, int(masks.max()) + 1))
        assert (run / f"{stem}_objects.csv").is_file()
        assert omezarr.attrs(Path(image) / "labels")["labels"] == ["cpsam"]
        total += int(masks.max())
    assert total > 8 * 6  # the shipped model finds nuclei
    # a second run skips every image (labels metadata not duplicated, images untouched)
    assert main(["segment", str(path), "--out", str(path), *MODEL]) == 0
    assert omezarr.attrs(Path(next(iter(pixels))) / "labels")["labels"] == ["cpsam"]


RUN = """
import sys
from cpsam_toolkit.cli import main
sys.exit(main(["segment", {plate!r}, "--out", {out!r}, "--model", "cpsam_toolkit_small",
               "--no-progress", "--batch-size", "1", "--flow-threshold", "0.8"]))
"""


def test_killed_plate_run_resumes_into_a_copy_of_the_layout(plate, tmp_path):
    path, pixels = plate
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", RUN.format(plate=str(path), out=str(out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished() -> int:
        m = out / "manifest.jsonl"
        return len(m.read_text().splitlines()) if m.is_file() else 0

    try:
        deadline = time.time() + 600
        while finished() < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = finished()
    assert 2 <= before < 8, f"could not kill mid-plate ({before} of 8 finished)"

    assert main(["segment", str(path), "--out", str(out), *MODEL]) == 0
    lines = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({ln["stem"] for ln in lines}) == 8 and len(lines) <= 8 + 1  # finished ones skipped
    # labels in a copy of the plate's layout; the input plate is untouched
    copy = out / "plate.zarr"
    assert omezarr.attrs(copy)["plate"] == omezarr.attrs(path)["plate"]
    assert omezarr.find_images(copy) == [copy / Path(p).relative_to(path) for p in pixels]
    for image in pixels:
        rel = Path(image).relative_to(path)
        stem = "__".join(rel.parts)
        assert not (Path(image) / "labels").exists()
        rec = json.loads((out / f"{stem}_labels.json").read_text())
        assert rec["labels"] == str(copy / rel / "labels" / "cpsam")
        node = _label_nodes_at(Path(rec["labels"]))[0]
        np.testing.assert_array_equal(np.asarray(node.data[0]),
                                      tifffile.imread(out / f"{stem}_masks.tif"))


def test_blockwise_reads_fields_and_writes_the_same_labels_layout(plate, tmp_path):
    path, pixels = plate
    out = tmp_path / "bw"
    args = ["segment", str(path), "--out", str(out), "--blockwise", "--block-size", "128",
            "--halo", "32", *MODEL]
    assert main(args) == 0
    copy = out / "plate.zarr"
    for image in pixels:
        rel = Path(image).relative_to(path)
        stem = "__".join(rel.parts)
        import zarr

        masks = np.asarray(zarr.open_array(str(out / f"{stem}_masks.zarr"), mode="r"))
        assert masks.shape == (192, 192)
        nodes = _label_nodes_at(copy / rel / "labels" / "cpsam")
        assert len(nodes) == 1 and len(nodes[0].data) >= 2
        np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), masks)
    # a rerun skips the fields and leaves the labels as they are
    assert main(args) == 0


def _label_nodes_at(labels: Path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    return [n for n in Reader(parse_url(str(labels)))() if n.load(Label)]


def test_single_ngff_04_image_into_input(tmp_path, data_dir):
    """A single OME-Zarr image in NGFF 0.4 (zarr v2), axes t,c,z,y,x: labels keep its format."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    s = stems(data_dir, DSB)[0]
    img = tifffile.imread(data_dir / DSB / "train" / f"{s}_img.tif")[:128, :128, 0]
    path = tmp_path / "one.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_image(img[None, None, None], group, axes="tczyx", fmt=FormatV04(), scale_factors=[2])
    assert omezarr.read_image(path).shape == (128, 128)
    assert main(["segment", str(path), "--out", str(path), *MODEL]) == 0
    labels = path / "labels" / "cpsam"
    assert (labels / ".zattrs").is_file() and not (labels / "zarr.json").exists()
    node = _label_nodes(path)[0]
    data = np.asarray(node.data[0])
    assert data.shape == (1, 1, 128, 128)  # t, z, y, x: the image's axes without c
    masks = tifffile.imread(path / omezarr.RUN_FOLDER / "one_masks.tif")
    np.testing.assert_array_equal(data[0, 0], masks)
