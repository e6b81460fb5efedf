"""The speed benchmarks compare against what they say they compare against: benchmarks/legrad_speed.py's
re-implementation of the published LeGrad wrapper gives ovlabel's LeGrad maps (so the speed-up it prints is
for the same output)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from ovlabel.legrad.legrad import legrad_grid_maps
from ovlabel.legrad.towers import read_tower

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import legrad_speed  # noqa: E402


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("layers", [[1, 2], [0, 1, 2]])
def test_published_reimplementation_gives_ovlabels_maps(batch, layers):
    model = make_model("ovl-test-vit", dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(1, 3, 32, 48, generator=g, dtype=torch.float64)
    text = torch.randn(5, 24, generator=g, dtype=torch.float64)
    published = legrad_speed.published_legrad(model, images, text, layers, batch)  # [K, n] (text normalised inside)
    ours = legrad_grid_maps(read_tower(model), images, F.normalize(text, dim=-1), layers)  # [1, K, gh, gw]
    assert published.shape == (5, 4 * 6)
    torch.testing.assert_close(published, ours.reshape(5, -1), rtol=1e-9, atol=1e-12)
