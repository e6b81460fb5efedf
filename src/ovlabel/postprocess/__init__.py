"""Heatmaps → scored instance masks and boxes.

Names are imported from their submodules on first use, so that the torch-free parts (``detections``,
``masks``, ``rle``) can be used by record writers and decode workers that never load torch.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "Detections": ".detections",
    "masks_to_boxes": ".detections",
    "Postprocessor": ".detect",
    "minmax": ".detect",
    "nms": ".detect",
    "ImageMaps": ".geometry",
    "Letterbox": ".geometry",
    "THRESHOLD_METHODS": ".masks",
    "Instances": ".masks",
    "ThresholdSpec": ".masks",
    "clean_mask": ".masks",
    "components": ".masks",
    "find_instances": ".masks",
    "heat_to_instances": ".masks",
    "PRESENCE_MODES": ".scoring",
    "image_text_logits": ".scoring",
    "presence_scores": ".scoring",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ovlabel.postprocess' has no attribute {name!r}")


__all__ = sorted(_LAZY)
