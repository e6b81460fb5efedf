"""Forward graphs of the image side, for export: an explainer's maps, the image encoder, the text encoder.

LeGrad's per-block gradients are computed in closed form from one forward pass (:mod:`ovlabel.legrad.legrad`),
so the whole map computation is an ordinary forward graph, as are the attention baselines' closed-form
paths: these modules wrap them for ``torch.onnx.export`` (:mod:`ovlabel.apps.export_onnx`). They read the
model's parameters through the tower description; the model is never changed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .base import ExplainInput, MethodOutput, finalize_maps, resolve_layers
from .catalog import EXPORTABLE
from .explain import get_method
from .towers import read_tower


class ExplainerGraph(nn.Module):
    """``(images [B,3,H,W], text [K,E] unit rows)`` → ``(maps [B,K,H,W], embeddings [B,E] unit, grid_maps)``
    of one method, from the tower description (no autograd: only closed-form paths)."""

    def __init__(self, model: nn.Module, method: str, layers: Any = None) -> None:
        super().__init__()
        if method not in EXPORTABLE:
            raise UnsupportedModelError(f"method {method!r} cannot be exported as a plain forward graph (it needs "
                                        f"autograd); the methods that can: {', '.join(EXPORTABLE)}")
        self.tower = read_tower(model)
        self.spec = get_method(method)
        self.method = method
        self.layers = resolve_layers(layers, len(self.tower.blocks), self.spec.default_layers)
        last = [len(self.tower.blocks) - 1]
        pooled = self.tower.pool is not None
        if (method == "gradcam" and not pooled and self.layers != last) or \
                (method == "chefercam" and (pooled or self.layers != last)):
            raise UnsupportedModelError(
                f"{method} with blocks {self.layers} on this tower needs autograd and cannot be exported; "
                f"{method} exports with its default block (the last) on CLS towers"
                + (", and gradcam on attention-pool towers" if method == "gradcam" else "")
                + "; legrad, raw_attention and rollout export on every tower")
        # only what the methods read from the model: its logit scale and bias, not its modules
        self.scales = SimpleNamespace(logit_scale=getattr(model, "logit_scale", None),
                                      logit_bias=getattr(model, "logit_bias", None))

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        text = text / text.norm(dim=-1, keepdim=True)
        out = self.spec.fn(ExplainInput(self.scales, self.tower, images, text, self.layers, True))
        if not isinstance(out, MethodOutput):
            out = MethodOutput(out)
        grid = out.maps
        emb = out.embedding if out.embedding is not None else self.tower.encode(images)
        maps = finalize_maps(grid, self.tower.patch_size, text.shape[0])
        if grid.shape[1] == 1:  # text-independent methods: one map for every query
            grid = grid.expand(grid.shape[0], text.shape[0], *grid.shape[2:])
        return maps, F.normalize(emb, dim=-1), grid.float()


class ImageEncoderGraph(nn.Module):
    """``images [B,3,H,W]`` → unit image embeddings ``[B,E]`` (the tower run from its description, with
    positional embeddings resampled for any grid)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower = read_tower(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower.encode(images), dim=-1)


class TextEncoderGraph(nn.Module):
    """``tokens [N,C]`` → unit text embeddings ``[N,E]`` (the model's own ``encode_text``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)
