"""Explainability maps of CLIP image towers: LeGrad and the baselines it is compared with.

Names are imported from their submodules on first use (``ovlabel.legrad.catalog`` needs no torch).
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "compute_maps": ".explain",
    "describe_methods": ".explain",
    "list_methods": ".explain",
    "resolve_layers": ".base",
    "SUPPORTED_TOWERS": ".towers",
    "Tower": ".towers",
    "read_tower": ".towers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ovlabel.legrad' has no attribute {name!r}")


__all__ = sorted(_LAZY)
