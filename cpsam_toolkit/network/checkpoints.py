"""Reading and writing network weights.

Three kinds of file are understood, all read with ``torch.load(weights_only=True)``:

* **official** Cellpose-SAM files (``cpsam``, ``cpsam_v2``): a plain fp32 state dict with the key
  layout of ``cellpose.vit.CPSAM``, optionally prefixed ``module.``; the network size is inferred
  from the tensor shapes;
* **ours**: ``{"format": "cpsam-toolkit", "format_version": 1, "config": {...},
  "state_dict": {...}, "meta": {...}}``, which reloads at its own size from one file;
* **Segment Anything** checkpoints (vit_b / vit_l / vit_h), converted for initialisation.

Every failure raises :class:`CheckpointError` naming the file and what is wrong; nothing is ever
loaded partially.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import NetConfig
from .model import CPSAMNet

FORMAT = "cpsam-toolkit"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A weights file that cannot be used, with the reason and the file named."""


def read_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a file safely, turning every failure into a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"model file {path} is empty; delete it and download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the safe unpickler met a reference to a Python callable/class
            raise CheckpointError(
                f"refusing to load {path}: it contains Python objects or code, not only weights "
                f"(torch.load weights_only=True rejected it: {_unsafe_detail(e)}); nothing in it "
                "was executed. Only load model files from sources you trust, saved as plain "
                "state dicts."
            ) from None
        raise CheckpointError(
            f"model file {path} is corrupted or not a PyTorch weights file (the safe loader "
            f"could not read it: {_unsafe_detail(e)}); download or copy it again"
        ) from None
    except Exception as e:  # the unpickler raises KeyError, IndexError, ... on arbitrary bytes
        raise CheckpointError(
            f"model file {path} is truncated or not a PyTorch weights file ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); download or copy it again"
        ) from None


def _unsafe_detail(e: Exception) -> str:
    """The informative line of torch's weights_only error (its first line is boilerplate)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln
    return lines[0] if lines else e.__class__.__name__


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove a DataParallel-style prefix from every key that has it."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def infer_config(state: Mapping[str, torch.Tensor], source: str = "state dict") -> NetConfig:
    """Infer a :class:`NetConfig` from the tensor shapes of a CPSAM-layout state dict."""
    try:
        pos = state["encoder.pos_embed"]
        proj = state["encoder.patch_embed.proj.weight"]
        out = state["out.weight"]
        neck = state["encoder.neck.0.weight"]
    except KeyError as e:
        raise CheckpointError(
            f"{source} is not a Cellpose-SAM (CP4) network: key {e.args[0]!r} is missing"
        ) from None
    depth = 0
    while f"encoder.blocks.{depth}.norm1.weight" in state:
        depth += 1
    if depth == 0:
        raise CheckpointError(f"{source} has no encoder blocks ('encoder.blocks.0.*' missing)")
    try:
        width, patch, grid = pos.shape[-1], proj.shape[-1], pos.shape[1]
        head_dim = state["encoder.blocks.0.attn.rel_pos_h"].shape[1]
        rows = tuple(state[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth))
        hidden = state["encoder.blocks.0.mlp.lin1.weight"].shape[0]
        cfg_rows = () if all(r == 2 * grid - 1 for r in rows) else rows
        return NetConfig(
            width=width,
            depth=depth,
            heads=width // head_dim,
            neck_width=neck.shape[0],
            mlp_ratio=hidden / width,
            patch=patch,
            tile=grid * patch,
            in_channels=proj.shape[1],
            nout=out.shape[0] // patch**2,
            rel_pos_rows=cfg_rows,
        )
    except KeyError as e:
        raise CheckpointError(
            f"{source} is not a complete Cellpose-SAM (CP4) network: key {e.args[0]!r} is missing"
        ) from None
    except (IndexError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(
            f"{source} has tensor shapes that do not form a Cellpose-SAM network ({e})"
        ) from None


def load_state_strict(net: CPSAMNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``net``; any missing, unexpected or mis-shaped key is an error."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise CheckpointError(
            f"{source} does not fit this network ({net.cfg.depth} blocks, width {net.cfg.width}): "
            + "; ".join(problems)
        )
    net.load_state_dict(state, strict=True)


def _is_cp3(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("downsample.", "upsample.", "output.")) for k in state) or "style" in state


def load_checkpoint(path: str | os.PathLike) -> tuple[CPSAMNet, dict[str, Any]]:
    """Build a network from a weights file of any supported kind.

    Returns
    -------
    net : CPSAMNet
        In fp32 on the CPU, in eval mode.
    meta : dict
        ``{"format": "official"|"cpsam-toolkit", "config": NetConfig, ...}`` plus the file's metadata.
    """
    obj = read_file(path)
    src = f"model file {path}"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src} holds a {type(obj).__name__}, not a state dict")
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{src} is a dict with non-text keys, not a state dict")
    if obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{src} has format version {version!r}; this cpsam-toolkit reads up to "
                f"{FORMAT_VERSION}: upgrade cpsam-toolkit"
            )
        try:
            cfg = NetConfig.from_dict(dict(obj["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{src} has an invalid config: {e}") from None
        state = obj.get("state_dict")
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(f"{src} has no 'state_dict' of named tensors")
        meta = dict(obj.get("meta") or {})
        meta["format"] = FORMAT
    else:
        state = strip_prefix(obj)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{src} is a dict but not a state dict of tensors")
        if _is_cp3(state):
            raise CheckpointError(
                f"{src} is a Cellpose 3 (U-Net) model such as cyto3; Cellpose-SAM needs a CP4 "
                "model (cpsam, cpsam_v2, or a file trained with cpsam-toolkit)"
            )
        if "W2" not in state:
            raise CheckpointError(
                f"{src} is not a Cellpose-SAM (CP4) network: the 'W2' readout key is missing"
            )
        cfg = infer_config(state, src)
        meta = {"format": "official"}
    net = CPSAMNet(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(net, state, src)
    meta["config"] = cfg
    return net.eval(), meta


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    net: CPSAMNet,
    path: str | os.PathLike,
    meta: Mapping[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Write ``net`` in our format (config + weights + metadata), atomically.

    ``half=True`` stores floating weights as float16 (for shipping small models); they are
    read back as float32.
    """
    state = {
        k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu().float())
        for k, v in net.state_dict().items()
    }
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": net.cfg.to_dict(),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    atomic_save(obj, path)


