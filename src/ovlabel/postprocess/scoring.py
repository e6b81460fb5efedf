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
from ..legrad.base import logit_bias, logit_scale

PRESENCE_MODES = ("auto", "softmax", "binary", "sigmoid")


def scaled_logits(image_embeddings: torch.Tensor, text: torch.Tensor, scale=None, bias=None) -> torch.Tensor:
    """The one image–text logit of every backend: ``scale·cos(e, t) (+ bias)`` → ``[B, K]`` float32 (both
    sides normalised here); ``scale`` and ``bias``: numbers, tensors or ``None`` (absent)."""
    s = F.normalize(image_embeddings.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    if scale is not None:
        s = s * scale
    return s if bias is None else s + bias


def image_text_logits(model, image_embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """:func:`scaled_logits` with an open_clip model's ``exp(logit_scale)`` and ``logit_bias``."""
    scale = logit_scale(model, torch.float32) if isinstance(getattr(model, "logit_scale", None), torch.Tensor) \
        else None
    return scaled_logits(image_embeddings, text, scale, logit_bias(model, torch.float32))


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


def presence_of(logits, image_embeddings: torch.Tensor, text: torch.Tensor, background: torch.Tensor | None,
                mode: str, has_bias: bool) -> np.ndarray:
    """The one presence helper: ``logits(embeddings, prompts)`` (a backend's) of the queries and the
    background prompts together, then :func:`presence_from_logits`."""
    K = text.shape[0]
    with torch.no_grad():
        full = text if background is None or background.shape[0] == 0 else torch.cat([text, background])
        lg = logits(image_embeddings, full)
    return presence_from_logits(lg[:, :K], lg[:, K:] if full is not text else None, mode, has_bias)


def presence_scores(model, image_embeddings: torch.Tensor, text: torch.Tensor,
                    background: torch.Tensor | None = None, mode: str = "auto") -> np.ndarray:
    """Presence probabilities ``[B, K]`` of each query in each image, for an open_clip model (see the module
    docstring)."""
    if mode not in PRESENCE_MODES:
        raise InputError(f"presence mode {mode!r} is not known; expected one of {PRESENCE_MODES}")
    return presence_of(lambda e, t: image_text_logits(model, e, t), image_embeddings, text, background, mode,
                       isinstance(getattr(model, "logit_bias", None), torch.Tensor))


def combine(presence: float, evidence: float) -> float:
    """The detection score: ``presence × evidence``, clipped to [0,1]."""
    return float(np.clip(presence * evidence, 0.0, 1.0))
