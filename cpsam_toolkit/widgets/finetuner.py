"""``Finetuner``: fine-tune a model on (corrected) images from the notebook, in the background.

Pick the training and validation images, a recipe, the number of epochs and the learning rate,
press Start: :func:`cpsam_toolkit.training.train` runs in a background thread (the notebook
stays usable), its per-epoch callback feeds a live loss / validation-AP plot and a progress bar,
Stop ends it cleanly after the current step. At the end the base-vs-finetuned comparison is
shown; when the best validated epoch beats the starting model, ``finetuner.model`` is the
finetuned :class:`~cpsam_toolkit.segment.CellposeSAM` (ready for a
:class:`~cpsam_toolkit.widgets.Viewer`) and "Save model (epoch N)" writes that epoch's weights.
A run that does not beat the starting model says so and offers no model.

Training works in one temporary folder per Finetuner, emptied at each Start and removed when
the Finetuner goes away; only the chosen weights are kept there after a run.
"""

from __future__ import annotations

import copy
import html
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

from ..io import imread, write_atomic
from ..segment import load_model
from ..training import RECIPES, TrainingSet, get_recipe, train
from ..training.data import find_pairs
from ._base import (
    MASK_KEYS,
    Panel,
    figure_png,
    fmt,
    html_table,
    report_errors,
    resolve_settings,
    safe_output_dir,
    status_html,
)


def _load(x: Any) -> np.ndarray:
    return imread(x) if isinstance(x, (str, os.PathLike)) else np.asarray(x)


