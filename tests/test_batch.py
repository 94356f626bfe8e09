"""Plate runs: resume after SIGKILL, failure isolation inside the stream, the manifest, and
Dask (a real LocalCluster of 2 processes on 127.0.0.1) giving the single-process result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import tifffile
from test_cli_segment import (  # noqa: F401
    gradient_cellpose,
    gradient_model,
    make_plate,
    temp_files,
)

from cpsam_toolkit import batch
from cpsam_toolkit.cli import main
from cpsam_toolkit.segment import MaskOptions

DSB = "dsb2018_stage1_train_fixed"


@contextmanager
def torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def read_masks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*_masks.tif"))}


def manifest_lines(folder: Path) -> list[str]:
    p = folder / "manifest.jsonl"
    return [ln for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------
def test_manifest_ignores_a_torn_last_line(tmp_path):
    m = batch.Manifest(tmp_path)
    m.append({"stem": "a", "status": "ok"})
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"stem": "b", "stat')  # a run killed in the middle of a line
    m2 = batch.Manifest(tmp_path)
    assert set(m2.entries) == {"a"}
    m2.append({"stem": "c", "status": "ok"})
    assert set(batch.Manifest(tmp_path).entries) == {"a", "c"}
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["stem"] == "c"


def test_job_stems_are_unique(tmp_path):
    for rel in ("A01/img.tif", "A02/img.tif", "B/x.tif", "B/x.png", "y.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    jobs = batch.make_jobs([tmp_path / r for r in ("A01/img.tif", "A02/img.tif", "B/x.tif",
                                                    "B/x.png", "y.tif")])
    names = [j.stem for j in jobs]
    assert names[0] == "A01__img" and names[1] == "A02__img" and names[4] == "y"
    assert len(set(names)) == len(names)


def test_out_dir_lock(tmp_path):
    with batch._folder_lock(tmp_path), pytest.raises(batch.OutputDirError, match="another"):
        with batch._folder_lock(tmp_path):
            pass


# --------------------------------------------------------------------------------------------
# failure isolation inside the network stream
# --------------------------------------------------------------------------------------------
class BreaksOnShape:
    """A model whose stream fails on images of one shape (an error the pre-read checks miss)."""

    def __init__(self, model, bad_rows: int):
        self.model, self.bad_rows = model, bad_rows
        self.name, self.info, self.dtype = model.name, model.info, model.dtype

    def iter_segment(self, images, *args, **kwargs):
        def check(it):
            for img in it:
                if img.shape[0] == self.bad_rows:
                    raise RuntimeError("kernel failure on this image")
                yield img

        return self.model.iter_segment(check(images), *args, **kwargs)


def test_error_inside_stream_is_pinned_on_its_image(tmp_path, data_dir):
    from cpsam_toolkit.segment import NetOptions

    good, _ = make_plate(data_dir, tmp_path / "plate", 5, broken=False)
    img = tifffile.imread(tmp_path / "plate" / f"{good[0]}.tif")
    tifffile.imwrite(tmp_path / "plate" / "m_bad.tif", img[:250, :250])
    model = gradient_cellpose()
    net = NetOptions(batch_size=3)
    with torch_threads(1):
        rep = batch.run_plate(tmp_path / "plate", tmp_path / "out", BreaksOnShape(model, 250),
                              net_options=net)
        batch.run_plate([tmp_path / "plate" / f"{s}.tif" for s in good], tmp_path / "ref",
                              model, net_options=net)
    assert [Path(p).name for p, _ in rep.failed] == ["m_bad.tif"]
    assert "kernel failure" in rep.failed[0][1]
    assert sorted(rep.segmented) == sorted(good)
    assert read_masks(tmp_path / "out") == read_masks(tmp_path / "ref")


# --------------------------------------------------------------------------------------------
# resume after SIGKILL
# --------------------------------------------------------------------------------------------
RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_cli_segment import gradient_cellpose
from cpsam_toolkit.batch import OutputOptions, run_plate
from cpsam_toolkit.segment import NetOptions

rep = run_plate({plate!r}, {out!r}, gradient_cellpose(), net_options=NetOptions(batch_size=2),
                outputs=OutputOptions(outlines=True, rois=True))
print(rep.line())
sys.exit(0 if rep.ok else 1)
"""


def _run(plate: Path, out: Path) -> list[str]:
    code = RUN.format(tests=str(Path(__file__).parent), plate=str(plate), out=str(out))
    return [sys.executable, "-c", code]


