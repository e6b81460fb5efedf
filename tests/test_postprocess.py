"""Heatmaps → masks, boxes and scores: thresholds, morphology, instances, the result type, NMS, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import make_model
from ovlabel import InputError
from ovlabel.postprocess import (
    Detections,
    Letterbox,
    Postprocessor,
    ThresholdSpec,
    clean_mask,
    components,
    find_instances,
    heat_to_instances,
    masks_to_boxes,
    nms,
    presence_scores,
)


def _blob(h, w, y0, y1, x0, x1, value=1.0):
    m = np.zeros((h, w), dtype=np.float32)
    m[y0:y1, x0:x1] = value
    return m


# ------------------------------------------------------------------------------------------- thresholds
def test_threshold_values():
    heat = np.arange(100, dtype=np.float32).reshape(10, 10) / 99
    assert ThresholdSpec("fixed", 0.3)(heat) == pytest.approx(0.3)
    assert ThresholdSpec("mean")(heat) == pytest.approx(heat.mean())
    assert ThresholdSpec("quantile", 0.9)(heat) == pytest.approx(np.quantile(heat, 0.9))
    assert ThresholdSpec("max_fraction", 0.5)(heat * 2) == pytest.approx(1.0)
    bimodal = np.concatenate([np.full(50, 0.1), np.full(50, 0.9)]).astype(np.float32).reshape(10, 10)
    t = ThresholdSpec("otsu")(bimodal)
    assert 0.1 <= t < 0.9
    assert ThresholdSpec("otsu")(np.zeros((4, 4))) == 0.0  # constant map: nothing above it


@pytest.mark.parametrize("spec", [("median", None), ("fixed", None), ("quantile", 1.5), ("max_fraction", -0.1)])
def test_threshold_rejects(spec):
    with pytest.raises(InputError):
        ThresholdSpec(*spec)


def test_morphology_and_components():
    m = np.zeros((20, 20), dtype=bool)
    m[2:8, 2:8] = True
    m[4, 4] = False  # a hole
    m[15, 15] = True  # a speck
    m[10:14, 10:18] = True
    assert clean_mask(m, fill_holes=True)[4, 4]
    assert not clean_mask(m, opening=3)[15, 15]
    parts = components(m, min_area=2)
    assert [p.sum() for p in parts] == [35, 32]  # largest first, the speck dropped
    inst = heat_to_instances(m.astype(np.float32), ThresholdSpec("fixed", 0.5), instances="class", min_area=2)
    assert len(inst) == 1 and inst[0].sum() == 67


@pytest.mark.parametrize("instances", ["components", "class"])
def test_instance_evidence_is_the_mean_heat_inside_each_mask(instances):
    rng = np.random.default_rng(3)
    heat = rng.random((40, 50)).astype(np.float32)
    heat[5:15, 5:20] += 2.0
    heat[25:35, 30:45] += 1.5
    found = find_instances(heat, ThresholdSpec("fixed", 1.2), instances=instances, min_area=20)
    masks = heat_to_instances(heat, ThresholdSpec("fixed", 1.2), instances=instances, min_area=20)
    assert len(found) == len(masks) == (2 if instances == "components" else 1)
    expected = [float(heat[m].mean()) for m in masks]
    assert np.allclose(found.mean(heat), expected, rtol=1e-6)
    assert found.areas.tolist() == [int(m.sum()) for m in masks]


# ---------------------------------------------------------------------------------------- result type
def test_detections_validate_and_derive_boxes():
    masks = np.zeros((2, 10, 12), dtype=bool)
    masks[0, 1:4, 2:7] = True
    masks[1, 5:10, 0:1] = True
    d = Detections(masks, [0.9, 0.5], [3, 7], ("a", "b"))
    assert d.boxes.tolist() == [[2, 1, 5, 3], [0, 5, 1, 5]]
    rles = d.rles()
    assert all(isinstance(r["counts"], str) for r in rles)
    enc = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    assert np.allclose(mask_utils.toBbox(enc), d.boxes)
    assert d.areas.tolist() == [15, 5]
    with pytest.raises(InputError, match="scores has 1 entries but there are 2 masks"):
        Detections(masks, [0.9], [3, 7], ("a", "b"))
    with pytest.raises(InputError, match="in \\[0,1\\]"):
        Detections(masks, [0.9, 1.5], [3, 7], ("a", "b"))
    with pytest.raises(InputError, match="empty masks"):
        Detections(np.zeros((1, 4, 4), dtype=bool), [0.5], [1], ("a",))
    with pytest.raises(InputError, match="boolean"):
        Detections(masks.astype(np.uint8), [0.9, 0.5], [3, 7], ("a", "b"))
    with pytest.raises(InputError, match="bounding boxes of the masks"):
        Detections(masks, [0.9, 0.5], [3, 7], ("a", "b"), boxes=np.zeros((2, 4)))


def test_detections_empty_safe():
    e = Detections.empty(5, 6)
    assert len(e) == 0 and e.image_size == (5, 6) and e.boxes.shape == (0, 4)
    assert len(e.sorted()) == 0 and len(e.top(3)) == 0 and e.rles() == [] and len(nms(e, 0.5)) == 0
    assert len(Detections.concatenate([e, e], 5, 6)) == 0
    assert masks_to_boxes(np.zeros((0, 5, 6), dtype=bool)).shape == (0, 4)


def test_many_detections_and_nms_over_many_candidates():
    """pycocotools' area() overflows for more than 255 RLEs at once under NumPy 2 (regression)."""
    masks = np.zeros((300, 40, 40), dtype=bool)
    for i in range(300):
        masks[i, i % 40, (i // 40) * 5 : (i // 40) * 5 + 1 + i % 3] = True
    d = Detections(masks, np.linspace(0.9, 0.1, 300), np.ones(300, int), ["a"] * 300)
    assert d.areas.tolist() == [1 + i % 3 for i in range(300)]
    heat = np.random.default_rng(0).random((1, 200, 200)).astype(np.float32)  # hundreds of specks
    dets = Postprocessor(threshold=ThresholdSpec("fixed", 0.7), min_area=1, min_area_fraction=0, nms="mask",
                         max_detections=1000)(heat, ["a"], [1])
    assert len(dets) > 255


def test_nms_suppresses_overlaps_across_classes():
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 3:12, 2:12] = True  # IoU 0.9 with the first
    masks[2, 14:18, 14:18] = True
    d = Detections(masks, [0.6, 0.9, 0.5], [1, 2, 1], ("a", "b", "a"))
    kept = nms(d, 0.5, "mask")
    assert kept.scores.tolist() == [0.9, 0.5]
    assert len(nms(d, 0.95, "box")) == 3


# ------------------------------------------------------------------------------------------ postprocessor
def test_postprocessor_instances_scores_and_presence():
    heat = np.stack([_blob(30, 40, 2, 10, 2, 10) + _blob(30, 40, 20, 28, 25, 38, 0.8),  # two instances
                     _blob(30, 40, 12, 18, 12, 18)])
    post = Postprocessor(threshold=ThresholdSpec("fixed", 0.5), min_area=4)
    d = post(heat, ["cat", "dog"], [17, 18], presence=[0.9, 0.4])
    assert sorted(d.category_ids.tolist()) == [17, 17, 18]
    # score = presence × mean heat inside the (min-max normalised) mask
    assert np.allclose(sorted(d.scores), sorted([0.9 * 1.0, 0.9 * 0.8, 0.4 * 1.0]))
    assert d.scores.tolist() == sorted(d.scores.tolist(), reverse=True)
    # absent classes are rejected by the presence threshold
    d2 = Postprocessor(threshold=ThresholdSpec("fixed", 0.5), min_area=4, presence_threshold=0.5)(
        heat, ["cat", "dog"], [17, 18], presence=[0.9, 0.4])
    assert set(d2.labels) == {"cat"}
    # one instance per class, per-class threshold override, max detections
    d3 = Postprocessor(threshold=ThresholdSpec("fixed", 0.5), instances="class")(heat, ["cat", "dog"], [17, 18])
    assert dict(zip(d3.labels, d3.areas.tolist())) == {"cat": 64 + 104, "dog": 36}
    top = Postprocessor(threshold=ThresholdSpec("fixed", 0.5), instances="class", max_detections=1)(
        heat, ["cat", "dog"], [17, 18])
    assert top.labels == ("dog",)  # evidence 1.0 beats cat's (64·1 + 104·0.8) / 168
    d4 = Postprocessor(threshold=ThresholdSpec("fixed", 0.5), class_thresholds={"cat": ThresholdSpec("fixed", 0.9)})(
        heat, ["cat", "dog"], [17, 18])
    assert sorted(d4.areas.tolist()) == [36, 64]


@pytest.mark.parametrize(
    "heat,labels,ids,presence,match",
    [
        (np.zeros((2, 4)), ["a"], [1], None, "\\[K,H,W\\]"),
        (np.zeros((2, 4, 4)), ["a"], [1], None, "2 heatmaps but 1 labels"),
        (np.full((1, 4, 4), np.nan), ["a"], [1], None, "NaN"),
        (np.zeros((1, 0, 4)), ["a"], [1], None, "zero area"),
        (np.zeros((1, 4, 4)), ["a"], [1], [1.5], "presence"),
    ],
)
def test_postprocessor_bad_input(heat, labels, ids, presence, match):
    with pytest.raises(InputError, match=match):
        Postprocessor()(heat, labels, ids, presence)


def test_postprocessor_raw_and_normalised_maps_agree():
    heat = _blob(16, 16, 3, 9, 3, 9)
    post = Postprocessor(threshold=ThresholdSpec("fixed", 0.5), min_area=1)
    a = post(heat[None], ["x"], [1])
    b = post((heat * 37.0 - 5.0)[None], ["x"], [1])
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.scores, b.scores)


