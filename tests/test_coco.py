"""COCO export and evaluation: the oracle test, file invariants, agreement with pycocotools, bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco_fixtures import ABSENT, CATEGORIES, make_gt, write_oracle_heatmaps
from ovlabel import CocoFormatError, InputError
from ovlabel.apps.postprocess import postprocess_heatmaps
from ovlabel.cli import main
from ovlabel.common.categories import Categories, load_categories
from ovlabel.evaluation.coco import STAT_NAMES, evaluate
from ovlabel.export.coco import label_image, write_label_png
from ovlabel.export.heatmaps import load_heatmaps, save_heatmaps
from ovlabel.export.records import RecordWriter, finalize
from ovlabel.postprocess import Detections

ORACLE = ["--set", "postprocess.threshold.method=fixed", "--set", "postprocess.threshold.value=0.5",
          "--set", "postprocess.min_area=4", "--set", "postprocess.min_area_fraction=0"]


@pytest.fixture
def gt(tmp_path):
    return make_gt(tmp_path)


def _run(argv, capsys=None):
    code = main(argv)
    assert code == 0, capsys.readouterr().err if capsys else code
    return code


def check_invariants(out_dir, category_ids):
    """Every written file: unique ids, bbox == toBbox(segmentation), area == mask area, ids kept."""
    preds = json.loads((out_dir / "predictions.json").read_text())
    data = json.loads((out_dir / "dataset.json").read_text())
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    for entries, is_dataset in ((preds, False), (data["annotations"], True)):
        for a in entries:
            seg = a["segmentation"]
            if isinstance(seg, list):
                img = coco.imgs[a["image_id"]]
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
            else:
                assert isinstance(seg["counts"], str)
                rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            area = int(mask_utils.area(rle))
            assert area > 0, "empty segmentation"
            assert a["area"] == area
            assert np.allclose(a["bbox"], mask_utils.toBbox(rle))
            assert a["category_id"] in category_ids
            if is_dataset:
                assert a["iscrowd"] == 0
    return preds, data


def test_oracle_postprocess_then_eval(tmp_path, gt, capsys):
    gt_path, truth = gt
    write_oracle_heatmaps(tmp_path / "hm", truth, blur=0.7)
    _run(["postprocess", "--heatmaps", str(tmp_path / "hm"), "--out", str(tmp_path / "out"),
          "--coco-gt", str(gt_path), *ORACLE], capsys)
    preds, data = check_invariants(tmp_path / "out", {c["id"] for c in CATEGORIES + ABSENT})
    assert {c["id"] for c in data["categories"]} == {3, 7, 12, 20}  # never renumbered
    _run(["eval", "--gt", str(gt_path), "--pred", str(tmp_path / "out" / "predictions.json"),
          "--out", str(tmp_path / "metrics.json")], capsys)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["segm"]["stats"]["AP"] >= 0.95
    assert metrics["bbox"]["stats"]["AP"] >= 0.95
    assert "AP50" in capsys.readouterr().out


def test_oracle_with_absent_class_maps(tmp_path, gt, capsys):
    gt_path, truth = gt
    write_oracle_heatmaps(tmp_path / "hm", truth, blur=0.7, absent=True)
    _run(["postprocess", "--heatmaps", str(tmp_path / "hm"), "--out", str(tmp_path / "out"),
          "--coco-gt", str(gt_path), *ORACLE], capsys)
    preds, _ = check_invariants(tmp_path / "out", {3, 7, 12, 20})
    absent_scores = [p["score"] for p in preds if p["score"] < 0.05]
    assert absent_scores, "absent-class maps must produce (low-scored) detections without a presence threshold"
    m = evaluate(gt_path, preds)
    assert m["segm"]["stats"]["AP"] >= 0.9 and m["bbox"]["stats"]["AP"] >= 0.9
    # with a presence threshold they are rejected outright
    _run(["postprocess", "--heatmaps", str(tmp_path / "hm"), "--out", str(tmp_path / "out2"),
          "--coco-gt", str(gt_path), *ORACLE, "--set", "postprocess.presence_threshold=0.1"], capsys)
    preds2 = json.loads((tmp_path / "out2" / "predictions.json").read_text())
    assert all(p["score"] >= 0.05 for p in preds2) and len(preds2) == len(preds) - len(absent_scores)


def test_eval_equals_pycocotools_directly(tmp_path, gt):
    gt_path, truth = gt
    write_oracle_heatmaps(tmp_path / "hm", truth, blur=1.5, absent=True)  # imperfect on purpose
    postprocess_heatmaps(tmp_path / "hm", tmp_path / "out", gt=gt_path)
    pred_path = tmp_path / "out" / "predictions.json"
    assert main(["eval", "--gt", str(gt_path), "--pred", str(pred_path), "--out", str(tmp_path / "m.json")]) == 0
    ours = json.loads((tmp_path / "m.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(gt_path))
        for iou_type in ("bbox", "segm"):
            res = json.loads(pred_path.read_text())
            if iou_type == "segm":
                for r in res:
                    r.pop("bbox")
            ev = COCOeval(cg, cg.loadRes(res), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert [ours[iou_type]["stats"][n] for n in STAT_NAMES] == [float(v) for v in ev.stats]
    assert 0 < ours["segm"]["stats"]["AP"] < 1


def test_categories_file_and_query_order(tmp_path, gt):
    gt_path, truth = gt
    hm = write_oracle_heatmaps(tmp_path / "hm", truth, blur=0.7)
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps([{"id": 41, "name": "disc"}, {"id": 42, "name": "square"}, {"id": 90, "name": "bar"}]))
    postprocess_heatmaps(hm, tmp_path / "a", categories=cats)
    preds, data = check_invariants(tmp_path / "a", {41, 42, 90})
    assert {c["id"] for c in data["categories"]} == {41, 42, 90}
    assert {p["category_id"] for p in preds} <= {41, 42, 90}
    txt = tmp_path / "cats.txt"
    txt.write_text("# my classes\nbar\nsquare\ndisc\n")
    assert load_categories(txt).ids == (1, 2, 3) and load_categories(txt).names == ("bar", "square", "disc")
    postprocess_heatmaps(hm, tmp_path / "b")  # no list: the queries' order, ids 1..K
    _, data_b = check_invariants(tmp_path / "b", {1, 2, 3})
    assert [c["name"] for c in data_b["categories"]] == ["square", "disc", "bar"]
    assert len(data_b["images"]) == 5 and data_b["images"][0]["width"] == 96


def test_polygon_dataset_and_png_masks(tmp_path, gt):
    gt_path, truth = gt
    hm = write_oracle_heatmaps(tmp_path / "hm", truth, blur=0.7)
    postprocess_heatmaps(hm, tmp_path / "out", gt=gt_path,
                         config={"export": {"segmentation": "polygon"},
                                 "postprocess": {"min_area": 4, "min_area_fraction": 0}})
    _, data = check_invariants(tmp_path / "out", {3, 7, 12, 20})
    assert any(isinstance(a["segmentation"], list) for a in data["annotations"])
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, :5, :5] = True
    masks[1, 3:8, 3:8] = True
    masks[2, 9, 9] = True
    d = Detections(masks, [0.5, 0.9, 0.2], [300, 7, 7], ("a", "b", "b"))
    inst = label_image(d, "instance")
    assert inst.dtype == np.uint8 and inst[4, 4] == 1 and inst[0, 0] == 2 and inst[9, 9] == 3
    sem = label_image(d, "semantic")
    assert sem.dtype == np.uint16 and sem[4, 4] == 7 and sem[0, 0] == 300 and sem[9, 0] == 0
    p = write_label_png(tmp_path / "m" / "x.png", d, "semantic")
    assert np.array_equal(np.array(Image.open(p)), sem)
    assert label_image(Detections.empty(4, 4)).max() == 0


def test_empty_predictions_and_empty_ground_truth(tmp_path, gt):
    gt_path, truth = gt
    m = evaluate(gt_path, [])
    assert m["segm"]["stats"]["AP"] == 0.0 and m["bbox"]["stats"]["AR100"] == 0.0
    empty_gt = tmp_path / "empty.json"
    empty_gt.write_text(json.dumps({"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.png"}],
                                    "categories": [{"id": 1, "name": "x"}], "annotations": []}))
    m2 = evaluate(empty_gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}], ["bbox"])
    assert m2["bbox"]["stats"]["AP"] == -1.0
    # a run where nothing is detected still writes valid, empty files
    w = RecordWriter(tmp_path / "r.jsonl")
    w.write({"id": 1, "file_name": "a.png", "width": 8, "height": 8}, Detections.empty(8, 8))
    w.close()
    summary = finalize([tmp_path / "r.jsonl"], tmp_path / "o", Categories.from_names(["x"]))
    assert summary == {"images": 1, "annotations": 0, "failures": [], "near_zero_annotations": 0,
                       "cross_class_duplicates": 0}
    assert json.loads((tmp_path / "o" / "predictions.json").read_text()) == []
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["annotations"] == []


def test_dataset_keeps_one_class_per_mask_and_warns_of_near_zero_scores(tmp_path, caplog):
    masks = np.zeros((4, 12, 12), bool)
    masks[0, 1:6, 1:6] = True  # an object labelled "a" (best) ...
    masks[1, 1:6, 1:7] = True  # ... and again as "b": IoU 25/30, a cross-class duplicate
    masks[2, 2:5, 2:5] = True  # "a" again inside it: same class (the post-processor's NMS decides those)
    masks[3, 7:11, 7:11] = True  # another object, "b"
    w = RecordWriter(tmp_path / "r.jsonl")
    w.write({"id": 1, "file_name": "a.png", "width": 12, "height": 12},
            Detections(masks, [0.9, 0.8, 0.5, 0.7], [1, 2, 1, 2], ("a", "b", "a", "b")))
    w.close()
    cats = Categories.from_names(["a", "b"])
    summary = finalize([tmp_path / "r.jsonl"], tmp_path / "o", cats, dataset_class_iou=0.5)
    data = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert sorted((a["category_id"], a["score"]) for a in data["annotations"]) == [(1, 0.5), (1, 0.9), (2, 0.7)]
    assert summary["cross_class_duplicates"] == 1
    assert len(json.loads((tmp_path / "o" / "predictions.json").read_text())) == 4  # AP keeps everything
    # above the IoU, both stay; off, both stay
    for iou in (0.9, None):
        finalize([tmp_path / "r.jsonl"], tmp_path / "o2", cats, dataset_class_iou=iou)
        assert len(json.loads((tmp_path / "o2" / "dataset.json").read_text())["annotations"]) == 4
    # a dataset of mostly near-zero scores is kept as asked, with a warning that says what to do
    w = RecordWriter(tmp_path / "z.jsonl")
    for i in range(12):
        w.write({"id": i + 1, "file_name": f"{i}.png", "width": 12, "height": 12},
                Detections(masks[3:], [0.001], [1], ("a",)))
    w.close()
    with caplog.at_level("WARNING", logger="ovlabel"):
        summary = finalize([tmp_path / "z.jsonl"], tmp_path / "o3", cats)
    assert summary["near_zero_annotations"] == 12 and "--dataset-min-score" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ovlabel"):
        finalize([tmp_path / "z.jsonl"], tmp_path / "o4", cats, dataset_min_score=0.05)
    assert "--dataset-min-score" not in caplog.text


def test_heatmap_cache_round_trip_and_errors(tmp_path):
    heat = np.random.default_rng(0).random((2, 7, 9)).astype(np.float32)
    p = save_heatmaps(tmp_path / "a.npz", heat, ["cat", "dog"], 5, "dir/a b.jpg", presence=[0.2, 0.7])
    rec = load_heatmaps(p)
    assert rec.heatmaps.dtype == np.float16 and rec.heatmaps.shape == (2, 7, 9)
    assert np.allclose(rec.heatmaps, heat, atol=1e-3)
    assert rec.queries == ("cat", "dog") and rec.image_id == 5 and rec.file_name == "dir/a b.jpg"
    assert np.allclose(rec.presence, [0.2, 0.7])
    with pytest.raises(InputError, match="'queries' has 1 names but 'heatmaps' has 2"):
        save_heatmaps(tmp_path / "b.npz", heat, ["cat"], 5, "a.jpg")
    bad = tmp_path / "bad.npz"
    np.savez(bad, heatmaps=np.full((1, 4, 4), np.nan, dtype=np.float16), queries=np.array(["x"]),
             image_id=np.array(1), file_name=np.array("x.jpg"))
    with pytest.raises(InputError, match="bad.npz: field 'heatmaps' has NaN"):
        load_heatmaps(bad)
    np.savez(bad, heatmaps=np.zeros((2, 4, 4), dtype=np.float16), queries=np.array(["x"]),
             image_id=np.array(1), file_name=np.array("x.jpg"))
    with pytest.raises(InputError, match="bad.npz: field 'queries' has 1 names"):
        load_heatmaps(bad)
    np.savez(bad, heatmaps=np.zeros((1, 0, 4), dtype=np.float16), queries=np.array(["x"]),
             image_id=np.array(1), file_name=np.array("x.jpg"))
    with pytest.raises(InputError, match="zero area"):
        load_heatmaps(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz: not a readable"):
        load_heatmaps(tmp_path / "junk.npz")


@pytest.mark.parametrize(
    "case,match",
    [
        ("all_unknown_images", "none of the 1 images the results name is in the ground truth \\(ids \\[999\\]\\)"),
        ("unknown_category", "field 'category_id' has ids not in the ground truth: \\[55\\]"),
        ("malformed", "is not valid JSON"),
        ("not_a_list", "COCO results are a JSON list"),
    ],
)
def test_eval_bad_results(tmp_path, gt, capsys, case, match):
    gt_path, truth = gt
    pred = tmp_path / "pred.json"
    good = {"image_id": 100, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.9}
    payload = {
        "all_unknown_images": json.dumps([dict(good, image_id=999)]),
        "unknown_category": json.dumps([dict(good, category_id=55)]),
        "malformed": '[{"image_id": 100,',
        "not_a_list": json.dumps({"annotations": []}),
    }[case]
    pred.write_text(payload)
    assert main(["eval", "--gt", str(gt_path), "--pred", str(pred), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert str(pred) in err and __import__("re").search(match, err)
    assert not (tmp_path / "m.json").exists()


def test_eval_warns_about_and_leaves_out_images_the_ground_truth_lacks(tmp_path, gt, capsys):
    gt_path, truth = gt
    pred = tmp_path / "pred.json"
    good = {"image_id": 100, "category_id": 3, "bbox": [0, 0, 14, 14], "score": 0.9}
    pred.write_text(json.dumps([good, dict(good, image_id=999), dict(good, image_id=998)]))
    assert main(["eval", "--gt", str(gt_path), "--pred", str(pred), "--iou-type", "bbox",
                 "--out", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert "2 results name 2 images that the ground truth lacks (ids [998, 999])" in err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["left_out"]["results"] == 2
    assert m["bbox"]["stats"] == evaluate(gt_path, [good], ["bbox"])["bbox"]["stats"]  # the known images only


@pytest.mark.parametrize("case", ["nan", "shape", "unknown_id", "unknown_query", "size", "duplicate"])
def test_postprocess_bad_heatmaps_write_nothing(tmp_path, gt, capsys, case):
    gt_path, truth = gt
    hm = write_oracle_heatmaps(tmp_path / "hm", truth, blur=0.7)
    target = hm / "scene_3.npz"
    rec = load_heatmaps(target)
    heat, queries, image_id = rec.heatmaps.astype(np.float32), list(rec.queries), rec.image_id
    if case == "nan":
        heat[1, 2, 2] = np.nan
        np.savez(target, heatmaps=heat.astype(np.float16), queries=np.array(queries), image_id=np.array(image_id),
                 file_name=np.array("x.png"))
    elif case == "shape":
        np.savez(target, heatmaps=heat.astype(np.float16), queries=np.array(queries[:2]),
                 image_id=np.array(image_id), file_name=np.array("x.png"))
    elif case == "unknown_id":
        save_heatmaps(target, heat, queries, 4242, "x.png")
    elif case == "unknown_query":
        save_heatmaps(target, heat, ["square", "disk", "bar"], image_id, "x.png")
    elif case == "size":
        save_heatmaps(target, heat[:, :-1], queries, image_id, "x.png")
    elif case == "duplicate":
        save_heatmaps(target, load_heatmaps(hm / "scene_0.npz").heatmaps, queries, 100, "x.png")
    out = tmp_path / "out"
    assert main(["postprocess", "--heatmaps", str(hm), "--out", str(out), "--coco-gt", str(gt_path)]) == 2
    err = capsys.readouterr().err
    assert "scene_3.npz" in err, err
    assert not (out / "predictions.json").exists() and not (out / "dataset.json").exists()
    assert not any(out.iterdir())  # no partial or temporary file left behind


def test_bad_ground_truth_and_inputs(tmp_path, capsys):
    bad_gt = tmp_path / "gt.json"
    bad_gt.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1}]}))
    pred = tmp_path / "p.json"
    pred.write_text("[]")
    assert main(["eval", "--gt", str(bad_gt), "--pred", str(pred)]) == 2
    assert "categories[0] needs 'id' and 'name'" in capsys.readouterr().err
    with pytest.raises(CocoFormatError, match="does not exist"):
        evaluate(tmp_path / "missing.json", [])
    assert main(["postprocess", "--heatmaps", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["postprocess", "--heatmaps", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no .npz heatmap files" in capsys.readouterr().err


def test_overlay_drawing():
    from ovlabel.export.overlays import draw_overlay

    masks = np.zeros((2, 40, 60), dtype=bool)
    masks[0, 5:20, 10:30] = True
    masks[1, 25:35, 40:55] = True
    d = Detections(masks, [0.8, 0.4], [3, 7], ("red circle", "blue star"))
    img = np.full((40, 60, 3), 100, np.uint8)
    out = draw_overlay(img, d, np.random.default_rng(0).random((2, 40, 60)), ("red circle", "blue star"))
    assert out.dtype == np.uint8 and out.shape[0] == 320  # enlarged ×8 for readable labels
    assert out.shape[1] > 2 * 480  # image panel + gap + heatmap panel
    left = out[:, :480]
    assert (left[8 * 12, 8 * 20] != 100).any()  # inside the first mask: tinted
    assert (left[8 * 38, 8 * 5] == 100).all()  # background untouched
    big = draw_overlay(np.zeros((400, 500, 3), np.uint8), Detections.empty(400, 500))
    assert big.shape == (400, 500, 3)
