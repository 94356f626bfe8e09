"""Named models: where they come from, how they are checked, where they are cached.

``resolve_weights(name_or_path)`` turns a model name or a file path into the path of a weights
file on this machine:

* a path to an existing file is returned as it is;
* a registered name is looked up, in order, in the cpsam cache (``$CPSAM_HOME``, default
  ``~/.cache/cpsam``), in ``$CELLPOSE_LOCAL_MODELS_PATH`` and in ``~/.cellpose/models`` (where the
  reference ``cellpose`` package keeps the same files), and otherwise downloaded into the cpsam
  cache;
* the shipped model (``cpsam_toolkit_small``) is a file inside the installed package.

Downloads stream with :mod:`urllib` to ``<cache>/<file>.part`` with a progress bar, resume an
interrupted ``.part`` with an HTTP ``Range`` request (and start again from zero if the server
ignores it), are verified, and only then renamed into place, so a file under its final name is
always complete. Verification:

* when the registry knows the SHA-256, the file must match it;
* when it does not (``sha256=None``: the official files could not be fetched to hash them when
  this registry was written), the size must match if it is known, and the file must load
  strictly as a network of the registered preset. The SHA-256 computed then is recorded next to
  the file in ``<file>.sha256`` (``sha256sum`` format) and every later use checks the file
  against it, so a file that is changed or corrupted afterwards is detected.

Files found in the reference package's folders are used as they are (checked against the
registered SHA-256 or size when known); they are never modified and no sidecar is written there.

With no model named, :func:`choose_default_model` gives the published ``cpsam_v2`` (cached, else
downloaded) and falls back to the shipped model only offline or when the server does not answer
within a few seconds, with one line that says so and how to get the real model.

Environment: ``CPSAM_HOME`` (cache folder), ``CPSAM_MODEL_URL_BASE`` (download from
``<base>/<file>`` instead of Hugging Face, e.g. a local mirror), ``CPSAM_OFFLINE=1`` (never use
the network: a missing file raises :class:`ModelUnavailableError` that says which file to put
where), ``CELLPOSE_LOCAL_MODELS_PATH`` (the reference package's model folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import CheckpointError, load_checkpoint, read_file
from .config import PRESETS, NetConfig, get_config

#: Where the official Cellpose-SAM weights are published.
DEFAULT_URL_BASE = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"

#: The model used when none is named.
DEFAULT_MODEL = "cpsam_toolkit_small"

_CHUNK = 1 << 20
_RETRY_DELAY_S = 1.0  # first back-off between automatic resume attempts (doubles each time)


# ----------------------------------------------------------------------------------- errors


class ModelError(RuntimeError):
    """A named model that cannot be provided; the message says why and what to do."""


class UnknownModelError(ModelError, ValueError):
    """Neither an existing file nor a registered model name."""


class ModelUnavailableError(ModelError):
    """The file is not on this machine and cannot be downloaded (offline, no network)."""


class DownloadError(ModelError):
    """A download that failed (HTTP error, interrupted transfer, wrong content)."""


class ChecksumError(DownloadError):
    """Downloaded bytes whose SHA-256 or size is not the registered one."""


class CorruptModelError(ModelError):
    """A cached file that no longer matches the SHA-256 recorded when it was downloaded."""


# ---------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    ``url`` is the default download address (``None`` for a file shipped inside the package);
    ``filename`` is the file's name on the server and in every cache (the reference package uses
    the bare model name, without extension). ``sha256``/``size_bytes`` are ``None`` when unknown.
    ``approx_size_bytes`` is only for display.
    """

    name: str
    url: str | None
    sha256: str | None
    licence: str
    size_bytes: int | None
    description: str
    preset: str
    filename: str = ""
    packaged: bool = False
    approx_size_bytes: int | None = None

    @property
    def file_name(self) -> str:
        return self.filename or self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "sha256": self.sha256,
            "licence": self.licence,
            "size_bytes": self.size_bytes,
            "description": self.description,
            "preset": self.preset,
            "file_name": self.file_name,
            "packaged": self.packaged,
        }