def save_official(net: CPSAMNet, path: str | os.PathLike) -> None:
    """Write a plain fp32 state dict, loadable by the reference ``cellpose`` package."""
    atomic_save({k: v.detach().cpu().float() for k, v in net.state_dict().items()}, path)


def from_sam(sam_state: Mapping[str, torch.Tensor], cfg: NetConfig, seed: int = 0) -> CPSAMNet:
    """Initialise a network from a Segment Anything image-encoder state dict.

    As in the paper: the 16x16 patch kernel is subsampled to 8x8 (every second tap), the 64x64
    position embedding is subsampled by 2, relative-position tables are kept (and resampled to
    the token grid at run time), attention is global in every block; the patch bias and the
    readout are freshly initialised.
    """
    sam = {k[len("image_encoder.") :]: v for k, v in sam_state.items() if k.startswith("image_encoder.")}
    sam = sam or dict(sam_state)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        net = CPSAMNet(cfg)
    own = net.state_dict()
    new: dict[str, torch.Tensor] = {}
    for k, v in sam.items():
        key = "encoder." + k
        if key not in own:
            continue
        if k == "patch_embed.proj.weight":
            step = v.shape[-1] // cfg.patch
            v = v[:, : cfg.in_channels, ::step, ::step]
        elif k == "patch_embed.proj.bias":
            continue
        elif k == "pos_embed":
            step = v.shape[1] // cfg.grid
            v = v[:, ::step, ::step]
        new[key] = v
    wanted = {k for k in own if k.startswith("encoder.") and k != "encoder.patch_embed.proj.bias"}
    if wanted - set(new):
        missing = sorted(wanted - set(new))
        raise CheckpointError(
            f"Segment Anything state dict does not fit preset (width {cfg.width}, depth {cfg.depth}):"
            f" {len(missing)} encoder keys missing or mis-shaped, e.g. {missing[:3]}"
        )
    for k, v in own.items():
        new.setdefault(k, v)
    load_state_strict(net, new, "Segment Anything state dict")
    return net
