"""Training and fine-tuning Cellpose-SAM networks.

>>> from cpsam_toolkit.training import train
>>> result = train(net, "my_data/train", "my_data/val", recipe="finetune", out="my_model.pt")
>>> print(result.report())          # base vs final vs best validation AP@0.5
"""

from .augment import AugmentConfig
from .data import LabelError, TrainingSet, validate_labels
from .loop import TrainResult, loss_fn, train
from .recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "AugmentConfig",
    "LabelError",
    "RECIPES",
    "Recipe",
    "TrainResult",
    "TrainingSet",
    "get_recipe",
    "loss_fn",
    "train",
    "validate_labels",
]
