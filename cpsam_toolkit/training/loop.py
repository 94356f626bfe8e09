"""The training loop: loss, optimiser, schedule, validation, checkpoints, resume, logs.

Guard rails
-----------
* the starting model is validated first (loss and AP@0.5), so the end report compares
  **base vs final vs best**;
* validation every ``recipe.val_every`` epochs and at the last one; the best checkpoint (highest
  AP@0.5, or lowest validation loss without AP) is kept;
* a resumable state (weights, optimiser, epoch, RNG states, best score, history) is written
  atomically after every epoch; ``resume=True`` continues from it, losing at most the epoch in
  progress;
* randomness is drawn from generators seeded by ``(seed, epoch)``, so a run is reproducible on
  the CPU and a resumed run follows the same path as an uninterrupted one;
* one JSON line per epoch in the log (``epoch, lr, train_loss, val_loss, val_ap50, time``),
  and the same dict passed to ``callback`` (for live plots); ``stop_event`` (a
  ``threading.Event``) stops cleanly after the current step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..metrics import average_precision
from ..network.checkpoints import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
)
from ..network.model import CPSAMNet
from ..segment import CellposeSAM
from ..settings import Settings
from .augment import AugmentConfig, augment_sample, pad_channels, random_affine_crop
from .data import TrainingSet
from .recipes import Recipe, get_recipe

STATE_VERSION = 1


def loss_fn(y: torch.Tensor, flows: torch.Tensor, cellprob: torch.Tensor) -> torch.Tensor:
    """Cellpose loss: ``MSE(pred dY,dX, 5 * unit flows) / 2 + BCEWithLogits(cellprob, mask>0)``
    (mean reductions, as ``cellpose.train._loss_fn_seg``)."""
    y = y.float()
    lf = F.mse_loss(y[:, -3:-1], 5.0 * flows) / 2
    lc = F.binary_cross_entropy_with_logits(y[:, -1], cellprob)
    return lf + lc


@dataclass
class TrainResult:
    """What :func:`train` did; ``report()`` gives the base/final/best comparison as text."""

    out: Path | None
    run_dir: Path
    epochs_done: int
    base: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False

    def report(self) -> str:
        def fmt(d):
            if not d:
                return "n/a"
            parts = [f"epoch {d.get('epoch')}"]
            if d.get("val_ap50") is not None:
                parts.append(f"AP@0.5 {d['val_ap50']:.3f}")
                for g, v in (d.get("val_ap50_groups") or {}).items():
                    parts.append(f"{g} {v:.3f}")
            if d.get("val_loss") is not None:
                parts.append(f"val loss {d['val_loss']:.4f}")
            return ", ".join(parts)

        lines = [f"base  (starting model): {fmt(self.base)}", f"final: {fmt(self.final)}",
                 f"best : {fmt(self.best)}"]
        b, f = self.base.get("val_ap50"), self.final.get("val_ap50")
        if b is not None and f is not None:
            verdict = "improved" if f > b else "did NOT improve"
            bb = self.best.get("val_ap50", f)
            lines.append(f"training {verdict} AP@0.5: {b:.3f} -> {f:.3f} (best {bb:.3f})")
        if self.stopped:
            lines.append(f"stopped early after {self.epochs_done} epochs")
        if self.out is not None:
            lines.append(f"model written to {self.out}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def _torch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2**63 - 1)


def make_batch(data: TrainingSet, idx: Sequence[int], rng: np.random.Generator,
               aug: AugmentConfig, masks_out: list | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augmented ``(images (B,3,S,S), flows (B,2,S,S), cellprob (B,S,S))`` float32 arrays.

    ``masks_out``: if a list, the augmented label crops are appended to it (for ``aux_loss``)."""
    xs, fs, cs = [], [], []
    for i in idx:
        s = data.samples[i]
        img, flw, msk = augment_sample(s.image, s.masks, data.flows(i), rng, aug)
        if masks_out is not None:
            masks_out.append(msk)
        xs.append(img)
        fs.append(flw)
        cs.append((msk > 0).astype(np.float32))
    return np.stack(xs), np.stack(fs), np.stack(cs)


