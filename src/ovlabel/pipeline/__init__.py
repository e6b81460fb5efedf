"""The labelling pipeline: inputs → images → model inputs → queries → explainer → detections → files.

Submodules are imported on first use: ``ovlabel.pipeline.images`` (finding and decoding images) and
``ovlabel.pipeline.manifest`` work without torch.
"""

from importlib import import_module
from typing import Any

_LAZY = {"ImageResult": ".runner", "Pipeline": ".runner", "merge_runs": ".merge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ovlabel.pipeline' has no attribute {name!r}")


__all__ = ["ImageResult", "Pipeline", "merge_runs"]
