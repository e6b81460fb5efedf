"""The built-in explainers, registered by name for :func:`ovlabel.legrad.compute_maps`.

Each docstring states what the method costs per query; all of them run one forward pass per image batch.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from . import baselines, lrp
from .base import ExplainInput, MethodOutput, finalize_maps, register_method
from .legrad import Contrast, legrad_grid_maps

Tensor = torch.Tensor

EMPTY_PROMPT_THRESHOLD = 0.8


def _pooler_reads_no_blocks(inp: ExplainInput, method: str) -> None:
    """Methods that read the attention pooler of SigLIP/CoCa towers cannot honour a block selection."""
    if inp.tower.pool is not None and inp.layers_given and inp.layers != [len(inp.tower.blocks) - 1]:
        raise InputError(f"{method} on an attention-pool tower (SigLIP, CoCa) reads the pooler's attention, not "
                         f"a block's, so layers={inp.layers} cannot be applied; leave layers unset (or pick "
                         "legrad, chefercam or rollout, which use the blocks)")


@register_method("legrad")
def legrad(inp: ExplainInput, *, chunk_size: int | None = None, batched: bool | None = None,
           empty_prompt: Tensor | None = None, contrast: Tensor | None = None,
           contrast_mode: str = "max") -> MethodOutput:
    """LeGrad. One forward pass per image batch serves all queries; per query and selected block the
    cost is the closed-form backward of the rest of that block (see :mod:`ovlabel.legrad.legrad`).

    ``empty_prompt``: embedding ``[E]`` of the text "a photo of a" (the published SigLIP correction):
    its map is computed alongside, min-max normalised, and every query map is zeroed where it exceeds
    0.8 — suppressing what the model attends to for any prompt. Costs one extra query.

    ``contrast``: embeddings ``[M, E]`` of background / negative prompts: each query's map explains
    ``t_k · e − agg_b (t_b · e)`` (``contrast_mode`` ``"max"`` or ``"mean"``) instead of ``t_k · e``, so what
    lights up for "background" is suppressed for every query (:class:`ovlabel.legrad.legrad.Contrast`).
    Exact gradients; no extra cost per query.
    """
    text = inp.text
    if empty_prompt is not None:
        if not isinstance(empty_prompt, Tensor) or empty_prompt.shape != (text.shape[1],):
            raise InputError(f"empty_prompt must be a tensor of shape [{text.shape[1]}] (one text embedding), "
                             f"got {getattr(empty_prompt, 'shape', type(empty_prompt).__name__)}")
        e = empty_prompt.to(device=text.device, dtype=text.dtype)
        text = torch.cat([text, (e / e.norm()).unsqueeze(0)])
    target = None
    if contrast is not None:
        if not isinstance(contrast, Tensor) or contrast.ndim != 2 or contrast.shape[1] != text.shape[1] or \
                contrast.shape[0] == 0:
            raise InputError(f"contrast must be a tensor [M, {text.shape[1]}] of background prompt embeddings, got "
                             f"{getattr(contrast, 'shape', type(contrast).__name__)}")
        if contrast_mode not in ("mean", "max"):
            raise InputError(f"contrast_mode must be 'mean' or 'max', got {contrast_mode!r}")
        c = contrast.to(device=text.device, dtype=text.dtype)
        target = Contrast(c / c.norm(dim=-1, keepdim=True), contrast_mode)
    tokens: list = []
    grid = legrad_grid_maps(inp.tower, inp.images, text, inp.layers, chunk_size=chunk_size, batched=batched,
                            final_tokens=tokens if inp.want_embedding else None, contrast=target)
    embedding = None
    if tokens:
        with torch.no_grad():
            embedding = inp.tower.embedding(tokens[0])
    if empty_prompt is None:
        return MethodOutput(grid, embedding=embedding)
    maps = finalize_maps(grid, inp.tower.patch_size, text.shape[0])
    return MethodOutput(empty_prompt_correction(maps), final=True, embedding=embedding)


def empty_prompt_correction(maps: Tensor) -> Tensor:
    """The published SigLIP correction: ``maps [B,K+1,H,W]`` (normalised) whose last map is the empty
    prompt's ("a photo of a") → ``[B,K,H,W]`` with the pixels where the empty prompt's map exceeds
    :data:`EMPTY_PROMPT_THRESHOLD` set to zero."""
    maps, empty = maps[:, :-1], maps[:, -1:]
    return torch.where(empty > EMPTY_PROMPT_THRESHOLD, torch.zeros_like(maps), maps).contiguous()


@register_method("raw_attention")
def raw_attention(inp: ExplainInput) -> Tensor:
    """Mean over heads of the readout row (CLS; the pooler's query for SigLIP/CoCa) of the selected
    blocks' attention (default: last block). The same map for every query: no cost per query.
    Attention-pool towers read the pooler's attention, which belongs to no block: ``layers`` is refused."""
    _pooler_reads_no_blocks(inp, "raw_attention")
    return baselines.raw_attention(inp.tower, inp.images, inp.layers)


@register_method("rollout")
def rollout(inp: ExplainInput) -> Tensor:
    """Attention rollout: ``rownorm(mean_h A + I)`` multiplied over the selected blocks (default: all),
    readout row. The same map for every query: no cost per query; O(T²) per block."""
    return baselines.rollout(inp.tower, inp.images, inp.layers)


@register_method("gradcam")
def gradcam(inp: ExplainInput, *, chunk_size: int | None = None) -> Tensor:
    """Grad-CAM for ViTs, the attention variant of Chefer et al.'s baselines: score =
    ``logit_scale·cos``; per head ``w_h`` = mean over the readout row of ``∂score/∂A_h``; map =
    ``max(mean_h w_h·A_h, 0)`` on the readout row (pooler towers: on the pooler's attention). Cost per
    query: a backward from the score to the selected block, batched over query chunks. Attention-pool
    towers use the pooler's attention, which belongs to no block: ``layers`` is refused there."""
    _pooler_reads_no_blocks(inp, "gradcam")
    return baselines.gradcam(inp.model, inp.tower, inp.images, inp.text, inp.layers, chunk_size)


@register_method("chefercam")
def chefercam(inp: ExplainInput, *, chunk_size: int | None = None) -> Tensor:
    """CheferCAM / GAE as used for CLIP (see :func:`ovlabel.legrad.baselines.chefercam`). Cost per query:
    a backward from the score to the first selected block, batched over query chunks, plus O(T²) per
    block for the readout row."""
    return baselines.chefercam(inp.model, inp.tower, inp.images, inp.text, inp.layers, chunk_size)


@register_method("chefer_lrp")
def chefer_lrp(inp: ExplainInput, *, chunk_size: int | None = None) -> Tensor:
    """Chefer 2021 relevance propagation (rules in :mod:`ovlabel.legrad.lrp`). CLS-token open_clip ViTs
    only. Cost per query: a backward for ``∇A`` and an LRP pass through all blocks (≈3× a forward)."""
    return lrp.chefer_lrp(inp.model, inp.tower, inp.images, inp.text, inp.layers, chunk_size)
