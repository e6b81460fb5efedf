"""Heatmaps → scored instance masks and boxes."""

from .detect import Postprocessor, minmax, nms
from .detections import Detections, masks_to_boxes
from .geometry import Letterbox
from .masks import (
    THRESHOLD_METHODS,
    Instances,
    ThresholdSpec,
    clean_mask,
    components,
    find_instances,
    heat_to_instances,
)
from .scoring import PRESENCE_MODES, image_text_logits, presence_scores

__all__ = [
    "PRESENCE_MODES",
    "THRESHOLD_METHODS",
    "Detections",
    "Instances",
    "Letterbox",
    "Postprocessor",
    "ThresholdSpec",
    "clean_mask",
    "components",
    "find_instances",
    "heat_to_instances",
    "image_text_logits",
    "masks_to_boxes",
    "minmax",
    "nms",
    "presence_scores",
]
