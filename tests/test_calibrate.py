"""``ovlabel calibrate``: every setting it scores is exactly what ``ovlabel postprocess`` with that config
gives (evaluated by pycocotools), the overlay it writes reproduces the chosen setting, and bad input is
refused clearly."""

from __future__ import annotations

import json

import pytest
import yaml

from ovlabel import InputError
from ovlabel.apps.calibrate import Calibrator, Setting, calibrate
from ovlabel.apps.postprocess import postprocess_heatmaps
from ovlabel.cli import main
from ovlabel.config import load_config
from ovlabel.datasets.shapes import write_coco
from ovlabel.evaluation.coco import evaluate
from ovlabel.evaluation.dataset import dataset_quality
from ovlabel.export.coco import load_coco
from ovlabel.pipeline import Pipeline


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    gt = write_coco(root / "data", 14, 4242, sizes=((64, 96), (80, 80), (64, 64)))
    pipe = Pipeline.from_config("shapes", **{"export.heatmaps": True, "run.progress": False})
    pipe.run(coco_gt=gt, images_dir=root / "data" / "images", out_dir=root / "run")
    return root, gt


def _postprocess_ap(root, gt, overrides, name, metric="segm"):
    out = root / name
    postprocess_heatmaps(root / "run" / "heatmaps", out, overrides=overrides, gt=gt, images=root / "data" / "images")
    preds = json.loads((out / "predictions.json").read_text())
    stats = evaluate(gt, preds, iou_types=(metric,))[metric]["stats"]
    return stats


SETTINGS = [
    (Setting(("max_fraction", 0.55), "components", "none", 0.0, 0.0), {}),
    (Setting(("otsu", None), "class", "pamr", 0.01, 0.05), {}),
    (Setting(("max_fraction", 0.7), "components", "superpixels", 0.005, 0.02, {"red circle": ("mean", None)}),
     {"postprocess.nms": "mask", "postprocess.nms_iou": 0.3, "postprocess.max_detections": 5}),
]


@pytest.mark.parametrize("setting,base", SETTINGS)
def test_calibrator_scores_what_postprocess_gives(labelled, setting, base, tmp_path):
    root, gt = labelled
    config = load_config("shapes", overrides=base)
    cal = Calibrator(root / "run" / "heatmaps", gt, config=config, images=root / "data" / "images")
    ids = sorted(cal.images)
    got = cal.score(setting, ids)
    pp = {"postprocess.threshold": {"method": setting.threshold[0], "value": setting.threshold[1]},
          "postprocess.instances": setting.instances, "postprocess.refine.method": setting.refine,
          "postprocess.min_area_fraction": setting.min_area_fraction,
          "postprocess.presence_threshold": setting.presence_threshold,
          "postprocess.class_thresholds": {k: {"method": m, "value": v}
                                           for k, (m, v) in setting.class_thresholds.items()}}
    stats = _postprocess_ap(root, gt, {**base, **pp}, f"pp-{setting.refine}-{setting.instances}")
    assert got == pytest.approx(stats["AP"], abs=1e-12)
    assert stats["AP"] > 0.05  # a real measurement, not an empty one


def test_calibrate_writes_an_overlay_that_reproduces_its_choice(labelled, tmp_path, capsys):
    root, gt = labelled
    out = tmp_path / "calibrated.yaml"
    assert main(["calibrate", "--heatmaps", str(root / "run" / "heatmaps"), "--coco-gt", str(gt), "--out", str(out),
                 "--folds", "2", "--per-class"]) == 0
    printed = capsys.readouterr().out
    assert "held-out folds" in printed and "chosen:" in printed
    text = out.read_text()
    assert text.startswith("# ovlabel calibrate: segm-ap on 14 labelled images")
    record = yaml.safe_load(text)["calibration"]
    # the overlay holds what the labels depend on, not the run's own switches (export.heatmaps, run.progress)
    overlay = yaml.safe_load(text)
    assert "run" not in overlay and "export" not in overlay and overlay["model"] == {"name": "ovlabel-shapes"}
    assert len(record["folds"]) == 2 and sum(f["images"] for f in record["folds"]) == 14
    assert record["all_images"]["tuned"] >= record["all_images"]["start"]  # the search never takes a worse step
    assert record["searched"]["refine"] == ["none", "pamr", "superpixels"]  # the run recorded its images
    cfg = load_config(out)
    assert cfg.calibration["chosen"]["refine"] == cfg.postprocess.refine.method
    assert cfg.model.name == load_config("shapes").model.name  # starts from the run's own config
    ov = {"postprocess": cfg.postprocess.model_dump()}
    stats = _postprocess_ap(root, gt, ov, "pp-calibrated")
    assert stats["AP"] == pytest.approx(record["all_images"]["tuned"], abs=1e-12)


def test_calibrate_for_the_dataset_scores_what_postprocess_writes(labelled, tmp_path, capsys):
    root, gt = labelled
    out = tmp_path / "dataset.yaml"
    assert main(["calibrate", "--heatmaps", str(root / "run" / "heatmaps"), "--coco-gt", str(gt), "--out", str(out),
                 "--folds", "2", "--metric", "dataset-f1"]) == 0
    assert "dataset_min_score" in capsys.readouterr().out
    overlay = yaml.safe_load(out.read_text())
    record = overlay["calibration"]
    assert record["metric"] == "dataset-f1" and record["searched"]["dataset_min_score"]
    assert overlay["export"] == {"dataset_min_score": record["chosen"]["dataset_min_score"]}  # only what it tuned
    assert record["all_images"]["tuned"] >= record["all_images"]["start"]
    # the overlay applied by `ovlabel postprocess` writes the dataset whose F1 the calibrator reported
    cfg = load_config(out)
    overrides = {"postprocess": cfg.postprocess.model_dump(), "export.dataset_min_score": cfg.export.dataset_min_score}
    pp = tmp_path / "pp"
    postprocess_heatmaps(root / "run" / "heatmaps", pp, overrides=overrides, gt=gt, images=root / "data" / "images")
    data = json.loads((pp / "dataset.json").read_text())
    q = dataset_quality(load_coco(gt), data["annotations"])
    assert q.f1 == pytest.approx(record["all_images"]["tuned"], abs=1e-12) and q.true_positives > 0


def test_calibrate_refuses_bad_input(labelled, tmp_path):
    root, gt = labelled
    heat = root / "run" / "heatmaps"
    with pytest.raises(InputError, match="--folds must be between 2"):
        calibrate(heat, gt, tmp_path / "c.yaml", folds=1)
    with pytest.raises(InputError, match="metric must be one of"):
        calibrate(heat, gt, tmp_path / "c.yaml", metric="f1")
    data = json.loads(gt.read_text())
    first = data["images"][0]["id"]
    data["images"] = data["images"][1:]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    other = tmp_path / "gt.json"
    other.write_text(json.dumps(data))
    with pytest.raises(InputError, match="is not in"):
        calibrate(heat, other, tmp_path / "c.yaml")
    with pytest.raises(InputError, match="does not exist"):
        calibrate(heat, gt, tmp_path / "c.yaml", images=tmp_path / "nowhere")
    assert not (tmp_path / "c.yaml").exists()
