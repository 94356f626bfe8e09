"""One settings object for every user-facing segmentation setting.

:class:`Settings` is flat, frozen, validated and JSON-serialisable. It is what the CLI, the
CellProfiler module, the widgets, batch, blockwise and training pass to the library, what the
run record stores, and what a model file recommends (``recommended_settings``). Each value
remembers where it came from (``sources``: ``"default"``, ``"model"`` or ``"user"``), so output
can say e.g. ``flow_threshold=0.8 (model)``.

>>> s = Settings.from_model({"flow_threshold": 0.8}).replace(min_size=30)
>>> print(s.describe())
flow_threshold=0.8 (model)
min_size=30 (user)

A core-layer module: it imports nothing of the package.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Settings", "SETTING_NAMES", "parse_memory", "SOURCES"]

#: where a value came from, in increasing precedence
SOURCES = ("default", "model", "user")

_UNITS = {"": None, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Bytes in a memory size such as ``"6GB"``, ``"512 MiB"`` or ``6e9`` (a number is bytes).

    Raises ``ValueError`` naming the text and the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a memory size such as '6GB', got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0:
            raise ValueError(f"a memory size must be positive, such as '6GB'; got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or _UNITS[unit] is None or float(m.group(1)) <= 0:
        raise ValueError(
            f"cannot read {text!r} as a memory size; give a positive size with a unit, e.g. '6GB', "
            "'512MB' or '8GiB'"
        )
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Settings:
    """Every user-facing segmentation setting, one flat, serialisable object.

    Input
        ``channel_axis`` (int or None: guessed), ``channels`` (1-3 channel indices or None: the
        first 3), ``normalize`` (percentile normalisation), ``percentiles`` (low, high; mapped
        to 0 and 1), ``invert``, ``tile_norm_blocksize`` (px, 0 = whole image), ``diameter``
        (median object diameter in px; None = no resizing, the network's 30 px scale;
        ``"auto"`` = estimated per image by the model's size model, :mod:`cpsam_toolkit.core.size`).
    Network
        ``batch_size`` (tiles per network call), ``tile_overlap`` (fraction), ``augment``
        (test-time flips), ``gpu_memory`` (budget such as ``"6GB"``: the largest batch that
        fits it is used on CUDA; None = ``batch_size``; ignored on the CPU), ``host_memory``
        (RAM budget such as ``"8GB"``: a 2D image whose whole-image segmentation would need more
        is segmented in blocks, with the same network outputs; None = half the available RAM,
        at most 4 GB; ``"unlimited"`` = always whole).
    Masks
        ``flow_threshold`` (flow-error QC, 0 = off), ``cellprob_threshold`` (logit),
        ``min_size`` (px, <= 0 keeps all), ``max_size_fraction`` (of the image),
        ``niter`` (tracking steps; None = 200, scaled with the diameter).

    ``sources`` maps each field name to ``"default"``, ``"model"`` or ``"user"``. Fields not
    named there are ``"default"`` when they equal the default and ``"user"`` otherwise. Sources
    do not take part in equality.
    """

    # input
    channel_axis: int | None = None
    channels: tuple[int, ...] | None = None
    normalize: bool = True
    percentiles: tuple[float, float] = (1.0, 99.0)
    invert: bool = False
    tile_norm_blocksize: int = 0
    diameter: float | str | None = None
    # network
    batch_size: int = 8
    tile_overlap: float = 0.1
    augment: bool = False
    gpu_memory: str | None = None
    host_memory: str | None = None
    # masks
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None
    # provenance
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.channels is not None and not isinstance(self.channels, tuple):
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not isinstance(self.percentiles, tuple):
            object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        src = dict(self.sources or {})
        unknown = set(src) - set(SETTING_NAMES)
        if unknown:
            raise ValueError(f"sources names unknown settings {sorted(unknown)}; known: {SETTING_NAMES}")
        bad = {k: v for k, v in src.items() if v not in SOURCES}
        if bad:
            raise ValueError(f"sources must be one of {SOURCES}, got {bad}")
        for f in _FIELDS:
            if f.name not in src:
                src[f.name] = "default" if getattr(self, f.name) == _DEFAULTS[f.name] else "user"
        object.__setattr__(self, "sources", src)
        self.validate()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model(cls, recommended: Mapping[str, Any] | None) -> Settings:
        """Defaults with a model file's ``recommended_settings`` applied (source ``"model"``).

        Keys that are not settings are ignored (a newer file may recommend more), so a model
        file never stops a run; values are validated like any other.
        """
        rec = {k: v for k, v in dict(recommended or {}).items() if k in _DEFAULTS}
        return cls().replace(_source="model", **rec)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Settings:
        """Inverse of :meth:`to_dict` (also accepts a dict without ``sources``)."""
        d = dict(d)
        sources = d.pop("sources", None) or {}
        _check_names(d, "Settings.from_dict")
        return cls(**d, sources=dict(sources))

    def replace(self, _source: str = "user", **overrides: Any) -> Settings:
        """A copy with ``overrides`` applied and validated; those fields become ``"user"``."""
        _check_names(overrides, "Settings.replace")
        if _source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {_source!r}")
        values = {f.name: getattr(self, f.name) for f in _FIELDS}
        values.update(overrides)
        sources = dict(self.sources)
        sources.update({k: _source for k in overrides})
        return Settings(**values, sources=sources)

    # -- checks and views ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and how to fix it."""
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"setting {name}={getattr(self, name)!r} is invalid: {fix}")

        def is_int(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        if self.channel_axis is not None and not is_int(self.channel_axis):
            raise bad("channel_axis", "give an integer axis (e.g. -1) or None to guess it")
        # how many channels an image has is checked where the image is known (preprocess),
        # so the error can name the image
        if self.channels is not None and (
            not len(self.channels) or any(not is_int(c) or c < 0 for c in self.channels)
        ):
            raise bad("channels", "give 1 to 3 non-negative channel indices, e.g. (1, 0), or None")
        for name in ("normalize", "invert", "augment"):
            if type(getattr(self, name)).__name__ not in ("bool", "bool_"):
                raise bad(name, "use True or False")
        p = self.percentiles
        if len(p) != 2 or not all(is_num(v) for v in p) or not 0 <= p[0] < p[1] <= 100:
            raise bad("percentiles", "give (low, high) with 0 <= low < high <= 100, e.g. (1, 99)")
        if not is_int(self.tile_norm_blocksize) or self.tile_norm_blocksize < 0:
            raise bad("tile_norm_blocksize", "give a block size in pixels >= 0 (0 = whole image)")
        if self.diameter is not None and self.diameter != "auto" and (
            not is_num(self.diameter) or not math.isfinite(self.diameter) or self.diameter < 0
        ):
            raise bad("diameter", "give the median object diameter in pixels (> 0), 'auto' to "
                      "estimate it with the model's size model, or None for no resizing")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "give a number of tiles >= 1")
        if not is_num(self.tile_overlap) or not 0 <= self.tile_overlap < 1:
            raise bad("tile_overlap", "give a fraction in [0, 1), e.g. 0.1")
        if self.gpu_memory is not None:
            try:
                parse_memory(self.gpu_memory)
            except ValueError as e:
                raise bad("gpu_memory", f"{e}; or None to use batch_size") from None
        if self.host_memory is not None and str(self.host_memory).strip().lower() != "unlimited":
            try:
                parse_memory(self.host_memory)
            except ValueError as e:
                raise bad("host_memory", f"{e}; "
                          "'unlimited' to always segment whole, or None for automatic") from None
        if not is_num(self.flow_threshold) or not self.flow_threshold >= 0:
            raise bad("flow_threshold", "give a flow error >= 0 (0 turns the flow QC off)")
        if not is_num(self.cellprob_threshold) or not math.isfinite(self.cellprob_threshold):
            raise bad("cellprob_threshold", "give a finite logit, e.g. 0 (higher = fewer pixels)")
        if not is_int(self.min_size):
            raise bad("min_size", "give a size in pixels (<= 0 keeps all objects)")
        if not is_num(self.max_size_fraction) or not 0 < self.max_size_fraction <= 1:
            raise bad("max_size_fraction", "give a fraction of the image in (0, 1]")
        if self.niter is not None and (not is_int(self.niter) or self.niter < 1):
            raise bad("niter", "give a number of tracking steps >= 1, or None for the default")

    @property
    def gpu_memory_bytes(self) -> int | None:
        """``gpu_memory`` in bytes (None when unset)."""
        return None if self.gpu_memory is None else parse_memory(self.gpu_memory)

    def values(self) -> dict[str, Any]:
        """The setting values by name (no sources; tuples kept)."""
        return {f.name: getattr(self, f.name) for f in _FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every value plus ``sources``; :meth:`from_dict` round-trips it."""
        out: dict[str, Any] = {name: _plain(v) for name, v in self.values().items()}
        out["sources"] = dict(self.sources)
        return out

    def non_default(self) -> dict[str, tuple[Any, str]]:
        """``{name: (value, source)}`` of the values not taken from the defaults."""
        return {k: (getattr(self, k), self.sources[k]) for k in SETTING_NAMES if self.sources[k] != "default"}

    def describe(self) -> str:
        """One line per value not from the defaults, e.g. ``flow_threshold=0.8 (model)``."""
        return "\n".join(f"{k}={_fmt(v)} ({s})" for k, (v, s) in self.non_default().items())


_FIELDS = tuple(f for f in fields(Settings) if f.name != "sources")
#: names of all settings, in declaration order
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in _FIELDS}


def _plain(v: Any) -> Any:
    """JSON-safe copy: tuples become lists, numpy scalars Python numbers."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def _check_names(d: Mapping[str, Any], where: str) -> None:
    unknown = [k for k in d if k not in _DEFAULTS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, SETTING_NAMES, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        names = ", ".join(SETTING_NAMES)
        raise TypeError(f"{where}: unknown setting {', '.join(hints)}; settings are {names}")
