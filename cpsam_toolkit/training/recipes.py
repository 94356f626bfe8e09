"""Training recipes: learning rate, schedule, batch, regularisation and augmentation in one place.

``finetune``
    The paper's fine-tuning setup (Methods, "Fine-tuning and evaluation"): AdamW lr 1e-5,
    weight decay 0.1, layer drop 0.4, batch 1, 100 epochs, >= 8 images per epoch, linear
    warm-up over 10 epochs, then the learning rate halves every 10 epochs over the last 50
    (the paper's wording; the reference code ``cellpose.train.train_seg`` halves every *5*
    epochs, 10 times, over the last 50 — set ``halve_every=5`` for that), augmentation:
    rotation, flips, scale uniform in [0.75, 1.25], 256x256 crops.
``full``
    The paper's whole-dataset setup: lr 5e-5 with 10 warm-up epochs, then /10 for the last 5%
    of the epochs and another /10 for the last 2.5% (100 and 50 of 2000 epochs in the paper),
    larger batches, scale log-uniform in [0.25, 4], and all intensity augmentations and
    degradations (grayscale, inversion, channel drop and permutation, brightness/contrast,
    Poisson noise, blur, downsampling, anisotropic blur).
``shipped``
    The recipe of the small model shipped in ``cpsam_toolkit/models`` (trained from scratch on
    2 shared CPU cores): ``full``-style augmentation with the scale range narrowed to
    log-uniform [0.5, 2] (the training sets already span 10-100 px objects), a higher learning
    rate for a randomly initialised network, gradient clipping, less layer drop, 150 epochs of
    64 images (first planned as 60; stretched at epoch 14, before any learning-rate step, because
    the network was still on its initial loss plateau — the schedule is identical up to then).
    The shipped run itself was resumed after epoch 50 with lr 1e-3 and 260 epochs (still
    before any learning-rate step), because the flows were learned too slowly at 4e-4; its
    model card lists the exact commands.

Scale augmentation draws the zoom relative to each image's own pixel size; the paper's
whole-dataset training first rescales images to a 30 px mean diameter, which is not done here
(Cellpose-SAM is meant to run without resizing, and the fine-tuning recipe does not rescale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .augment import AugmentConfig


@dataclass(frozen=True)
class Recipe:
    """Everything about *how* to train, independent of the data and the network.

    Parameters
    ----------
    name : str
    lr : float
        Peak learning rate (AdamW).
    epochs : int
    batch_size : int
    weight_decay : float
    layer_drop : float
        Encoder layer-drop rate during training (the last block's drop probability).
    warmup_epochs : int
        Linear warm-up: epoch ``e`` < warmup uses ``lr * (e + 1) / warmup``.
    schedule : "halving" or "steps"
        ``halving``: over the last ``halving_epochs`` epochs the rate halves every
        ``halve_every`` epochs (only when ``epochs >= 2 * halving_epochs``; shorter runs scale
        the window to the last half). ``steps``: multiply by ``factor`` from
        ``fraction * epochs`` on, for each ``(fraction, factor)`` in ``steps``.
    nimg_per_epoch : int or None
        Images drawn per epoch (None: every training image once); at least ``min_nimg_per_epoch``.
    min_masks : int
        Training images with fewer masks are skipped.
    grad_clip : float or None
        Clip the gradient norm (None: off, as in the reference).
    val_every : int
        Validate (loss and AP@0.5) every this many epochs, and at the last epoch.
    augment : AugmentConfig
    """

    name: str = "custom"
    lr: float = 1e-5
    epochs: int = 100
    batch_size: int = 1
    weight_decay: float = 0.1
    layer_drop: float = 0.4
    warmup_epochs: int = 10
    schedule: str = "halving"
    halving_epochs: int = 50
    halve_every: int = 10
    steps: tuple[tuple[float, float], ...] = ()
    nimg_per_epoch: int | None = None
    min_nimg_per_epoch: int = 8
    min_masks: int = 5
    grad_clip: float | None = None
    val_every: int = 10
    augment: AugmentConfig = field(default_factory=AugmentConfig.spatial_only)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"recipe {self.name!r}: lr, epochs and batch_size must be positive")
        if self.schedule not in ("halving", "steps", "constant"):
            raise ValueError(f"recipe {self.name!r}: schedule must be 'halving', 'steps' or 'constant'")

    def lr_at(self, epoch: int, lr: float | None = None) -> float:
        """Learning rate of (0-based) ``epoch``."""
        base = self.lr if lr is None else lr
        if self.warmup_epochs and epoch < self.warmup_epochs:
            return base * (epoch + 1) / self.warmup_epochs
        if self.schedule == "halving":
            window, every = self.halving_epochs, self.halve_every
            if self.epochs < 2 * window:  # short run: halve over the last half, 5 times
                window = self.epochs // 2
                every = max(1, window // 5)
            start = self.epochs - window
            if window > 0 and epoch >= start:
                return base * 0.5 ** (1 + (epoch - start) // every)
            return base
        if self.schedule == "steps":
            f = 1.0
            for frac, factor in self.steps:
                if epoch >= int(round(frac * self.epochs)):
                    f = factor
            return base * f
        return base

    def replace(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [list(s) for s in self.steps]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = dict(d)
        aug = d.pop("augment", None)
        d["steps"] = tuple(tuple(s) for s in d.get("steps", ()))
        if aug is not None:
            aug = dict(aug)
            for k in ("scale_range", "contrast_range", "poisson_photons", "blur_sigma",
                      "downsample_factor", "aniso_factor"):
                if k in aug:
                    aug[k] = tuple(aug[k])
            d["augment"] = AugmentConfig(**aug)
        return cls(**d)


FULL_AUGMENT = AugmentConfig()  # paper defaults: log-uniform 0.25-4 and all intensity augmentations

RECIPES: dict[str, Recipe] = {
    "finetune": Recipe(
        name="finetune", lr=1e-5, epochs=100, batch_size=1, weight_decay=0.1, layer_drop=0.4,
        warmup_epochs=10, schedule="halving", halving_epochs=50, halve_every=10,
        min_nimg_per_epoch=8, min_masks=5, val_every=10,
        augment=AugmentConfig.spatial_only((0.75, 1.25), "uniform"),
    ),
    "full": Recipe(
        name="full", lr=5e-5, epochs=2000, batch_size=8, weight_decay=0.1, layer_drop=0.4,
        warmup_epochs=10, schedule="steps", steps=((0.95, 0.1), (0.975, 0.01)),
        min_nimg_per_epoch=8, min_masks=5, val_every=50, augment=FULL_AUGMENT,
    ),
    "shipped": Recipe(
        name="shipped", lr=4e-4, epochs=150, batch_size=8, weight_decay=0.05, layer_drop=0.1,
        warmup_epochs=3, schedule="steps", steps=((0.75, 0.25), (0.9, 0.05)),
        nimg_per_epoch=64, min_nimg_per_epoch=8, min_masks=1, grad_clip=1.0, val_every=10,
        augment=replace(FULL_AUGMENT, scale_range=(0.5, 2.0)),
    ),
}


def get_recipe(recipe: str | Recipe | dict) -> Recipe:
    """A :class:`Recipe` from its name, a dict, or itself."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}") from None
