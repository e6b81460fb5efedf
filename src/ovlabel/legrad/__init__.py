"""Explainability maps of CLIP image towers: LeGrad and the baselines it is compared with."""

from .explain import compute_maps, describe_methods, list_methods, resolve_layers
from .towers import SUPPORTED_TOWERS, Tower, read_tower

__all__ = [
    "SUPPORTED_TOWERS",
    "Tower",
    "compute_maps",
    "describe_methods",
    "list_methods",
    "read_tower",
    "resolve_layers",
]
