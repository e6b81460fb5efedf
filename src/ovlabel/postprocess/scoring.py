"""Scores that mean the same thing across queries and images.

A min-max normalised heatmap always has a hot spot, even for a class that is absent. ovlabel therefore
scores each detection as

    score = presence(query | image) × evidence(mask)

* ``presence`` ∈ [0,1] — an image-level probability that the query is in the image, from the model's own
  image–text logits ``l_k = exp(logit_scale)·cos(image, t_k) (+ logit_bias)``:

  - ``softmax``: softmax over the query set (plus any background / negative prompts, whose
    probabilities are not emitted) — CLIP's zero-shot classifier;
  - ``binary``: for each query separately, softmax over {the query} ∪ background prompts — a
    multi-label presence (needs background prompts);
  - ``sigmoid``: ``σ(l_k)`` — SigLIP's own per-pair probability (it has a ``logit_bias``);
  - ``auto``: ``sigmoid`` for models with a logit bias (SigLIP), else ``softmax``.

* ``evidence`` ∈ [0,1] — the mean of the min-max normalised heatmap inside the mask.

Queries whose presence is below a threshold produce no detection at all, which is how absent classes
are rejected. Without a model (cached heatmaps with no presence), presence is 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..legrad.base import image_text_logits as _logits

PRESENCE_MODES = ("auto", "softmax", "binary", "sigmoid")


def image_text_logits(model, image_embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale)·cos (+ logit_bias)`` → ``[B, K]`` float32 (both sides normalised here)."""
    return _logits(model, image_embeddings.float(), F.normalize(text.float(), dim=-1))


def presence_from_logits(query_logits: torch.Tensor, background_logits: torch.Tensor | None, mode: str,
                         has_bias: bool) -> np.ndarray:
    """Presence ``[B, K]`` from image–text logits of the queries ``[B, K]`` and of the background
    prompts ``[B, M]`` (see the module docstring); ``has_bias``: the model has a logit bias (SigLIP)."""
    if mode not in PRESENCE_MODES:
        raise InputError(f"presence mode {mode!r} is not known; expected one of {PRESENCE_MODES}")
    if mode == "auto":
        mode = "sigmoid" if has_bias else "softmax"
    K = query_logits.shape[1]
    has_bg = background_logits is not None and background_logits.shape[1] > 0
    with torch.no_grad():
        if mode == "sigmoid":
            return torch.sigmoid(query_logits).cpu().numpy()
        if mode == "softmax":
            full = torch.cat([query_logits, background_logits], dim=1) if has_bg else query_logits
            return full.softmax(-1)[:, :K].cpu().numpy()
        if not has_bg:
            raise InputError("presence mode 'binary' needs background prompts (query vs background)")
        bg_lse = torch.logsumexp(background_logits, dim=-1, keepdim=True)
        return torch.sigmoid(query_logits - bg_lse).cpu().numpy()  # = e^q / (e^q + Σ e^bg)


def presence_scores(model, image_embeddings: torch.Tensor, text: torch.Tensor,
                    background: torch.Tensor | None = None, mode: str = "auto") -> np.ndarray:
    """Presence probabilities ``[B, K]`` of each query in each image (see the module docstring)."""
    if mode not in PRESENCE_MODES:
        raise InputError(f"presence mode {mode!r} is not known; expected one of {PRESENCE_MODES}")
    K = text.shape[0]
    with torch.no_grad():
        full = text if background is None or background.shape[0] == 0 else torch.cat([text, background])
        logits = image_text_logits(model, image_embeddings, full)
    return presence_from_logits(logits[:, :K], logits[:, K:] if full is not text else None, mode,
                                isinstance(getattr(model, "logit_bias", None), torch.Tensor))


def combine(presence: float, evidence: float) -> float:
    """The detection score: ``presence × evidence``, clipped to [0,1]."""
    return float(np.clip(presence * evidence, 0.0, 1.0))
