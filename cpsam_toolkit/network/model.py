"""The Cellpose-SAM network: SAM image encoder, 1x1 readout and pixel shuffle to flows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetConfig
from .encoder import ImageEncoder


class CPSAMNet(nn.Module):
    """Map (B, C<=3, tile, tile) float images to (B, nout, tile, tile) maps.

    For ``nout=3`` the output channels are ``[dY, dX, cellprob-logit]`` with flows in network
    units (about 5x unit vectors). Panoptic nets put ``nout - 3`` class logits in front.
    The parameter names match ``cellpose.vit.CPSAM`` so official state dicts load unchanged.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        p2 = cfg.patch**2
        self.out = nn.Conv2d(cfg.neck_width, cfg.nout * p2, kernel_size=1)
        # kept for checkpoint compatibility: the reference's transposed-conv weight, which is
        # exactly a pixel shuffle; the forward pass uses F.pixel_shuffle
        w2 = torch.eye(cfg.nout * p2).reshape(cfg.nout * p2, cfg.nout, cfg.patch, cfg.patch)
        self.W2 = nn.Parameter(w2, requires_grad=False)
        self.diam_labels = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.diam_mean = nn.Parameter(torch.tensor([30.0]), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.out.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.cfg.tile
        if x.ndim != 4 or x.shape[-2:] != (t, t) or not 1 <= x.shape[1] <= self.cfg.in_channels:
            raise ValueError(
                f"CPSAMNet expects a (B, 1..{self.cfg.in_channels}, {t}, {t}) tensor, "
                f"got {tuple(x.shape)}; tile the image first (cpsam_toolkit.tiling)"
            )
        return F.pixel_shuffle(self.out(self.encoder(x)), self.cfg.patch)
