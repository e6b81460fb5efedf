"""The generated shapes dataset, the training script, the shipped model and the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ovlabel.cli import main
from ovlabel.datasets.shapes import CLASSES, COLOURS, SHAPES, generate, scene_arrays, write_coco


def test_generator_is_deterministic_and_varied():
    a = list(generate(30, seed=5, sizes=((64, 96), (80, 80)), max_objects=4))
    b = list(generate(30, seed=5, sizes=((64, 96), (80, 80)), max_objects=4))
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and x.labels == y.labels
        assert all(np.array_equal(m, n) for m, n in zip(x.masks, y.masks))
    c = list(generate(30, seed=6, sizes=((64, 96), (80, 80))))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))
    assert {s.image.shape[:2] for s in a} == {(64, 96), (80, 80)}
    assert len(CLASSES) == 36 and len(SHAPES) == 6 and len(COLOURS) == 6
    many = list(generate(400, seed=1, max_objects=3))
    seen = {lbl for s in many for lbl in s.labels}
    assert seen == set(CLASSES)
    assert max(len(s.labels) for s in many) == 3
    # visible masks are disjoint (occlusion) and inside the canvas
    for s in many[:50]:
        assert (np.sum(s.masks, axis=0) <= 1).all()


def test_empty_scenes_and_arrays():
    images, labels, scenes = scene_arrays(60, seed=2, empty_fraction=0.5)
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (60, 36) and (labels.sum(1) == 0).any() and (labels.sum(1) > 0).any()
    assert all(labels[i].sum() == len(set(s.labels)) for i, s in enumerate(scenes))


def test_write_coco_is_valid(tmp_path):
    path = write_coco(tmp_path, 12, seed=3)
    data = json.loads(path.read_text())
    assert len(data["images"]) == 12 and len(data["categories"]) == 36
    assert [c["id"] for c in data["categories"]] == list(range(1, 37))
    ids = [a["id"] for a in data["annotations"]]
    assert len(ids) == len(set(ids)) and ids
    for a in data["annotations"]:
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        assert a["area"] == int(mask_utils.area(rle)) > 0
        assert np.allclose(a["bbox"], mask_utils.toBbox(rle))
    for img in data["images"]:
        assert (tmp_path / "images" / img["file_name"]).exists()


def test_training_script_runs(tmp_path):
    from ovlabel.apps.train_shapes import MODEL_NAME, train

    summary = train(tmp_path, steps=3, pool=64, batch=16)
    assert summary["steps"] == 3 and 0 <= summary["zero_shot_single_object"] <= 1
    assert (tmp_path / f"{MODEL_NAME}.safetensors").exists() and (tmp_path / "training.json").exists()


def test_shipped_model_loads_and_genuinely_learned():
    """The shipped weights through the normal loading path; accuracy and localisation a random model lacks."""
    import open_clip
    import torch.nn.functional as F

    from ovlabel.apps.train_shapes import EVAL_TEMPLATE, to_tensor
    from ovlabel.pipeline.models import load_model, shipped_models

    assert "ovlabel-shapes" in shipped_models()
    lm = load_model("ovlabel-shapes", None, device="cpu")
    assert lm.provenance["sha256"] == shipped_models()["ovlabel-shapes"]["sha256"]
    images, labels, _ = scene_arrays(300, seed=4242, min_objects=1, max_objects=1)
    tok = open_clip.get_tokenizer("ovlabel-shapes")
    with torch.no_grad():
        text = F.normalize(lm.model.encode_text(tok([EVAL_TEMPLATE.format(c) for c in CLASSES])), dim=-1)
        emb = F.normalize(lm.model.encode_image(to_tensor(images)), dim=-1)
    acc = float(((emb @ text.T).argmax(1).numpy() == labels.argmax(1)).mean())
    assert acc >= SHIPPED_MIN_ZERO_SHOT, acc


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images", "12", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "segm AP" in out and "pointing game" in out
    demo = tmp_path / "demo"
    report = (demo / "report.md").read_text()
    assert "![overlays](figures/overlays.png)" in report
    for f in ("overlays.png", "per_class_ap.png", "pr_segm_iou50.png"):
        assert (demo / "figures" / f).stat().st_size > 1000
    from PIL import Image

    with Image.open(demo / "figures" / "overlays.png") as grid:  # readable: 2 wide overlays a row, not 4 tiny
        assert grid.width == 1600 and grid.height >= 6 * 150
    metrics = json.loads((demo / "metrics.json").read_text())
    assert 0 <= metrics["segm"]["AP"] <= 1 and 0 <= metrics["pointing_game"] <= 1
    assert metrics["pointing_game"] >= metrics["random_object_baseline"] + 0.1
    assert (demo / "run" / "predictions.json").exists() and (demo / "run" / "dataset.json").exists()
    assert len(list((demo / "run" / "overlays").glob("*.jpg"))) == 12
    # and its HTML report, with the demo's ground truth
    index = (demo / "report" / "index.html").read_text()
    assert "report/index.html" in out and '"evaluation":{"segm_ap"' in index
    assert len(list((demo / "report" / "thumbs").glob("*.jpg"))) == 12


SHIPPED_MIN_ZERO_SHOT = 0.9


@pytest.mark.parametrize("seed", [0])
def test_scene_masks_cover_painted_pixels(seed):
    s = next(generate(1, seed=seed, max_objects=3))
    union = np.any(s.masks, axis=0) if s.masks else np.zeros(s.image.shape[:2], bool)
    assert union.sum() == sum(m.sum() for m in s.masks)
