#!/usr/bin/env python
"""Train the shipped-size network on one GPU for a fixed wall-clock budget (the GPU run).

A lean loop around the library's network (:class:`cpsam_toolkit.network.CPSAMNet`), loss
(:func:`cpsam_toolkit.training.loop.loss_fn`) and flow targets
(:func:`cpsam_toolkit.flows.object_pixel_flows`), with the whole data pipeline on the GPU so that
the CPU cores never limit it:

* the packed data (``scripts/pack_gpu_inputs.py``) is held on the device as flat uint8 pixels;
  flow targets are computed there once at the start;
* each batch is drawn per set (``--mix``) and augmented on the device: random rotation, flip,
  log-uniform zoom and 256² crop by one bilinear gather per sample (flows resampled and their
  vectors rotated, as :mod:`cpsam_toolkit.training.augment` does), then grayscale, inversion,
  third-channel drop, channel permutation, degradations (Poisson noise, blur, downsampling,
  anisotropic blur, renormalised) and brightness/contrast jitter;
* bf16 autocast, fused AdamW, warm-up then cosine decay over the wall-clock budget;
* about every ``--ckpt-every`` seconds the weights are written (fp16, our checkpoint format,
  overwritten in place) to ``<out>/cpsam_gpu.pt``, and the one with the lowest validation loss
  to ``<out>/cpsam_gpu_best.pt``; ``<out>/log.jsonl`` gets a line every ``--log-every`` s;
* at the end: validation AP@0.5 per set on the packed validation images (the library's own
  segmentation), and the flow threshold that scores best there stored as
  ``recommended_settings`` in the checkpoints.

    python scripts/train_gpu.py --out out/gpu --seconds 480
    python scripts/train_gpu.py --out out/gpu --seconds 20 --tiny     # CPU dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

GROUPS = ("dsb2018", "usiigaci", "consep")
MIX = {"dsb2018": 0.5, "consep": 0.25, "usiigaci": 0.25}
#: files coming back from the device machine may hold at most 16 MiB each
FILE_LIMIT = 16 * 2**20


# ----------------------------------------------------------------------------- network size


def model_bytes(cfg) -> int:
    """Size of the fp16 checkpoint of a network of config ``cfg`` (bytes, within ~20 kB)."""
    from cpsam_toolkit.network import CPSAMNet

    with torch.device("meta"):
        net = CPSAMNet(cfg)
    return 2 * sum(t.numel() for t in net.state_dict().values()) + 20_000


def choose_config(width: int = 384, heads: int = 6, depth: int = 8, mlp_ratio: float | None = None,
                  neck: int = 128, limit: int = FILE_LIMIT, tiny: bool = False):
    """The network trained here: ``width`` x ``depth`` blocks with the largest MLP ratio (of
    4, 3, 2, 1.75, 1.5, 1.25, 1) whose fp16 file fits ``limit`` (one file that comes back).

    At width 384 that file limit, not GPU time, bounds the size: 8 blocks fit with MLP ratio
    1.25 (8.2 M parameters, ~15.7 MiB); with ratio 4 only 4 blocks would."""
    from cpsam_toolkit.network import get_config

    if tiny:
        return get_config("tiny").replace(layer_drop=0.0)
    base = get_config("small").replace(width=width, heads=heads, neck_width=neck, layer_drop=0.0, depth=depth)
    for r in ([mlp_ratio] if mlp_ratio else [4.0, 3.0, 2.0, 1.75, 1.5, 1.25, 1.0]):
        cfg = base.replace(mlp_ratio=r)
        if model_bytes(cfg) <= limit * 0.99:
            return cfg
    raise ValueError(f"no network of width {width} and depth {depth} fits {limit / 2**20:.0f} MiB; "
                     "lower --depth or --mlp-ratio")


# ----------------------------------------------------------------------------- data on the device


@dataclass
class DeviceData:
    """Packed images on the device: flat (P, 3) uint8 pixels, (P, 2) fp16 unit flows, (P,)
    foreground, and per image: offset, height, width, channels, group."""

    img: torch.Tensor
    flows: torch.Tensor
    fg: torch.Tensor
    off: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    c: torch.Tensor
    group: torch.Tensor
    quant: float
    names: list
    cls: torch.Tensor | None = None  # (P,) uint8 class index (0 = background), class-labelled sets
    class_names: tuple = ()

    def __len__(self) -> int:
        return len(self.h)


def load_device_data(path: Path, part: str, device: torch.device, threads: int = 8) -> DeviceData:
    """Move one part of the packed file to ``device`` and compute its flow targets there."""
    from concurrent.futures import ThreadPoolExecutor

    from pack_gpu_inputs import images

    from cpsam_toolkit.flows import object_pixel_flows

    z = np.load(path, allow_pickle=False)
    s = json.loads(str(z["summary"]))
    rows, poff = z[f"{part}_rows"], z[f"{part}_px_off"]
    masks_flat = z[f"{part}_masks"]
    decoded = images(z, part)
    p = int(poff[-1])
    img = torch.zeros((p, 3), dtype=torch.uint8, device=device)
    flows = torch.zeros((p, 2), dtype=torch.float16, device=device)
    fg = torch.zeros(p, dtype=torch.bool, device=device)

    def one(i: int) -> None:
        g, c, h, w, _ = (int(v) for v in rows[i])
        a, b = int(poff[i]), int(poff[i + 1])
        x = torch.from_numpy(decoded[i].reshape(c, h * w)).to(device)
        img[a:b, :c] = x.T
        m = masks_flat[a:b].reshape(h, w).astype(np.int32)
        idx, mu = object_pixel_flows(m, device=device)
        if len(idx):
            t = torch.from_numpy(idx).to(device) + a
            flows[t] = mu.T.to(torch.float16)
            fg[t] = True

    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(one, range(len(rows))))
    r = torch.from_numpy(rows).to(device)
    cls, names = None, tuple(s.get("class_names") or ())
    if names:  # per-pixel class index from the per-instance tables (CoNSeP)
        luts, coff = z[f"{part}_classes"], z[f"{part}_class_off"]
        c_flat = np.zeros(p, np.uint8)
        for i in range(len(rows)):
            lut = luts[coff[i]:coff[i + 1]]
            m = masks_flat[poff[i]:poff[i + 1]]
            c_flat[poff[i]:poff[i + 1]] = lut[np.minimum(m, len(lut) - 1)] if len(lut) else 0
        cls = torch.from_numpy(c_flat).to(device)
    return DeviceData(img, flows, fg, torch.from_numpy(poff[:-1]).to(device), r[:, 2], r[:, 3], r[:, 1],
                      r[:, 0], float(s["quant"]), [str(n) for n in z[f"{part}_names"]], cls, names)


# ----------------------------------------------------------------------------- GPU augmentation


def _gather(flat: torch.Tensor, off, h, w, sy, sx, nearest: bool = False) -> torch.Tensor:
    """Sample per-image flat (P, C) pixels at (B, S, S) source coordinates; 0 outside."""
    h, w, off = h[:, None, None], w[:, None, None], off[:, None, None]
    # as scipy.ndimage.map_coordinates(mode="constant"): 0 beyond the outer pixel centres
    inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
    if nearest:
        yy, xx = torch.floor(sy + 0.5).long(), torch.floor(sx + 0.5).long()
        ok = inside & (yy < h) & (xx < w)
        v = flat[off + yy.clamp_min(0).minimum(h - 1) * w + xx.clamp_min(0).minimum(w - 1)]
        return v * ok.unsqueeze(-1).to(v.dtype)
    y0, x0 = torch.floor(sy), torch.floor(sx)
    wy, wx = sy - y0, sx - x0
    y0, x0 = y0.long(), x0.long()
    out = None
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy < h) & (xx < w)
        wt = (wy if dy else 1 - wy) * (wx if dx else 1 - wx) * ok
        v = flat[off + yy.clamp_min(0).minimum(h - 1) * w + xx.clamp_min(0).minimum(w - 1)].float()
        v = v * wt.unsqueeze(-1)
        out = v if out is None else out + v
    return out


def spatial_batch(data: DeviceData, idx: torch.Tensor, size: int, scale_range=(0.5, 2.0),
                  rotate: bool = True, gen: torch.Generator | None = None, params: dict | None = None,
                  with_classes: bool = False):
    """Random rotation/flip/zoom/crop of images ``idx``: (B,3,S,S) image in [0, ~1.3], (B,2,S,S)
    unit flows (vectors rotated with the image) and (B,S,S) foreground target.

    ``with_classes`` adds the (B,S,S) class-index crops (nearest) as a fourth output.
    ``params`` fixes the maps instead (tensors of B: ``scale``, ``angle`` (rad), ``flip``
    (bool), ``shift_y``, ``shift_x`` (px)), as :func:`cpsam_toolkit.training.augment.make_affine`."""
    dev = data.img.device
    b = len(idx)

    def u(lo, hi):
        return torch.rand(b, device=dev, generator=gen) * (hi - lo) + lo

    h, w = data.h[idx], data.w[idx]
    hf, wf = h.float(), w.float()
    if params is None:
        lo, hi = scale_range
        scale = torch.exp(u(math.log(lo), math.log(hi)))
        ang = u(-math.pi, math.pi) if rotate else torch.zeros(b, device=dev)
        f = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0)
        span_y = (hf * scale - size).clamp_min(0) / 2
        span_x = (wf * scale - size).clamp_min(0) / 2
        shy, shx = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * span_y, \
            (torch.rand(b, device=dev, generator=gen) * 2 - 1) * span_x
    else:
        scale, ang = params["scale"].float().to(dev), params["angle"].float().to(dev)
        f = torch.where(params["flip"].to(dev), -1.0, 1.0)
        shy, shx = params["shift_y"].float().to(dev), params["shift_x"].float().to(dev)
    o = torch.arange(size, device=dev, dtype=torch.float32)
    dy = o[None, :, None] - ((size - 1) / 2 + shy)[:, None, None]
    dx = o[None, None, :] - ((size - 1) / 2 + shx)[:, None, None]
    c, s = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    sc, ff = scale[:, None, None], f[:, None, None]
    # source = inv(scale * rot @ flip) @ (out - out_centre) + source_centre (augment.make_affine)
    sy = (c * dy + s * dx) / sc + ((hf - 1) / 2)[:, None, None]
    sx = ff * (-s * dy + c * dx) / sc + ((wf - 1) / 2)[:, None, None]
    off = data.off[idx]
    img = _gather(data.img, off, h, w, sy, sx) / data.quant
    fl = _gather(data.flows, off, h, w, sy, sx)
    fg = _gather(data.fg[:, None], off, h, w, sy, sx, nearest=True)[..., 0].float()
    fy, fx = fl[..., 0], fl[..., 1] * ff  # flows turn with the image: rot @ flip @ v
    flows = torch.stack([c * fy - s * fx, s * fy + c * fx], 1)
    out = img.permute(0, 3, 1, 2).contiguous(), flows * fg[:, None], fg
    if with_classes:
        return (*out, _gather(data.cls[:, None], off, h, w, sy, sx, nearest=True)[..., 0].long())
    return out


def _renormalize(x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Per-channel 1-99 percentile -> 0..1 (estimated on every 7th pixel); inactive channels 0."""
    b, c = x.shape[:2]
    sub = x.reshape(b, c, -1)[..., ::7].float()
    q = torch.quantile(sub.reshape(b * c, -1), torch.tensor([0.01, 0.99], device=x.device), dim=1)
    lo, hi = q[0].reshape(b, c, 1, 1), q[1].reshape(b, c, 1, 1)
    ok = (hi - lo > 1e-6) & act[:, :, None, None]
    return torch.where(ok, (x - lo) / (hi - lo).clamp_min(1e-6), torch.zeros_like(x))