def _val_crops(data: TrainingSet, size: int, max_crops: int = 64):
    """Deterministic validation crops (seed 42, no rotation, scale 1) for the validation loss."""
    rng = np.random.default_rng(42)
    aug = AugmentConfig.spatial_only((1.0, 1.0), "uniform", size=size)
    aug = AugmentConfig(**{**aug.to_dict(), "rotate": False, "flip": False})
    n = len(data)
    order = np.arange(n) if n <= max_crops else np.sort(rng.choice(n, max_crops, replace=False))
    out = []
    for i in order:
        s = data.samples[i]
        img, msk, flw = random_affine_crop(pad_channels(s.image.astype(np.float32)), s.masks,
                                           data.flows(i).astype(np.float32), rng, aug)
        out.append((img, flw, (msk > 0).astype(np.float32)))
    return out


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def validation_loss(net: CPSAMNet, crops, device: torch.device, batch_size: int = 8) -> float | None:
    if not crops:
        return None
    was = net.training
    net.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(crops), batch_size):
            ch = crops[k : k + batch_size]
            x = torch.from_numpy(np.stack([c[0] for c in ch])).to(device)
            fl = torch.from_numpy(np.stack([c[1] for c in ch])).to(device)
            cp = torch.from_numpy(np.stack([c[2] for c in ch])).to(device)
            with _autocast(device):
                y = net(x)
            tot += float(loss_fn(y, fl, cp)) * len(ch)
            n += len(ch)
    net.train(was)
    return tot / n


