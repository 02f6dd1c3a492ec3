"""Self-supervised methods, one file each, looked up by name through the registry.

Every module in this package is imported here so that its ``@register`` runs; adding a
method is adding a file.
"""
import importlib
import pkgutil

from .base import Method, MethodConfig, StepInfo, get_method, list_methods, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Method", "MethodConfig", "StepInfo", "get_method", "list_methods", "register"]
