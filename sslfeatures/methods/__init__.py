"""Self-supervised methods, one file each, looked up by name through the registry."""
from . import byol, dino, mae, moco, simclr  # noqa: F401  (registers the methods)
from .base import Method, MethodConfig, StepInfo, get_method, list_methods, register

__all__ = ["Method", "MethodConfig", "StepInfo", "get_method", "list_methods", "register"]
