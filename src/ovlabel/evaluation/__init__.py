"""Metrics: faithfulness (perturbation, deletion/insertion), pointing game, and (later) COCO/semantic."""

from .faithfulness import (
    PERTURBATION_STEPS,
    clip_score_fn,
    curve_auc,
    deletion_curve,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    perturbation_test,
    pointing_game,
)

__all__ = [
    "PERTURBATION_STEPS",
    "clip_score_fn",
    "curve_auc",
    "deletion_curve",
    "insertion_curve",
    "perturbation_auc",
    "perturbation_curve",
    "perturbation_test",
    "pointing_game",
]
