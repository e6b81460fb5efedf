"""ovlabel: label images from text with CLIP explainability maps, no training.

The heavy parts (torch, open_clip) are imported on first use of what needs them, so that ``ovlabel
--help``, the image decoder and the record files work in processes that never load a model.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import (
    CocoFormatError,
    ConfigError,
    ImageReadError,
    InputError,
    ModelLoadError,
    OutputError,
    OvlabelError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "Pipeline": ".pipeline.runner",
    "ImageResult": ".pipeline.runner",
    "Detections": ".postprocess.detections",
    "ImageMaps": ".postprocess.geometry",
    "read_results": ".export.coco",
    "read_image": ".pipeline.images",
    "decode_item": ".pipeline.images",
    "compute_maps": ".legrad.explain",
    "list_methods": ".legrad.explain",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ovlabel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CocoFormatError",
    "ConfigError",
    "Detections",
    "ImageMaps",
    "ImageReadError",
    "ImageResult",
    "InputError",
    "ModelLoadError",
    "OutputError",
    "OvlabelError",
    "Pipeline",
    "UnsupportedModelError",
    "decode_item",
    "read_image",
    "__version__",
    "compute_maps",
    "list_methods",
    "read_results",
]
