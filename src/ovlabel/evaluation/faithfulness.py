"""Faithfulness and localisation metrics for explainability maps.

* Perturbation tests (Chefer et al. 2021; ``methods.md`` "Perturbation"): delete the 10 %, 20 %, …, 90 %
  most relevant pixels (positive test — lower AUC is better) or least relevant (negative test — higher is
  better), re-score, and take the trapezoid AUC over ``x = 0, 0.1, …, 0.9`` including the clean score at
  0, ×100.
* Deletion / insertion curves (Petsiuk et al., RISE): scores as the most relevant pixels are removed from
  the image, or inserted into a baseline image, from 0 to 100 %; AUC over ``[0, 1]``.
* Pointing game (Zhang et al.): does the map's maximum fall inside the object mask.

A *score function* maps a batch of images ``[B,3,H,W]`` to one score per image ``[B]`` — a class
probability, a logit, or 0/1 correctness for accuracy curves. :func:`clip_score_fn` builds one for an
open_clip model. Pixels are ranked per image by the map value (ties broken by position, stably).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..legrad.base import image_text_logits

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor], Tensor]

PERTURBATION_STEPS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 … 0.9


def _check(images: Tensor, maps: Tensor) -> None:
    if images.ndim != 4:
        raise InputError(f"images must be [B,C,H,W], got {tuple(images.shape)}")
    if maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise InputError(f"maps must be [B,H,W] matching images {tuple(images.shape)}, got {tuple(maps.shape)}")


def _ranks(maps: Tensor, most_relevant_first: bool) -> Tensor:
    """Per image, the rank of every pixel in deletion order (0 = deleted first) → ``[B,H*W]``."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=most_relevant_first, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def _replace(images: Tensor, ranks: Tensor, count: int, fill: Tensor) -> Tensor:
    mask = (ranks < count).reshape(images.shape[0], 1, *images.shape[-2:])
    return torch.where(mask, fill, images)


@torch.no_grad()
def perturbation_curve(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Tensor,
    *,
    positive: bool = True,
    fractions: Sequence[float] = PERTURBATION_STEPS,
    baseline: float | Tensor = 0.0,
) -> Tensor:
    """Scores ``[B, S]`` after deleting each fraction of pixels (set to ``baseline`` in every channel).

    ``positive``: delete the most relevant pixels first (the positive test); otherwise the least.
    """
    _check(images, maps)
    ranks = _ranks(maps, most_relevant_first=positive)
    fill = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    n = maps[0].numel()
    cols = [score_fn(_replace(images, ranks, int(round(f * n)), fill)).reshape(-1) for f in fractions]
    return torch.stack(cols, dim=1)


def perturbation_auc(curve: Tensor | Sequence[float], fractions: Sequence[float] = PERTURBATION_STEPS) -> float:
    """Trapezoid AUC ×100 of a (dataset-mean) perturbation curve over ``fractions`` (``[S]``)."""
    y = np.asarray(curve, dtype=np.float64).reshape(-1)
    if y.size != len(fractions):
        raise InputError(f"curve has {y.size} points but there are {len(fractions)} fractions")
    x = np.asarray(fractions, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 * 100.0)


def perturbation_test(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, positive: bool = True,
                      baseline: float | Tensor = 0.0) -> dict[str, object]:
    """Mean curve over the batch and its AUC, as the papers report it."""
    curve = perturbation_curve(score_fn, images, maps, positive=positive, baseline=baseline).mean(0)
    return {"fractions": list(PERTURBATION_STEPS), "curve": curve.tolist(), "auc": perturbation_auc(curve)}