# Official weights, published under BSD-3-Clause on the Hugging Face model card
# (huggingface.co/mouseland/cellpose-sam). Their SHA-256 and exact sizes are not recorded here:
# the files could not be fetched from the machine this registry was written on. Until they are
# filled in, downloads are verified by a strict structural load as a ViT-L network and the
# computed SHA-256 is pinned in a sidecar file on first download (see the module docstring).
REGISTRY: dict[str, ModelEntry] = {
    "cpsam": ModelEntry(
        name="cpsam",
        url=DEFAULT_URL_BASE + "cpsam",
        sha256=None,  # unknown: verified by structure + sidecar SHA-256 (see above)
        licence="BSD-3-Clause",
        size_bytes=None,  # unknown exactly; about 1.2 GB (fp32 ViT-L state dict)
        description="Cellpose-SAM paper weights (cellpose 4.0.x default), ViT-L",
        preset="vit_l",
        approx_size_bytes=1_220_000_000,
    ),
    "cpsam_v2": ModelEntry(
        name="cpsam_v2",
        url=DEFAULT_URL_BASE + "cpsam_v2",
        sha256=None,  # unknown: verified by structure + sidecar SHA-256 (see above)
        licence="BSD-3-Clause",
        size_bytes=None,  # unknown exactly; about 1.2 GB
        description="Cellpose-SAM v2 weights (cellpose 4.2.x default), ViT-L",
        preset="vit_l",
        approx_size_bytes=1_220_000_000,
    ),
    "cpsam_toolkit_small": ModelEntry(
        name="cpsam_toolkit_small",
        url=None,
        sha256=None,  # shipped inside the package; set when the file is added
        licence="BSD-3-Clause",
        size_bytes=None,
        description="small network shipped with cpsam-toolkit (default; no download)",
        preset="small",
        filename="cpsam_small.pt",
        packaged=True,
    ),
}


def register_model(entry: ModelEntry, *, replace: bool = False) -> None:
    """Add a model to :data:`REGISTRY` (e.g. a lab's own weights on an internal server)."""
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"model {entry.name!r} is already registered; pass replace=True")
    if entry.preset not in PRESETS:
        raise ValueError(f"model {entry.name!r}: unknown preset {entry.preset!r}")
    REGISTRY[entry.name] = entry


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(_unknown_message(name)) from None


def _unknown_message(name: str) -> str:
    return (
        f"{name!r} is neither an existing file nor a known model name; known models: "
        f"{', '.join(sorted(REGISTRY))} (see `cpsam models`)"
    )