def validation_ap(
    net: CPSAMNet, data: TrainingSet, device: torch.device,
    settings: Settings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Mean per-image AP@0.5 of full-image segmentation (per group, and the mean of groups),
    with ``settings`` (a :class:`Settings` or a dict of ``segment`` keywords, e.g. the model's
    recommended ``flow_threshold``; default: the defaults). Images are already normalised, so
    ``normalize`` is always off.

    Uses :mod:`cpsam_toolkit.segment` and :mod:`cpsam_toolkit.metrics`; returns ``{}`` (and
    warns) if they cannot run, so a training run never dies in validation.
    """
    was = net.training
    clone = copy.deepcopy(net).eval()  # segment() may convert dtype (bf16 on CUDA)
    try:
        model = CellposeSAM(clone, device=device, name="validation")
        per_group: dict[str, list[float]] = {}
        images = [np.moveaxis(s.image.astype(np.float32), 0, -1) for s in data.samples]
        if not isinstance(settings, Settings):
            settings = Settings().replace(**dict(settings or {}))
        results = model.segment(images, settings.replace(normalize=False))
        for s, r in zip(data.samples, results):
            ap = average_precision(s.masks, np.asarray(r.masks), [0.5])[0]
            per_group.setdefault(s.group or "all", []).append(float(np.ravel(ap)[0]))
    except Exception as e:  # noqa: BLE001 - validation must not kill a long run
        print(f"cpsam train: AP validation failed ({e.__class__.__name__}: {e})", file=sys.stderr)
        return {}
    finally:
        del clone
        net.train(was)
    groups = {g: float(np.mean(v)) for g, v in per_group.items()}
    return {"val_ap50": float(np.mean(list(groups.values()))), "val_ap50_groups": groups}


def _sampler(n: int, recipe: Recipe, rng: np.random.Generator, weights: np.ndarray | None,
             nimg: int | None) -> np.ndarray:
    nimg = nimg or recipe.nimg_per_epoch
    if nimg is None and weights is None:
        k = max(n, recipe.min_nimg_per_epoch)
        reps = math.ceil(k / n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[:k]
    k = max(nimg or n, recipe.min_nimg_per_epoch)
    p = None if weights is None else weights / weights.sum()
    return rng.choice(n, size=k, replace=p is not None or k > n, p=p)


def _group_weights(data: TrainingSet, mix: dict[str, float] | None) -> np.ndarray | None:
    if not mix:
        return None
    counts: dict[str, int] = {}
    for s in data.samples:
        counts[s.group] = counts.get(s.group, 0) + 1
    missing = set(counts) - set(mix)
    if missing:
        raise ValueError(f"mix: no weight for groups {sorted(missing)}")
    return np.array([mix[s.group] / counts[s.group] for s in data.samples], dtype=float)


def _rng_states() -> dict[str, Any]:
    # tensors only, so the state file loads with weights_only=True (the loop itself draws from
    # per-epoch seeded generators; this is recorded for inspection)
    return {"torch": torch.get_rng_state()}


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a resumable training state safely (``weights_only=True``: no code can run)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to resume from {path}: it holds Python objects, not only tensors and plain "
            f"data ({str(e).splitlines()[0][:160]}). States written by cpsam-toolkit only hold "
            "tensors; delete the run folder to start again, or resume only from files you wrote."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"training state {path} is unreadable or truncated ({e}); "
                              "delete it to start again") from None


def _write_log(path: Path | None, history: list[dict[str, Any]], append: dict | None = None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if append is None:  # rewrite from history (after resume), atomically
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
        os.replace(tmp, path)
    else:
        with open(path, "a") as f:
            f.write(json.dumps(append) + "\n")
            f.flush()


def _metrics_row(epoch: int, val: dict[str, Any]) -> dict[str, Any]:
    return {"epoch": epoch, **val}


# ----------------------------------------------------------------------------- train


def train(
    net: CPSAMNet,
    train_data: Any,
    val_data: Any = None,
    recipe: str | Recipe = "finetune",
    out: str | os.PathLike | None = None,
    resume: bool = False,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    log: str | os.PathLike | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    stop_event: Any = None,
    *,
    batch_size: int | None = None,
    nimg_per_epoch: int | None = None,
    val_every: int | None = None,
    val_ap: bool = True,
    mix: dict[str, float] | None = None,
    img_suffix: str = "_img",
    mask_suffix: str = "_masks",
    min_masks: int | None = None,
    layer_drop: float | None = None,
    augment: AugmentConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    cache_flows: bool = True,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    aux_loss: Callable[[torch.Tensor, Sequence[int], list[np.ndarray]], torch.Tensor] | None = None,
    settings: Settings | None = None,
    val_settings: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train (fine-tune, or from scratch) a Cellpose-SAM network.

    Parameters
    ----------
    net : CPSAMNet
        Starting network (trained in place, in fp32; bf16 autocast on CUDA).
    train_data, val_data
        A folder of ``<id>_img.tif`` + ``<id>_masks.tif`` pairs, a list of folders or of
        ``(image, masks)`` arrays/paths, a ``{group: source}`` dict (validation AP is then
        reported per group), or a :class:`TrainingSet`.
    recipe : "finetune", "full", "shipped" or a :class:`Recipe`
    out : path
        Model file to write (our checkpoint format): the best validated weights when
        ``val_data`` is given, else the last. The run folder (``run_dir``, default
        ``<out>.run/``) holds ``state.pt`` (resumable), ``best.pt``, ``last.pt``,
        ``log.jsonl`` and cached flow targets.
    resume : bool
        Continue the run in ``run_dir`` from its last completed epoch. Without it an existing
        run there is an error (nothing is overwritten by accident).
    epochs, lr, batch_size, nimg_per_epoch, val_every, min_masks, layer_drop, augment
        Override the recipe (also that of a resumed run, which otherwise keeps its own).
        ``layer_drop`` is the deepest block's skip probability: the paper's 0.4 is for
        ViT-L (24 blocks); the shipped small model has 4 blocks and was trained with 0.1.
    seed : int
        Same seed, data and device -> the same weights (on the CPU).
    log : path
        JSON-lines log, one dict per epoch (default ``<run_dir>/log.jsonl``).
    callback : callable
        Called with each epoch's log dict (and once with the base validation, epoch -1).
    stop_event : threading.Event
        When set, training stops after the current step; the last completed epoch stays
        resumable and ``out`` receives the best/last weights so far.
    mix : dict
        Sampling weight of each group of a ``{group: source}`` training set.
    aux_loss : callable
        Extra training-loss term, called as ``aux_loss(y, indices, label_crops)`` with the
        network output, the training-set indices of the batch and their augmented label crops;
        its value is added to the segmentation loss (e.g. the class loss of
        :func:`cpsam_toolkit.panoptic.train_panoptic`). Not part of the validation loss.
    settings : Settings
        The segmentation settings of the validation AP (default: the defaults). Values set in
        them (not defaults) are stored in the model file as its ``recommended_settings``, so
        ``load_model(out).settings`` gives them back.
    val_settings : dict, optional
        ``segment`` keywords of the validation AP on top of ``settings`` (e.g.
        ``{"flow_threshold": 0.8}``, the model's recommended settings); not stored.
    """

    rec = get_recipe(recipe)
    over = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size,
                                  nimg_per_epoch=nimg_per_epoch, val_every=val_every,
                                  min_masks=min_masks, layer_drop=layer_drop,
                                  augment=augment).items() if v is not None}
    if layer_drop is not None and not 0 <= layer_drop < 1:
        raise ValueError(f"layer_drop must be in [0, 1), got {layer_drop}")
    if nimg_per_epoch is not None:  # an explicit number of images per epoch wins over the minimum
        over["min_nimg_per_epoch"] = min(rec.min_nimg_per_epoch, nimg_per_epoch)
    rec = rec.replace(**over) if over else rec
    dev = resolve_device(device)
    if out is None and run_dir is None:
        raise ValueError("train: give out= (the model file to write) or run_dir=")
    out = Path(out) if out is not None else None
    run = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    log_path = Path(log) if log is not None else run / "log.jsonl"
    cache_dir = run / "flows" if cache_flows else None

    if state_path.exists() and not resume:
        raise FileExistsError(
            f"a training run already exists in {run} (state.pt); continue it with resume=True "
            "(--resume), or choose another output / delete that folder"
        )

    t_load = time.time()
    tr = TrainingSet.build(train_data, img_suffix=img_suffix, mask_suffix=mask_suffix,
                           min_masks=rec.min_masks, cache_dir=cache_dir)
    va = (TrainingSet.build(val_data, img_suffix=img_suffix, mask_suffix=mask_suffix,
                            min_masks=1, cache_dir=cache_dir) if val_data is not None else None)
    if tr.skipped:
        print(f"cpsam train: skipped {len(tr.skipped)} training images with < {rec.min_masks} masks",
              file=sys.stderr)
    tr.compute_flows(progress=progress)
    if va is not None:
        va.compute_flows(progress=progress)
    weights = _group_weights(tr, mix)
    val_crops = _val_crops(va, net.cfg.tile) if va is not None else []
    load_time = time.time() - t_load

    net.to(dev).float()
    net.encoder.layer_drop = rec.layer_drop
    decay, no_decay = [], []
    for n_, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos" in n_ else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": rec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=rec.lr_at(0),
    )

    history: list[dict[str, Any]] = []
    start = 0
    base: dict[str, Any] = {}
    best: dict[str, Any] = {}
    best_score = -math.inf
    if resume and state_path.exists():
        st = load_training_state(state_path)
        if st.get("version") != STATE_VERSION:
            raise CheckpointError(f"{state_path}: unknown training-state version {st.get('version')}")
        load_state_strict(net, st["net"], str(state_path))
        net.to(dev)
        opt.load_state_dict(st["optimizer"])
        start, history, base, best = st["epoch"], st["history"], st["base"], st["best"]
        best_score = st["best_score"]
        if st.get("recipe"):  # a resumed run keeps its own recipe; explicit arguments still win
            saved = Recipe.from_dict(st["recipe"])
            rec = saved.replace(**over) if over else saved
            net.encoder.layer_drop = rec.layer_drop
        print(f"cpsam train: resuming {run} after epoch {start} of {rec.epochs}", file=sys.stderr)
        _write_log(log_path, history)
    elif resume:
        print(f"cpsam train: nothing to resume in {run}; starting a new run", file=sys.stderr)

    def validate(epoch: int, with_ap: bool) -> dict[str, Any]:
        if va is None:
            return {}
        res: dict[str, Any] = {"val_loss": validation_loss(net, val_crops, dev)}
        if with_ap and val_ap:
            res.update(validation_ap(net, va, dev, val_used))
        return res

    def score(v: dict[str, Any]) -> float | None:
        if v.get("val_ap50") is not None:  # ties (e.g. all 0 early on) go to the lower validation loss
            return v["val_ap50"] - 1e-6 * v.get("val_loss", 0.0)
        if v.get("val_loss") is not None:
            return -v["val_loss"]
        return None

    def save_state(epoch_done: int) -> None:
        atomic_save({
            "version": STATE_VERSION, "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "optimizer": opt.state_dict(), "epoch": epoch_done, "history": history, "base": base,
            "best": best, "best_score": best_score, "recipe": rec.to_dict(), "seed": seed,
            "rng": _rng_states(), "config": net.cfg.to_dict(), "start_model": (meta or {}).get("start_model"),
        }, state_path)

    data_desc = {"train": tr.description, "n_train": len(tr), "val": va.description if va else None,
                 "n_val": len(va) if va else 0}

    val_used = (settings or Settings()).replace(**dict(val_settings or {}))
    recommended = {}
    if settings is not None and settings.non_default():
        recommended = {"recommended_settings": {k: v for k, v in settings.to_dict().items()
                                                if k in settings.non_default()}}

    def model_meta(kind: str, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"trained_with": "cpsam_toolkit.training", "recipe": rec.name, "recipe_params": rec.to_dict(),
                "data": data_desc, "epochs": epoch, "checkpoint": kind, "val": metrics, "base_val": base,
                "seed": seed, **recommended, **(meta or {})}

    if start == 0 and not base:
        t0 = time.time()
        base = _metrics_row(-1, validate(-1, True)) if va is not None else {}
        if base:
            base["time"] = time.time() - t0
            base["base"] = True
            history.append(base)
            _write_log(log_path, history)
            if callback:
                callback(dict(base))
            s0 = score(base)
            if s0 is not None:
                best_score, best = s0, dict(base)
                save_checkpoint(net, run / "best.pt", model_meta("best", 0, base))
        save_state(0)

    steps_per_epoch = math.ceil(len(_sampler(len(tr), rec, _rng(seed, 0, 1), weights, None)) / rec.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(rec.epochs - start) * steps_per_epoch, unit="step", desc="train",
                   dynamic_ncols=True, file=sys.stderr)
    net.train()
    stopped = False
    epoch = start
    try:
        for epoch in range(start, rec.epochs):
            t0 = time.time()
            rng = _rng(seed, epoch, 1)
            torch.manual_seed(_torch_seed(seed, epoch))
            lr_e = rec.lr_at(epoch, lr)
            for g in opt.param_groups:
                g["lr"] = lr_e
            order = _sampler(len(tr), rec, rng, weights, None)
            losses = []
            for k in range(0, len(order), rec.batch_size):
                if stop_event is not None and stop_event.is_set():
                    stopped = True
                    break
                idx, crops = order[k : k + rec.batch_size], ([] if aux_loss is not None else None)
                x, fl, cp = make_batch(tr, idx, rng, rec.augment, masks_out=crops)
                x, fl, cp = (torch.from_numpy(a).to(dev) for a in (x, fl, cp))
                with _autocast(dev):
                    y = net(x)
                loss = loss_fn(y, fl, cp)
                if aux_loss is not None:
                    loss = loss + aux_loss(y, idx, crops)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if rec.grad_clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), rec.grad_clip)
                opt.step()
                losses.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}", lr=f"{lr_e:.2e}")
            if stopped:
                break
            last = epoch == rec.epochs - 1
            do_val = va is not None and (last or (epoch + 1) % max(1, rec.val_every) == 0)
            v = validate(epoch, True) if do_val else {}
            row = {"epoch": epoch, "lr": lr_e, "train_loss": float(np.mean(losses)),
                   "val_loss": v.get("val_loss"), "val_ap50": v.get("val_ap50"),
                   "time": time.time() - t0}
            if v.get("val_ap50_groups"):
                row["val_ap50_groups"] = v["val_ap50_groups"]
            if epoch == start and start > 0:
                row["resumed_from"] = start
            history.append(row)
            sc = score(v) if v else None
            if sc is not None and sc > best_score:
                best_score, best = sc, dict(row)
                save_checkpoint(net, run / "best.pt", model_meta("best", epoch + 1, row))
            save_checkpoint(net, run / "last.pt", model_meta("last", epoch + 1, row))
            save_state(epoch + 1)
            _write_log(log_path, history, append=row)
            if callback:
                callback(dict(row))
            if bar is not None:
                msg = f"epoch {epoch}: loss {row['train_loss']:.4f}"
                if row["val_loss"] is not None:
                    msg += f", val loss {row['val_loss']:.4f}"
                if row["val_ap50"] is not None:
                    msg += f", val AP@0.5 {row['val_ap50']:.3f}"
                bar.write(msg, file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()

    done = len([h for h in history if h.get("epoch", -1) >= 0])
    finals = [h for h in history if h.get("epoch", -1) >= 0
              and (h.get("val_loss") is not None or h.get("val_ap50") is not None)]
    final = dict(finals[-1]) if finals else (dict(history[-1]) if history else {})
    result = TrainResult(out, run, done, base, final, best, history, stopped)
    if out is not None:
        src = run / "best.pt" if (va is not None and (run / "best.pt").exists()) else None
        if src is not None:
            best_net, best_meta = load_checkpoint(src)
            m = {k: v for k, v in best_meta.items() if k not in ("config", "format")}
            m.update({"final_val": final, "best_val": best, "base_val": base, "epochs": done})
            save_checkpoint(best_net, out, m)
        else:
            save_checkpoint(net, out, model_meta("last", done, final))
    summary = {"summary": True, "base": base, "final": final, "best": best, "epochs": done,
               "stopped": stopped, "load_time": load_time}
    _write_log(log_path, history, append=summary)
    if progress:
        print(result.report(), file=sys.stderr)
    return result
