"""Small layers with an explicit, closed-form backward pass.

The explainers need gradients of an image–text score with respect to attention maps, for many text
queries at once, from a single forward pass. Instead of running autograd once per query, the pieces of a
ViT that sit between an attention map and the score are written here as plain ops, each with a
``forward`` that returns what its backward needs and a ``backward`` that maps an output gradient to an
input gradient. Everything is matmuls, element-wise ops and reductions, so it batches over queries, runs
in any dtype and can be traced for ONNX.

Shape convention: a forward takes ``x`` of shape ``[B, *S]`` and caches tensors of the same leading
batch dimension ``B``. A backward takes ``g`` of shape ``[B, K, *S']`` — one gradient per query — where
``S'`` broadcasts to ``S``; a cached tensor is read with :func:`_q` (a query axis inserted at dim 1).
Gradients that are identical for every token are therefore kept with a token axis of size 1 until an
op makes them token-dependent.

The ops read parameters (``detach()``-ed views of the model's tensors); they never modify a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def _q(t: Tensor) -> Tensor:
    """Insert the query axis (dim 1) into a cached ``[B, ...]`` tensor."""
    return t.unsqueeze(1)


class Op(Protocol):
    def forward(self, x: Tensor) -> tuple[Tensor, Any]: ...

    def backward(self, g: Tensor, cache: Any) -> Tensor: ...


@dataclass(frozen=True)
class LayerNorm:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis."""

    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # Statistics in float32 for half-precision inputs, as open_clip's LayerNormFp32 does.
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xc = work - work.mean(-1, keepdim=True)
        inv_std = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        xhat = xc * inv_std
        y = xhat
        if self.weight is not None:
            y = y * self.weight.to(work.dtype)
        if self.bias is not None:
            y = y + self.bias.to(work.dtype)
        return y.to(x.dtype), (xhat.to(x.dtype), inv_std.to(x.dtype))

    def backward(self, g: Tensor, cache: tuple[Tensor, Tensor]) -> Tensor:
        xhat, inv_std = _q(cache[0]), _q(cache[1])
        gt = g * self.weight if self.weight is not None else g
        # (g̃ − mean(g̃) − x̂·mean(g̃ ⊙ x̂)) / σ ; broadcasting makes g token-dependent here.
        return (gt - gt.mean(-1, keepdim=True) - xhat * (gt * xhat).mean(-1, keepdim=True)) * inv_std


@dataclass(frozen=True)
class Linear:
    """``x @ weight.T + bias`` with ``weight`` in PyTorch's (out × in) layout."""

    weight: Tensor
    bias: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return F.linear(x, self.weight, self.bias), None

    def backward(self, g: Tensor, cache: None) -> Tensor:
        return g @ self.weight


@dataclass(frozen=True)
class Activation:
    """Element-wise activation: exact GELU, tanh-approximated GELU or QuickGELU."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation {self.kind!r} is not supported; expected one of {ACTIVATIONS}")

    def forward(self, x: Tensor) -> tuple[Tensor, ActivationCache]:
        return activation(x, self.kind), ActivationCache(x)

    def backward(self, g: Tensor, cache: ActivationCache) -> Tensor:
        if cache.grad is None:  # computed once, reused by every query chunk
            cache.grad = activation_grad(cache.x, self.kind)
        return g * _q(cache.grad)


@dataclass
class ActivationCache:
    x: Tensor
    grad: Tensor | None = None


@dataclass(frozen=True)
class Scale:
    """Per-channel scale (LayerScale): ``x * gamma``."""

    gamma: Tensor

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return x * self.gamma, None

    def backward(self, g: Tensor, cache: None) -> Tensor:
        return g * self.gamma


@dataclass(frozen=True)
class Residual:
    """``x + branch(x)``."""

    branch: tuple[Op, ...]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Any]]:
        y, caches = run_forward(self.branch, x)
        return x + y, caches

    def backward(self, g: Tensor, cache: list[Any]) -> Tensor:
        return g + run_backward(self.branch, cache, g)


@dataclass(frozen=True)
class Mlp:
    """A transformer block's MLP residual, its parts named: ``x + γ·fc2(act(fc1(norm(x))))`` (``norm``
    and ``γ`` optional). Forward and backward are those of :class:`Residual` over :attr:`branch`."""

    norm: LayerNorm | None
    fc1: Linear
    act: Activation
    fc2: Linear
    gamma: Tensor | None = None

    @property
    def branch(self) -> tuple[Op, ...]:
        ops: list[Op] = [] if self.norm is None else [self.norm]
        ops += [self.fc1, self.act, self.fc2]
        return tuple(ops) if self.gamma is None else (*ops, Scale(self.gamma))

    @property
    def hidden(self) -> int:
        """Width of the hidden layer (``fc1``'s outputs)."""
        return int(self.fc1.weight.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Any]]:
        y, caches = run_forward(self.branch, x)
        return x + y, caches

    def backward(self, g: Tensor, cache: list[Any]) -> Tensor:
        return g + run_backward(self.branch, cache, g)


