"""Backends: what the runner needs from a model, whatever executes it.

The runner never touches a model directly; it asks a :class:`Backend` for

* ``patch_size`` and the model's normalisation (``mean``/``std``);
* ``encode_text(prompts)`` → unit text embeddings ``[N,E]``;
* ``explain(images, text)`` → maps ``[B,K,H,W]`` (min-max normalised, or raw) and image embeddings
  ``[B,E]``, from one forward pass, and ``embed(images)`` → embeddings only;
* ``logits(embeddings, text)`` → ``exp(logit_scale)·cos (+ logit_bias)`` ``[B,N]`` for presence scores;
* ``describe()`` → the provenance and result-changing settings recorded in ``run.yaml`` and the
  manifest.

:class:`TorchBackend` runs an open_clip model in PyTorch. Another engine (onnxruntime) is one more class
with the same methods.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..config import ExplainerConfig
from ..legrad import read_tower, resolve_layers
from ..legrad.explain import explain, get_method
from ..postprocess.scoring import image_text_logits
from .models import LoadedModel
from .queries import encode_prompts


class Backend(Protocol):
    name: str
    patch_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_logit_bias: bool

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def explain(self, images: torch.Tensor, text: torch.Tensor, *, raw: bool = False,
                empty: torch.Tensor | None = None,
                contrast: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def logits(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


class TorchBackend:
    """An open_clip model in PyTorch, explained with :func:`ovlabel.legrad.explain.explain`."""

    name = "torch"

    def __init__(self, loaded: LoadedModel, explainer: ExplainerConfig) -> None:
        self.loaded = loaded
        self.explainer = explainer
        self.method = get_method(explainer.method)
        tower = read_tower(loaded.model)
        self.patch_size: tuple[int, int] = tuple(tower.patch_size)
        self.layers = resolve_layers(explainer.layers, len(tower.blocks), self.method.default_layers)
        self.mean, self.std = tuple(loaded.mean), tuple(loaded.std)
        self.has_logit_bias = isinstance(getattr(loaded.model, "logit_bias", None), torch.Tensor)
        self._tokenizer = None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        import open_clip

        if self._tokenizer is None:
            lm = self.loaded
            self._tokenizer = open_clip.get_tokenizer(lm.provenance.get("open_clip_arch", lm.name))
        return encode_prompts(self.loaded.model, self._tokenizer, prompts, self.loaded.device)

    def explain(self, images: torch.Tensor, text: torch.Tensor, *, raw: bool = False,
                empty: torch.Tensor | None = None,
                contrast: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps ``[B,K,H,W]`` float32 on the CPU and embeddings ``[B,E]`` float32 for a batch of inputs of
        one size. ``empty``: the "a photo of a" embedding for LeGrad's empty-prompt correction;
        ``contrast``: background prompt embeddings for ``explainer.contrast``."""

        lm, ex = self.loaded, self.explainer
        options: dict = {}
        if ex.chunk_size:
            options["chunk_size"] = ex.chunk_size
        if empty is not None and not raw:
            options["empty_prompt"] = empty
        if contrast is not None:
            options["contrast"] = contrast.to(lm.device, lm.dtype)
            options["contrast_mode"] = ex.contrast
        out = explain(lm.model, images.to(lm.device, lm.dtype), text.to(lm.device, lm.dtype), method=ex.method,
                      layers=ex.layers, normalize=not raw, embeddings=True, **options)
        return out.maps.float().cpu(), out.embeddings.float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        lm = self.loaded
        with torch.no_grad():
            return read_tower(lm.model).encode(images.to(lm.device, lm.dtype)).float()

    def logits(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return image_text_logits(self.loaded.model, embeddings, text)

    def describe(self) -> dict[str, Any]:
        lm = self.loaded
        return {"backend": self.name, **lm.provenance, "device": str(lm.device),
                "dtype": str(lm.dtype).replace("torch.", ""), "mean": list(lm.mean), "std": list(lm.std)}
