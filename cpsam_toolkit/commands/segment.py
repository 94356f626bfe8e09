"""``cpsam segment``: segment images, folders and plates (adapter over :mod:`cpsam_toolkit.batch`
and :mod:`cpsam_toolkit.blockwise`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import batch, blockwise, omezarr, volume
from ..batch import make_jobs
from ..io import find_images
from ..omezarr import prepare_outputs
from ..segment import load_model, split_settings
from ..settings import Settings

EPILOG = """\
Settings not given use the model's recommended values (e.g. the shipped model's flow
threshold 0.8), else the defaults; the run prints which values came from the model.

outputs (in --out):
  <stem>_masks.tif        labels (uint16, uint32 above 65,535 objects), always
  <stem>_flows.tif        RGB flow picture, with _dP.tif (float32 dY,dX) and _cellprob.tif  (--save-flows)
  <stem>_outlines.png     image with red outlines                                  (--save-outlines)
  <stem>_rois.zip         ImageJ ROIs, one polygon per object                      (--save-rois)
  <stem>_objects.csv      label, area, centroid, mean_cellprob, flow_error         (--save-table)
  <stem>_seg.npy          masks, outlines, flows, thresholds for the cellpose GUI   (--save-npy)
  <stem>_labels.json      OME-Zarr input: where <image>/labels/<name> was written    (plate.zarr)
  summary.csv             per image: count, mean area, mean confidence, flow error and the
                          diameter the image was resized from, if any (--summary)
  manifest.jsonl          one line per finished image; reruns skip finished images
  failures.csv            path and reason of each image that failed

Rerunning the same command resumes: finished images are skipped (unless --overwrite),
half-written ones are redone. The exit status is 1 when any image failed.

examples:
  cpsam segment plate1/ --out plate1_seg --save-outlines --summary
  cpsam segment 'data/**/*.tif' --out seg --model cpsam_v2 --diameter 17
  cpsam segment plate1/ --out seg --dask --workers 4
  cpsam segment big_slide.tif --out seg --blockwise --block-size 2048