@dataclass(frozen=True)
class SelectToken:
    """Take token ``index`` of ``[B, T, D]`` → ``[B, D]`` (CLS pooling, first latent query)."""

    index: int = 0

    def forward(self, x: Tensor) -> tuple[Tensor, int]:
        return x[:, self.index], x.shape[1]

    def backward(self, g: Tensor, cache: int) -> Tensor:
        out = g.new_zeros(*g.shape[:-1], cache, g.shape[-1])
        out[..., self.index, :] = g
        return out


@dataclass(frozen=True)
class MeanTokens:
    """Mean over tokens ``start:`` of ``[B, T, D]`` → ``[B, D]``."""

    start: int = 0

    def forward(self, x: Tensor) -> tuple[Tensor, int]:
        return x[:, self.start :].mean(1), x.shape[1]

    def backward(self, g: Tensor, cache: int) -> Tensor:
        n = cache - self.start
        gi = (g / n).unsqueeze(-2)
        if self.start == 0:
            return gi  # token axis of size 1: the same gradient for every token
        out = g.new_zeros(*g.shape[:-1], cache, g.shape[-1])
        out[..., self.start :, :] = gi
        return out


def run_forward(ops: Sequence[Op], x: Tensor) -> tuple[Tensor, list[Any]]:
    caches = []
    for op in ops:
        x, c = op.forward(x)
        caches.append(c)
    return x, caches


def run_backward(ops: Sequence[Op], caches: Sequence[Any], g: Tensor) -> Tensor:
    for op, c in zip(reversed(ops), reversed(caches)):
        g = op.backward(g, c)
    return g


def activation(x: Tensor, kind: str) -> Tensor:
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"activation {kind!r} is not supported; expected one of {ACTIVATIONS}")


def activation_grad(x: Tensor, kind: str) -> Tensor:
    """Derivative of :func:`activation` at ``x``."""
    if kind == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + x * pdf
    if kind == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x.pow(3)))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    if kind == "quick_gelu":
        s = torch.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1.0 - s)
    raise ValueError(f"activation {kind!r} is not supported; expected one of {ACTIVATIONS}")


def cosine_grad(f: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of ``s_k = t_k · f / ‖f‖`` with respect to ``f``, for every query.

    ``f``: ``[B, E]`` unnormalised embeddings; ``text``: ``[K, E]`` vectors, or ``[B, K, E]`` (one set
    per image). Returns ``(g_f [B, K, E], s [B, K])`` with ``g_f = (t_k − s_k e) / ‖f‖`` — exact for any
    ``t_k``, unit or not (a difference of text embeddings, say).
    """
    norm = f.norm(dim=-1, keepdim=True)
    e = f / norm
    if text.ndim == 2:
        s = e @ text.T
        text = text.unsqueeze(0)
    else:
        s = (text @ e.unsqueeze(-1)).squeeze(-1)
    g = (text - s.unsqueeze(-1) * e.unsqueeze(1)) / norm.unsqueeze(1)
    return g, s