def _blur(x: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,S,S) with per-sample sigmas (px; 0 = none), reflect pad."""
    b, c, hh, ww = x.shape
    r = int(math.ceil(3 * float(torch.maximum(sy.max(), sx.max()).clamp_min(0.5))))
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)

    def kern(sig):
        k = torch.exp(-0.5 * (t[None] / sig.clamp_min(1e-3)[:, None]) ** 2)
        k = torch.where(sig[:, None] > 0, k, (t[None] == 0).float())
        return (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)

    y = F.pad(x.reshape(1, b * c, hh, ww), (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, kern(sy)[:, None, :, None], groups=b * c)
    y = F.pad(y, (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, kern(sx)[:, None, None, :], groups=b * c)
    return y.reshape(b, c, hh, ww)


def _down_up(x: torch.Tensor, fy: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """Bilinear down by per-sample factors (rounded to 0.5) and back up to the size."""
    out = torch.empty_like(x)
    s = x.shape[-1]
    key = torch.stack([torch.round(fy * 2), torch.round(fx * 2)], 1)
    for k in torch.unique(key, dim=0):
        sel = (key == k).all(1)
        size = (max(1, round(s * 2 / float(k[0]))), max(1, round(s * 2 / float(k[1]))))
        small = F.interpolate(x[sel], size=size, mode="bilinear", align_corners=False)
        out[sel] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return out


def degrade_batch(x: torch.Tensor, act: torch.Tensor, gen=None) -> torch.Tensor:
    """One of the four degradations of :mod:`cpsam_toolkit.training.augment` per sample (levels
    as its ``AugmentConfig`` defaults), then renormalised."""
    b, dev = x.shape[0], x.device

    def u(lo, hi, log=False):
        r = torch.rand(b, device=dev, generator=gen)
        return torch.exp(r * (math.log(hi) - math.log(lo)) + math.log(lo)) if log else r * (hi - lo) + lo

    kind = torch.randint(0, 4, (b,), device=dev, generator=gen)
    out = x.clone()
    zero = torch.zeros(b, device=dev)
    # 0: Poisson noise, 1 to 40 photons at intensity 1
    ph = u(1.0, 40.0, log=True)[:, None, None, None]
    noisy = torch.poisson(x.clamp_min(0) * ph, generator=gen) / ph
    out = torch.where((kind == 0)[:, None, None, None], noisy, out)
    # 1: blur sigma 1-4, then a little shot noise (120 photons)
    sig = u(1.0, 4.0)
    bl = _blur(x, torch.where(kind == 1, sig, zero), torch.where(kind == 1, sig, zero))
    bl = torch.poisson(bl.clamp_min(0) * 120.0, generator=gen) / 120.0
    out = torch.where((kind == 1)[:, None, None, None], bl, out)
    # 2: downsample by 2-6 (blur sigma f/2), 3: anisotropic 2-8 along a random axis
    fd, fa = u(2.0, 6.0), u(2.0, 8.0)
    axis = torch.randint(0, 2, (b,), device=dev, generator=gen)
    fy = torch.where(kind == 2, fd, torch.where((kind == 3) & (axis == 0), fa, torch.ones(b, device=dev)))
    fx = torch.where(kind == 2, fd, torch.where((kind == 3) & (axis == 1), fa, torch.ones(b, device=dev)))
    sel = kind >= 2
    if sel.any():
        xs = x[sel]
        ds = _blur(xs, (fy[sel] / 2) * (fy[sel] > 1), (fx[sel] / 2) * (fx[sel] > 1))
        out[sel] = _down_up(ds, fy[sel], fx[sel])
    return _renormalize(out, act)


def intensity_batch(x: torch.Tensor, nch: torch.Tensor, degrade_p: float = 0.25, gen=None) -> torch.Tensor:
    """Grayscale (10%), inversion (25%), third-channel drop (10%), channel permutation,
    degradation (``degrade_p``) and brightness/contrast jitter, per sample, on the device."""
    b, dev = x.shape[0], x.device

    def p(prob):
        return torch.rand(b, device=dev, generator=gen) < prob

    act = torch.arange(3, device=dev)[None] < nch[:, None]  # (B, 3) channels that hold data
    gray = p(0.1)
    g = (x * act[:, :, None, None]).sum(1, keepdim=True) / act.sum(1).clamp_min(1)[:, None, None, None]
    x = torch.where(gray[:, None, None, None], g.expand_as(x), x)
    act = act | gray[:, None]
    inv = p(0.25)[:, None] & act
    x = torch.where(inv[:, :, None, None], 1.0 - x, x)
    drop = p(0.1) & (act.sum(1) > 1)
    x[:, 2] = torch.where(drop[:, None, None], torch.zeros_like(x[:, 2]), x[:, 2])
    act[:, 2] &= ~drop
    perm = torch.argsort(torch.rand(b, 3, device=dev, generator=gen), dim=1)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    act = torch.gather(act, 1, perm)
    deg = p(degrade_p)
    if deg.any():
        x[deg] = degrade_batch(x[deg], act[deg], gen)
    m = (x.sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3]))
    f = torch.exp((torch.rand(b, 3, 1, 1, device=dev, generator=gen) * 2 - 1) * math.log(2.0))
    shift = torch.randn(b, 3, 1, 1, device=dev, generator=gen) * 0.2
    return torch.where(act[:, :, None, None], (x - m) * f + m + shift, x)


# ----------------------------------------------------------------------------- validation


def fixed_crops(data: DeviceData, size: int, n: int = 64):
    """Deterministic validation crops (scale 1, no rotation) for the validation loss."""
    g = torch.Generator(device=data.img.device).manual_seed(42)
    idx = torch.arange(len(data), device=data.img.device)[:n]
    return spatial_batch(data, idx, size, (1.0, 1.0), rotate=False, gen=g)


def val_loss(net, crops, autocast) -> float:
    from cpsam_toolkit.training.loop import loss_fn

    x, fl, fg = crops
    net.eval()
    tot = 0.0
    with torch.no_grad():
        for k in range(0, len(x), 32):
            with autocast():
                y = net(x[k:k + 32])
            tot += float(loss_fn(y, fl[k:k + 32], fg[k:k + 32])) * len(x[k:k + 32])
    net.train()
    return tot / max(1, len(x))


def val_ap(net, packed: Path, device: torch.device, thresholds=(0.4, 0.6, 0.8), batch_size: int = 64,
           deadline: float | None = None) -> dict:
    """AP@0.5 per set on the packed validation images, for each flow threshold (the library's
    segmentation with defaults otherwise; flows computed once, thresholds on cached tracking).
    Thresholds after the first are skipped once one more would end past ``deadline`` (unix s)."""
    from pack_gpu_inputs import load_packed

    from cpsam_toolkit.metrics import average_precision
    from cpsam_toolkit.segment import CellposeSAM

    items = load_packed(packed, "val")
    model = CellposeSAM(copy.deepcopy(net).float().eval(), device=device, name="validation")
    imgs = [it["image"][0] if it["image"].shape[0] == 1 else np.moveaxis(it["image"], 0, -1) for it in items]
    res = model.segment(imgs, normalize=False, batch_size=batch_size,
                        channel_axis=None, flow_threshold=thresholds[0])
    out: dict = {}
    last = 0.0  # seconds the previous threshold took
    for t in thresholds:
        t0 = time.time()
        if out and deadline is not None and time.time() + last > deadline:
            print(f"validation at flow threshold {t} skipped: deadline", flush=True)
            continue
        per: dict[str, list[float]] = {}
        for it, r in zip(items, res):
            rr = r if t == thresholds[0] else r.recompute(flow_threshold=t)
            a = average_precision(it["masks"], np.asarray(rr.masks), [0.5])[0]
            per.setdefault(it["group"], []).append(float(np.ravel(a)[0]))
        groups = {g: round(float(np.mean(v)), 4) for g, v in per.items()}
        out[str(t)] = {"mean": round(float(np.mean(list(groups.values()))), 4), "groups": groups,
                       "n": {g: len(v) for g, v in per.items()}}
        last = time.time() - t0
    return out


# ----------------------------------------------------------------------------- panoptic variant


def train_panoptic_phase(net, train: DeviceData, val: DeviceData, args, seconds: float, path: Path,
                         meta: dict, log_path: Path, autocast, gen) -> dict:
    """Re-head ``net`` with background + class maps (:func:`cpsam_toolkit.panoptic.make_panoptic`)
    and train it on the class-labelled set (CoNSeP) for ``seconds``: the segmentation loss plus
    inverse-frequency weighted cross-entropy of the class maps (as
    :class:`cpsam_toolkit.panoptic.ClassLoss`). Writes ``path``; returns a summary."""
    from cpsam_toolkit.network.checkpoints import save_checkpoint
    from cpsam_toolkit.panoptic import class_weights, make_panoptic
    from cpsam_toolkit.training.loop import loss_fn

    names = train.class_names[1:] if train.class_names[:1] == ("background",) else train.class_names
    dev = train.img.device
    pnet = make_panoptic(copy.deepcopy(net).float(), names).to(dev).train()
    k = 1 + len(names)
    sel = train.group == GROUPS.index("consep")
    counts = np.zeros(k, np.int64)
    for i in torch.nonzero(sel).flatten().tolist():
        a, b = int(train.off[i]), int(train.off[i]) + int(train.h[i]) * int(train.w[i])
        counts += torch.bincount(train.cls[a:b].long(), minlength=k).cpu().numpy()[:k]
    wt = torch.as_tensor(class_weights(counts), device=dev)
    opt = torch.optim.AdamW(pnet.parameters(), lr=args.lr * 0.5, weight_decay=args.weight_decay,
                            fused=dev.type == "cuda")
    vsel = torch.nonzero(val.group == GROUPS.index("consep")).flatten()
    vcrops = None
    if len(vsel):
        vcrops = spatial_batch(val, vsel[:64], pnet.cfg.tile, (1.0, 1.0), rotate=False,
                               gen=torch.Generator(device=dev).manual_seed(42), with_classes=True)
    t0, samples, bs = time.time(), 0, args.batch_size
    while (frac := (time.time() - t0) / seconds) < 1:
        for g in opt.param_groups:
            cosine = 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))
            g["lr"] = args.lr * 0.5 * min(1.0, frac / 0.05) * cosine
        try:
            with torch.no_grad():
                idx = torch.multinomial(sel.float(), bs, replacement=True, generator=gen)
                x, fl, fg, cl = spatial_batch(train, idx, pnet.cfg.tile, tuple(args.scale_range), gen=gen,
                                              with_classes=True)
                x = intensity_batch(x, train.c[idx], args.degrade_p, gen)
            with autocast():
                y = pnet(x)
            loss = loss_fn(y, fl, fg) + F.cross_entropy(y[:, :k].float(), cl, weight=wt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(pnet.parameters(), 1.0)
            opt.step()
            samples += bs
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            bs = max(1, bs // 2)
    res: dict = {"samples": samples, "seconds": round(time.time() - t0, 1), "class_names": list(names),
                 "class_weights": [round(float(v), 4) for v in wt.cpu()]}
    if vcrops is not None:
        x, fl, fg, cl = vcrops
        pnet.eval()
        with torch.no_grad(), autocast():
            y = pnet(x)
        res["val_seg_loss"] = round(float(loss_fn(y, fl, fg)), 5)
        res["val_class_loss"] = round(float(F.cross_entropy(y[:, :k].float(), cl, weight=wt)), 5)
        res["val_pixel_class_accuracy"] = round(float((y[:, :k].argmax(1) == cl)[cl > 0].float().mean()), 4)
    save_checkpoint(pnet, path, {**meta, "name": "cpsam_gpu_panoptic", "panoptic": res,
                                 "note": "panoptic variant fine-tuned from cpsam_gpu on CoNSeP by "
                                 "scripts/train_gpu.py --panoptic-seconds; evaluate with "
                                 "scripts/train_panoptic_model.py"}, half=True)
    write_jsonl(log_path, {"panoptic": res})
    print(json.dumps({"panoptic": res}), flush=True)
    return res


# ----------------------------------------------------------------------------- main loop


def write_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / ".gpu" / "train_data.npz")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "out" / "gpu")))
    ap.add_argument("--seconds", type=float, default=480.0, help="training wall-clock budget (s)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="unix time by which everything (validation, files) must be done")
    ap.add_argument("--reserve", type=float, default=90.0,
                    help="seconds kept before --deadline for the final validation and files")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the budget")
    ap.add_argument("--degrade-p", type=float, default=0.25)
    ap.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0))
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--mlp-ratio", type=float, default=None)
    ap.add_argument("--neck", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="tiny network (CPU dry run)")
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (falls back)")
    ap.add_argument("--ckpt-every", type=float, default=60.0)
    ap.add_argument("--log-every", type=float, default=10.0)
    ap.add_argument("--no-val-ap", action="store_true", help="skip the final AP validation")
    ap.add_argument("--panoptic-seconds", type=float, default=0.0,
                    help="after training, fine-tune the panoptic variant on CoNSeP for this long "
                         "(taken from the training budget); writes cpsam_gpu_panoptic.pt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from cpsam_toolkit.device import resolve_device
    from cpsam_toolkit.network import CPSAMNet
    from cpsam_toolkit.network.checkpoints import load_checkpoint, save_checkpoint
    from cpsam_toolkit.training.loop import loss_fn

    t_start = time.time()
    dev = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    log_path.unlink(missing_ok=True)
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    if args.init is not None:
        net, _ = load_checkpoint(args.init)
        cfg = net.cfg
    else:
        cfg = choose_config(args.width, args.heads, args.depth, args.mlp_ratio, args.neck, tiny=args.tiny)
        net = CPSAMNet(cfg)
    net.encoder.layer_drop = 0.0  # per-sample layer drop syncs with the host at every block
    net = net.to(dev).train()
    nparam = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print(f"network: width {cfg.width}, depth {cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_ratio}, "
          f"neck {cfg.neck_width}: {nparam / 1e6:.2f} M parameters, "
          f"fp16 file ~{model_bytes(cfg) / 2**20:.1f} MiB", flush=True)

    t0 = time.time()
    train = load_device_data(args.data, "train", dev)
    val = load_device_data(args.data, "val", dev)
    t_data = time.time() - t0
    print(f"data: {len(train)} train / {len(val)} val images, {train.img.shape[0] / 1e6:.1f} Mpx on {dev}, "
          f"flows in {t_data:.1f} s", flush=True)
    counts = {g: int((train.group == i).sum()) for i, g in enumerate(GROUPS)}
    wts = torch.zeros(len(train), device=dev)
    for i, g in enumerate(GROUPS):
        if counts[g]:
            wts[train.group == i] = MIX[g] / counts[g]
    crops = fixed_crops(val, cfg.tile) if len(val) else None

    fwd = net
    if args.compile:
        try:
            fwd = torch.compile(net)
        except Exception as e:  # noqa: BLE001 - compiling is optional
            print(f"torch.compile unavailable ({e}); eager", flush=True)
    decay = [p for n, p in net.named_parameters() if p.requires_grad and p.ndim >= 2 and "pos" not in n]
    other = [p for n, p in net.named_parameters() if p.requires_grad and (p.ndim < 2 or "pos" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr,
                            fused=dev.type == "cuda")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else \
            torch.autocast("cpu", enabled=False)

    end = time.time() + args.seconds
    if args.deadline is not None:
        pan = args.panoptic_seconds + 15 if args.panoptic_seconds else 0
        end = min(end, args.deadline - args.reserve - pan)
    budget = max(1.0, end - time.time())
    meta = {"trained_with": "scripts/train_gpu.py", "data": str(args.data.name), "mix": MIX,
            "batch_size": args.batch_size, "lr": args.lr, "degrade_p": args.degrade_p,
            "scale_range": list(args.scale_range), "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda" else "cpu", "init": str(args.init) if args.init else None,
            "packed": {k: v for k, v in json.loads(str(np.load(args.data)["summary"])).items()
                       if k in ("split", "diameter", "jpeg_quality", "train", "val")},
            "packed_note": "images whose median object diameter exceeded 'diameter' px were shrunk to it"}
    meta["split"] = "cpsam_toolkit/models/" + meta["packed"]["split"]
    ckpt, best_path = out / "cpsam_gpu.pt", out / "cpsam_gpu_best.pt"
    step = samples = 0
    best_vl = math.inf
    losses: list[float] = []
    t_train = time.time()
    t_log = t_ckpt = t_train
    bs = args.batch_size
    print(f"training for {budget:.0f} s, batch {bs}", flush=True)

    def save(path: Path, extra: dict) -> None:
        save_checkpoint(net, path, {**meta, **extra, "name": "cpsam_gpu"}, half=True)
        size = path.stat().st_size
        if size > FILE_LIMIT:
            print(f"WARNING: {path.name} is {size / 2**20:.1f} MiB, over the 16 MiB that come back",
                  flush=True)

    while True:
        now = time.time()
        frac = (now - t_train) / budget
        if frac >= 1:
            break
        cosine = 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))
        lr = args.lr * min(1.0, frac / max(args.warmup, 1e-6)) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            with torch.no_grad():
                idx = torch.multinomial(wts, bs, replacement=True, generator=gen)
                x, fl, fg = spatial_batch(train, idx, cfg.tile, tuple(args.scale_range), gen=gen)
                x = intensity_batch(x, train.c[idx], args.degrade_p, gen)
            with autocast():
                y = fwd(x)
            loss = loss_fn(y, fl, fg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            print(f"out of memory: batch {bs}", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - keep what was trained: save and validate below
            import traceback

            traceback.print_exc()
            if fwd is not net:  # torch.compile fails at the first call, not when asked
                print("compiled network failed; continuing eager", flush=True)
                fwd = net
                opt.zero_grad(set_to_none=True)
                continue
            write_jsonl(log_path, {"t": round(time.time() - t_start, 1),
                                   "error": f"{e.__class__.__name__}: {e}"})
            break
        step += 1
        samples += bs
        if step % 10 == 0 or dev.type != "cuda":
            losses.append(float(loss.detach()))
        now = time.time()
        if now - t_log >= args.log_every:
            row = {"t": round(now - t_start, 1), "step": step, "samples": samples, "batch": bs,
                   "lr": lr, "loss": round(float(np.mean(losses)), 5) if losses else None,
                   "samples_per_s": round(samples / (now - t_train), 1)}
            write_jsonl(log_path, row)
            print(json.dumps(row), flush=True)
            losses, t_log = [], now
        if now - t_ckpt >= args.ckpt_every:
            vl = val_loss(net, crops, autocast) if crops is not None else None
            save(ckpt, {"samples": samples, "steps": step, "val_loss": vl})
            if vl is not None and vl < best_vl:
                best_vl = vl
                save(best_path, {"samples": samples, "steps": step, "val_loss": vl})
            row = {"t": round(time.time() - t_start, 1), "checkpoint": step, "samples": samples,
                   "val_loss": vl}
            write_jsonl(log_path, row)
            print(json.dumps(row), flush=True)
            t_ckpt = time.time()

    train_s = time.time() - t_train
    vl = val_loss(net, crops, autocast) if crops is not None else None
    final = {"samples": samples, "steps": step, "val_loss": vl, "train_seconds": round(train_s, 1),
             "samples_per_s": round(samples / max(train_s, 1e-9), 1), "data_seconds": round(t_data, 1)}
    save(ckpt, final)
    best_is_last = vl is not None and vl <= best_vl
    if best_is_last:
        best_vl = vl
        save(best_path, final)
    note = ("flow threshold with the best mean validation AP@0.5 of the packed validation split "
            "(scripts/train_gpu.py)")
    if not args.no_val_ap and len(val):
        t0 = time.time()
        aps = val_ap(net, args.data, dev, deadline=args.deadline and args.deadline - 10)
        ap_s = time.time() - t0
        best_t = max(aps, key=lambda k: aps[k]["mean"])
        final.update({"val_ap50": aps, "val_ap_seconds": round(ap_s, 1)})
        save(ckpt, {**final, "recommended_settings": {"flow_threshold": float(best_t)},
                    "recommended_settings_note": note})
        if best_is_last:
            save(best_path, {**final, "recommended_settings": {"flow_threshold": float(best_t)},
                             "recommended_settings_note": note})
        # the lowest-validation-loss checkpoint too, if it is another one and time allows
        elif best_path.is_file() and \
                (args.deadline is None or time.time() + 1.5 * ap_s + 10 < args.deadline):
            bnet, bmeta = load_checkpoint(best_path)
            baps = val_ap(bnet.to(dev), args.data, dev, deadline=args.deadline and args.deadline - 10)
            bt = max(baps, key=lambda k: baps[k]["mean"])
            final["best_val_ap50"] = baps
            bmeta = {k: v for k, v in bmeta.items() if k not in ("config", "format")}
            save_checkpoint(bnet, best_path, {**bmeta, "val_ap50": baps, "recommended_settings":
                                              {"flow_threshold": float(bt)},
                                              "recommended_settings_note": note}, half=True)
    if args.panoptic_seconds > 0 and train.cls is not None:
        left = args.panoptic_seconds if args.deadline is None else \
            min(args.panoptic_seconds, args.deadline - 20 - time.time())
        if left > 2:
            final["panoptic"] = train_panoptic_phase(net, train, val, args, left,
                                                     out / "cpsam_gpu_panoptic.pt", meta, log_path,
                                                     autocast, gen)
    write_jsonl(log_path, {"t": round(time.time() - t_start, 1), "final": final})
    print(json.dumps({"final": final}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
