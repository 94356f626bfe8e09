"""Screen-scale batch runs: folders and plates of images, resumable, failure-isolated, on one
process or a Dask cluster.

``run_plate(inputs, out_dir, model)`` segments every image under ``inputs`` and writes
``<stem>_masks.tif`` (and optional flows, outlines, ROIs, object tables) into ``out_dir``:

* **Streaming.** Images are read (and checked) in a background thread, their tiles share network
  batches across image boundaries (``CellposeSAM.iter_segment`` on a lazy generator), and the
  outputs are written by another thread while the network runs on the next images.
* **Atomic and resumable.** Every output file is written to a temporary name and renamed into
  place. When all outputs of an image exist, one JSON line is appended to
  ``out_dir/manifest.jsonl`` (stem, input path, size and mtime, outputs, object count,
  settings). A rerun skips images whose manifest entry matches the input file, the settings
  and the requested outputs; everything else (an output without an entry, an input that
  changed, other settings) is redone. Kill it at any point and run it again.
* **Failure-isolated.** An unreadable, corrupt or wrongly shaped file is recorded in
  ``out_dir/failures.csv`` (path, reason) and the run goes on; bad files are rejected before
  they enter the network stream, and an error inside the stream is pinned on the image that
  caused it by re-running the images in flight one by one.
* **Distributed.** With a ``dask.distributed`` client, chunks of images are tasks; each worker
  loads the model once (a per-process cache keyed by path, device and dtype) and batches tiles
  across the images of its chunk. Outputs are identical to a single-process run.

The command line (``cpsam segment``) is a thin adapter over :func:`run_plate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

from . import outputs as out
from .cellpose_files import save_seg_npy
from .device import resolve_device, resolve_dtype
from .io import ImageReadError, find_images, imread, input_stat, write_atomic
from .model_cache import get_model, model_loads  # noqa: F401 - model_loads: for client.run
from .modes.panoptic import save_classes_json
from .modes.volume import segment_3d
from .preprocess import ImageInputError, check_finite, to_channels_last
from .segment import load_model, split_settings
from .settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from .segment import CellposeSAM, InputOptions, MaskOptions, NetOptions, SegmentationResult
    from .settings import Settings

log = logging.getLogger("cpsam_toolkit")

MANIFEST = "manifest.jsonl"
FAILURES = "failures.csv"
SUMMARY = "summary.csv"
RUN_INFO = "run.json"
LOCK = ".cpsam.lock"


class OutputDirError(OSError):
    """The output folder cannot be created or written, or another run is using it."""


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputOptions:
    """Which files to write per image (``<stem>_masks.tif`` is always written)."""

    flows: bool = False  # _flows.tif (RGB), _dP.tif, _cellprob.tif
    outlines: bool = False  # _outlines.png
    rois: bool = False  # _rois.zip (ImageJ)
    table: bool = False  # _objects.csv
    summary: bool = False  # per-image statistics in the manifest (for summary.csv)
    npy: bool = False  # _seg.npy for the cellpose GUI (cpsam_toolkit.cellpose_files)
    zarr: Any = None  # cpsam_toolkit.omezarr.LabelTarget: labels of OME-Zarr inputs

    def kinds(self) -> list[str]:
        k = ["masks"]
        if self.flows:
            k += ["flows", "dP", "cellprob"]
        if self.outlines:
            k.append("outlines")
        if self.rois:
            k.append("rois")
        if self.table:
            k.append("table")
        if self.npy:
            k.append("npy")
        if self.zarr is not None:
            k.append("zarr_labels")
        return k


@dataclass(frozen=True)
class PlateSettings:
    """Everything a worker needs to process images (picklable)."""

    inputs: InputOptions
    net: NetOptions
    masks: MaskOptions
    outputs: OutputOptions = field(default_factory=OutputOptions)


def _settings_fingerprint(settings: PlateSettings, model_id: dict[str, Any]) -> str:
    """Hash of what determines the outputs' content (not batch size, device or outputs)."""
    d = {
        "model": model_id,
        "inputs": asdict(settings.inputs),
        "masks": asdict(settings.masks),
        "tile_overlap": settings.net.tile_overlap,
        "augment": settings.net.augment,
    }
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageJob:
    """One input image and the stem of its outputs."""

    stem: str
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def from_path(cls, path: str | os.PathLike, stem: str | None = None) -> ImageJob:
        p = Path(path)
        try:
            st = input_stat(p)  # an OME-Zarr image: its metadata file, not the folder
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        return cls(stem or p.stem, str(p), size, mtime)


