"""The ViT image encoder of Segment Anything, adapted as in Cellpose-SAM.

Global attention in every block, SAM's decomposed relative-position bias (tables kept at their
stored shapes and resampled to the token grid), attention through
:func:`torch.nn.functional.scaled_dot_product_attention`, and per-sample layer drop.
Attribute names follow ``segment_anything.modeling.image_encoder`` so that official state dicts
load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetConfig


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def resample_rel_pos(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Gather a relative-position table into a (grid, grid, head_dim) lookup.

    ``table`` has R rows; it is linearly resampled to ``2 * grid - 1`` rows (as SAM's
    ``get_rel_pos``: ``F.interpolate(mode="linear")``) and indexed by ``q - k + grid - 1``.
    """
    rows = 2 * grid - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.T[None], size=rows, mode="linear")[0].T
    coords = torch.arange(grid, device=table.device)
    return table[(coords[:, None] - coords[None, :] + grid - 1)]


class Attention(nn.Module):
    """Multi-head global attention with SAM's decomposed relative-position bias.

    The resampled position lookups are cached while no gradient flows into them
    (inference) and recomputed, differentiably, whenever they could be trained.
    """

    def __init__(self, width: int, heads: int, grid: int, rel_rows: int) -> None:
        super().__init__()
        self.heads = heads
        self.grid = grid
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_rows, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_rows, head_dim))
        self._cache: tuple | None = None
        self._spread_cache: tuple | None = None

    def train(self, mode: bool = True) -> Attention:
        # switching modes drops cached lookups, so tables edited in place through `.data`
        # (which does not bump the tensor version) are never served stale
        self._cache = None
        return super().train(mode)

    def _lookups(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ph, pw = self.rel_pos_h, self.rel_pos_w
        trainable = torch.is_grad_enabled() and (ph.requires_grad or pw.requires_grad)
        if trainable:
            return resample_rel_pos(ph, self.grid).to(dtype), resample_rel_pos(pw, self.grid).to(dtype)
        key = (ph._version, pw._version, ph.data_ptr(), pw.data_ptr(), ph.device, dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                rh = resample_rel_pos(ph, self.grid).to(dtype)
                rw = resample_rel_pos(pw, self.grid).to(dtype)
            self._cache = (key, rh, rw)
        return self._cache[1], self._cache[2]

    def _spread(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h + w, h * w) 0/1 matrix: row ``i < h`` is 1 at the keys in token row ``i``, row
        ``h + j`` at the keys in token column ``j``."""
        key = (h, w, like.dtype, like.device)
        if self._spread_cache is None or self._spread_cache[0] != key:
            rows = torch.arange(h, device=like.device).repeat_interleave(w)
            cols = torch.arange(w, device=like.device).repeat(h)
            sel = torch.zeros(h + w, h * w, dtype=like.dtype, device=like.device)
            sel[rows, torch.arange(h * w, device=like.device)] = 1
            sel[h + cols, torch.arange(h * w, device=like.device)] = 1
            self._spread_cache = (key, sel)
        return self._spread_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
        rh, rw = self._lookups(q.dtype)  # (grid, grid, hd)
        r_q = q.reshape(b, self.heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
        # bias[q, (i, j)] = rel_h[q, i] + rel_w[q, j], written by one GEMM with a 0/1 matrix:
        # each output sums two products by 1 (in fp32, rounded once), the same values as the
        # broadcast add, in a third less time on the CPU (bf16 element-wise ops are slow there)
        rel = torch.cat([rel_h, rel_w], -1).reshape(b, self.heads, n, h + w)
        bias = rel @ self._spread(h, w, rel)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, grid: int, rel_rows: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, grid, rel_rows)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLPBlock(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C<=3, H, W) -> (B, H/p, W/p, width); fewer channels use a slice of the kernel."""
        w = self.proj.weight[:, : x.shape[1]]
        x = F.conv2d(x, w, self.proj.bias, stride=self.proj.stride)
        return x.permute(0, 2, 3, 1)


class ImageEncoder(nn.Module):
    """Patch embedding, absolute position embedding, ``depth`` global blocks and the SAM neck."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        g = cfg.grid
        self.patch_embed = PatchEmbed(cfg.patch, cfg.in_channels, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.width))
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, hidden, g, cfg.rows(i)) for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, cfg.neck_width, kernel_size=1, bias=False),
            LayerNorm2d(cfg.neck_width),
            nn.Conv2d(cfg.neck_width, cfg.neck_width, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.neck_width),
        )
        self.layer_drop = cfg.layer_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        depth = len(self.blocks)
        if self.training and self.layer_drop > 0 and depth > 0:
            # per sample: block i is skipped with probability linspace(0, layer_drop, depth)[i]
            p = torch.linspace(0, self.layer_drop, depth, device=x.device)
            drop = torch.rand(x.shape[0], depth, device=x.device) < p
            for i, blk in enumerate(self.blocks):
                kept = (~drop[:, i]).nonzero().flatten()
                if len(kept) == x.shape[0]:
                    x = blk(x)
                elif len(kept):  # only the kept samples pay for the block
                    x = x.index_copy(0, kept, blk(x[kept]))
        else:
            for blk in self.blocks:
                x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
