"""Network sizes: one frozen dataclass and named presets.

A config fully determines the parameter shapes of :class:`~cpsam_toolkit.network.model.CPSAMNet`,
so a checkpoint that records its config reloads with the right size from one file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class NetConfig:
    """Sizes of a Cellpose-SAM network.

    Parameters
    ----------
    width : int
        Token embedding dimension (1024 for ViT-L).
    depth : int
        Number of transformer blocks.
    heads : int
        Attention heads per block (``width`` must divide evenly).
    neck_width : int
        Channels of the SAM neck and of the readout input (256 in SAM).
    mlp_ratio : float
        Hidden size of the block MLP as a multiple of ``width``.
    patch : int
        Patch size in pixels (8 in Cellpose-SAM).
    tile : int
        Tile size in pixels (256); the token grid is ``tile // patch`` on a side.
    in_channels : int
        Maximum input channels; fewer are accepted (the patch kernel is sliced).
    nout : int
        Output maps: 3 for ``[dY, dX, cellprob]``; panoptic nets add class maps in front.
    rel_pos_rows : tuple of int
        Stored rows of each block's relative-position tables. SAM checkpoints keep their
        windowed (27) and global (127) sizes; they are resampled to ``2 * grid - 1`` rows.
        Empty means ``2 * grid - 1`` for every block.
    layer_drop : float
        Training-time layer-drop probability of the last block (rises linearly from 0).
    class_names : tuple of str
        Names of the class maps of a panoptic net (background first); empty for plain nets.
    """

    width: int = 1024
    depth: int = 24
    heads: int = 16
    neck_width: int = 256
    mlp_ratio: float = 4.0
    patch: int = 8
    tile: int = 256
    in_channels: int = 3
    nout: int = 3
    rel_pos_rows: tuple[int, ...] = field(default=())
    layer_drop: float = 0.4
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"NetConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.tile % self.patch:
            raise ValueError(f"NetConfig: tile {self.tile} is not a multiple of patch {self.patch}")
        if self.rel_pos_rows and len(self.rel_pos_rows) != self.depth:
            raise ValueError(
                f"NetConfig: rel_pos_rows has {len(self.rel_pos_rows)} entries, expected depth={self.depth}"
            )
        if not 1 <= self.in_channels <= 3:
            raise ValueError("NetConfig: in_channels must be 1, 2 or 3")

    @property
    def grid(self) -> int:
        """Tokens per side of a tile."""
        return self.tile // self.patch

    def rows(self, block: int) -> int:
        """Stored rows of block ``block``'s relative-position tables."""
        return self.rel_pos_rows[block] if self.rel_pos_rows else 2 * self.grid - 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rel_pos_rows"] = list(self.rel_pos_rows)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"NetConfig: unknown fields {sorted(unknown)}")
        known["rel_pos_rows"] = tuple(known.get("rel_pos_rows", ()))
        known["class_names"] = tuple(known.get("class_names", ()))
        return cls(**known)

    def replace(self, **changes: Any) -> NetConfig:
        return replace(self, **changes)


def _sam_rows(depth: int, global_blocks: tuple[int, ...], window: int = 14, glob: int = 64) -> tuple:
    return tuple(2 * glob - 1 if i in global_blocks else 2 * window - 1 for i in range(depth))


#: Named sizes. ``vit_l`` is the paper's network (the official ``cpsam`` weights),
#: ``vit_b``/``vit_h`` match the other SAM encoders, ``small`` is the shipped model's size,
#: and ``tiny`` is for tests.
PRESETS: dict[str, NetConfig] = {
    "vit_l": NetConfig(1024, 24, 16, 256, rel_pos_rows=_sam_rows(24, (5, 11, 17, 23))),
    "vit_b": NetConfig(768, 12, 12, 256, rel_pos_rows=_sam_rows(12, (2, 5, 8, 11))),
    "vit_h": NetConfig(1280, 32, 16, 256, rel_pos_rows=_sam_rows(32, (7, 15, 23, 31))),
    "small": NetConfig(width=192, depth=4, heads=3, neck_width=96, layer_drop=0.1),
    "tiny": NetConfig(width=64, depth=2, heads=2, neck_width=32),
}


def get_config(name_or_config: str | NetConfig | dict) -> NetConfig:
    """Return a :class:`NetConfig` from a preset name, a dict or a config."""
    if isinstance(name_or_config, NetConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return NetConfig.from_dict(name_or_config)
    try:
        return PRESETS[name_or_config]
    except KeyError:
        raise ValueError(
            f"unknown network preset {name_or_config!r}; choose one of {sorted(PRESETS)}"
        ) from None