# --------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "original,size,square",
    [
        ((300, 200), 60, (75, 150, 40, 100)),  # scale 1/5
        ((64, 128), 256, (16, 32, 25, 64)),  # scale 2
        ((90, 90), 45, (20, 44, 10, 30)),  # scale 1/2
        ((50, 150), 48, (25, 50, 25, 100)),  # scale 0.32, square on the bottom border
    ],
)
def test_letterbox_maps_boxes_back_exactly(original, size, square):
    lb = Letterbox.fit(original, size, patch=16)
    assert lb.padded[0] % 16 == 0 and lb.padded[1] % 16 == 0 and max(lb.resized) == size
    oy0, oy1, ox0, ox1 = square
    sy, sx = lb.scale
    iy0, iy1, ix0, ix1 = (round(v) for v in (oy0 * sy, oy1 * sy, ox0 * sx, ox1 * sx))
    assert np.allclose([iy0, iy1, ix0, ix1], [oy0 * sy, oy1 * sy, ox0 * sx, ox1 * sx])  # edges on input pixels
    inp = np.zeros(lb.padded, dtype=np.float32)
    inp[iy0:iy1, ix0:ix1] = 1
    inp[lb.resized[0] :, :] = 1  # padding must be ignored
    inp[:, lb.resized[1] :] = 1
    back = lb.to_original(inp).numpy()
    assert back.shape == original
    mask = back > 0.5
    # the box is exact to the pixel; bilinear interpolation may only round the square's corners
    assert masks_to_boxes(mask[None])[0].tolist() == [ox0, oy0, ox1 - ox0, oy1 - oy0]
    expected = np.zeros(original, dtype=bool)
    expected[oy0:oy1, ox0:ox1] = True
    assert not (mask & ~expected).any()
    assert mask.sum() / expected.sum() > 0.97


def test_letterbox_rejects_zero_area():
    with pytest.raises(InputError, match="zero area"):
        Letterbox.fit((0, 10), 224, 16)


# ------------------------------------------------------------------------------------------------ scores
def test_presence_modes():
    model = make_model("ovl-test-vit")
    img = torch.randn(2, 24)
    text = torch.randn(3, 24)
    bg = torch.randn(2, 24)
    p = presence_scores(model, img, text)  # auto → softmax (no logit bias)
    assert p.shape == (2, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    pb = presence_scores(model, img, text, background=bg)
    assert (pb.sum(1) < 1).all()
    binary = presence_scores(model, img, text, background=bg, mode="binary")
    assert binary.shape == (2, 3) and ((binary > 0) & (binary < 1)).all()
    siglip = make_model("ovl-test-siglip")
    ps = presence_scores(siglip, img, text)  # auto → sigmoid with the -10 logit bias
    assert ps.shape == (2, 3) and (ps < 0.5).all()
    with pytest.raises(InputError, match="background prompts"):
        presence_scores(model, img, text, mode="binary")
