"""Precision and recall of a pseudo-label dataset (ovlabel.evaluation.dataset) against a plain reference:
dense masks, IoU by counting pixels, greedy matching best score first, per image and class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ovlabel.evaluation.dataset import dataset_quality, precision_recall_curve
from ovlabel.export.coco import coco_from_dict, load_coco


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _rect(rng, h, w) -> np.ndarray:
    y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    m = np.zeros((h, w), bool)
    m[y0:y0 + rng.integers(3, 9), x0:x0 + rng.integers(3, 9)] = True
    return m


def _scene(seed: int):
    rng = np.random.default_rng(seed)
    images, truth, preds, dense = [], [], [], {}
    for i in range(1, 7):
        h, w = 20, 24
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        for _ in range(rng.integers(0, 4)):
            m, cat = _rect(rng, h, w), int(rng.integers(1, 3))
            crowd = int(rng.random() < 0.15)
            truth.append({"id": len(truth) + 1, "image_id": i, "category_id": cat, "segmentation": _rle(m),
                          "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(mask_utils.encode(
                              np.asfortranarray(m.astype(np.uint8))))], "iscrowd": crowd})
            dense[len(truth)] = m
            for _ in range(rng.integers(0, 3)):  # near copies of the truth, some of the wrong class
                p = np.roll(m, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
                preds.append({"image_id": i, "category_id": cat if rng.random() < 0.8 else 3 - cat,
                              "segmentation": _rle(p), "score": float(rng.random()), "_m": p})
        for _ in range(rng.integers(0, 3)):  # and noise
            p = _rect(rng, h, w)
            preds.append({"image_id": i, "category_id": int(rng.integers(1, 3)), "segmentation": _rle(p),
                          "score": float(rng.random()), "_m": p})
    gt = coco_from_dict({"images": images, "annotations": truth,
                         "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, "test")
    return gt, truth, preds, dense


def _reference(truth, preds, dense, min_score, iou=0.5):
    tp = n = 0
    for key in {(p["image_id"], p["category_id"]) for p in preds}:
        group = sorted([p for p in preds if (p["image_id"], p["category_id"]) == key and p["score"] >= min_score],
                       key=lambda p: -p["score"])
        gts = [t for t in truth if (t["image_id"], t["category_id"]) == key]
        taken = set()
        for p in group:
            best, where = iou, None
            for t in gts:
                g = dense[t["id"]]
                inter = (p["_m"] & g).sum()
                if t["iscrowd"]:
                    continue
                v = inter / (p["_m"] | g).sum()
                if t["id"] not in taken and v >= best:
                    best, where = v, t["id"]
            if where is not None:
                taken.add(where)
                tp += 1
                n += 1
            elif any(t["iscrowd"] and (p["_m"] & dense[t["id"]]).sum() / p["_m"].sum() >= iou for t in gts):
                continue  # ignored: matches a crowd region only
            else:
                n += 1
    instances = sum(1 for t in truth if not t["iscrowd"])
    return tp, n, instances


@pytest.mark.parametrize("seed", range(6))
def test_precision_and_recall_match_a_pixel_counting_reference(seed):
    gt, truth, preds, dense = _scene(seed)
    anns = [{k: v for k, v in p.items() if k != "_m"} for p in preds]
    curve = dict(precision_recall_curve(gt, anns))
    for min_score in (0.0, 0.3, 0.6, 0.9):
        tp, n, instances = _reference(truth, preds, dense, min_score)
        q = dataset_quality(gt, anns, min_score=min_score)
        assert (q.true_positives, q.annotations, q.instances) == (tp, n, instances)
        assert q.precision == pytest.approx(tp / n if n else 1.0)
        assert q.recall == pytest.approx(tp / instances if instances else 1.0)
        # the curve gives the same figures at each annotation's score
        kept = [p["score"] for p in preds if p["score"] >= min_score]
        if kept:
            assert curve[min(kept)] == q
    assert any(q.true_positives for q in curve.values())  # the scenes do produce hits


def test_an_exact_dataset_scores_one_and_boxes_are_measured_too():
    gt, truth, _, _ = _scene(1)
    exact = [{"image_id": t["image_id"], "category_id": t["category_id"], "segmentation": t["segmentation"],
              "bbox": list(mask_utils.toBbox({"size": t["segmentation"]["size"],
                                              "counts": t["segmentation"]["counts"].encode()})),
              "score": 1.0} for t in truth if not t["iscrowd"]]
    for iou_type in ("segm", "bbox"):
        q = dataset_quality(gt, exact, iou_type=iou_type)
        assert (q.precision, q.recall, q.f1) == (1.0, 1.0, 1.0) and q.instances == len(exact) > 0
    wrong_class = [{**a, "category_id": 3 - a["category_id"]} for a in exact]
    assert dataset_quality(gt, wrong_class).true_positives == 0


def test_the_dataset_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/dataset_quality.py on a few scenes: the sweep and the held-out figures it prints are the
    library's own measurement of the files it wrote."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dataset_quality.py"
    out = subprocess.run([sys.executable, str(script), "--images", "6", "--sweep", "--out", str(tmp_path),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert "held-out: 6 scenes" in out.stdout and "chosen:" in out.stdout
    assert {r["dataset_min_score"] for r in report["sweep"]} >= {0.0, 0.1}
    held = report["held_out"]["segm"]
    data = json.loads((tmp_path / "test-run" / "dataset.json").read_text())
    assert held == dataset_quality(load_coco(tmp_path / "test" / "annotations.json"), data["annotations"]).as_dict()
    assert held["annotations"] == len(data["annotations"]) and held["instances"] > 0
