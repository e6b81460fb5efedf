"""Map refinement (``postprocess.refine``): PAMR against a loop implementation of Araslanov & Roth's
definition, superpixel means, edge alignment on a scene with a known object, and the errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovlabel import InputError
from ovlabel.postprocess import Postprocessor, ThresholdSpec
from ovlabel.postprocess.refine import RefineSpec

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None


def pamr_reference(image: np.ndarray, heat: np.ndarray, dilations, iterations) -> np.ndarray:
    """PAMR written pixel by pixel in float64 (1-stage-wseg's ``PAMR``): for each pixel, the colour
    distances to its 8 neighbours at every dilation (borders replicated), divided by 0.1 × the standard
    deviation (unbiased, per channel) of the 9 × |dilations| values around it, averaged over the channels
    and negated; a softmax over the neighbours gives the weights, and the map is averaged with them
    ``iterations`` times."""
    x = image.astype(np.float64) / 255.0
    H, W, C = x.shape
    offs = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def at(a, y, x_):
        return a[min(max(y, 0), H - 1), min(max(x_, 0), W - 1)]

    weights = np.zeros((H, W, len(offs) * len(dilations)))
    nbr = np.zeros((H, W, len(offs) * len(dilations), 2), dtype=int)
    for i in range(H):
        for j in range(W):
            window = [at(x, i + dy * d, j + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            std = np.std(np.array(window), axis=0, ddof=1)  # [C]
            logits = []
            p = 0
            for d in dilations:
                for dy, dx in offs:
                    diff = np.abs(x[i, j] - at(x, i + dy * d, j + dx * d))
                    logits.append(np.mean(-diff / (1e-8 + 0.1 * std)))
                    nbr[i, j, p] = (min(max(i + dy * d, 0), H - 1), min(max(j + dx * d, 0), W - 1))
                    p += 1
            e = np.exp(np.array(logits) - max(logits))
            weights[i, j] = e / e.sum()
    m = heat.astype(np.float64)
    for _ in range(iterations):
        m = np.einsum("hwp,hwp->hw", weights, m[nbr[..., 0], nbr[..., 1]])
    return m


def test_pamr_matches_the_definition():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image[:, 6:] = [200, 30, 30]  # an edge and a flat region (zero spread: the 1e-8 guard)
    heat = rng.random((9, 11)).astype(np.float32)
    spec = RefineSpec(method="pamr", iterations=3, dilations=(1, 2))
    got = spec.for_image(image).refine(heat)
    want = pamr_reference(image, heat, (1, 2), 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_superpixels_take_the_mean_heat_of_their_pixels():
    rng = np.random.default_rng(1)
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    image[:20, :25], image[:20, 25:], image[20:, :25], image[20:, 25:] = [200, 0, 0], [0, 200, 0], [0, 0, 200], 90
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    heat = rng.random((40, 50)).astype(np.float32)
    for kind in ("slic", "felzenszwalb"):
        r = RefineSpec(method="superpixels", superpixels=kind, segments=30, scale=20).for_image(image)
        out = r.refine(heat)
        labels = r.labels
        assert labels.max() >= 3  # several superpixels
        for s in np.unique(labels):
            sel = labels == s
            np.testing.assert_allclose(out[sel], heat[sel].mean(), rtol=1e-5)


def _scene(size=192, patch=32, seed=0):
    """A disc of one colour on a textured background, and a map like a ViT's: the disc's coverage of
    each patch, upsampled bilinearly (blocky at the threshold) and peaked at the disc's centre (so that a
    threshold at half the maximum cuts inside the object)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = 0.53 * size, 0.45 * size, 0.23 * size
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    image = np.clip(rng.normal(90, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image[disc] = [210, 170, 40]
    cover = torch.from_numpy(disc.astype(np.float32))[None, None]
    coarse = F.avg_pool2d(cover, patch)
    heat = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = heat * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.1 * r) ** 2))
    return image, heat.astype(np.float32), disc

def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("method", ["superpixels", "pamr"] + (["crf"] if HAS_CRF else []))
def test_refined_masks_follow_the_image_edges(method):
    image, heat, disc = _scene()
    plain = Postprocessor(threshold=ThresholdSpec("max_fraction", 0.5), min_area_fraction=0)
    refined = Postprocessor(threshold=ThresholdSpec("max_fraction", 0.5), min_area_fraction=0,
                            refine=RefineSpec(method=method))
    before = plain(heat[None], ["disc"], [1])
    after = refined(heat[None], ["disc"], [1], image=image)
    assert len(before) == 1 and len(after) == 1
    iou_before, iou_after = _iou(before.mask(0), disc), _iou(after.mask(0), disc)
    assert iou_before < 0.7
    assert iou_after > 0.9, (iou_before, iou_after)


def test_crf_needs_its_extra_or_runs():
    image, heat, _ = _scene(64)
    spec = RefineSpec(method="crf", iterations=2)
    if HAS_CRF:
        out = spec.for_image(image).refine(heat)
        assert out.shape == heat.shape and 0 <= out.min() and out.max() <= 1
    else:
        with pytest.raises(InputError, match=r"ovlabel\[crf\]"):
            spec.for_image(image)


def test_large_images_are_refined_at_max_side():
    image, heat, disc = _scene(192)
    r = RefineSpec(method="pamr", max_side=96).for_image(image)
    assert r.work == (96, 96)
    out = r.refine(heat)
    assert out.shape == heat.shape
    assert _iou(out >= 0.5 * out.max(), disc) > 0.85


def test_refinement_needs_the_image_of_the_maps_size():
    image, heat, _ = _scene(64)
    post = Postprocessor(refine=RefineSpec(method="pamr"))
    with pytest.raises(InputError, match="needs the image"):
        post(heat[None], ["disc"], [1])
    with pytest.raises(InputError, match="64x64"):
        post(heat[None, :, :60], ["disc"], [1], image=image)
    with pytest.raises(InputError, match="expected one of"):
        RefineSpec(method="bilateral")
