"""What every explainer shares: the method registry and its input/output types, layer selection, query
chunking, the model's image–text logits, and map finalisation (upsampling and min-max).

A method is a function registered under a name with :func:`register_method`. It receives an
:class:`ExplainInput` and returns maps on the token grid ``[B, K, gh, gw]`` (``K = 1`` for methods that do
not depend on the text) or a :class:`MethodOutput`. ``ovlabel.legrad.explain`` validates the inputs, runs
the method and finalises the maps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .catalog import BUILTIN
from .towers import Tower

Tensor = torch.Tensor
Layers = Union[None, str, int, Sequence[int]]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class ExplainInput:
    """What a method receives. ``images``/``text`` are already in the tower's device and dtype."""

    model: nn.Module
    tower: Tower
    images: Tensor  # [B,3,H,W]
    text: Tensor  # [K,E], unit rows
    layers: list[int]  # sorted block indices
    want_embedding: bool = False
    layers_given: bool = False  # the caller chose the layers (not the method's default)


@dataclass(frozen=True)
class MethodOutput:
    """What a method may return instead of plain grid maps: ``maps`` on the token grid (or, with
    ``final=True``, already ``[B,K,H,W]`` in [0,1] at input resolution) and, when its forward pass
    reached the end of the tower, the image ``embedding`` ``[B,E]`` (spares a second forward)."""

    maps: Tensor
    final: bool = False
    embedding: Tensor | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Tensor | MethodOutput]
    default_layers: Layers
    summary: str
    options: tuple[str, ...] = field(default=())


METHODS: dict[str, Method] = {}


def register_method(name: str, *, default_layers: Layers = None, summary: str | None = None) -> Callable:
    """Register ``fn(inp: ExplainInput, **options) -> Tensor [B,K|1,gh,gw] | MethodOutput`` under ``name``.
    The built-in methods take their default blocks and summary from :mod:`ovlabel.legrad.catalog`."""

    if name in BUILTIN:
        default_layers = BUILTIN[name].default_layers if default_layers is None else default_layers
        summary = BUILTIN[name].summary if summary is None else summary
    if summary is None:
        raise ValueError(f"method {name!r} needs a summary")

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = list(inspect.signature(fn).parameters.values())[1:]
        options = tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)
        METHODS[name] = Method(name, fn, default_layers, summary, options)
        return fn

    return wrap


# ------------------------------------------------------------------------------------------- layers
def resolve_layers(layers: Layers, num_blocks: int, default: Layers = -2) -> list[int]:
    """Block indices from ``None`` (the method's default), ``"all"``, ``-n`` (last n blocks) or a list.

    List entries may be negative (Python-style). The result is sorted and free of duplicates.
    """
    if layers is None:
        layers = default
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_blocks))
        if layers == "last":
            return [num_blocks - 1]
        raise InputError(f"layers={layers!r} is not understood; expected None, 'all', a negative int -n "
                         "for the last n blocks, or a list of block indices")
    if isinstance(layers, bool):
        raise InputError(f"layers={layers!r} is not understood; expected None, 'all', -n or a list of ints")
    if isinstance(layers, int):
        if layers >= 0:
            raise InputError(f"layers={layers} is ambiguous; pass a negative int -n for the last n blocks "
                             f"or a list such as [{layers}] for one block")
        if -layers > num_blocks:
            raise InputError(f"layers={layers} asks for the last {-layers} blocks but the tower has "
                             f"{num_blocks}")
        return list(range(num_blocks + layers, num_blocks))
    try:
        items = list(layers)
    except TypeError:
        raise InputError(
            f"layers={layers!r} is not understood; expected None, 'all', -n or a list of ints") from None
    if not items:
        raise InputError("layers is an empty list; expected at least one block index")
    out = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InputError(f"layers contains {i!r}; expected integer block indices")
        if not -num_blocks <= i < num_blocks:
            raise InputError(f"block index {i} is out of range for a tower with {num_blocks} blocks "
                             f"(valid: {-num_blocks}..{num_blocks - 1})")
        out.add(i % num_blocks)
    return sorted(out)


