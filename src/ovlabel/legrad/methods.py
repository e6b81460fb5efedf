"""The built-in explainers, registered by name for :func:`ovlabel.legrad.compute_maps`."""

from __future__ import annotations

import torch

from .explain import ExplainInput, register_method
from .legrad import legrad_grid_maps

Tensor = torch.Tensor


@register_method(
    "legrad",
    default_layers=-2,
    summary="LeGrad: ReLU'd gradient of the per-layer image-text cosine w.r.t. attention, summed over "
    "layers (default: last 2 blocks). One forward pass; per query ≈0.07× a forward (last 2) or ≈0.43× "
    "(all layers) for ViT-B-16.",
)
def legrad(inp: ExplainInput, *, chunk_size: int | None = None, batched: bool | None = None) -> Tensor:
    """LeGrad. One forward pass per image batch serves all queries; per query and selected block the
    cost is the closed-form backward of the rest of that block (see :mod:`ovlabel.legrad.legrad`)."""
    return legrad_grid_maps(inp.tower, inp.images, inp.text, inp.layers, chunk_size=chunk_size,
                            batched=batched)
