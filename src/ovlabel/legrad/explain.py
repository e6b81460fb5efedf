"""``compute_maps``: the one entry point of every explainer.

The methods live in :mod:`ovlabel.legrad.methods` (registered with
:func:`ovlabel.legrad.base.register_method`). ``compute_maps`` validates the inputs, runs the method,
upsamples bilinearly to the input resolution and min-max normalises each (image, query) map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from . import methods as _builtin  # noqa: F401  (importing the module registers the built-in methods)
from .base import (
    METHODS,
    ExplainInput,
    Layers,
    Method,
    MethodOutput,
    finalize_maps,
    resolve_layers,
)
from .ops import Linear
from .towers import Tower, read_tower

Tensor = torch.Tensor


@dataclass(frozen=True)
class Explanation:
    maps: Tensor  # [B,K,H,W]
    embeddings: Tensor | None  # [B,E] unnormalised image embeddings, when asked for


def list_methods() -> list[str]:
    """Names accepted by ``compute_maps(..., method=NAME)``."""
    return sorted(METHODS)


def describe_methods() -> dict[str, str]:
    return {name: METHODS[name].summary for name in sorted(METHODS)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown explainer method {name!r}; available methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def embed_dim(tower: Tower) -> int:
    """Width of the tower's image embedding (what text embeddings must match)."""
    ops = tower.pool.tail if tower.pool is not None else (tower.head or ())
    for op in reversed(ops):
        if isinstance(op, Linear):
            return int(op.weight.shape[0])
    return int(tower.blocks[-1].width)


def prepare_inputs(tower: Tower, images: Any, text_embeddings: Any) -> tuple[Tensor, Tensor]:
    """Validate and move inputs to the tower's device and dtype; normalise text rows."""
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a torch.Tensor of shape [B,3,H,W], got {type(images).__name__}")
    if images.ndim != 4:
        raise InputError(f"images must have shape [B,3,H,W], got {tuple(images.shape)} ({images.ndim} dims)")
    if images.shape[1] != 3:
        raise InputError(f"images must have 3 channels in dim 1 ([B,3,H,W]), got {images.shape[1]}")
    if images.shape[0] == 0:
        raise InputError("images is an empty batch (B=0); expected at least one image")
    if not images.is_floating_point():
        raise InputError(f"images must be a floating-point tensor normalised for the model, got {images.dtype}")
    ph, pw = tower.patch_size
    H, W = images.shape[-2:]
    if H < ph or W < pw or H % ph or W % pw:
        raise InputError(
            f"image size {H}x{W} is not a positive multiple of the patch size {ph}x{pw}; pad or resize "
            "the input to a multiple of the patch size (ovlabel.pipeline's preprocessing does this)")
    if not torch.isfinite(images).all():
        raise InputError("images contain NaN or infinite values")

    if not isinstance(text_embeddings, Tensor):
        raise InputError(f"text_embeddings must be a torch.Tensor of shape [K,E], got "
                         f"{type(text_embeddings).__name__}")
    if text_embeddings.ndim != 2:
        raise InputError(f"text_embeddings must have shape [K,E], got {tuple(text_embeddings.shape)}")
    K, E = text_embeddings.shape
    if K == 0:
        raise InputError("text_embeddings is empty (K=0); expected at least one query")
    expected = embed_dim(tower)
    if E != expected:
        raise InputError(f"text_embeddings have width {E} but the model's image embedding has width "
                         f"{expected}; encode the queries with the same model")
    if not torch.isfinite(text_embeddings).all():
        raise InputError("text_embeddings contain NaN or infinite values")
    norms = text_embeddings.norm(dim=-1)
    if (norms == 0).any():
        bad = torch.nonzero(norms == 0).flatten().tolist()
        raise InputError(f"text_embeddings rows {bad} are all zeros; expected non-zero embeddings")

    images = images.to(device=tower.device, dtype=tower.dtype)
    text = text_embeddings.to(device=tower.device, dtype=torch.float64 if tower.dtype == torch.float64
                              else torch.float32)
    text = (text / text.norm(dim=-1, keepdim=True)).to(tower.dtype)
    return images, text


def explain(
    model: nn.Module,
    images: Tensor,
    text_embeddings: Tensor,
    *,
    method: str = "legrad",
    layers: Layers = None,
    normalize: bool = True,
    embeddings: bool = False,
    **options: Any,
) -> Explanation:
    """:func:`compute_maps` with extras for pipelines: ``normalize=False`` returns raw upsampled maps,
    ``embeddings=True`` also returns the image embeddings ``[B,E]`` (from the same forward pass when
    the method's pass reaches the end of the tower, else from one more)."""
    spec = get_method(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise InputError(f"method {method!r} does not take option(s) {unknown}; it accepts "
                         f"{list(spec.options) or 'no options'}")
    # Gradient-based methods build a graph of their own, whatever the caller's grad mode is
    # (no_grad or inference_mode); LeGrad runs without autograd.
    with torch.inference_mode(False):
        if isinstance(images, Tensor) and images.is_inference():
            images = images.clone()
        if isinstance(text_embeddings, Tensor) and text_embeddings.is_inference():
            text_embeddings = text_embeddings.clone()
        tower = read_tower(model)
        images, text = prepare_inputs(tower, images, text_embeddings)
        layer_ids = resolve_layers(layers, len(tower.blocks), spec.default_layers)
        out = spec.fn(ExplainInput(model, tower, images, text, layer_ids, embeddings,
                                   layers_given=layers is not None), **options)
        if not isinstance(out, MethodOutput):
            out = MethodOutput(out)
        if out.final:
            if not normalize:
                raise InputError(f"method {method!r} with these options returns normalised maps only")
            maps = out.maps
        else:
            maps = finalize_maps(out.maps, tower.patch_size, text.shape[0], normalize)
        emb = None
        if embeddings:
            emb = out.embedding
            if emb is None:
                with torch.no_grad():
                    emb = tower.encode(images)
            emb = emb.detach()
        return Explanation(maps, emb)


def compute_maps(
    model: nn.Module,
    images: Tensor,
    text_embeddings: Tensor,
    *,
    method: str = "legrad",
    layers: Layers = None,
    **options: Any,
) -> Tensor:
    """Explainability maps of every text query on every image.

    Args:
        model: an open_clip model (``open_clip.create_model*``) or its image tower. Read, never modified.
        images: ``[B,3,H,W]`` normalised for the model; H and W multiples of the patch size, any aspect
            ratio (positional embeddings are resampled for the forward pass).
        text_embeddings: ``[K,E]`` text embeddings of the same model (normalised here if they are not).
        method: one of :func:`list_methods` (``"legrad"`` by default).
        layers: ``None`` for the method's default (LeGrad: the last two blocks, as in the published
            wrapper), ``"all"``, ``-n`` for the last n blocks, or a list of block indices.
        **options: method options, e.g. ``chunk_size`` (queries per chunk; results are identical).

    Returns:
        ``[B,K,H,W]`` float32 maps in [0,1] at the input resolution, on the model's device.
    """
    return explain(model, images, text_embeddings, method=method, layers=layers, **options).maps
