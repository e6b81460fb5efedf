"""The labelling pipeline: inputs → images → model inputs → queries → explainer → detections → files."""

from .runner import ImageResult, Pipeline, merge_runs

__all__ = ["ImageResult", "Pipeline", "merge_runs"]
