"""Semantic metrics (FG/BG, average precision, p-mIoU, class IoU) and query building on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_model
from ovlabel import ConfigError
from ovlabel.config import load_config
from ovlabel.evaluation.semantic import ClassIoU, FgBgMetrics, PointMIoU, average_precision
from ovlabel.pipeline.queries import build_queries, encode_queries, imagenet_templates


def test_average_precision_known_values():
    assert average_precision([0.9, 0.8, 0.7], [1, 1, 0]) == pytest.approx(1.0)
    # ranking: pos, neg, pos → precision at the recalls 0.5 and 1.0 is 1 and 2/3
    assert average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # ties share one threshold: (pos, neg) tied at 0.5 → precision 1/2 at recall 1
    assert average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_fgbg_metrics_accumulate_over_the_dataset():
    m = FgBgMetrics(threshold=0.5)
    heat = np.array([[0.9, 0.9], [0.1, 0.1]])
    mask = np.array([[True, False], [False, False]])
    m.update(heat, mask)  # pred fg: top row; TP 1, FP 1, TN 2
    m.update(np.zeros((2, 2)), np.zeros((2, 2), bool))  # all background, correct; AP undefined (skipped)
    r = m.result()
    assert r["pixel_accuracy"] == pytest.approx(7 / 8)
    assert r["iou_foreground"] == pytest.approx(1 / 2)
    assert r["iou_background"] == pytest.approx(6 / 7)
    assert r["miou"] == pytest.approx((1 / 2 + 6 / 7) / 2)
    assert r["map"] == pytest.approx(0.5) and r["images"] == 1  # heat ties the FP with the TP
    mean = FgBgMetrics("mean")
    mean.update(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[True, False], [False, False]]))
    assert mean.result()["miou"] == 1.0


def test_point_miou():
    p = PointMIoU()
    heat = np.zeros((10, 10))
    heat[2:5, 2:5] = 0.9
    p.update(heat, [(3, 3), (8, 8), (2.5, 4.9), (9, 1)], [True, False, False, True])
    # preds at the points: fg, bg, fg, bg → TP 1, FP 1, TN 1, FN 1
    r = p.result()
    assert r["iou_foreground"] == pytest.approx(1 / 3) and r["iou_background"] == pytest.approx(1 / 3)
    assert r["p_miou"] == pytest.approx(1 / 3) and r["points"] == 4


def test_class_iou():
    c = ClassIoU()
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    c.update({"x": a}, {"x": b}, (4, 4))
    c.update({}, {"y": b}, (4, 4))
    r = c.result()
    assert r["per_class"] == {"x": pytest.approx(4 / 12), "y": 0.0}
    assert r["miou"] == pytest.approx((1 / 3 + 0) / 2)


def test_queries_templates_synonyms_and_background():
    import open_clip

    assert len(imagenet_templates()) == 80 and all("{}" in t for t in imagenet_templates())
    cfg = load_config(overrides=["queries.templates=imagenet", "queries.background=[background, sky]"]).queries
    cfg = cfg.model_copy(update={"synonyms": {"cat": ["kitten"]}})
    qs = build_queries(cfg, names=["cat", "dog"])
    assert len(qs.prompts("cat")) == 160 and len(qs.prompts("dog")) == 80
    model = make_model("ovl-test-vit")
    tok = open_clip.get_tokenizer("ovl-test-vit")
    text, bg = encode_queries(model, tok, qs, torch.device("cpu"))
    assert text.shape == (2, 24) and bg.shape == (2, 24)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the class embedding is the normalised mean of its prompts' normalised embeddings
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_text(tok(qs.prompts("dog"))), dim=-1)
    assert torch.allclose(text[1], torch.nn.functional.normalize(e.mean(0), dim=0), atol=1e-5)
    with pytest.raises(ConfigError, match="synonyms has entries for \\['cow'\\]"):
        build_queries(cfg.model_copy(update={"synonyms": {"cow": ["calf"]}}), names=["cat"])
    with pytest.raises(ConfigError, match="no queries"):
        build_queries(load_config().queries)
    with pytest.raises(ConfigError, match="no '\\{\\}' slot"):
        load_config(overrides=["queries.templates=[a photo]"])
