"""Training methods, by name. Every module of this package registers its methods on import."""
import importlib
import pkgutil

from .base import METHODS, BuildContext, Method, Option, Strategy, get_method, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "BuildContext", "Method", "Option", "Strategy", "get_method", "register"]
