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



def __getattr__(name: str):
    # The pipeline pulls in heavier dependencies; import it on first use.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ovlabel' has no attribute {name!r}")


__all__ = [
    "Pipeline",
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
