"""The training engine: one loop for every method."""
from .config import TrainConfig, load_recipe, resolve_config
from .ema import EMA
from .trainer import NonFiniteLossError, Pretrainer, Run

__all__ = ["TrainConfig", "load_recipe", "resolve_config", "EMA", "Pretrainer", "Run", "NonFiniteLossError"]
