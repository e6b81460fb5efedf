"""Closed-form backward of each op against torch.autograd, per query, in float64."""

from __future__ import annotations

import pytest
import torch

from ovlabel.legrad.ops import (
    Activation,
    LayerNorm,
    Linear,
    MeanTokens,
    Residual,
    Scale,
    SelectToken,
    cosine_grad,
    run_backward,
    run_forward,
)

torch.manual_seed(0)
D = 6


def _ops():
    w = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    return {
        "layernorm": [LayerNorm(w(D), w(D), 1e-5)],
        "layernorm_no_affine": [LayerNorm(None, None, 1e-6)],
        "linear": [Linear(w(4, D), w(4))],
        "gelu": [Activation("gelu")],
        "gelu_tanh": [Activation("gelu_tanh")],
        "quick_gelu": [Activation("quick_gelu")],
        "scale": [Scale(w(D))],
        "residual_mlp": [Residual((LayerNorm(w(D), w(D), 1e-5), Linear(w(12, D), w(12)), Activation("gelu"),
                                   Linear(w(D, 12), w(D)), Scale(w(D))))],
        "select": [SelectToken(2)],
        "mean_all": [MeanTokens(0)],
        "mean_patches": [MeanTokens(1), LayerNorm(w(D), None, 1e-5)],
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_backward_matches_autograd(name):
    ops = _ops()[name]
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    y, caches = run_forward(ops, x)
    K = 4
    g = torch.randn(3, K, *y.shape[1:], dtype=torch.float64)
    ours = run_backward(ops, caches, g)
    for k in range(K):
        (ref,) = torch.autograd.grad(y, x, g[:, k], retain_graph=True)
        assert torch.allclose(ours[:, k].expand_as(ref), ref, atol=1e-10), name


def test_cosine_grad():
    f = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    g, s = cosine_grad(f, t)
    for k in range(3):
        sk = (torch.nn.functional.normalize(f, dim=-1) @ t[k]).sum()
        (ref,) = torch.autograd.grad(sk, f)
        assert torch.allclose(g[:, k], ref, atol=1e-12)
    assert torch.allclose(s, torch.nn.functional.normalize(f, dim=-1) @ t.T)


def test_unknown_activation():
    with pytest.raises(ValueError, match="expected one of"):
        Activation("relu6")
