"""Network definition, checkpoints and the model registry."""

from .config import PRESETS, NetConfig, get_config
from .model import CPSAMNet

__all__ = ["CPSAMNet", "NetConfig", "PRESETS", "get_config"]
