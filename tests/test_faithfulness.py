"""Faithfulness metrics on hand-built cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_model
from ovlabel import InputError, compute_maps
from ovlabel.evaluation import (
    clip_score_fn,
    curve_auc,
    deletion_curve,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    perturbation_test,
    pointing_game,
)

# A 10x10 image whose score is the mean of channel 0 over the 5x5 top-left square R (25 pixels).
IMAGE = torch.ones(1, 3, 10, 10)
REGION = torch.zeros(10, 10, dtype=torch.bool)
REGION[:5, :5] = True
# The map ranks R first; within R and outside it, a strict order so that ties do not matter.
MAP = (REGION.float() * 10 + torch.linspace(0, 1, 100).reshape(10, 10)).unsqueeze(0)


def region_score(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, :5, :5].mean(dim=(-1, -2))


def test_positive_perturbation_known_curve_and_auc():
    curve = perturbation_curve(region_score, IMAGE, MAP, positive=True)[0]
    # f = 0.1 deletes 10 of R's 25 pixels, 0.2 deletes 20, from 0.3 on all of R is gone.
    expected = torch.tensor([1.0, 0.6, 0.2, 0, 0, 0, 0, 0, 0, 0])
    assert torch.allclose(curve, expected, atol=1e-6)
    # trapezoid: 0.1*(1+.6)/2 + 0.1*(.6+.2)/2 + 0.1*(.2+0)/2 = 0.13
    assert perturbation_auc(curve) == pytest.approx(13.0)


def test_negative_perturbation_known_curve_and_auc():
    curve = perturbation_curve(region_score, IMAGE, MAP, positive=False)[0]
    # least relevant first: R is untouched until 75 pixels are gone; 0.8 removes 5 of R, 0.9 removes 15.
    expected = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 0.8, 0.4])
    assert torch.allclose(curve, expected, atol=1e-6)
    assert perturbation_auc(curve) == pytest.approx(85.0)
    res = perturbation_test(region_score, IMAGE, MAP, positive=False)
    assert res["auc"] == pytest.approx(85.0) and len(res["curve"]) == 10


def test_deletion_and_insertion_curves():
    fr, dele = deletion_curve(region_score, IMAGE, MAP, steps=4)  # 0, 25, 50, 75, 100 %
    assert torch.allclose(dele[0], torch.tensor([1.0, 0, 0, 0, 0]))
    fr, ins = insertion_curve(region_score, IMAGE, MAP, steps=4, baseline=0.0)
    assert torch.allclose(ins[0], torch.tensor([0.0, 1, 1, 1, 1]))
    assert curve_auc(fr, ins).item() == pytest.approx(0.875)
    # a map that ranks R last does worse on both
    _, ins_bad = insertion_curve(region_score, IMAGE, -MAP, steps=4, baseline=0.0)
    assert curve_auc(fr, ins_bad).item() < 0.2
    # default baseline: a blurred image (finite scores, starts below the clean score for a sharp image)
    img = torch.zeros(1, 3, 10, 10)
    img[:, :, :5, :5] = 1
    _, ins_blur = insertion_curve(region_score, img, MAP, steps=4)
    assert ins_blur[0, 0] < 1.0 and ins_blur[0, -1] == pytest.approx(1.0)


def test_pointing_game():
    maps = np.zeros((3, 8, 8))
    maps[0, 2, 2] = 1  # inside
    maps[1, 7, 7] = 1  # outside
    maps[2, 5, 3] = 1  # 2 px from the mask edge
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[:, 1:4, 1:4] = True
    assert pointing_game(maps, masks).tolist() == [True, False, False]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [True, False, True]
    with pytest.raises(InputError):
        pointing_game(maps, masks[:2])


def test_bad_shapes():
    with pytest.raises(InputError, match="maps must be"):
        perturbation_curve(region_score, IMAGE, MAP[0])
    with pytest.raises(InputError, match="points"):
        perturbation_auc([1.0, 0.5])


def test_clip_score_fn_on_a_model():
    model = make_model("ovl-test-vit")
    images = torch.randn(2, 3, 32, 32)
    text = torch.randn(4, 24)
    for kind in ("probability", "logit", "correct"):
        s = clip_score_fn(model, text, [1, 2], kind=kind)(images)
        assert s.shape == (2,) and torch.isfinite(s).all()
    probs = clip_score_fn(model, text, 3)(images)
    assert ((probs > 0) & (probs < 1)).all()
    maps = compute_maps(model, images, text[:1])[:, 0]
    curve = perturbation_curve(clip_score_fn(model, text, 0), images, maps)
    assert curve.shape == (2, 10)
    with pytest.raises(InputError):
        clip_score_fn(model, text, 0, kind="accuracy")