def make_jobs(paths: Sequence[str | os.PathLike]) -> list[ImageJob]:
    """Jobs with unique output stems: the file stem, or for files sharing a stem the path
    relative to their common folder joined with ``__`` (``A01/img.tif`` → ``A01__img``)."""
    paths = [Path(p) for p in paths]
    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_stem.setdefault(p.stem, []).append(i)
    stems = [p.stem for p in paths]
    for group in by_stem.values():
        if len(group) < 2:
            continue
        parents = [paths[i].resolve().parent for i in group]
        common = Path(os.path.commonpath([str(q) for q in parents]))
        for i in group:
            rel = paths[i].resolve().with_suffix("").relative_to(common)
            stems[i] = "__".join(rel.parts)
    seen: dict[str, int] = {}
    for i, s in enumerate(stems):  # same stem and folder, different extension: add it
        if s in seen:
            stems[i] = f"{s}__{paths[i].suffix.lstrip('.').lower()}"
        seen.setdefault(stems[i], i)
    return [ImageJob.from_path(p, s) for p, s in zip(paths, stems, strict=True)]


def _short_reason(e: BaseException, path: str) -> str:
    msg = str(e) or e.__class__.__name__
    for prefix in (f"{path}: ", f"{Path(path).name}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if not isinstance(e, (ImageReadError, ImageInputError)):
        msg = f"{e.__class__.__name__}: {msg}"
    return msg.splitlines()[0] if msg else msg


def read_checked(job: ImageJob, inputs: InputOptions) -> np.ndarray:
    """Read an image and check it can be segmented with these input options (shape,
    channels, dtype, finite values) before it enters the network stream."""
    img = imread(job.path)
    # channels=(0,) when none are chosen: same checks, without the ">3 channels" warning
    # (the model warns once when it prepares the image)
    view = to_channels_last(
        img, inputs.channel_axis, inputs.channels if inputs.channels is not None else (0,),
        name=job.path,
    )
    check_finite(view, job.path)
    return img


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
class Manifest:
    """``manifest.jsonl``: one JSON object per finished image, appended; the last entry of a
    stem wins. A torn last line (a run killed mid-write) is ignored."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / MANIFEST
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._needs_newline = False
        if self.path.exists():
            data = self.path.read_bytes()
            self._needs_newline = bool(data) and not data.endswith(b"\n")
            for line in data.splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if isinstance(e, dict) and isinstance(e.get("stem"), str):
                    self.entries[e["stem"]] = e

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True, default=_json_default) + "\n"
        with self._lock:
            if self._needs_newline:
                line = "\n" + line
                self._needs_newline = False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode())  # one write of one line: never interleaved
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries[entry["stem"]] = entry


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _is_done(
    entry: dict[str, Any] | None,
    job: ImageJob,
    fingerprint: str,
    kinds: Sequence[str],
    need_summary: bool,
    out_dir: Path,
) -> bool:
    if not entry or entry.get("status") != "ok":
        return False
    if (
        entry.get("name") != Path(job.path).name
        or entry.get("size") != job.size
        or entry.get("mtime_ns") != job.mtime_ns
        or entry.get("settings") != fingerprint
    ):
        return False
    if not set(kinds) <= set(entry.get("kinds", ())):
        return False
    if need_summary and not entry.get("summary"):
        return False
    return all((out_dir / f).is_file() for f in entry.get("outputs", ()))


# --------------------------------------------------------------------------------------------
# the streaming core (one process; also what each Dask task runs)
# --------------------------------------------------------------------------------------------
_END = object()


class _Prefetcher:
    """Reads (and checks) images in a background thread, a few ahead of the network."""

    def __init__(self, jobs: Iterable[ImageJob], load: Callable[[ImageJob], np.ndarray], depth: int = 3):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._jobs = jobs
        self._load = load
        self._t = threading.Thread(target=self._run, name="cpsam-reader", daemon=True)
        self._t.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for job in self._jobs:
                if self._stop.is_set():
                    return
                try:
                    item = (job, self._load(job), None)
                except Exception as e:  # noqa: BLE001 - any failure is this file's
                    item = (job, None, _short_reason(e, job.path))
                if not self._put(item):
                    return
        finally:
            self._put(_END)

    def __iter__(self) -> Iterator[tuple[ImageJob, np.ndarray | None, str | None]]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._t.join(timeout=5)


def write_outputs(
    job: ImageJob, image: np.ndarray | None, res: SegmentationResult, out_dir: Path,
    settings: PlateSettings,
) -> dict[str, Any]:
    """Write all requested outputs of one image (each atomically); return its record."""
    o = settings.outputs
    written: list[Path] = [out.save_masks(out.output_path(out_dir, job.stem, "masks"), res.masks)]
    if getattr(res, "class_names", None):  # panoptic model: {label: class} (cpsam_toolkit.panoptic)

        written.append(save_classes_json(out_dir / f"{job.stem}_classes.json", res))
    if o.flows:
        written += out.save_flows(out_dir / job.stem, res)
    if o.outlines:
        written.append(out.save_outlines_png(
            out.output_path(out_dir, job.stem, "outlines"), image, res.masks,
            channel_axis=settings.inputs.channel_axis,
        ))
    if o.rois:
        p = out.save_rois(out.output_path(out_dir, job.stem, "rois"), res.masks)
        if p is not None:
            written.append(p)
        else:  # no objects: no zip, and no stale one from an earlier run
            out.output_path(out_dir, job.stem, "rois").unlink(missing_ok=True)
    if o.npy:
        written.append(save_seg_npy(
            out.output_path(out_dir, job.stem, "npy"), res, filename=str(Path(job.path).resolve()),
            diameter=getattr(res, "diameter", None),
            settings={**asdict(settings.inputs), **asdict(settings.masks)},
        ))
    if o.zarr is not None:  # OME-Zarr input: labels/<name> in the plate (cpsam_toolkit.omezarr)
        p = o.zarr.write(job.stem, job.path, res.masks, res.objects, out_dir)
        if p is not None:
            written.append(p)
    summary = None
    if o.table or o.summary:
        objects = res.objects
        if o.table:
            written.append(out.object_table_csv(out.output_path(out_dir, job.stem, "table"), objects))
        summary = out.summary_row(job.stem, objects, res.diameter)
        summary.pop("stem")
    rec: dict[str, Any] = {
        "stem": job.stem,
        "input": job.path,
        "name": Path(job.path).name,
        "size": job.size,
        "mtime_ns": job.mtime_ns,
        "status": "ok",
        "kinds": o.kinds(),
        "outputs": [p.name for p in written],
        "n_objects": res.n_objects,
        "shape": list(res.masks.shape),
        "diameter": getattr(res, "diameter", None),
    }
    if summary is not None:
        rec["summary"] = summary
    return rec


def failure_record(job: ImageJob, reason: str) -> dict[str, Any]:
    return {"stem": job.stem, "input": job.path, "status": "failed", "reason": reason}


class _Writer:
    """Writes outputs in a background thread so the network can go on."""

    def __init__(self, out_dir: Path, settings: PlateSettings, on_record: Callable[[dict], None]):
        self.out_dir, self.settings, self.on_record = out_dir, settings, on_record
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="cpsam-writer", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _END:
                return
            job, image, res, t0 = item
            try:
                if res is None:
                    rec = failure_record(job, image)  # image holds the reason
                else:
                    try:
                        rec = write_outputs(job, image, res, self.out_dir, self.settings)
                        rec["seconds"] = round(time.perf_counter() - t0, 3)
                    except Exception as e:  # noqa: BLE001 - e.g. disk full: this image failed
                        rec = failure_record(job, f"writing outputs failed: {_short_reason(e, job.path)}")
                self.on_record(rec)
            except BaseException as e:  # noqa: BLE001 - the callback failed: stop the run
                self._error = e
                return

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, job: ImageJob, image: Any, res: SegmentationResult | None, t0: float) -> None:
        while True:
            self._check()
            try:
                self._q.put((job, image, res, t0), timeout=0.1)
                return
            except queue.Full:
                if not self._t.is_alive():
                    self._check()
                    raise RuntimeError("the output writer stopped") from None

    def fail(self, job: ImageJob, reason: str) -> None:
        self.put(job, reason, None, time.perf_counter())

    def close(self, wait: bool = True) -> None:
        if self._t.is_alive():
            if wait:
                while self._t.is_alive():
                    try:
                        self._q.put(_END, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                self._t.join()
            else:
                with contextlib.suppress(queue.Empty):
                    while True:
                        self._q.get_nowait()
                with contextlib.suppress(queue.Full):
                    self._q.put_nowait(_END)
                self._t.join(timeout=30)
        self._check()


def segment_jobs(
    model: CellposeSAM,
    jobs: Sequence[ImageJob],
    out_dir: str | os.PathLike,
    settings: PlateSettings,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    prefetch: int = 3,
) -> list[dict[str, Any]]:
    """Read, segment and write ``jobs`` in one streaming pass; return one record per job
    (``status`` "ok" or "failed"). ``on_record`` is called (from the writer thread) as each
    image finishes."""
    out_dir = Path(out_dir)
    records: list[dict[str, Any]] = []

    def collect(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_record is not None:
            on_record(rec)

    reader = _Prefetcher(jobs, lambda j: read_checked(j, settings.inputs), prefetch)
    writer = _Writer(out_dir, settings, collect)
    source = iter(reader)
    ok = False
    try:
        while True:
            inflight: deque[tuple[ImageJob, np.ndarray, float]] = deque()
            names: list[str] = []

            def feed(inflight=inflight, names=names) -> Iterator[np.ndarray]:
                for job, img, reason in source:
                    if reason is not None:
                        writer.fail(job, reason)
                        continue
                    inflight.append((job, img, time.perf_counter()))
                    names.append(job.path)
                    yield img

            try:
                for res in model.iter_segment(
                    feed(), settings.inputs, settings.net, settings.masks, names=names
                ):
                    job, img, t0 = inflight.popleft()
                    writer.put(job, img, res, t0)
                break  # the source is exhausted
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001
                if not inflight:  # not caused by an image (e.g. invalid options): give up
                    raise
                # an image in flight broke the stream: find it by running them one by one
                log.info("stream error (%s); re-running %d images singly", e, len(inflight))
                for job, img, t0 in list(inflight):
                    try:
                        res = next(iter(model.iter_segment(
                            [img], settings.inputs, settings.net, settings.masks, names=[job.path]
                        )))
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e1:  # noqa: BLE001
                        writer.fail(job, _short_reason(e1, job.path))
                        continue
                    writer.put(job, img, res, t0)
        ok = True
    finally:
        reader.close()
        writer.close(wait=ok)
    return records


# --------------------------------------------------------------------------------------------
# worker-side model cache (Dask)
# --------------------------------------------------------------------------------------------
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: a weights file, a device and a dtype (names, picklable)."""

    path: str
    device: str | None = None
    dtype: str | None = None
    name: str | None = None

    @classmethod
    def from_model(cls, model: CellposeSAM, device: str | None = None) -> ModelSpec:
        path = model.info.get("path")
        if not path:
            raise ValueError(
                "this model has no weights file, so Dask workers cannot load it; save it with "
                "cpsam_toolkit.network.checkpoints.save_checkpoint and load_model(path)"
            )
        dev = device if device is not None else model.device.type  # workers pick their GPU
        return cls(str(path), dev, _DTYPE_NAMES.get(str(model.dtype), None), model.name)


def cached_model(spec: ModelSpec) -> CellposeSAM:
    """The model for ``spec``, loaded once per process (each Dask worker keeps its own;
    :mod:`cpsam_toolkit.model_cache`)."""
    return get_model(spec.path, spec.device, spec.dtype, name=spec.name)[0]


def worker_model(spec: ModelSpec | CellposeSAM) -> CellposeSAM:
    """On a worker: the model of a spec (loaded once per process), or a shipped model object."""
    return cached_model(spec) if isinstance(spec, ModelSpec) else spec


def model_file(model: Any) -> str | None:
    """The weights file a model was loaded from, if any (workers can load it themselves)."""
    info = getattr(model, "info", None) or {}
    path = info.get("path")
    return str(path) if path and Path(path).is_file() else None


def model_for_workers(client: Any, model: ModelSpec | CellposeSAM) -> Any:
    """What tasks get as their model: a :class:`ModelSpec` (workers load the file once), or,
    for a model object without a file (e.g. fine-tuned in memory), the object sent once to
    every worker (``client.scatter(..., broadcast=True)``; it runs there on the CPU device it
    was pickled with)."""
    if isinstance(model, ModelSpec):
        return model
    return client.scatter(model, broadcast=True, hash=False)


def run_chunk(
    spec: ModelSpec | CellposeSAM, jobs: Sequence[ImageJob], out_dir: str, settings: PlateSettings
) -> list[dict[str, Any]]:
    """A Dask task: segment a chunk of images with the worker's model."""
    return segment_jobs(worker_model(spec), jobs, out_dir, settings)


try:  # the plugin class needs distributed; the rest of this module does not
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover
    _WorkerPluginBase = object  # type: ignore[assignment,misc]


class WorkerSetup(_WorkerPluginBase):  # type: ignore[misc,valid-type]
    """Worker plugin: torch threads per worker, and one GPU per worker on multi-GPU nodes
    where the cluster did not already restrict ``CUDA_VISIBLE_DEVICES`` to one device."""

    name = "cpsam-setup"

    def __init__(self, torch_threads: int | None = None, pin_gpu: bool = True) -> None:
        self.torch_threads = torch_threads
        self.pin_gpu = pin_gpu

    def setup(self, worker: Any) -> None:
        if self.pin_gpu:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v for v in (visible or "").split(",") if v.strip()]
            if visible is None or len(ids) > 1:
                import torch

                n = len(ids) if ids else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
                if n > 1:
                    idx = _worker_number(worker) % n
                    chosen = ids[idx] if ids else str(idx)
                    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
                    if torch.cuda.is_initialized():
                        torch.cuda.set_device(idx)  # too late for the variable: pick the index
        if self.torch_threads:
            import torch

            torch.set_num_threads(int(self.torch_threads))