# ------------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """The cpsam download cache: ``$CPSAM_HOME`` or ``~/.cache/cpsam``."""
    env = os.environ.get("CPSAM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpsam"


def cellpose_dirs() -> list[Path]:
    """Folders where the reference ``cellpose`` package keeps its model files."""
    dirs = []
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(Path.home() / ".cellpose" / "models")
    return dirs


def packaged_path(entry: ModelEntry) -> Path:
    """Location of a file shipped inside the installed package (``cpsam_toolkit/models/``)."""
    return Path(__file__).resolve().parents[1] / "models" / entry.file_name


def url_for(entry: ModelEntry, url_base: str | None = None) -> str:
    """Download address: ``<base>/<file>`` if a base is given (argument or
    ``$CPSAM_MODEL_URL_BASE``), else the registered URL."""
    base = url_base or os.environ.get("CPSAM_MODEL_URL_BASE")
    if base:
        return base.rstrip("/") + "/" + entry.file_name
    if not entry.url:
        raise ModelError(f"model {entry.name!r} has no download address")
    return entry.url


def offline() -> bool:
    return os.environ.get("CPSAM_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find_cached(name: str) -> Path | None:
    """The file a name would resolve to without downloading, or ``None``; nothing is checked."""
    entry = get_entry(name)
    if entry.packaged:
        p = packaged_path(entry)
        return p if p.is_file() else None
    for d in [cache_dir(), *cellpose_dirs()]:
        p = d / entry.file_name
        if p.is_file():
            return p
    return None


def _manual_instructions(entry: ModelEntry, url: str) -> str:
    places = [cache_dir() / entry.file_name] + [d / entry.file_name for d in cellpose_dirs()]
    lines = [
        "To use it without network access, download it on another machine from",
        f"    {url}",
    ]
    if url != entry.url and entry.url:
        lines.append(f"    (official address: {entry.url})")
    lines.append(f"and copy the file, named exactly {entry.file_name!r}, to one of")
    lines += [f"    {p}" for p in places]
    lines.append("or pass the file's path instead of the model name.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- hashing

_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (memoised per path, size and modification time)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: Path) -> str | None:
    side = sidecar_path(path)
    try:
        text = side.read_text().split()
    except OSError:
        return None
    return text[0].lower() if text and re.fullmatch(r"[0-9a-fA-F]{64}", text[0]) else None


def write_sidecar(path: Path, digest: str) -> None:
    side = sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, side)


# ---------------------------------------------------------------------------- verification


def same_architecture(a: NetConfig, b: NetConfig) -> bool:
    """Whether two configs give the same parameter shapes (training-only fields ignored)."""
    fields = ("width", "depth", "heads", "neck_width", "mlp_ratio", "patch", "tile",
              "in_channels", "nout")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and all(
        a.rows(i) == b.rows(i) for i in range(a.depth)
    )


def match_preset(cfg: NetConfig) -> str | None:
    """Name of the preset with the same architecture as ``cfg``, if any."""
    for name, preset in PRESETS.items():
        if same_architecture(cfg, preset):
            return name
    return None


def verify_structure(path: Path, entry: ModelEntry, label: str | None = None) -> None:
    """Load ``path`` strictly and check it is a network of ``entry.preset``."""
    label = label or str(path)
    try:
        net, meta = load_checkpoint(path)
    except CheckpointError as e:
        raise ChecksumError(
            f"{label} for model {entry.name!r} is not a valid weights file: {e}"
        ) from None
    cfg = meta["config"]
    del net
    if not same_architecture(cfg, get_config(entry.preset)):
        found = match_preset(cfg) or f"width {cfg.width}, depth {cfg.depth}"
        raise ChecksumError(
            f"{label} for model {entry.name!r} is a {found} network, expected preset "
            f"{entry.preset!r}: the server sent different weights"
        )


def verify_cached(path: Path, entry: ModelEntry, *, ours: bool) -> None:
    """Check a file found in a cache before using it.

    Files in the cpsam cache are compared with their sidecar SHA-256 (which is created, after a
    structural check, if a file was put there by hand). All files are compared with the
    registered SHA-256 and size when those are known.
    """
    size = path.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        raise CorruptModelError(
            f"{path} has {size} bytes but model {entry.name!r} has {entry.size_bytes}: the file "
            f"is incomplete or a different file; delete it and run `cpsam models download "
            f"{entry.name}`"
        )
    digest = None
    if entry.sha256:
        digest = sha256_file(path)
        if digest != entry.sha256.lower():
            raise CorruptModelError(
                f"{path} does not match the registered SHA-256 of model {entry.name!r} "
                f"({digest} != {entry.sha256}); delete it and run `cpsam models download "
                f"{entry.name} --force`"
            )
    if not ours:
        return
    recorded = read_sidecar(path)
    if recorded is None:
        if not entry.sha256:
            verify_structure(path, entry)
        write_sidecar(path, digest or sha256_file(path))
        return
    digest = digest or sha256_file(path)
    if digest != recorded:
        raise CorruptModelError(
            f"{path} has changed since it was downloaded: its SHA-256 {digest} differs from the "
            f"one recorded in {sidecar_path(path)} ({recorded}). The file is corrupted or was "
            f"replaced; run `cpsam models download {entry.name} --force` to fetch it again"
        )


# -------------------------------------------------------------------------------- download


@contextlib.contextmanager
def _download_lock(path: Path) -> Iterator[None]:
    """Serialise downloads of one file between processes (POSIX ``flock``; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"waiting for another process downloading {path.name} ...", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Unreachable(Exception):
    """No answer from the server (DNS, refused connection, timeout before any data)."""


class _Interrupted(Exception):
    def __init__(self, received: int, total: int | None, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.received, self.total, self.cause = received, total, cause


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        v = version("cpsam-toolkit")
    except Exception:
        v = "dev"
    return f"cpsam-toolkit/{v}"


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _fetch(url: str, part: Path, entry: ModelEntry, progress: bool, timeout: float) -> None:
    """One HTTP attempt, appending to ``part`` if it holds the start of the file."""
    meta_path = part.with_name(part.name + ".json")
    offset = part.stat().st_size if part.is_file() else 0
    if entry.size_bytes is not None and offset > entry.size_bytes:
        part.unlink()
        offset = 0
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    validator = None
    if offset:
        headers["Range"] = f"bytes={offset}-"
        with contextlib.suppress(OSError, ValueError):
            validator = json.loads(meta_path.read_text()).get("validator")
        if validator:
            headers["If-Range"] = validator
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is not a prefix we can extend: start again
            part.unlink(missing_ok=True)
            return _fetch(url, part, entry, progress, timeout)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _Unreachable(getattr(e, "reason", None) or e) from None
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        mode = "wb"
        total = length
        if offset and status == 206:
            cr = _parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != offset:
                raise DownloadError(f"server answered a resume request for {url} with a wrong "
                                    f"Content-Range ({resp.headers.get('Content-Range')!r})")
            mode = "ab"
            total = cr[1] if cr[1] is not None else (offset + length if length else None)
        else:
            offset = 0  # a 200 answer to a Range request: the server sends the whole file
        new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if new_validator and not (new_validator.startswith("W/")):
            meta_path.write_text(json.dumps({"url": url, "validator": new_validator}))
        else:
            meta_path.unlink(missing_ok=True)
        from tqdm.auto import tqdm

        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"downloading {entry.name}", disable=not progress, file=sys.stderr)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (http.client.IncompleteRead, OSError, TimeoutError) as e:
                        raise _Interrupted(received, total, e) from None
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
        if total is not None and received != total:
            raise _Interrupted(received, total, ConnectionError("connection closed early"))


def download_model(
    name: str,
    *,
    url_base: str | None = None,
    progress: bool = True,
    force: bool = False,
    retries: int = 2,
    timeout: float = 60.0,
) -> Path:
    """Download a registered model into the cpsam cache and return its path.

    The file is written to ``<file>.part``, resumed from there after an interruption (up to
    ``retries`` automatic attempts, and again on the next call), verified (SHA-256 if registered,
    else size if known and a strict load as the registered preset), then renamed into place with
    its ``.sha256`` sidecar. A failed verification deletes the partial file. ``force`` replaces
    a file already in the cache.
    """
    entry = get_entry(name)
    if entry.packaged:
        return _packaged(entry)
    url = url_for(entry, url_base)
    if offline():
        raise ModelUnavailableError(
            f"model {entry.name!r} is not on this machine and CPSAM_OFFLINE is set, so it is "
            f"not downloaded.\n" + _manual_instructions(entry, url)
        )
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model cache {folder} ({e}); set CPSAM_HOME to a "
                         "writable folder") from None
    final = folder / entry.file_name
    part = folder / (entry.file_name + ".part")
    with _download_lock(final):
        if final.is_file() and not force:
            verify_cached(final, entry, ours=True)
            return final
        attempt = 0
        while True:
            try:
                _fetch(url, part, entry, progress, timeout)
                break
            except urllib.error.HTTPError as e:
                raise DownloadError(
                    f"downloading model {entry.name!r} from {url} failed: HTTP {e.code} "
                    f"{e.reason}.\n" + _manual_instructions(entry, url)
                ) from None
            except _Interrupted as e:
                if attempt < retries:
                    attempt += 1
                    time.sleep(_RETRY_DELAY_S * 2 ** (attempt - 1))
                    continue
                got = f"{e.received} of {e.total}" if e.total else f"{e.received}"
                raise DownloadError(
                    f"downloading model {entry.name!r} from {url} was interrupted after {got} "
                    f"bytes ({e.cause.__class__.__name__}: {e.cause}). The partial file {part} "
                    f"is kept: run the same command again to resume.\n"
                    + _manual_instructions(entry, url)
                ) from None
            except _Unreachable as e:
                raise ModelUnavailableError(
                    f"model {entry.name!r} is not on this machine and could not be downloaded "
                    f"from {url} ({e}).\n" + _manual_instructions(entry, url)
                ) from None
        _verify_download(part, entry, url)
        digest = sha256_file(part)
        os.replace(part, final)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        write_sidecar(final, digest)
    return final


def _verify_download(part: Path, entry: ModelEntry, url: str) -> None:
    label = f"the file downloaded from {url}"
    try:
        size = part.stat().st_size
        if entry.size_bytes is not None and size != entry.size_bytes:
            raise ChecksumError(
                f"{label} has {size} bytes, expected {entry.size_bytes} for model {entry.name!r}"
            )
        if entry.sha256:
            digest = sha256_file(part)
            if digest != entry.sha256.lower():
                raise ChecksumError(
                    f"{label} has SHA-256 {digest}, expected {entry.sha256} for model "
                    f"{entry.name!r}; the transfer was corrupted or the server sent another file"
                )
        else:
            verify_structure(part, entry, label)
    except ChecksumError as e:
        part.unlink(missing_ok=True)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        raise ChecksumError(f"{e}. The partial download was deleted; run again to retry.") from None


def _packaged(entry: ModelEntry) -> Path:
    p = packaged_path(entry)
    if not p.is_file():
        raise ModelUnavailableError(
            f"the model file shipped with cpsam-toolkit for {entry.name!r} is missing: {p} does "
            "not exist (an installation without package data, or a source checkout without the "
            "model). Reinstall cpsam-toolkit from a release, pass a weights file's path, or use "
            "'cpsam' (downloaded from Hugging Face, about 1.2 GB)"
        )
    return p


def resolve_weights(
    name_or_path: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    url_base: str | None = None,
    verify: bool = True,
) -> Path:
    """Path of the weights file for a model name or a path.

    Parameters
    ----------
    name_or_path
        A path to an existing file (returned as it is), a registered name (see
        :data:`REGISTRY`), or ``None`` for :data:`DEFAULT_MODEL`.
    download
        Download a registered model that is in no cache (otherwise raise
        :class:`ModelUnavailableError` with instructions).
    progress
        Show a progress bar while downloading.
    url_base
        Download from ``<url_base>/<file>`` instead of the registered address.
    verify
        Check a cached file against its registered or recorded SHA-256 (see the module notes).
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    name = os.fspath(name_or_path)
    if name not in REGISTRY:
        if p.exists():
            raise UnknownModelError(f"{p} is a folder, not a weights file")
        if os.sep in name or "/" in name or p.suffix in (".pt", ".pth", ".ckpt"):
            raise UnknownModelError(f"model file {p} does not exist; known model names: "
                                    f"{', '.join(sorted(REGISTRY))}")
        raise UnknownModelError(_unknown_message(name))
    entry = REGISTRY[name]
    if entry.packaged:
        return _packaged(entry)
    ours = cache_dir() / entry.file_name
    if ours.is_file():
        if verify:
            verify_cached(ours, entry, ours=True)
        return ours
    for d in cellpose_dirs():
        f = d / entry.file_name
        if f.is_file():
            if verify:
                verify_cached(f, entry, ours=False)
            return f
    url = url_for(entry, url_base)
    if not download:
        raise ModelUnavailableError(
            f"model {entry.name!r} is not downloaded yet.\n" + _manual_instructions(entry, url)
        )
    return download_model(name, url_base=url_base, progress=progress)


def list_models() -> list[dict[str, Any]]:
    """Registered models with where each is (``path``: ``None`` if not on this machine)."""
    rows = []
    for name, entry in REGISTRY.items():
        row = entry.to_dict()
        path = find_cached(name)
        row["path"] = str(path) if path else None
        size = path.stat().st_size if path else (entry.size_bytes or entry.approx_size_bytes)
        row["size"] = size
        rows.append(row)
    return rows


def describe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """What a weights file is: format, config, matching preset, parameter count, SHA-256.

    A name is looked up without downloading. Segment Anything checkpoints (usable only to
    initialise training) are recognised too.
    """
    path = resolve_weights(name_or_path, download=False, verify=False)
    info: dict[str, Any] = {"path": str(path), "size_bytes": path.stat().st_size}
    try:
        net, meta = load_checkpoint(path)
    except CheckpointError as err:
        sam = _describe_sam(path)
        if sam is None:
            raise err from None
        info.update(sam)
    else:
        cfg = meta.pop("config")
        info["format"] = meta.pop("format")
        info["config"] = cfg.to_dict()
        info["preset"] = match_preset(cfg)
        info["parameters"] = sum(p.numel() for p in net.parameters())
        info["trainable_parameters"] = sum(
            p.numel() for p in net.parameters() if p.requires_grad
        )
        info["meta"] = meta
    info["sha256"] = sha256_file(path)
    return info


def _describe_sam(path: Path) -> dict[str, Any] | None:
    import torch

    try:
        obj = read_file(path)
    except CheckpointError:
        return None
    if not isinstance(obj, dict) or not any(
        isinstance(k, str) and k.startswith("image_encoder.") for k in obj
    ):
        return None
    enc = {k: v for k, v in obj.items() if k.startswith("image_encoder.")}
    width = enc["image_encoder.pos_embed"].shape[-1] if "image_encoder.pos_embed" in enc else None
    depth = len({k.split(".")[2] for k in enc if k.startswith("image_encoder.blocks.")})
    preset = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(width)
    return {
        "format": "segment-anything",
        "config": {"width": width, "depth": depth},
        "preset": preset,
        "parameters": sum(v.numel() for v in obj.values() if isinstance(v, torch.Tensor)),
        "trainable_parameters": None,
        "meta": {"note": "a Segment Anything checkpoint: use it to initialise training "
                         "(cpsam_toolkit.network.checkpoints.from_sam), not for segmentation"},
    }


# --------------------------------------------------------------------------- default model

#: Published models tried, in order, when no model is named (the first is downloaded if none
#: is on this machine).
PUBLISHED_DEFAULTS = ("cpsam_v2", "cpsam")

#: Seconds to wait for the download server to answer before falling back to the shipped model.
CONNECT_TIMEOUT_S = 4.0

_UNREACHABLE: dict[str, str] = {}  # url -> reason, so one process probes a dead server once


@dataclass(frozen=True)
class DefaultChoice:
    """The model used when none is named, and why.

    ``reason`` is ``"cached"`` (a published model already on this machine), ``"downloaded"``,
    ``"offline"`` (``CPSAM_OFFLINE`` set) or ``"unreachable"`` (the server did not answer).
    ``message`` is the one line to show the user for a fallback (``None`` otherwise).
    """

    name: str
    path: Path
    reason: str
    message: str | None = None

    @property
    def fallback(self) -> bool:
        return self.reason in ("offline", "unreachable")


def cached_default() -> str | None:
    """The first of :data:`PUBLISHED_DEFAULTS` present on this machine (nothing is checked)."""
    for name in PUBLISHED_DEFAULTS:
        if find_cached(name) is not None:
            return name
    return None


def shipped_accuracy() -> str:
    """The shipped model's measured validation accuracy, read from its own metadata.

    Returns a short text such as ``"validation AP@0.5 0.21 (dsb2018 0.53, ...)"`` or
    ``"accuracy unknown"`` when the file has no record of it.
    """
    entry = get_entry(DEFAULT_MODEL)
    path = packaged_path(entry)
    try:
        import torch

        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        val = meta.get("val") or {}
        ap = float(val["val_ap50"])
    except Exception:  # noqa: BLE001 - a missing or older file has no record: say so
        return "accuracy unknown"
    groups = val.get("val_ap50_groups") or {}
    detail = ", ".join(f"{k} {float(v):.2f}" for k, v in groups.items())
    n = meta.get("data", {}).get("n_val")
    where = f" on {n} validation images" if n else ""
    return f"AP@0.5 {ap:.2f}{where}" + (f": {detail}" if detail else "")


def _probe(url: str, timeout: float) -> str | None:
    """``None`` if an HTTP server answers at ``url`` within ``timeout`` seconds, else why not.

    Any HTTP answer (even an error status) counts as reachable: the download that follows
    reports HTTP errors itself.
    """
    if url in _UNREACHABLE:
        return _UNREACHABLE[url]
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": _user_agent()})
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = str(getattr(e, "reason", None) or e) or e.__class__.__name__
        _UNREACHABLE[url] = reason
        return reason


def fallback_line(reason: str) -> str:
    """The one line printed when the shipped model replaces the published one."""
    name = PUBLISHED_DEFAULTS[0]
    return (
        f"cpsam: {reason}: using the small shipped model {DEFAULT_MODEL!r} "
        f"({shipped_accuracy()}; see MODEL_CARD.md), not Cellpose-SAM. For the real model run "
        f"`cpsam models download {name}` when online, or copy the file {name!r} into "
        f"{cache_dir()} (or a folder named by $CPSAM_HOME), or pass --model PATH"
    )


def choose_default_model(
    *,
    download: bool = True,
    progress: bool = True,
    url_base: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> DefaultChoice:
    """The model to use when none is named: the published one whenever it can be had.

    Order: a published model already on this machine (:data:`PUBLISHED_DEFAULTS`, checked as
    :func:`resolve_weights` does); else download ``cpsam_v2`` (progress bar, checksum,
    resumable); else -- only when ``CPSAM_OFFLINE`` is set, ``download`` is false or the server
    does not answer within ``connect_timeout`` seconds -- the shipped small model, with a
    one-line ``message`` saying so. Errors other than unreachability (HTTP errors, a corrupt
    file, a failed checksum) are raised: they need fixing, not hiding.
    """
    cached = cached_default()
    if cached is not None:
        return DefaultChoice(cached, resolve_weights(cached, download=False), "cached")
    shipped = _packaged(get_entry(DEFAULT_MODEL))
    if offline():
        return DefaultChoice(DEFAULT_MODEL, shipped, "offline",
                             fallback_line("CPSAM_OFFLINE is set"))
    if not download:
        return DefaultChoice(DEFAULT_MODEL, shipped, "offline",
                             fallback_line(f"{PUBLISHED_DEFAULTS[0]!r} is not downloaded"))
    name = PUBLISHED_DEFAULTS[0]
    url = url_for(get_entry(name), url_base)
    why = _probe(url, connect_timeout)
    if why is None:
        try:
            path = download_model(name, url_base=url_base, progress=progress)
        except ModelUnavailableError as e:  # the connection went away after the probe
            why = str(e).splitlines()[0]
        else:
            return DefaultChoice(name, path, "downloaded")
    host = urllib.parse.urlsplit(url).netloc or url
    return DefaultChoice(DEFAULT_MODEL, shipped, "unreachable",
                         fallback_line(f"cannot reach {host} ({why})"))