@torch.no_grad()
def deletion_curve(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, steps: int = 20,
                   baseline: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """``(fractions [steps+1], scores [B, steps+1])`` removing the most relevant pixels, 0 → 100 %."""
    fractions = torch.linspace(0, 1, steps + 1)
    return fractions, perturbation_curve(score_fn, images, maps, positive=True, fractions=fractions.tolist(),
                                         baseline=baseline)


@torch.no_grad()
def insertion_curve(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, steps: int = 20,
                    baseline: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(fractions, scores [B, steps+1])`` inserting the most relevant pixels into a baseline image,
    0 → 100 %. The default baseline is the image blurred with a Gaussian (σ = 5 % of the shorter side)."""
    _check(images, maps)
    if baseline is None:
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(1.0, 0.05 * min(images.shape[-2:]))
        k = int(2 * round(3 * sigma) + 1)
        start = gaussian_blur(images, [k, k], [sigma, sigma])
    else:
        start = torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images)
    ranks = _ranks(maps, most_relevant_first=True)
    n = maps[0].numel()
    fractions = torch.linspace(0, 1, steps + 1)
    cols = []
    for f in fractions.tolist():
        inserted = (ranks < int(round(f * n))).reshape(images.shape[0], 1, *images.shape[-2:])
        cols.append(score_fn(torch.where(inserted, images, start)).reshape(-1))
    return fractions, torch.stack(cols, dim=1)


def curve_auc(fractions: Tensor, scores: Tensor) -> Tensor:
    """Trapezoid AUC of each curve ``[B, S]`` over ``fractions`` ``[S]`` → ``[B]``."""
    return torch.trapezoid(scores, fractions.to(scores.dtype), dim=-1)


def pointing_game(maps: Tensor | np.ndarray, masks: Tensor | np.ndarray, *, tolerance: int = 0) -> np.ndarray:
    """Whether each map's maximum lies inside its object mask (optionally within ``tolerance`` pixels).

    ``maps``: ``[N,H,W]``; ``masks``: ``[N,H,W]`` booleans. Returns ``[N]`` booleans. Where several pixels
    share the maximum, the first in row-major order is the map's point.
    """
    maps = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float64)
    masks = np.asarray(masks.detach().cpu() if isinstance(masks, Tensor) else masks).astype(bool)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape:
        raise InputError(f"maps {maps.shape} and masks {masks.shape} must have the same [N,H,W] shape")
    hits = np.zeros(maps.shape[0], dtype=bool)
    for i, (m, g) in enumerate(zip(maps, masks)):
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        if tolerance <= 0:
            hits[i] = bool(g[y, x])
        else:
            y0, y1 = max(0, y - tolerance), y + tolerance + 1
            x0, x1 = max(0, x - tolerance), x + tolerance + 1
            yy, xx = np.mgrid[y0 : min(y1, m.shape[0]), x0 : min(x1, m.shape[1])]
            near = (yy - y) ** 2 + (xx - x) ** 2 <= tolerance**2
            hits[i] = bool(g[yy[near], xx[near]].any())
    return hits


def clip_score_fn(model, text_embeddings: Tensor, targets: Sequence[int] | Tensor, *,
                  kind: str = "probability") -> ScoreFn:
    """Score function for an open_clip model over a set of class embeddings.

    ``kind``: ``"probability"`` (softmax with the model's logit scale over the classes, at the target),
    ``"logit"`` or ``"correct"`` (1 where the target is the top class — for accuracy curves).
    """
    if kind not in ("probability", "logit", "correct"):
        raise InputError(f"kind must be 'probability', 'logit' or 'correct', got {kind!r}")
    text = F.normalize(text_embeddings, dim=-1)
    target = torch.as_tensor(targets, dtype=torch.long, device=text.device).reshape(-1)

    @torch.no_grad()
    def score(images: Tensor) -> Tensor:
        logits = image_text_logits(model, model.encode_image(images.to(text.dtype)), text)
        idx = target.expand(images.shape[0]) if target.numel() == 1 else target
        if kind == "logit":
            return logits.gather(1, idx[:, None])[:, 0]
        if kind == "correct":
            return (logits.argmax(1) == idx).to(logits.dtype)
        return logits.softmax(1).gather(1, idx[:, None])[:, 0]

    return score