def test_sigkill_mid_plate_then_resume_is_byte_identical(tmp_path, data_dir):
    n = 16
    good, _ = make_plate(data_dir, tmp_path / "plate", n, broken=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, out = tmp_path / "ref", tmp_path / "out"
    done = subprocess.run(_run(tmp_path / "plate", ref), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    assert len(read_masks(ref)) == n
    assert sum(json.loads(ln)["n_objects"] for ln in manifest_lines(ref)) > 10 * n  # real masks

    proc = subprocess.Popen(_run(tmp_path / "plate", out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while len(manifest_lines(out)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished_before = len(manifest_lines(out))
    assert 3 <= finished_before < n, f"could not kill mid-plate ({finished_before} of {n} finished)"

    resumed = subprocess.run(_run(tmp_path / "plate", out), env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stdout.split(" skipped")[0].split(", ")[-1])
    assert finished_before - 1 <= skipped < n  # the last manifest line may be torn by the kill
    assert read_masks(out) == read_masks(ref)  # byte-identical
    for s in good:  # the other outputs too
        assert (out / f"{s}_rois.zip").read_bytes() == (ref / f"{s}_rois.zip").read_bytes()
        assert (out / f"{s}_outlines.png").read_bytes() == (ref / f"{s}_outlines.png").read_bytes()
    stems_done = {json.loads(ln)["stem"] for ln in manifest_lines(out) if ln.endswith("}")}
    assert stems_done == set(good)
    assert temp_files(out) == []


# --------------------------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=40)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_dask_equals_single_process(tmp_path, data_dir, gradient_model, client):  # noqa: F811
    good, bad = make_plate(data_dir, tmp_path / "plate", 8)
    with torch_threads(1):
        single = batch.run_plate(tmp_path / "plate", tmp_path / "single", gradient_model,
                                 summary=True, outputs=batch.OutputOptions(rois=True))
    # a model object without a weights file is sent to each worker once
    dist = batch.run_plate(tmp_path / "plate", tmp_path / "dask", gradient_model, client=client,
                           chunk_size=2, torch_threads=1, summary=True,
                           outputs=batch.OutputOptions(rois=True))
    assert sorted(dist.segmented) == sorted(single.segmented) == sorted(good)
    assert sorted(Path(p).stem for p, _ in dist.failed) == sorted(bad)
    assert single.n_objects > 10 * len(good)  # real masks, not empty ones
    assert dist.n_objects == single.n_objects
    assert read_masks(tmp_path / "dask") == read_masks(tmp_path / "single")
    for s in good:
        assert (tmp_path / "dask" / f"{s}_rois.zip").read_bytes() == \
            (tmp_path / "single" / f"{s}_rois.zip").read_bytes()
    summary = (tmp_path / "dask" / "summary.csv").read_text()
    assert summary == (tmp_path / "single" / "summary.csv").read_text()
    assert (tmp_path / "dask" / "failures.csv").read_text() == \
        (tmp_path / "single" / "failures.csv").read_text()


def test_dask_workers_load_the_model_file_once(tmp_path, data_dir, tiny_model, client):
    make_plate(data_dir, tmp_path / "plate", 6, broken=False)
    fast = MaskOptions(cellprob_threshold=8.0)  # random weights: nothing to track, quick
    before = client.run(batch.model_loads)
    with torch_threads(1):
        single = batch.run_plate(tmp_path / "plate", tmp_path / "single", str(tiny_model),
                                 mask_options=fast)
    for i in range(2):
        dist = batch.run_plate(tmp_path / "plate", tmp_path / f"dask{i}", str(tiny_model),
                               client=client, chunk_size=1, torch_threads=1, mask_options=fast)
        assert dist.ok and len(dist.segmented) == 6
        assert read_masks(tmp_path / f"dask{i}") == read_masks(tmp_path / "single")
    loads = client.run(batch.model_loads)
    new = {w: loads[w] - before.get(w, 0) for w in loads}
    assert set(new.values()) <= {0, 1} and sum(new.values()) >= 1, new
    assert single.ok


def test_cli_dask_local_cluster(tmp_path, data_dir, tiny_model, capsys):
    good, _ = make_plate(data_dir, tmp_path / "plate", 4, broken=False)
    with torch_threads(1):
        assert main(["segment", str(tmp_path / "plate"), "--out", str(tmp_path / "single"),
                     "--model", str(tiny_model), "--no-progress", "--cellprob-threshold", "8"]) == 0
    rc = main(["segment", str(tmp_path / "plate"), "--out", str(tmp_path / "dask"), "--model",
               str(tiny_model), "--no-progress", "--dask", "--workers", "2", "--torch-threads", "1",
               "--cellprob-threshold", "8"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "dask: 2 workers" in cap.err
    assert "4 segmented" in cap.out
    assert read_masks(tmp_path / "dask") == read_masks(tmp_path / "single")


def test_invalid_options_raise_instead_of_looping(tmp_path, data_dir, tiny_model):
    from cpsam_toolkit.segment import InputOptions

    make_plate(data_dir, tmp_path / "plate", 2, broken=False)
    with pytest.raises(ValueError, match="diameter"):
        batch.run_plate(tmp_path / "plate", tmp_path / "out", str(tiny_model),
                        input_options=InputOptions(diameter=-3))


def test_one_gpu_per_worker(monkeypatch):
    """Without GPUs here, check the assignment logic: the local cluster gives worker i the i-th
    visible GPU; the worker plugin pins a worker that sees several GPUs to one of them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    _, workers = batch.local_cluster_spec(4, torch_threads=3, gpus=3)
    envs = [workers[i]["options"]["env"] for i in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "7", "2"]
    assert all(e["OMP_NUM_THREADS"] == "3" for e in envs)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    _, workers = batch.local_cluster_spec(2, gpus=0)
    assert all("CUDA_VISIBLE_DEVICES" not in w["options"]["env"] for w in workers.values())

    class FakeWorker:
        name = "SLURMCluster-4"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    batch.WorkerSetup(pin_gpu=True).setup(FakeWorker())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the job scheduler gave it one: kept
    batch.WorkerSetup(pin_gpu=True).setup(FakeWorker())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
