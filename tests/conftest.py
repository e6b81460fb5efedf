from __future__ import annotations

import logging
import warnings

import open_clip
import pytest
import torch

import tiny_models

tiny_models.register()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init open_clip model in eval mode (no weights are downloaded)."""
    torch.manual_seed(seed)
    logging.getLogger().setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(name, pretrained=None)
    # Random init leaves LayerNorm affine at identity and biases at zero; perturb them so the tests
    # exercise every parameter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 and ("ln" in n or "norm" in n or n.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture
def model_factory():
    return make_model
