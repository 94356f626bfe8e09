"""OME-Zarr (NGFF) in and out: HCS plates and single images, labels with a pyramid.

Reading: :func:`find_images` walks an HCS plate (plate → wells → fields) or takes a single
OME-Zarr image; :func:`read_image` returns an image's full-resolution array, channels last
(a ``t`` axis is read at ``t=0``; a ``z`` axis must have one plane). :mod:`cpsam_toolkit.io`
uses both, so ``cpsam segment plate.zarr`` and :func:`cpsam_toolkit.batch.run_plate` take
OME-Zarr inputs as they take image files, with the same resume and failure isolation.

Writing (with the ``ome-zarr`` package, which writes the NGFF metadata): :func:`write_labels`
puts a label image at ``<image>/labels/<name>/`` with ``image-label`` metadata (its
``source`` and one ``properties`` entry per object: the per-object table that napari and
other viewers show) and a nearest-neighbour resolution pyramid. Labels go into the input
(``into_input``) or into a copy of the plate's layout under ``--out`` (plate and well metadata,
no image data). Each image also gets ``<stem>_labels.json`` in the run folder, written last, so a
killed run redoes exactly the images whose labels are incomplete.

The per-object table is also written as ``<stem>_objects.csv`` in the run folder.
Blockwise (``--blockwise``, very large images): fields are read lazily (:func:`blockwise_input`)
and the label array is written as the same NGFF labels with a pyramid computed by dask
(:func:`blockwise_labels`), without the per-object properties.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .primitives import as_label_dtype, write_text_atomic

LABEL_NAME = "cpsam"
RUN_FOLDER = "cpsam_run"  # the run folder when labels are written into the input plate


class OmeZarrError(ValueError):
    """An OME-Zarr input or output that cannot be used; the message says which and why."""


# ----------------------------------------------------------------------------------- reading


def attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The OME metadata of a zarr group folder (NGFF 0.4 ``.zattrs`` or 0.5 ``zarr.json``
    ``attributes.ome``); ``{}`` for anything else."""
    p = Path(path)
    try:
        if (p / "zarr.json").is_file():
            a = json.loads((p / "zarr.json").read_text()).get("attributes", {})
            return dict(a.get("ome", a))
        if (p / ".zattrs").is_file():
            return dict(json.loads((p / ".zattrs").read_text()))
    except (OSError, ValueError):
        return {}
    return {}


def metadata_file(path: str | os.PathLike) -> Path | None:
    """The file holding a group's metadata (its size and time identify the image's version)."""
    p = Path(path)
    for name in ("zarr.json", ".zattrs"):
        if (p / name).is_file():
            return p / name
    return None


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and "multiscales" in attrs(path)


