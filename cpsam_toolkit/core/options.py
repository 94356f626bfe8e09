"""The stage views of :class:`~cpsam_toolkit.settings.Settings`: input, network and masks.

The one settings object is what users and adapters pass; each stage reads its own fields
through these small frozen dataclasses (picklable, cheap to compare).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..settings import Settings

__all__ = ["InputOptions", "NetOptions", "MaskOptions", "split_settings", "settings_from_options",
           "options_dict", "scale_niter"]


@dataclass(frozen=True)
class InputOptions:
    """How raw arrays become network input."""

    channel_axis: int | None = None
    channels: tuple[int, ...] | None = None
    normalize: bool = True
    percentiles: tuple[float, float] = (1.0, 99.0)
    invert: bool = False
    tile_norm_blocksize: int = 0
    diameter: float | str | None = None  # median cell diameter in px; None = as is; "auto": size model


@dataclass(frozen=True)
class NetOptions:
    """How tiles are run through the network."""

    batch_size: int = 8
    tile_overlap: float = 0.1
    augment: bool = False
    gpu_memory: str | None = None  # budget, e.g. "6GB": the largest batch that fits (CUDA only)
    host_memory: str | None = None  # RAM budget, e.g. "8GB": larger 2D images go in blocks


@dataclass(frozen=True)
class MaskOptions:
    """Post-processing of flows into masks (see :func:`cpsam_toolkit.dynamics.compute_masks`)."""

    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None  # None: 200, scaled with the diameter when resizing

    def validate(self) -> None:
        if self.flow_threshold < 0:
            raise ValueError(f"flow_threshold must be >= 0 (0 disables QC), got {self.flow_threshold}")
        if not 0 < self.max_size_fraction <= 1:
            raise ValueError(f"max_size_fraction must be in (0, 1], got {self.max_size_fraction}")
        if self.niter is not None and self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")


def split_settings(settings: Settings) -> tuple[InputOptions, NetOptions, MaskOptions]:
    """The option dataclasses of the input, network and mask stages of one :class:`Settings`."""
    v = settings.values()
    return (
        InputOptions(**{k: v[k] for k in InputOptions.__dataclass_fields__}),
        NetOptions(**{k: v[k] for k in NetOptions.__dataclass_fields__}),
        MaskOptions(**{k: v[k] for k in MaskOptions.__dataclass_fields__}),
    )


def settings_from_options(*opts: Any, base: Settings | None = None) -> Settings:
    """A :class:`Settings` from option dataclasses (``InputOptions``, ``NetOptions``,
    ``MaskOptions``) on top of ``base`` (default: the defaults); every field of a given options
    object counts as set by the user."""
    base = base or Settings()
    given = {k: v for o in opts if o is not None for k, v in asdict(o).items() if k in base.sources}
    return base.replace(**given) if given else base


def options_dict(*opts: Any) -> dict[str, Any]:
    """Flatten option dataclasses into one dict (for logs and metadata)."""
    out: dict[str, Any] = {}
    for o in opts:
        out.update(asdict(o))
    return out


def scale_niter(masks: MaskOptions, diameter: float | None) -> MaskOptions:
    """``niter=None`` becomes 200 scaled with ``diameter / 30`` when images are resized."""
    if masks.niter is None and diameter:
        return replace(masks, niter=max(1, int(200 * diameter / 30.0)))
    return masks
