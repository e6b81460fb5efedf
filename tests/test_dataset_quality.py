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


def _distill():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill

    return distill


def test_distill_splits_the_students_gap_by_hand_count():
    """benchmarks/distill.py's gap: missed objects, false positives and boundaries (matches at IoU 0.5 that
    fail at 0.75) among detections scoring ≥ 0.25, counted by hand on one image."""
    box = lambda y0, y1, x0, x1: np.pad(np.ones((y1 - y0, x1 - x0), bool), ((y0, 40 - y1), (x0, 40 - x1)))  # noqa: E731
    a, b, c = box(0, 10, 0, 10), box(20, 30, 0, 10), box(0, 10, 20, 30)
    truth = [{"id": i + 1, "image_id": 1, "category_id": cat, "segmentation": _rle(m), "area": int(m.sum()),
              "bbox": [0.0, 0.0, 1.0, 1.0], "iscrowd": 0} for i, (m, cat) in enumerate([(a, 1), (b, 1), (c, 2)])]
    gt = coco_from_dict({"images": [{"id": 1, "file_name": "1.png", "height": 40, "width": 40}],
                         "annotations": truth, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, "t")
    shifted = box(23, 33, 0, 10)  # IoU with b: 70 / 130 = 0.54
    results = [{"image_id": 1, "category_id": 1, "segmentation": _rle(a), "score": 0.9},        # exact
               {"image_id": 1, "category_id": 1, "segmentation": _rle(shifted), "score": 0.5},  # boundary
               {"image_id": 1, "category_id": 2, "segmentation": _rle(c), "score": 0.1},        # below 0.25
               {"image_id": 1, "category_id": 2, "segmentation": _rle(box(30, 40, 30, 40)), "score": 0.8}]  # FP
    g = _distill().gap(gt, results)
    assert (g["missed"], g["false_positives"], g["boundary"]) == (1, 1, 1)
    assert g["recall@0.5"] == 2 / 3 and g["precision@0.5"] == 2 / 3


def _outline(mask: np.ndarray) -> np.ndarray:
    """What a YOLO polygon can hold of a mask: its largest 8-connected part, holes filled."""
    from scipy import ndimage

    parts, n = ndimage.label(mask, structure=np.ones((3, 3)))
    largest = parts == 1 + int(np.argmax(ndimage.sum(mask, parts, range(1, n + 1))))
    return ndimage.binary_fill_holes(largest)


def test_distill_trains_the_ground_truth_student_on_the_exact_masks(tmp_path):
    """The ground-truth student's dataset is the exact ground truth in ovlabel's YOLO layout: one label line
    per object, its class the object's, its outline the object's mask (its largest part, holes filled: YOLO
    has no holes)."""
    from ovlabel.datasets.shapes import write_coco

    gt_path = write_coco(tmp_path / "train", 8, 5)
    data_yaml = _distill().ground_truth_dataset(tmp_path, gt_path)
    root = data_yaml.parent
    gt = json.loads(gt_path.read_text())
    index_to_id = {int(k): v["category_id"] for k, v in json.loads((root / "categories.json").read_text()).items()}
    split = json.loads((root / "images.json").read_text())
    seen = 0
    for img in gt["images"]:
        entry = split[str(img["id"])]
        lines = (root / "labels" / entry["split"] / (Path(entry["image"]).stem + ".txt")).read_text().split("\n")
        lines = [ln for ln in lines if ln.strip()]
        objects = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        assert sorted(index_to_id[int(ln.split()[0])] for ln in lines) == sorted(a["category_id"] for a in objects)
        h, w = img["height"], img["width"]
        for ln in lines:
            xy = np.array(ln.split()[1:], float).reshape(-1, 2) * [w, h]
            drawn = mask_utils.frPyObjects([xy.reshape(-1).tolist()], h, w)  # COCO's frame, as the exporter's
            ious = [float(mask_utils.iou(drawn, [
                _rle(_outline(mask_utils.decode(a["segmentation"])))], [0])[0, 0]) for a in objects
                if a["category_id"] == index_to_id[int(ln.split()[0])]]
            assert max(ious) == 1.0  # the exact outline
            seen += 1
    assert seen == len(gt["annotations"]) > 0


def test_distill_attribution_gives_ovlabels_masks_their_true_classes(tmp_path):
    """--attribute's dataset: each of ovlabel's masks that matches an object (IoU ≥ 0.5, greedy by score, any
    class) takes the object's class; a duplicate of a taken object and a false positive keep theirs. The
    images are matched by file name (ovlabel's run numbers them its own way)."""
    from PIL import Image

    box = lambda y0, y1, x0, x1: np.pad(np.ones((y1 - y0, x1 - x0), bool), ((y0, 40 - y1), (x0, 40 - x1)))  # noqa: E731
    a, b = box(0, 10, 0, 10), box(20, 30, 0, 10)
    cats = [{"id": i, "name": n} for i, n in [(1, "a"), (2, "b"), (3, "c")]]
    (tmp_path / "train" / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "images" / "s.png")
    image = {"file_name": "s.png", "height": 40, "width": 40}
    truth = [{"id": i + 1, "image_id": 1, "category_id": cat, "segmentation": _rle(m), "area": int(m.sum()),
              "bbox": [0.0, 0.0, 10.0, 10.0], "iscrowd": 0} for i, (m, cat) in enumerate([(a, 1), (b, 2)])]
    gt_path = tmp_path / "train" / "annotations.json"
    gt_path.write_text(json.dumps({"images": [{"id": 1, **image}], "annotations": truth, "categories": cats}))
    near_a = box(1, 11, 0, 10)  # IoU with a: 90 / 110
    ours = [(a, 2, 0.9),                       # the right mask, the wrong class → a's class, 1
            (b, 2, 0.8),                       # right already
            (near_a, 3, 0.5),                  # a duplicate of a, already taken → keeps 3
            (box(30, 40, 30, 40), 1, 0.7)]     # a false positive → keeps 1
    dataset = {"images": [{"id": 7, **image}], "categories": cats,
               "annotations": [{"id": i + 1, "image_id": 7, "category_id": c, "segmentation": _rle(m),
                                "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(_rle(m))],
                                "iscrowd": 0, "score": s} for i, (m, c, s) in enumerate(ours)]}
    (tmp_path / "teacher-train").mkdir()
    (tmp_path / "teacher-train" / "dataset.json").write_text(json.dumps(dataset))
    data_yaml = _distill().true_classes(tmp_path, gt_path)
    fixed = json.loads((data_yaml.parent.parent / "dataset.json").read_text())
    assert [x["category_id"] for x in fixed["annotations"]] == [1, 2, 3, 1]
    index_to_id = {int(k): v["category_id"] for k, v in json.loads(
        (data_yaml.parent / "categories.json").read_text()).items()}
    labels = list((data_yaml.parent / "labels").rglob("*.txt"))
    lines = [ln for ln in labels[0].read_text().split("\n") if ln.strip()]
    assert len(labels) == 1 and sorted(index_to_id[int(ln.split()[0])] for ln in lines) == [1, 1, 2, 3]


def test_distill_does_not_resume_a_run_of_other_settings(tmp_path):
    """A kept --out resumes only the run it holds: other settings stop the script before anything is
    installed, labelled or trained, and the folder's settings are left as they were."""
    out = tmp_path / "run"
    distill = _distill()
    out.mkdir()
    kept = {"train": 1000, "test": 200, "seed": 5150, "epochs": 100, "imgsz": 96, "batch": 32}
    (out / "settings.json").write_text(json.dumps(kept))
    with pytest.raises(SystemExit, match="other settings"):
        distill.main(["--out", str(out), "--epochs", "5", "--venv", str(tmp_path / "venv")])
    assert json.loads((out / "settings.json").read_text()) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and sorted(p.name for p in out.iterdir()) == [
        "settings.json"]