def is_plate(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and "plate" in attrs(path)


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """An OME-Zarr HCS plate or image (a folder with NGFF metadata)."""
    a = attrs(path) if Path(path).is_dir() else {}
    return "plate" in a or "multiscales" in a


def find_images(path: str | os.PathLike) -> list[Path]:
    """Image groups of a plate (wells in plate order, fields in well order) or ``[path]``."""
    p = Path(path)
    a = attrs(p)
    if "multiscales" in a:
        return [p]
    if "plate" not in a:
        raise OmeZarrError(f"{p}: not an OME-Zarr plate or image (no 'plate' or 'multiscales' "
                           "metadata in .zattrs / zarr.json)")
    out = []
    for well in a["plate"].get("wells", []):
        wp = p / well["path"]
        images = attrs(wp).get("well", {}).get("images", [])
        if not images:
            raise OmeZarrError(f"{wp}: well listed in the plate has no 'well' metadata with images")
        out += [wp / im["path"] for im in images]
    return out


def _axes(ms: Mapping[str, Any], ndim: int) -> list[str]:
    axes = ms.get("axes") or ["t", "c", "z", "y", "x"][-ndim:]
    return [a["name"] if isinstance(a, Mapping) else str(a) for a in axes]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Full-resolution pixels of an OME-Zarr image: (Y, X) or (Y, X, C), channels last.

    ``t`` is read at 0; a ``z`` axis with more than one plane is an error (3D OME-Zarr input is
    not supported yet).
    """
    import zarr

    p = Path(path)
    a = attrs(p)
    if "multiscales" not in a:
        raise OmeZarrError(f"{p}: not an OME-Zarr image (no 'multiscales' metadata)")
    ms = a["multiscales"][0]
    arr = zarr.open_array(str(p / ms["datasets"][0]["path"]), mode="r")
    axes = _axes(ms, arr.ndim)
    if len(axes) != arr.ndim:
        raise OmeZarrError(f"{p}: {len(axes)} axes in the metadata but the array has {arr.ndim}")
    index: list[Any] = []
    kept: list[str] = []
    for name, n in zip(axes, arr.shape, strict=True):
        if name == "t" or (name == "z" and n == 1):
            index.append(0)
        elif name == "z":
            raise OmeZarrError(f"{p}: {n} z planes; 3D OME-Zarr input is not supported yet "
                               "(export the stack as TIFF and use --do-3d)")
        else:
            index.append(slice(None))
            kept.append(name)
    data = np.asarray(arr[tuple(index)])
    if "c" in kept:
        data = np.moveaxis(data, kept.index("c"), -1)
        if data.shape[-1] == 1:
            data = data[..., 0]
    return data


# ----------------------------------------------------------------------------------- writing


def _pyramid_factors(shape: Sequence[int], smallest: int = 32, levels: int = 4) -> list[int]:
    f, out = 2, []
    while len(out) < levels and min(shape[-2:]) // f >= smallest:
        out.append(f)
        f *= 2
    return out or [2]


def label_properties(objects: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """NGFF ``image-label.properties``: one dict per object, ``label-value`` first."""
    cols = [c for c in objects if c != "label"]
    rows = []
    for i, lab in enumerate(np.asarray(objects["label"]).tolist()):
        row: dict[str, Any] = {"label-value": int(lab)}
        for c in cols:
            v = np.asarray(objects[c])[i].item()
            row[c] = None if isinstance(v, float) and not np.isfinite(v) else v
        rows.append(row)
    return rows


def write_labels(
    image_group: str | os.PathLike,
    masks: np.ndarray,
    name: str = LABEL_NAME,
    *,
    objects: Mapping[str, np.ndarray] | None = None,
    like: str | os.PathLike | None = None,
) -> Path:
    """Write ``masks`` as ``<image_group>/labels/<name>/`` (NGFF labels, with a pyramid).

    Parameters
    ----------
    image_group
        The OME-Zarr image (or, for output beside the input, the matching group of the copy).
    masks : (Y, X) int
        Labels, 0 = background.
    objects
        Per-object measurements (``label`` plus columns), stored as ``image-label.properties``.
    like
        The input image whose axes the labels follow (default ``image_group``); its ``c`` axis
        is dropped and ``t``/``z`` are kept with one entry.
    """
    import zarr
    from ome_zarr.writer import add_metadata, get_metadata
    from ome_zarr.writer import write_labels as _write

    group_path = Path(image_group)
    src = Path(like) if like is not None else group_path
    ms = attrs(src).get("multiscales", [{}])[0]
    src_arr = zarr.open_array(str(src / ms["datasets"][0]["path"]), mode="r")
    axes = [a for a in _axes(ms, src_arr.ndim) if a != "c"]
    if not hasattr(masks, "dask"):  # a dask array (blockwise labels) stays lazy
        masks = as_label_dtype(np.asarray(masks))
    if masks.ndim != 2:
        raise OmeZarrError(f"{group_path}: labels must be 2D (Y, X), got shape {masks.shape}")
    data = masks[(None,) * (len(axes) - 2)]
    zarr_format = zarr.open_group(str(src), mode="r").metadata.zarr_format
    group = zarr.open_group(str(group_path), mode="a", zarr_format=zarr_format)
    meta: dict[str, Any] = {"source": {"image": "../../"}}
    if objects is not None:
        meta["properties"] = label_properties(objects)
    _write(data, group, name=name, axes=axes, scaler=None, scale_factors=_pyramid_factors(masks.shape),
           label_metadata=meta)
    labels = get_metadata(group["labels"]).get("labels", [])
    unique = list(dict.fromkeys(labels))  # a rerun must not list the name twice
    if unique != labels:
        add_metadata(group["labels"], {"labels": unique})
    return group_path / "labels" / name


@dataclass(frozen=True)
class LabelTarget:
    """Where the labels of OME-Zarr inputs go; carried by the plate runner's output options.

    ``roots`` are the input plates/images (resolved); labels of an image ``<root>/<rel>`` go to
    ``<root>/<rel>/labels/<name>`` (``into_input``) or ``<dest>/<root name>/<rel>/labels/<name>``.
    """

    roots: tuple[str, ...]
    dest: str | None = None
    name: str = LABEL_NAME
    into_input: bool = True

    def destination(self, image: str | os.PathLike) -> Path | None:
        """The group to write ``image``'s labels into, or ``None`` for a non-OME-Zarr input."""
        p = Path(image).resolve()
        for root in self.roots:
            r = Path(root)
            if p == r or r in p.parents:
                if self.into_input:
                    return p
                return Path(self.dest or ".") / r.name / p.relative_to(r)
        return None

    def write(self, job_stem: str, image_path: str, masks: np.ndarray,
              objects: Mapping[str, np.ndarray] | None, out_dir: Path) -> Path | None:
        """Write one image's labels, then ``<out_dir>/<stem>_labels.json`` (its record)."""
        dst = self.destination(image_path)
        if dst is None:
            return None
        where = write_labels(dst, masks, self.name, objects=objects, like=Path(image_path))
        rec = {"labels": str(where), "image": str(Path(image_path).resolve()), "name": self.name,
               "n_objects": int(masks.max()) if masks.size else 0}
        return write_text_atomic(out_dir / f"{job_stem}_labels.json", json.dumps(rec, indent=1))


def prepare_outputs(
    inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
    into_input: bool = False, name: str = LABEL_NAME,
) -> tuple[LabelTarget | None, Path]:
    """Set up the label destination for the OME-Zarr inputs among ``inputs``.

    Returns ``(target, run_folder)``: ``target`` is ``None`` when no input is OME-Zarr. With
    ``into_input`` (or ``out_dir`` being the input plate itself) labels go into the inputs and
    the run folder (manifest, failures, tables) is ``out_dir`` (``<plate>/cpsam_run`` when
    ``out_dir`` is the plate). Otherwise the plates' layout (plate and well metadata) is
    created under ``out_dir`` before any image is segmented.
    """
    roots = [Path(p).resolve() for p in inputs if is_ome_zarr(p)]
    out = Path(out_dir).resolve()
    if not roots:
        return None, Path(out_dir)
    run = Path(out_dir)
    if out in roots:
        into_input = True
        run = out / RUN_FOLDER
    target = LabelTarget(tuple(str(r) for r in roots), None if into_input else str(out), name,
                         into_input)
    if not into_input:
        for r in roots:
            _copy_layout(r, out / r.name)
    return target, run


def _copy_layout(src: Path, dst: Path) -> None:
    """Plate and well groups (metadata only) of ``src`` at ``dst``, same zarr format."""
    import zarr
    from ome_zarr.writer import add_metadata

    zf = zarr.open_group(str(src), mode="r").metadata.zarr_format
    a = attrs(src)
    if "plate" not in a:
        zarr.open_group(str(dst), mode="a", zarr_format=zf)
        return
    root = zarr.open_group(str(dst), mode="a", zarr_format=zf)
    add_metadata(root, {"plate": a["plate"]})
    for well in a["plate"].get("wells", []):
        wg = zarr.open_group(str(dst / well["path"]), mode="a", zarr_format=zf)
        add_metadata(wg, {"well": attrs(src / well["path"]).get("well", {})})
        for im in attrs(src / well["path"]).get("well", {}).get("images", []):
            zarr.open_group(str(dst / well["path"] / im["path"]), mode="a", zarr_format=zf)


# --------------------------------------------------------------------------------- blockwise


def blockwise_input(path: str | os.PathLike) -> Any:
    """What :func:`cpsam_toolkit.blockwise.segment_blockwise` should read for an OME-Zarr image:
    the full-resolution array's path when its axes are (c,) y, x, else a lazy dask view
    (``t`` = 0, the single ``z`` plane, channels last)."""
    import dask.array as da
    import zarr

    p = Path(path)
    ms = attrs(p)["multiscales"][0]
    level0 = p / ms["datasets"][0]["path"]
    arr = zarr.open_array(str(level0), mode="r")
    axes = _axes(ms, arr.ndim)
    if axes in (["y", "x"], ["c", "y", "x"]):
        return str(level0)
    view = da.from_zarr(arr)
    index = tuple(0 if a in ("t", "z") else slice(None) for a in axes)
    for a, n in zip(axes, arr.shape, strict=True):
        if a == "z" and n > 1:
            raise OmeZarrError(f"{p}: {n} z planes; blockwise segmentation is 2D")
    kept = [a for a in axes if a not in ("t", "z")]
    view = view[index]
    return da.moveaxis(view, kept.index("c"), -1) if "c" in kept else view


def blockwise_labels(
    image: str | os.PathLike, masks_zarr: str | os.PathLike, target: LabelTarget | None,
    out_dir: str | os.PathLike, stem: str,
) -> Path | None:
    """After a blockwise run: the label array ``masks_zarr`` as ``<image>/labels/<name>``
    (pyramid computed lazily with dask), then ``<stem>_labels.json``. Does nothing for inputs
    that are not OME-Zarr images or whose labels record exists (a rerun)."""
    if target is None or not is_image(image) or target.destination(image) is None:
        return None
    record = Path(out_dir) / f"{stem}_labels.json"
    if record.is_file():
        return record
    import dask.array as da

    where = write_labels(target.destination(image), da.from_zarr(str(masks_zarr)), target.name,
                         like=image)
    rec = {"labels": str(where), "image": str(Path(image).resolve()), "name": target.name,
           "masks": str(masks_zarr)}
    return write_text_atomic(record, json.dumps(rec, indent=1))
