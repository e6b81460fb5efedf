"""ovlabel: label images from text with CLIP explainability maps, no training."""

from .errors import (
    CocoFormatError,
    ConfigError,
    ImageReadError,
    InputError,
    ModelLoadError,
    OvlabelError,
    UnsupportedModelError,
)
from .legrad import compute_maps, list_methods

__version__ = "0.1.0"

__all__ = [
    "CocoFormatError",
    "ConfigError",
    "ImageReadError",
    "InputError",
    "ModelLoadError",
    "OvlabelError",
    "UnsupportedModelError",
    "__version__",
    "compute_maps",
    "list_methods",
]