class Finetuner(Panel):
    """Fine-tune ``model`` on image/mask pairs.

    Parameters
    ----------
    model : CellposeSAM
        The starting (base) model; it is not modified (training works on a copy).
    data : list of (image, masks), or a training folder, optional
        Images and labels as arrays or file paths (``<id>_img`` / ``<id>_masks`` for a folder).
    corrector : Corrector, optional
        Its saved corrections are added to the list (and again with "add corrected").
    names : list of str, optional
        Names of the pairs in ``data`` (default: image file stems, or ``pair i``).
    viewer : Viewer, optional
        "use model" loads the finetuned model into it (and into ``corrector``).
    val_fraction : float
        Share of the images selected for validation by default (at least one when there are
        two or more images).
    recipe, epochs, lr, seed
        Defaults of the controls (see :mod:`cpsam_toolkit.training.recipes`); the recipe's
        warm-up is shortened to a tenth of the epochs for short runs.
    out : path, optional
        Default file for Save (``finetuned.pt`` in the working directory, beside the notebook).
    recipe_overrides : dict, optional
        Other recipe fields (``batch_size``, ``layer_drop``, ``schedule`` ...), e.g. the shipped
        small model's ``lr=3e-4, layer_drop=0.1, batch_size=2`` (docs/finetuning.md).
    """

    def __init__(
        self,
        model: Any,
        data: Any = None,
        *,
        corrector: Any = None,
        names: Sequence[str] | None = None,
        viewer: Any = None,
        val_fraction: float = 0.25,
        recipe: str = "finetune",
        epochs: int = 10,
        lr: float | None = None,
        seed: int = 0,
        out: str | os.PathLike = "finetuned.pt",
        recipe_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.base_model = model
        self.corrector = corrector
        self.viewer = viewer
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self._pairs: list[tuple[str, Any, Any]] = []  # (name, image, masks) as given (paths or arrays)
        self.history: list[dict[str, Any]] = []
        self.result: Any = None
        self.model: Any = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.recipe_overrides = dict(recipe_overrides or {})
        # validation AP with the model's recommended post-processing (what the viewer shows)
        values, sources = resolve_settings(model)
        self.val_settings = {k: values[k] for k in MASK_KEYS if sources[k] != "default"}
        self._run_dir: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self.improved: bool | None = None  # None: not trained yet, or no validation images
        self._last_plot = 0.0

        self.status = W.HTML()
        guard = report_errors(self.status)
        self.train_select = W.SelectMultiple(options=[], rows=6, description="train",
                                             layout=W.Layout(width="330px"))
        self.val_select = W.SelectMultiple(options=[], rows=6, description="validation",
                                           layout=W.Layout(width="330px"))
        self.add_button = W.Button(description="add corrected", icon="refresh",
                                   tooltip="add the images saved in the corrector")
        self.recipe = W.Dropdown(options=sorted(RECIPES), value=recipe, description="recipe",
                                 layout=W.Layout(width="220px"))
        self.epochs = W.BoundedIntText(value=int(epochs), min=1, max=100000, description="epochs",
                                       layout=W.Layout(width="160px"))
        self.lr = W.BoundedFloatText(value=float(lr if lr is not None else get_recipe(recipe).lr),
                                     min=1e-9, max=1.0, step=1e-6, description="learning rate",
                                     layout=W.Layout(width="220px"), style={"description_width": "90px"})
        self.recipe.observe(self._on_recipe, "value")
        self.start_button = W.Button(description="Start", icon="play", button_style="success")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="danger", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="epochs",
                                      layout=W.Layout(width="420px"))
        self.plot = W.Image(format="png", layout=W.Layout(width="900px"))
        self.comparison = W.HTML()
        self.save_path = W.Text(value=str(out), description="save to", layout=W.Layout(width="420px"))
        self.save_button = W.Button(description="Save model", icon="save", button_style="primary",
                                    disabled=True)
        self.use_button = W.Button(description="use model", icon="check", disabled=True,
                                   tooltip="load the finetuned model into the viewer / corrector",
                                   layout=W.Layout(display="" if (viewer or corrector) else "none"))
        self.start_button.on_click(guard(lambda _b: self.start()))
        self.stop_button.on_click(guard(lambda _b: self.stop()))
        self.save_button.on_click(guard(lambda _b: self.save()))
        self.use_button.on_click(guard(lambda _b: self.use()))
        self.add_button.on_click(guard(lambda _b: self.add_corrected()))
        self.add_button.layout.display = "" if corrector is not None else "none"

        self.widget = W.VBox([
            W.HBox([self.train_select, self.val_select, self.add_button]),
            W.HBox([self.recipe, self.epochs, self.lr]),
            W.HBox([self.start_button, self.stop_button, self.progress]),
            self.status,
            self.plot,
            self.comparison,
            W.HBox([self.save_path, self.save_button, self.use_button]),
        ])
        if data is not None:
            self.add(data, names)
        if corrector is not None:
            self.add_corrected()
        vs = ", ".join(f"{k}={v} (model)" for k, v in self.val_settings.items())
        self.status.value = status_html(
            f"{len(self._pairs)} images; base model {html.escape(str(model.name))}"
            + (f"; validation AP with {html.escape(vs)}" if vs else ""))

    # -- data -----------------------------------------------------------------------------
    def add(self, data: Any, names: Sequence[str] | None = None) -> None:
        """Add ``(image, masks)`` pairs (arrays or paths) or a training folder."""
        if isinstance(data, (str, os.PathLike)):
            data = find_pairs(data)
        data = list(data)
        known = {n for n, _, _ in self._pairs}
        for i, (img, msk) in enumerate(data):
            if names is not None:
                name = str(names[i])
            elif isinstance(img, (str, os.PathLike)):
                name = Path(img).stem
            else:
                name = f"pair {len(self._pairs)}"
            if name in known:
                # replace (a re-saved correction)
                self._pairs = [p for p in self._pairs if p[0] != name]
            known.add(name)
            self._pairs.append((name, img, msk))
        self._update_selectors()

    def add_corrected(self) -> int:
        """Add (or refresh) the corrector's saved images; returns how many it has."""
        if self.corrector is None:
            return 0
        pairs = self.corrector.corrected()
        names = [Path(m).name[: -len("_masks.tif")] for _, m in pairs]
        self.add(pairs, names)
        return len(pairs)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self._pairs]

    def _update_selectors(self) -> None:
        names = self.names
        old_t, old_v = set(self.train_select.value), set(self.val_select.value)
        self.train_select.options = names
        self.val_select.options = names
        new = [n for n in names if n not in old_t | old_v]
        n_val = 0 if len(names) < 2 else max(1, int(round(self.val_fraction * len(names))))
        val = [n for n in names if n in old_v]
        for n in reversed(new):  # fill the validation set from the newest images
            if len(val) >= n_val:
                break
            val.append(n)
        self.val_select.value = tuple(n for n in names if n in val)
        self.train_select.value = tuple(n for n in names if n not in val and (n in old_t or n in new))

    def _on_recipe(self, change: dict) -> None:
        self.lr.value = get_recipe(change["new"]).lr

    def set_split(self, train: Sequence[str] | None = None, val: Sequence[str] | None = None) -> None:
        """Choose the training and validation images by name (None: every other image)."""
        names = self.names
        for n in [*(train or ()), *(val or ())]:
            if n not in names:
                raise ValueError(f"no image named {n!r}; images: {', '.join(names)}")
        if val is None:
            val = [n for n in names if n not in set(train or ())]
        if train is None:
            train = [n for n in names if n not in set(val)]
        self.val_select.value = tuple(n for n in names if n in set(val))
        self.train_select.value = tuple(n for n in names if n in set(train))

    def split(self) -> tuple[list[str], list[str]]:
        """The selected (training, validation) image names."""
        return list(self.train_select.value), list(self.val_select.value)

    def _training_set(self, names: list[str]) -> Any:
        by = {n: (i, m) for n, i, m in self._pairs}
        arrays = [(_load(by[n][0]), _load(by[n][1])) for n in names]
        return TrainingSet.build(arrays, names=names, min_masks=1)

    # -- training -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, wait: bool = False) -> None:
        """Start training in a background thread (``wait=True``: block until it ends)."""
        if self.running:
            raise RuntimeError("training is already running (Stop it first)")
        train_names, val_names = self.split()
        if not train_names:
            raise ValueError("select at least one training image")
        both = set(train_names) & set(val_names)
        if both:
            raise ValueError(f"images both in training and validation: {', '.join(sorted(both))}")
        epochs = int(self.epochs.value)
        rec = get_recipe(self.recipe.value)
        rec = rec.replace(epochs=epochs, lr=float(self.lr.value),
                          warmup_epochs=min(rec.warmup_epochs, epochs // 10),
                          val_every=max(1, min(rec.val_every, epochs // 5 or 1)), min_masks=1)
        if self.recipe_overrides:
            rec = rec.replace(**self.recipe_overrides)
        self.status.value = status_html("loading images and computing flow targets …")
        tr = self._training_set(train_names)
        va = self._training_set(val_names) if val_names else None
        self._run_dir = self._fresh_work_dir()
        self.history, self.result, self.model, self.error = [], None, None, None
        self.improved = None
        self.save_button.description = "Save model"
        self._stop.clear()
        self.progress.max, self.progress.value = epochs, 0
        self.progress.bar_style = ""
        self.comparison.value = ""
        self.start_button.disabled, self.stop_button.disabled = True, False
        self.save_button.disabled = self.use_button.disabled = True
        self._thread = threading.Thread(target=self._run, args=(tr, va, rec), daemon=True,
                                        name="cpsam-finetune")
        self._thread.start()
        self.status.value = status_html(
            f"training on {len(tr)} images, validating on {len(va) if va else 0} …")
        if wait:
            self.wait()

    def _fresh_work_dir(self) -> Path:
        """The Finetuner's one working folder, emptied (removed with the Finetuner)."""
        if self._run_dir is None or not self._run_dir.is_dir():
            self._run_dir = Path(tempfile.mkdtemp(prefix="cpsam-finetune-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._run_dir), True)
        for p in self._run_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return self._run_dir

    def close(self) -> None:
        """Remove the working folder now (a saved model is not affected)."""
        if self._cleanup is not None:
            self._cleanup()
        self._run_dir = None

    def stop(self) -> None:
        """Ask the training to stop after the current step (the best weights so far are kept)."""
        self._stop.set()
        self.status.value = status_html("stopping after the current step …", "warn")

    def wait(self, timeout: float | None = None) -> Any:
        """Block until training ends; returns the :class:`~cpsam_toolkit.training.TrainResult`
        (re-raises a training error)."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def _run(self, tr: Any, va: Any, rec: Any) -> None:
        try:
            net = copy.deepcopy(self.base_model.net).float()
            out = self._run_dir / "finetuned.pt"  # type: ignore[operator]
            self.result = train(net, tr, va, recipe=rec, out=out, seed=self.seed,
                                device=getattr(self.base_model, "device", None),
                                callback=self._on_epoch, stop_event=self._stop, progress=False,
                                meta={"base_model": str(self.base_model.name)},
                                val_settings=self.val_settings)
            shutil.rmtree(out.with_name(out.name + ".run"), ignore_errors=True)  # keep only the weights
            b, f = self.result.base.get("val_ap50"), (self.result.best or {}).get("val_ap50")
            self.improved = None if (b is None or f is None) else bool(f > b)
            if self.improved is not False:
                self.model = load_model(out, device=getattr(self.base_model, "device", None))
                self.model.name = f"{self.base_model.name} (finetuned)"
                # the base model's settings, except diameter="auto": its size model was fitted to
                # the base encoder, and finetuning taught the network the objects at this scale
                base_info = getattr(self.base_model, "info", None) or {}
                rec_base = dict(base_info.get("recommended_settings") or {})
                if rec_base.get("diameter") == "auto":
                    del rec_base["diameter"]
                self.model.info.setdefault("recommended_settings", rec_base)
            self._finished()
        except BaseException as e:  # noqa: BLE001 - shown in the panel, re-raised by wait()
            self.error = e
            self.progress.bar_style = "danger"
            self.status.value = status_html(f"training failed: {html.escape(type(e).__name__)}: "
                                            f"{html.escape(str(e))}", "error")
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True

    def _on_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(dict(row))
        ep = int(row.get("epoch", -1))
        if ep >= 0:
            self.progress.value = min(ep + 1, self.progress.max)
            msg = f"epoch {ep + 1}/{self.progress.max}: loss {row.get('train_loss', math.nan):.4f}"
            if row.get("val_loss") is not None:
                msg += f", val loss {row['val_loss']:.4f}"
            if row.get("val_ap50") is not None:
                msg += f", val AP@0.5 {row['val_ap50']:.3f}"
            self.status.value = status_html(msg)
        else:
            self.status.value = status_html(
                f"base model: val AP@0.5 {fmt(row.get('val_ap50'))}, val loss {fmt(row.get('val_loss'), 4)}")
        now = time.monotonic()
        if now - self._last_plot > 0.5 or ep == self.progress.max - 1:
            self._last_plot = now
            self.plot.value = self.curve_png()

    def curve_png(self) -> bytes:
        """Training loss, validation loss and validation AP@0.5 as PNG (three panels: the two
        losses are on different scales)."""
        from matplotlib.figure import Figure

        rows = [h for h in self.history if h.get("epoch", -1) >= 0]
        base = next((h for h in self.history if h.get("epoch", 0) < 0), {})
        fig = Figure(figsize=(11, 3), layout="constrained")
        ax0, ax1, ax2 = fig.subplots(1, 3)
        ep = [h["epoch"] + 1 for h in rows]
        ax0.plot(ep, [h.get("train_loss") for h in rows], "o-", ms=3, color="C0")
        ax0.set(xlabel="epoch", ylabel="loss", title="training loss")
        vl = [(h["epoch"] + 1, h["val_loss"]) for h in rows if h.get("val_loss") is not None]
        if base.get("val_loss") is not None:
            ax1.axhline(base["val_loss"], color="grey", ls="--", label="starting model")
            vl = [(0, base["val_loss"])] + vl
        if vl:
            ax1.plot(*zip(*vl), "s-", ms=3, color="C1", label="finetuned")
            ax1.legend(fontsize="small")
        ax1.set(xlabel="epoch", ylabel="loss", title="validation loss")
        va = [(h["epoch"] + 1, h["val_ap50"]) for h in rows if h.get("val_ap50") is not None]
        if base.get("val_ap50") is not None:
            ax2.axhline(base["val_ap50"], color="grey", ls="--", label="starting model")
            va = [(0, base["val_ap50"])] + va
        if va:
            ax2.plot(*zip(*va), "o-", ms=3, color="C2", label="finetuned")
        best = (self.result.best if self.result is not None else {}) or {}
        if best.get("val_ap50") is not None and best.get("epoch", -1) >= 0:
            ax2.plot([best["epoch"] + 1], [best["val_ap50"]], "*", ms=12, color="C3", label="best (kept)")
        ax2.set(xlabel="epoch", ylabel="AP@0.5", title="validation AP@0.5", ylim=(0, 1.02))
        if va:
            ax2.legend(fontsize="small")
        return figure_png(fig, dpi=80)

    def _finished(self) -> None:
        r = self.result
        self.plot.value = self.curve_png()
        rows = []
        for label, d in (("base (starting model)", r.base), ("final", r.final), ("best (kept)", r.best)):
            rows.append({"model": label, "epoch": None if not d else (d.get("epoch", -1) + 1),
                         "ap50": d.get("val_ap50") if d else None,
                         "val_loss": d.get("val_loss") if d else None})
        table = html_table(rows, [("model", "model"), ("epoch", "epochs"), ("ap50", "val AP@0.5"),
                                  ("val_loss", "val loss")])
        b, f = r.base.get("val_ap50"), (r.best or {}).get("val_ap50")
        best_epoch = (r.best or {}).get("epoch", -1) + 1
        if self.improved:
            verdict = status_html(f"finetuning improved validation AP@0.5: {b:.3f} → {f:.3f} (best: epoch "
                                  f"{best_epoch}, the weights Save writes)", "ok")
            self.save_button.description = f"Save model (epoch {best_epoch})"
        elif self.improved is False:
            verdict = status_html(f"finetuning did NOT improve validation AP@0.5 ({b:.3f} → best {f:.3f}): "
                                  "keep the starting model (no finetuned model is offered); train longer, "
                                  "with more images, or another learning rate", "warn")
            self.save_button.description = "nothing better to save"
        else:
            verdict = status_html("no validation images: no comparison (Save writes the last epoch)", "warn")
            self.save_button.description = f"Save model (epoch {r.epochs_done}, not validated)"
        stopped = " (stopped early)" if r.stopped else ""
        self.comparison.value = f"<b>comparison{stopped}</b>{table}<div>{verdict}</div>"
        self.progress.bar_style = "success" if not r.stopped else "warning"
        self.save_button.disabled = self.use_button.disabled = self.model is None
        self.status.value = status_html(f"done: {r.epochs_done} epochs{stopped}", "ok")

    # -- results --------------------------------------------------------------------------
    @property
    def saved_epoch(self) -> int | None:
        """The epoch (1-based) whose weights :meth:`save` writes: the best validated one (the
        last one without validation images); None before training."""
        if self.result is None:
            return None
        if self.result.best and self.result.best.get("epoch", -1) >= 0:
            return int(self.result.best["epoch"]) + 1
        return int(self.result.epochs_done)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the finetuned weights (the best validated epoch, :attr:`saved_epoch`) to
        ``path`` atomically; refused when finetuning did not beat the starting model."""
        if self.result is None or self.result.out is None:
            raise RuntimeError("nothing to save: train first")
        if self.model is None:
            raise RuntimeError("finetuning did not improve on the starting model: nothing better to save")

        target = Path(path or self.save_path.value)
        safe_output_dir(target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp: shutil.copyfile(self.result.out, tmp))
        self.status.value = status_html(
            f"saved epoch {self.saved_epoch} to {html.escape(str(target))}", "ok")
        return target

    def use(self) -> Any:
        """Give the finetuned model to the attached viewer (re-segments) and corrector."""
        if self.model is None:
            raise RuntimeError("no finetuned model yet")
        if self.viewer is not None:
            self.viewer.set_model(self.model)
        if self.corrector is not None:
            self.corrector.set_model(self.model)
        self.status.value = status_html(f"now using {html.escape(self.model.name)}", "ok")
        return self.model

    def comparison_table(self) -> list[dict[str, Any]]:
        """Base / final / best validation AP@0.5 and loss as rows."""
        if self.result is None:
            return []
        r = self.result
        return [{"model": k, "val_ap50": d.get("val_ap50"), "val_loss": d.get("val_loss")}
                for k, d in (("base", r.base), ("final", r.final), ("best", r.best))]
