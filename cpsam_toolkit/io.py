"""Reading images, finding inputs, and writing outputs atomically."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tifffile

from . import omezarr
from .cellpose_files import check_seg, load_plain_npy, masks_of
from .primitives import atomic_path, masks_dtype, write_atomic  # noqa: F401 - also io's names

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
#: file-name endings of outputs and labels, never taken as input images
OUTPUT_SUFFIXES = ("_masks", "_flows", "_cellprob", "_outlines", "_seg", "_classes", "_cp_masks", "_dP")


class ImageReadError(OSError):
    """An input file that cannot be read as an image; the message names the file and why."""


def imread(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into an array (TIFF via tifffile, PNG/JPEG/BMP via imageio, .npy).

    Raises :class:`ImageReadError` naming the file for missing, unreadable, truncated or
    non-image files.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        if omezarr.is_image(path):  # an OME-Zarr image group (e.g. one field of a plate)
            try:
                return omezarr.read_image(path)
            except Exception as e:  # noqa: BLE001 - any reading failure names the image
                raise ImageReadError(f"{path}: cannot read the OME-Zarr image "
                                     f"({e.__class__.__name__}: {e})") from None
    if not path.is_file():
        raise ImageReadError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"{path}: permission denied (not readable)")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    ext = path.suffix.lower()
    try:
        if ext in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        elif ext == ".npy":  # a pickled object (cellpose _seg.npy) is read without running code
            arr = load_plain_npy(path)
            if not isinstance(arr, np.ndarray):  # a cellpose _seg.npy: its labels
                arr = masks_of(check_seg(arr, path))
            elif arr.dtype.hasobject:
                raise ImageReadError(
                    f"{path}: not a readable .npy image: it holds Python objects (dtype object), not "
                    "pixels; save the image as a numeric array (np.save(path, image)) or a TIFF")
        else:
            import imageio.v3 as iio

            arr = iio.imread(path)
    except ImageReadError:
        raise
    except ModuleNotFoundError as e:
        raise ImageReadError(f"{path}: reading {ext} files needs the '{e.name}' package") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageReadError(
            f"{path}: not a readable {ext or 'image'} file, or truncated/corrupt "
            f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ImageReadError(
            f"{path}: the image is empty (shape {arr.shape}): the file holds no pixel data, "
            "or is truncated/corrupt; re-export it from the acquisition software"
        )
    return arr


def is_output_name(path: str | os.PathLike, extra_suffixes: Sequence[str] = ()) -> bool:
    stem = Path(path).stem
    return any(stem.endswith(s) for s in (*OUTPUT_SUFFIXES, *extra_suffixes))


def find_images(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    recursive: bool = False,
    exclude_suffixes: Sequence[str] = (),
) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of images.

    Folders contribute files with an image extension, skipping our outputs and label files
    (``*_masks.tif`` and the like). A pattern or path matching nothing raises
    ``FileNotFoundError`` naming it.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.is_dir() and _is_ome_zarr(p):  # an OME-Zarr plate or image: its image groups
            found += omezarr.find_images(p)
        elif p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            found += sorted(
                f
                for f in it
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not f.name.startswith(".")
                and not is_output_name(f, exclude_suffixes)
            )
        elif p.exists():
            found.append(p)
        elif any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"pattern {item!r} matches no files")
            found += matches
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
    seen: set[Path] = set()
    out = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _is_ome_zarr(path: Path) -> bool:
    return omezarr.is_ome_zarr(path)


def input_stat(path: str | os.PathLike) -> os.stat_result:
    """``stat`` of an input: the file, or an OME-Zarr image's metadata file (the folder's own
    time changes when labels are written into it)."""
    p = Path(path)
    if p.is_dir():
        meta = omezarr.metadata_file(p)
        if meta is not None:
            return meta.stat()
    return p.stat()


def imwrite_tiff(path: str | os.PathLike, array: np.ndarray, compression: str = "zlib") -> Path:
    """Write ``array`` as a (zlib-compressed) TIFF, atomically."""
    return write_atomic(path, lambda tmp: tifffile.imwrite(tmp, array, compression=compression))