# ----------------------------------------------------------------------------------------- chunking
# Elements of the largest per-chunk temporary. On CPUs small chunks are as fast as large ones (they stay
# in cache; measured with benchmarks/legrad_speed.py) and keep peak memory low; GPUs like bigger batches.
CHUNK_ELEMENTS = {"cpu": 2**23, "default": 2**26}


def query_chunk_size(per_query_elements: int, chunk_size: int | None, device: torch.device) -> int:
    """Queries per chunk: ``chunk_size`` when given (a positive int), else as many as fit the budget."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive number of queries, got {chunk_size!r}")
        return chunk_size
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["default"])
    return max(1, budget // max(1, per_query_elements))


def exporting() -> bool:
    """Whether the code runs under ``torch.export`` (the ONNX export): then shapes are symbolic, so
    queries go in one chunk and no branch may depend on a size."""
    return bool(torch.compiler.is_exporting())


def query_chunks(num_queries: int, per_query_elements: int, chunk_size: int | None,
                 device: torch.device) -> list[slice]:
    """The query slices processed together (results never depend on them); one slice when exporting."""
    n = query_chunk_size(per_query_elements, chunk_size, device)
    if exporting():
        return [slice(None)]
    return [slice(k0, min(num_queries, k0 + n)) for k0 in range(0, num_queries, n)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Maps are accumulated in float32 (float64 for float64 models), whatever the compute dtype."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------- logits
def logit_scale(model: nn.Module, dtype: torch.dtype) -> Tensor:
    """``exp(logit_scale)`` of the model in ``dtype`` (1 for a model without one)."""
    scale = getattr(model, "logit_scale", None)
    return scale.detach().to(dtype).exp() if isinstance(scale, Tensor) else torch.ones((), dtype=dtype)


def logit_bias(model: nn.Module, dtype: torch.dtype) -> Tensor | None:
    """The model's ``logit_bias`` (SigLIP) in ``dtype``, or ``None``."""
    bias = getattr(model, "logit_bias", None)
    return bias.detach().to(dtype) if isinstance(bias, Tensor) else None


def image_text_logits(model: nn.Module, embedding: Tensor, text: Tensor) -> Tensor:
    """The model's image–text logits ``[B,K]``: ``exp(logit_scale)·cos(e, t) (+ logit_bias)``.

    ``embedding`` ``[B,E]`` is normalised here; ``text`` ``[K,E]`` is used as given (unit rows).
    Differentiable, in the dtype of the inputs.
    """
    s = F.normalize(embedding, dim=-1) @ text.T
    if isinstance(getattr(model, "logit_scale", None), Tensor):
        s = s * logit_scale(model, s.dtype)
    bias = logit_bias(model, s.dtype)
    return s if bias is None else s + bias


# ---------------------------------------------------------------------------------------------- maps
def minmax_maps(maps: Tensor) -> Tensor:
    """Per-map min-max over the last two axes to [0,1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    rng = hi - lo
    return torch.where(rng > 0, (maps - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                       torch.zeros_like(maps))


def finalize_maps(grid_maps: Tensor, patch_size: tuple[int, int], num_queries: int, normalize: bool = True) -> Tensor:
    """Bilinear ×patch upsampling (``align_corners=False``) and per-map min-max → ``[B,K,H,W]`` in [0,1].

    A constant map (no positive gradient anywhere) becomes all zeros. ``normalize=False`` skips the
    min-max (raw maps, e.g. to fuse tiles before normalising).
    """
    maps = grid_maps.float() if grid_maps.dtype not in (torch.float32, torch.float64) else grid_maps
    B, K, gh, gw = maps.shape
    out = F.interpolate(maps, size=(gh * patch_size[0], gw * patch_size[1]), mode="bilinear",
                        align_corners=False)
    if normalize:
        out = minmax_maps(out)
    if K == 1:  # text-independent maps: the same map for every query (a no-op for one query)
        out = out.expand(B, num_queries, *out.shape[-2:])
    return out.to(torch.float32).contiguous()
