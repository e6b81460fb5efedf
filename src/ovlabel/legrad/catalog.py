"""The built-in explainers by name: their default blocks and a one-line summary.

This module does not import torch, so that ``ovlabel methods`` and ``ovlabel --help`` start at once; the
implementations in :mod:`ovlabel.legrad.methods` register under these names and take these defaults.
"""

from __future__ import annotations

from typing import NamedTuple


class MethodInfo(NamedTuple):
    default_layers: str | int
    summary: str


BUILTIN: dict[str, MethodInfo] = {
    "legrad": MethodInfo(
        -2,
        "LeGrad (default): gradient of each block's image-text cosine w.r.t. its attention, ReLU, "
        "summed over blocks (default last 2). Per query ≈0.07x a forward (last 2), ≈0.45x (all), ViT-B-16.",
    ),
    "raw_attention": MethodInfo(
        "last",
        "Raw attention of the last block, CLS row, mean over heads (text-independent). No cost per query.",
    ),
    "rollout": MethodInfo(
        "all",
        "Attention rollout (Abnar & Zuidema) over all blocks (text-independent). No cost per query.",
    ),
    "gradcam": MethodInfo(
        "last",
        "Grad-CAM on the last block's attention (per-head weights = score gradient averaged over the "
        "CLS row). One backward through the shared graph per query chunk.",
    ),
    "chefercam": MethodInfo(
        "last",
        "CheferCAM / GAE (Chefer et al. ICCV 2021, the CLIP rule): R <- R + mean_h relu(grad*A) R over "
        "the selected blocks (default last). One backward through the shared graph per query chunk.",
    ),
    "chefer_lrp": MethodInfo(
        "all",
        "Chefer, Gur, Wolf CVPR 2021: LRP relevance (alpha=1, beta=0) times gradients at every block's "
        "attention, multiplied over blocks. Per query: a backward plus an LRP pass (~3x a forward).",
    ),
}


# the methods whose maps are a plain forward graph (closed form, no autograd): what ONNX export takes
EXPORTABLE = ("legrad", "chefercam", "gradcam", "raw_attention", "rollout")


def describe() -> dict[str, str]:
    """Name → summary of the built-in methods (what ``ovlabel methods`` prints)."""
    return {name: BUILTIN[name].summary for name in sorted(BUILTIN)}