"""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(" ", ",").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel indices, got {text!r}") from None
    if not 1 <= len(vals) <= 3:
        raise argparse.ArgumentTypeError("give 1 to 3 channel indices, e.g. --channels 1,0")
    return vals


def _diameter(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a diameter in pixels or 'auto', got {text!r}") from None


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment images, folders and plates",
        description="Segment 2D images with Cellpose-SAM and write label images (and optional "
        "flows, outlines, ImageJ ROIs, tables). Inputs are files, folders and glob patterns.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--recursive", "-r", action="store_true", help="also search sub-folders of folders")
    p.add_argument("--overwrite", action="store_true", help="redo images that are already finished")

    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, metavar="NAME|PATH",
                   help="registry name (see `cpsam models`) or weights file; default: cpsam_v2 "
                        "(downloaded once), else offline the shipped small model")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default=None, help="auto (default: bf16 on CUDA, fp32 elsewhere), fp32, bf16")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="tiles per network call (8)")
    g.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="GPU memory budget, e.g. 6GB: the largest batch that fits it is measured "
                        "and used instead of --batch-size (CUDA only; out-of-memory errors always "
                        "halve the batch and go on)")
    g.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="RAM budget, e.g. 8GB: an image whose whole-image segmentation would need "
                        "more is segmented in blocks by itself (same network outputs; a line says "
                        "so); default: half the available RAM, at most 4GB; 'unlimited': always "
                        "whole")

    g = p.add_argument_group("input")
    g.add_argument("--channel-axis", type=int, default=None, help="axis of the channels (default: guessed)")
    g.add_argument("--channels", type=_int_list, default=None, metavar="I[,J[,K]]",
                   help="up to 3 channel indices to use, in order (default: the first 3)")
    g.add_argument("--diameter", type=_diameter, default=None, metavar="PX|auto",
                   help="median object diameter in pixels; images are resized so objects are ~30 px "
                        "(default: none, Cellpose-SAM is size-invariant); 'auto': estimated per image "
                        "by the model's size model (the shipped model recommends it)")
    g.add_argument("--invert", action="store_true", default=None,
                   help="invert intensities (1 - x) after normalising")
    g.add_argument("--no-norm", action="store_true", help="do not percentile-normalise the images")
    g.add_argument("--norm-percentile", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="percentiles mapped to 0 and 1 (1 99)")

    g = p.add_argument_group("network")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation (flipped tiles); --no-augment turns off a model's "
                        "recommended augmentation")
    g.add_argument("--tile-overlap", type=float, default=None, help="fraction of tile overlap (0.1)")

    g = p.add_argument_group("masks")
    g.add_argument("--flow-threshold", type=float, default=None,
                   help="flow error QC threshold, 0 = off (default: the model's recommended value, else 0.4)")
    g.add_argument("--cellprob-threshold", type=float, default=None,
                   help="cell probability logit threshold (default: the model's, else 0)")
    g.add_argument("--min-size", type=int, default=None, help="remove objects smaller than this (15 px)")
    g.add_argument("--max-size-fraction", type=float, default=None,
                   help="remove objects larger than this fraction of the image (0.4)")
    g.add_argument("--niter", type=int, default=None, help="flow-following iterations (default 200)")

    g = p.add_argument_group("volumes (3D; see cpsam_toolkit.volume)")
    g.add_argument("--do-3d", action="store_true",
                   help="segment each input as a volume: network on YX, ZX and ZY slices, 3D flows")
    g.add_argument("--z-axis", type=int, default=None, help="axis of the planes (needed for volumes)")
    g.add_argument("--anisotropy", type=float, default=None,
                   help="Z spacing / XY pixel size; Z is resampled by it for the network (1)")
    g.add_argument("--flow3d-smooth", type=float, default=0.0,
                   help="Gaussian sigma (XY pixels) on the 3D flows before tracking, 0 = off (0)")
    g.add_argument("--stitch-threshold", type=float, default=0.0,
                   help="instead of --do-3d: 2D masks per plane stitched across planes at this IoU")

    g = p.add_argument_group("outputs")
    g.add_argument("--save-flows", action="store_true", help="write _flows.tif, _dP.tif and _cellprob.tif")
    g.add_argument("--save-outlines", action="store_true", help="write _outlines.png")
    g.add_argument("--save-rois", action="store_true", help="write _rois.zip (ImageJ)")
    g.add_argument("--save-table", action="store_true", help="write _objects.csv per image")
    g.add_argument("--save-npy", action="store_true",
                   help="write _seg.npy that the cellpose GUI opens (masks, outlines, flows, thresholds)")
    g.add_argument("--summary", nargs="?", const=True, default=False, metavar="CSV",
                   help="write a per-image summary CSV (default: DIR/summary.csv)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--label-name", default="cpsam", metavar="NAME",
                   help="OME-Zarr input: write labels as <image>/labels/NAME (cpsam)")
    g.add_argument("--into-input", action="store_true",
                   help="OME-Zarr input: write the labels into the input plate (same as --out PLATE); "
                        "default: into a copy of the plate's layout in --out")

    g = p.add_argument_group("distributed (Dask)")
    g.add_argument("--dask", action="store_true", help="run on a local Dask cluster (worker processes)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (see docs/batch.md)")
    g.add_argument("--workers", type=_positive_int, default=None,
                   help="local workers (default: one per GPU, else 2)")
    g.add_argument("--threads-per-worker", type=_positive_int, default=1,
                   help="tasks run at once per worker (1)")
    g.add_argument("--torch-threads", type=_positive_int, default=None,
                   help="torch CPU threads (per worker with Dask; default: CPU cores / workers, "
                        "or torch's default in one process). On a CPU shared with other jobs, "
                        "1 can be much faster than the default")
    g.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="images per Dask task (default: ~4 tasks per worker, at most 16)")

    g = p.add_argument_group("large images (blockwise)")
    g.add_argument("--blockwise", action="store_true",
                   help="segment each input in blocks with a halo and write <stem>_masks.zarr "
                        "(images larger than memory; TIFF or .zarr inputs)")
    g.add_argument("--block-size", type=_positive_int, default=2048, help="block size in pixels (2048)")
    g.add_argument("--halo", type=_positive_int, default=64,
                   help="context around each block, >= 2 cell diameters (64 px)")
    p.set_defaults(func=run)


def _err(msg: str) -> int:
    print(f"cpsam segment: error: {msg}", file=sys.stderr)
    return 2


#: command-line argument -> setting name (values left at None are not given)
_SETTING_ARGS = {
    "channel_axis": "channel_axis", "channels": "channels", "diameter": "diameter",
    "invert": "invert", "norm_percentile": "percentiles", "batch_size": "batch_size",
    "augment": "augment", "tile_overlap": "tile_overlap", "gpu_memory": "gpu_memory",
    "host_memory": "host_memory",
    "flow_threshold": "flow_threshold",
    "cellprob_threshold": "cellprob_threshold", "min_size": "min_size",
    "max_size_fraction": "max_size_fraction", "niter": "niter",
}


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (source "user"), validated."""
    given = {name: getattr(args, a) for a, name in _SETTING_ARGS.items()
             if getattr(args, a, None) is not None}
    if getattr(args, "no_norm", False):
        given["normalize"] = False
    if "percentiles" in given:
        given["percentiles"] = tuple(given["percentiles"])
    Settings().replace(**given)  # ValueError naming the setting
    return given


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings on top of the defaults as the older option objects
    (``input_options``, ``net_options``, ``mask_options``); kept for callers of the old form."""
    inputs, net, masks = split_settings(Settings().replace(**setting_overrides(args)))
    return dict(input_options=inputs, net_options=net, mask_options=masks)


def print_settings(settings: Settings) -> None:
    """One stderr line per value not from the defaults, e.g. ``flow_threshold=0.8 (model)``."""
    for line in settings.describe().splitlines():
        print(f"setting: {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        out_dir = batch.check_out_dir(args.out)
    except batch.OutputDirError as e:
        return _err(str(e))
    if args.norm_percentile is not None:
        lo, hi = args.norm_percentile
        if not 0 <= lo < hi <= 100:
            return _err(f"--norm-percentile needs 0 <= LO < HI <= 100, got {lo} {hi}")
    if args.tile_overlap is not None and not 0 <= args.tile_overlap < 1:
        return _err(f"--tile-overlap must be in [0, 1), got {args.tile_overlap}")
    if args.diameter is not None and args.diameter != "auto" and not args.diameter > 0:
        return _err(f"--diameter must be a positive number of pixels, got {args.diameter}")
    if args.dask and args.scheduler:
        return _err("give either --dask (a local cluster) or --scheduler ADDRESS, not both")
    try:
        overrides = setting_overrides(args)
    except ValueError as e:
        return _err(str(e))

    if args.do_3d or args.stitch_threshold or args.z_axis is not None:
        return _run_3d(args, out_dir, overrides, t0)
    try:  # OME-Zarr plates: labels/<name> in the plate or a copy
        zarr_target, out_dir = prepare_outputs(args.inputs, out_dir, into_input=args.into_input,
                                               name=args.label_name)
    except (ValueError, OSError) as e:
        return _err(str(e))
    if args.blockwise:
        return _run_blockwise(args, out_dir, overrides, t0, zarr_target)

    try:
        paths = find_images(args.inputs, recursive=args.recursive)
    except FileNotFoundError as e:
        return _err(str(e))
    if not paths:
        return _err(f"no images found in {' '.join(args.inputs)} (extensions: .tif .tiff .png "
                    ".jpg .jpeg .bmp .npy; use --recursive for sub-folders)")

    distributed = args.dask or args.scheduler
    model: Any = args.model
    if args.torch_threads and not distributed:
        import torch

        torch.set_num_threads(args.torch_threads)
    if not distributed:
        try:
            model = _load(args.model, args.device, args.dtype)
        except Exception as e:  # noqa: BLE001 - model errors are reported, not raised
            return _err(str(e))
        print(f"model: {model.name} ({model.info.get('path', 'in memory')}) on {model.device}, "
              f"{str(model.dtype).replace('torch.', '')}", file=sys.stderr)

    with _dask(args) as (client, torch_threads):
        def started(info: dict[str, Any]) -> None:
            if distributed:
                print(f"model: {info['model']} ({info['path']})", file=sys.stderr)
            print_settings(info["settings"])
            print(f"{info['n_inputs']} images: {info['n_todo']} to segment, {info['n_skipped']} "
                  f"already finished" + (" (--overwrite to redo)" if info["n_skipped"] else ""),
                  file=sys.stderr)

        show_bar = not args.no_progress and sys.stderr.isatty()

        def finished(rec: dict[str, Any]) -> None:
            if rec["status"] != "ok" and not show_bar:  # the bar prints failures itself
                print(f"failed: {rec['input']}: {rec['reason']}", file=sys.stderr, flush=True)

        try:
            report = batch.run_plate(
                paths, out_dir, model, overrides=overrides,
                outputs=batch.OutputOptions(args.save_flows, args.save_outlines, args.save_rois,
                                            args.save_table or zarr_target is not None,
                                            npy=args.save_npy, zarr=zarr_target),
                summary=Path(args.summary) if isinstance(args.summary, str) else args.summary,
                overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                client=client, chunk_size=args.chunk_size,
                torch_threads=torch_threads,
                progress=show_bar, on_start=started, on_record=finished,
            )
        except (ValueError, OSError, RuntimeError) as e:  # model, options, output folder
            return _err(str(e))

    if report.failed:
        print(f"failures listed in {out_dir / batch.FAILURES}", file=sys.stderr)
    report.seconds = time.perf_counter() - t0
    print(f"cpsam segment: {report.line()}; outputs in {out_dir}")
    return 0 if report.ok else 1


@contextlib.contextmanager
def _dask(args: argparse.Namespace) -> Iterator[tuple[Any, int | None]]:
    """(client, torch threads per worker) for --dask / --scheduler, else (None, None)."""
    if not (args.dask or args.scheduler):
        yield None, None
        return
    import logging
    import os

    from distributed import Client

    cluster = None
    torch_threads = args.torch_threads
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        n = args.workers or _default_workers()
        torch_threads = torch_threads or max(1, (os.cpu_count() or 1) // n)
        cluster = batch.local_cluster(n, args.threads_per_worker, torch_threads,
                                      silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        print(f"dask: {len(client.scheduler_info().get('workers', {}))} workers "
              f"({client.scheduler.address})", file=sys.stderr)
        yield client, torch_threads
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _load(name: str | None, device: str | None, dtype: str | None):
    return load_model(name, device=device, dtype=dtype)


def _default_workers() -> int:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.cuda.device_count()
    except Exception:  # noqa: BLE001  # pragma: no cover
        pass
    return 2


def _run_blockwise(args: argparse.Namespace, out_dir: Path, overrides: dict[str, Any], t0: float,
                   zarr_target: Any = None) -> int:
    inputs = []
    for item in args.inputs:
        p = Path(item)
        if p.is_dir() and (p.suffix.lower() != ".zarr" or omezarr.is_ome_zarr(p)):
            inputs += find_images(p, recursive=args.recursive)
        elif p.exists():
            inputs.append(p)
        else:
            return _err(f"input {item!r} does not exist")
    try:
        model = _load(args.model, args.device, args.dtype)
    except Exception as e:  # noqa: BLE001
        return _err(str(e))
    print(f"model: {model.name} ({model.info.get('path', 'in memory')}) on {model.device}", file=sys.stderr)
    settings = model.settings.replace(**overrides)
    print_settings(settings)
    failed = n_objects = done = skipped = 0
    stems = {j.path: j.stem for j in make_jobs(inputs)}  # unique (plate fields share names)
    with _dask(args) as (client, _):
        for p in inputs:
            stem = stems[str(p)]
            target = out_dir / f"{stem}_masks.zarr"
            if target.exists() and not args.overwrite:
                print(f"skipped: {target} exists (--overwrite to redo)", file=sys.stderr)
                omezarr.blockwise_labels(p, target, zarr_target, out_dir, stem)  # if a kill cut it
                skipped += 1
                continue
            try:
                image = omezarr.blockwise_input(p) if omezarr.is_image(p) else p
                res = blockwise.segment_blockwise(
                    image, model, target, block_size=args.block_size, halo=args.halo,
                    settings=settings, overwrite=args.overwrite, client=client,
                    progress=not args.no_progress and sys.stderr.isatty(),
                )
                if args.overwrite:  # labels of this run, not an earlier one's
                    (out_dir / f"{stem}_labels.json").unlink(missing_ok=True)
                omezarr.blockwise_labels(p, target, zarr_target, out_dir, stem)
            except Exception as e:  # noqa: BLE001 - report and go on with the next input
                print(f"failed: {p}: {e}", file=sys.stderr)
                failed += 1
                continue
            done += 1
            n_objects += res.n_objects
            print(f"{p} -> {target} ({res.n_objects} objects, {res.n_blocks} blocks, "
                  f"{res.seconds:.1f} s)", file=sys.stderr)
    print(f"cpsam segment: {done} segmented, {skipped} skipped, {failed} failed, {n_objects} objects, "
          f"{time.perf_counter() - t0:.1f} s; outputs in {out_dir}")
    return 1 if failed else 0


def _run_3d(args: argparse.Namespace, out_dir: Path, overrides: dict[str, Any], t0: float) -> int:
    """Volumes: delegate to :func:`cpsam_toolkit.volume.segment_volume_files`."""

    if args.z_axis is None:
        return _err("volumes need --z-axis (the axis of the planes, e.g. --z-axis 0 for Z, Y, X)")
    if not (args.do_3d or args.stitch_threshold > 0):
        return _err("--z-axis is for volumes: add --do-3d or --stitch-threshold")
    try:
        paths = find_images(args.inputs, recursive=args.recursive)
        model = _load(args.model, args.device, args.dtype)
    except Exception as e:  # noqa: BLE001
        return _err(str(e))
    s = model.settings.replace(**overrides)
    print_settings(s)
    user_flow = args.stitch_threshold or s.sources["flow_threshold"] == "user"  # no QC in 3D
    done, skipped, failed, n_obj = volume.segment_volume_files(
        paths, out_dir, model, overwrite=args.overwrite, save_flows=args.save_flows,
        report=lambda m: print(m, file=sys.stderr), do_3d=args.do_3d, z_axis=args.z_axis,
        stitch_threshold=args.stitch_threshold, anisotropy=args.anisotropy,
        flow3d_smooth=args.flow3d_smooth, channel_axis=s.channel_axis, channels=s.channels,
        diameter=s.diameter, normalize=s.normalize, percentiles=s.percentiles, invert=s.invert,
        batch_size=s.batch_size, tile_overlap=s.tile_overlap, augment=s.augment,
        flow_threshold=s.flow_threshold if user_flow else None,
        cellprob_threshold=s.cellprob_threshold, min_size=s.min_size,
        max_size_fraction=s.max_size_fraction, niter=s.niter,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(f"cpsam segment: {done} volumes segmented, {skipped} skipped, {failed} failed, {n_obj} "
          f"objects, {time.perf_counter() - t0:.1f} s; outputs in {out_dir}")
    return 1 if failed else 0