def _worker_number(worker: Any) -> int:
    name = getattr(worker, "name", 0)
    if isinstance(name, int):
        return name
    m = re.search(r"(\d+)$", str(name))
    return int(m.group(1)) if m else abs(hash(str(name)))


def local_cluster_spec(
    n_workers: int = 2,
    threads_per_worker: int = 1,
    torch_threads: int | None = None,
    gpus: int | None = None,
    memory_limit: str | float | None = "auto",
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Scheduler and worker specs of :func:`local_cluster` (``SpecCluster`` format)."""
    from distributed import Nanny, Scheduler

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001  # pragma: no cover
            gpus = 0
    if torch_threads is None:
        torch_threads = max(1, (os.cpu_count() or 1) // max(1, n_workers))
    scheduler = {"cls": Scheduler,
                 "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": ":0"}}
    workers: dict[int, dict[str, Any]] = {}
    for i in range(n_workers):
        env = {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads)}
        if gpus:  # the i-th of the GPUs this process may use
            env["CUDA_VISIBLE_DEVICES"] = visible[i % gpus] if len(visible) >= gpus else str(i % gpus)
        opts: dict[str, Any] = {"nthreads": threads_per_worker, "host": "127.0.0.1", "env": env,
                                "name": i}
        if memory_limit is not None:
            opts["memory_limit"] = memory_limit
        workers[i] = {"cls": Nanny, "options": opts}
    return scheduler, workers


def local_cluster(
    n_workers: int = 2,
    threads_per_worker: int = 1,
    torch_threads: int | None = None,
    gpus: int | None = None,
    memory_limit: str | float | None = "auto",
    silence_logs: int | bool = False,
):
    """A ``dask.distributed`` cluster of worker processes on this machine (127.0.0.1).

    With GPUs (``gpus``; default: all CUDA devices this process sees), worker ``i`` sees only
    GPU ``i % gpus`` through ``CUDA_VISIBLE_DEVICES``, set before the worker process starts.
    ``torch_threads`` (default: CPU cores / workers) sets the workers' OpenMP/MKL threads.
    """
    from distributed import SpecCluster

    scheduler, workers = local_cluster_spec(n_workers, threads_per_worker, torch_threads, gpus,
                                            memory_limit)
    return SpecCluster(workers=workers, scheduler=scheduler, name="cpsam-local",
                       silence_logs=silence_logs)


# --------------------------------------------------------------------------------------------
# the plate runner
# --------------------------------------------------------------------------------------------
@dataclass
class PlateReport:
    """What a run did. ``ok`` is False when any image failed."""

    out_dir: Path
    model: str
    n_inputs: int = 0
    segmented: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    n_objects: int = 0
    seconds: float = 0.0
    redone: int = 0  # images that had outputs but no matching manifest entry
    settings: Any = None  # the Settings used

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def images_per_second(self) -> float:
        return len(self.segmented) / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        rate = f" ({self.images_per_second:.2f} images/s)" if self.segmented else ""
        return (
            f"{len(self.segmented)} segmented, {len(self.skipped)} skipped, {len(self.failed)} failed, "
            f"{self.n_objects} objects, {self.seconds:.1f} s{rate}"
        )


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and prove it is writable; raise :class:`OutputDirError`."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputDirError(f"output folder {p} exists and is not a folder; choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".cpsam-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"cannot write to output folder {p}: {e.strerror or e}; choose a writable --out"
        ) from None
    return p


@contextlib.contextmanager
def _folder_lock(out_dir: Path):
    """An exclusive lock on the output folder for the run (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputDirError(
                f"another cpsam run is writing to {out_dir}; wait for it or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)


_TMP_RE = re.compile(r"^\..+\.part(\.[A-Za-z0-9]+)?$")


def _remove_stale_temp_files(out_dir: Path) -> int:
    """Temporary files of writes interrupted by a killed run (we hold the folder lock)."""
    n = 0
    for f in out_dir.iterdir():
        if f.is_file() and _TMP_RE.match(f.name):
            with contextlib.suppress(OSError):
                f.unlink()
                n += 1
    return n


def _model_identity(model: CellposeSAM) -> dict[str, Any]:
    path = model.info.get("path")
    ident: dict[str, Any] = {"name": model.name, "dtype": str(getattr(model, "dtype", ""))}
    if path:
        with contextlib.suppress(OSError):
            st = Path(path).stat()
            ident.update(path=str(Path(path).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    else:
        ident["config"] = str(model.info.get("config"))
    return ident


def write_failures(out_dir: Path, failed: Sequence[tuple[str, str]]) -> None:
    path = out_dir / FAILURES
    if failed:
        rows = [{"path": p, "reason": r} for p, r in sorted(failed)]
        out.write_text_atomic(path, out.csv_text(rows, ("path", "reason")))
    else:
        path.unlink(missing_ok=True)


def write_summary(path: Path, jobs: Sequence[ImageJob], manifest: Manifest) -> Path:
    rows = []
    for job in jobs:
        e = manifest.entries.get(job.stem)
        if not e or e.get("status") != "ok" or not e.get("summary"):
            continue
        rows.append({"stem": job.stem, **e["summary"]})
    return out.write_text_atomic(path, out.csv_text(rows, out.SUMMARY_COLUMNS))


def run_plate(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    model: CellposeSAM | str | os.PathLike | None = None,
    *,
    settings: Settings | None = None,
    overrides: Mapping[str, Any] | None = None,
    input_options: InputOptions | None = None,
    net_options: NetOptions | None = None,
    mask_options: MaskOptions | None = None,
    outputs: OutputOptions | None = None,
    summary: bool | str | os.PathLike = False,
    recursive: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    client: Any = None,
    chunk_size: int | None = None,
    torch_threads: int | None = None,
    progress: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> PlateReport:
    """Segment a folder/plate of images into ``out_dir``; resumable and failure-isolated.

    Parameters
    ----------
    inputs
        Files, folders and glob patterns (see :func:`cpsam_toolkit.io.find_images`).
    out_dir
        Output folder (created). Holds the outputs, ``manifest.jsonl``, ``failures.csv``
        (only when something failed), ``run.json`` and optionally ``summary.csv``.
    model
        A loaded :class:`~cpsam_toolkit.segment.CellposeSAM`, a registry name, a weights
        path, or None for the default model (loaded with ``device``/``dtype``).
    settings
        A :class:`~cpsam_toolkit.settings.Settings`; default: the model's ``settings`` (the
        defaults plus its recommended values).
    overrides
        Setting values that win over ``settings`` (source "user"), e.g. from the command line.
    input_options, net_options, mask_options
        The older form (as for :meth:`CellposeSAM.iter_segment`): every field of an options
        object given counts as set by the user.
    outputs
        Extra files per image (:class:`OutputOptions`).
    summary
        True (``out_dir/summary.csv``) or a path: a per-image CSV (stem, count, mean area,
        mean confidence, mean flow error) over all finished images of ``inputs``.
    overwrite
        Redo every image even if the manifest says it is finished.
    client
        A ``dask.distributed.Client``: run chunks of ``chunk_size`` images as tasks on its
        workers (each loads the model file once, or gets a model object without a file once;
        they must see ``out_dir`` and the inputs).
    torch_threads
        With ``client``: torch threads per worker (None leaves the workers' setting).
    progress
        Show a progress bar (images/s).
    on_record
        Called with each image's record (ok or failed) as it finishes.
    on_start
        Called once before the work starts with ``model``, ``path``, ``n_inputs``,
        ``n_todo``, ``n_skipped`` and ``n_redone`` (images with outputs but no finished entry).
    """

    t_start = time.perf_counter()
    out_dir = check_out_dir(out_dir)
    outputs = outputs or OutputOptions()
    if summary and not outputs.summary:
        outputs = replace(outputs, summary=True)
    given = {k: v for o in (input_options, net_options, mask_options) if o is not None
             for k, v in asdict(o).items()}
    given.update(overrides or {})
    paths = find_images(inputs, recursive=recursive)
    jobs = make_jobs(paths)

    spec = None
    if hasattr(model, "iter_segment"):  # a model object (CellposeSAM or compatible)
        identity = _model_identity(model)
        base = getattr(model, "settings", None)
        if client is not None and model_file(model):
            spec = ModelSpec.from_model(model, device)
    elif client is None:
        model = load_model(model, device=device, dtype=dtype)
        identity = _model_identity(model)
        base = model.settings
    else:
        # checked (and downloaded) once here, on the CPU; the workers load it themselves

        checked = load_model(model, device="cpu", dtype="fp32")
        spec = ModelSpec(str(checked.info["path"]), device, dtype, checked.name)
        identity = _model_identity(checked)
        base = checked.settings
        identity["dtype"] = str(resolve_dtype(dtype, resolve_device(device)))
        model = None
        del checked
    model_name = spec.name if spec is not None and spec.name else model.name
    if settings is None:
        settings = base if isinstance(base, Settings) else Settings()
    used = settings.replace(**given) if given else settings
    settings = PlateSettings(*split_settings(used), outputs)
    report = PlateReport(out_dir, model_name, n_inputs=len(jobs))
    report.settings = used
    fingerprint = _settings_fingerprint(settings, identity)
    kinds = outputs.kinds()

    with _folder_lock(out_dir):
        _remove_stale_temp_files(out_dir)
        manifest = Manifest(out_dir)
        todo: list[ImageJob] = []
        for job in jobs:
            if not overwrite and _is_done(manifest.entries.get(job.stem), job, fingerprint,
                                          kinds, outputs.summary, out_dir):
                report.skipped.append(job.stem)
                continue
            if out.output_path(out_dir, job.stem, "masks").exists():
                report.redone += 1
            todo.append(job)
        out.write_text_atomic(out_dir / RUN_INFO, json.dumps({
            "model": identity, "settings": fingerprint,
            "options": {"inputs": asdict(settings.inputs), "net": asdict(settings.net),
                        "masks": asdict(settings.masks), "outputs": asdict(outputs)},
            "segmentation_settings": used.to_dict(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_inputs": len(jobs),
            "n_todo": len(todo),
        }, indent=2, default=str) + "\n")

        if on_start is not None:
            on_start({"model": model_name, "path": identity.get("path"), "settings": used,
                      "n_inputs": len(jobs),
                      "n_todo": len(todo), "n_skipped": len(report.skipped),
                      "n_redone": 0 if overwrite else report.redone})
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="img", desc="segment", dynamic_ncols=True)
        lock = threading.Lock()

        def finish(rec: dict[str, Any]) -> None:
            with lock:
                if rec["status"] == "ok":
                    rec["settings"] = fingerprint
                    rec["model"] = model_name
                    manifest.append(rec)
                    report.segmented.append(rec["stem"])
                    report.n_objects += int(rec.get("n_objects", 0))
                else:
                    report.failed.append((rec["input"], rec["reason"]))
                    write_failures(out_dir, report.failed)
                    if bar is not None:
                        bar.write(f"failed: {rec['input']}: {rec['reason']}")
                    log.info("failed: %s: %s", rec["input"], rec["reason"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(objects=report.n_objects, failed=len(report.failed), refresh=False)
                if on_record is not None:
                    on_record(rec)

        try:
            if not todo:
                pass
            elif client is None:
                segment_jobs(model, todo, out_dir, settings, on_record=finish)
            else:
                _run_distributed(client, spec if spec is not None else model, todo, out_dir,
                                 settings, finish, chunk_size, torch_threads)
        finally:
            if bar is not None:
                bar.close()
        write_failures(out_dir, report.failed)
        if summary:
            spath = out_dir / SUMMARY if summary is True else Path(summary)
            write_summary(spath, jobs, manifest)
    report.seconds = time.perf_counter() - t_start
    return report


def _run_distributed(
    client: Any,
    spec: ModelSpec | CellposeSAM,
    todo: Sequence[ImageJob],
    out_dir: Path,
    settings: PlateSettings,
    finish: Callable[[dict[str, Any]], None],
    chunk_size: int | None,
    torch_threads: int | None,
) -> None:
    from distributed import as_completed

    client.register_plugin(WorkerSetup(torch_threads), name=WorkerSetup.name)
    spec = model_for_workers(client, spec)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    if chunk_size is None:  # ~4 tasks per worker, at most 16 images each
        chunk_size = max(1, min(16, math.ceil(len(todo) / (4 * n_workers))))
    chunks = [list(todo[i : i + chunk_size]) for i in range(0, len(todo), chunk_size)]
    token = hashlib.sha1(f"{out_dir}{time.time()}".encode()).hexdigest()[:8]
    futures = {
        client.submit(run_chunk, spec, chunk, str(out_dir), settings, key=f"cpsam-chunk-{token}-{i}",
                      pure=False): chunk
        for i, chunk in enumerate(chunks)
    }
    try:
        for fut in as_completed(futures):
            chunk = futures[fut]
            try:
                records = fut.result()
            except Exception as e:  # noqa: BLE001 - the whole task failed (e.g. worker died)
                reason = f"worker task failed: {_short_reason(e, '')}"
                records = [failure_record(job, reason) for job in chunk]
            for rec in records:
                finish(rec)
    finally:
        for fut in futures:
            fut.cancel()


# --------------------------------------------------------------------------------------------
# volumes (one file at a time)
# --------------------------------------------------------------------------------------------
def segment_volume_files(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    model: CellposeSAM,
    *,
    overwrite: bool = False,
    save_flows: bool = False,
    report: Callable[[str], None] = print,
    **kwargs: Any,
) -> tuple[int, int, int, int]:
    """Segment volume files one by one (the command line's ``--do-3d`` / ``--stitch-threshold``)
    and write ``<stem>_masks.tif`` (Z, Y, X) (and with
    ``save_flows`` ``_dP.tif`` (3, Z, Y, X) float32 and ``_cellprob.tif``). ``kwargs`` go to
    :func:`segment_3d` (``do_3d``/``stitch_threshold``, ``z_axis``, ...).

    Returns ``(done, skipped, failed, n_objects)``; a failing file is reported and skipped.
    """
    def save(path: Path, arr: np.ndarray) -> None:  # Z, Y, X planes (never RGB for Z = 3)
        write_atomic(path, lambda tmp: tifffile.imwrite(tmp, arr, compression="zlib",
                                                        photometric="minisblack"))

    done = skipped = failed = n_obj = 0
    for p in paths:
        p = Path(p)
        target = out.output_path(out_dir, p.stem, "masks")
        if target.exists() and not overwrite:
            report(f"skipped: {target} exists (--overwrite to redo)")
            skipped += 1
            continue
        try:
            res = segment_3d(model, imread(p), **kwargs)
            save(target, out.as_label_dtype(res.masks))
            if save_flows:
                save(out.output_path(out_dir, p.stem, "dP"), res.flows.astype(np.float32))
                save(out.output_path(out_dir, p.stem, "cellprob"), res.cellprob.astype(np.float32))
        except Exception as e:  # noqa: BLE001 - report and go on with the next file
            report(f"failed: {p}: {e}")
            failed += 1
            continue
        done += 1
        n_obj += res.n_objects
        report(f"{p} -> {target} ({res.n_objects} objects)")
    return done, skipped, failed, n_obj
