"""Outputs that other tools read correctly, pseudo-label datasets ready to train on, command-line habits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from ovlabel.cli import main
from ovlabel.config import load_config, register_model_preset
from ovlabel.errors import ConfigError, InputError
from ovlabel.pipeline.runner import Pipeline
from test_coco import check_invariants
from test_pipeline import BASE, label, scenes


def _ann_mask(a: dict, h: int, w: int) -> np.ndarray:
    seg = a["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else \
        {"size": seg["size"], "counts": seg["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


# --------------------------------------------------------------------------------- 1. file names
def test_runs_over_several_folders_have_unique_relative_names_and_load_in_supervision(tmp_path, capsys):
    import supervision as sv

    root = tmp_path / "data"
    a, b = scenes(root / "a", 3), scenes(root / "b", 2, seed=7)  # both hold img_000.png and img_001.png
    single = root / "c" / "extra.png"
    single.parent.mkdir()
    Image.fromarray((np.random.default_rng(3).random((50, 60, 3)) * 255).astype(np.uint8)).save(single)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{single}\n")
    out = tmp_path / "out"
    label([str(a), str(b), str(lst), "--out", str(out), *BASE, "--queries", "x", "y"], capsys)
    preds, data = check_invariants(out, {1, 2})
    names = [i["file_name"] for i in data["images"]]
    assert names == ["a/img_000.png", "a/img_001.png", "a/img_002.png", "b/img_000.png", "b/img_001.png",
                     "c/extra.png"]
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["image_root"] == str(root) and data["info"]["image_root"] == str(root)
    sizes = {i["file_name"]: (i["height"], i["width"]) for i in data["images"]}
    for name, (h, w) in sizes.items():  # each name is that image, with its own size
        assert Image.open(root / name).size == (w, h)
    ds = sv.DetectionDataset.from_coco(images_directory_path=str(root), annotations_path=str(out / "dataset.json"),
                                       force_masks=True)
    assert len(ds) == 6
    by_name = {i["file_name"]: i["id"] for i in data["images"]}
    for path, image, det in ds:
        name = Path(path).relative_to(root).as_posix()
        ours = [x for x in data["annotations"] if x["image_id"] == by_name[name]]
        assert image.shape[:2] == sizes[name] and len(det) == len(ours)
        assert sorted(int(m.sum()) for m in det.mask) == sorted(x["area"] for x in ours)


# ---------------------------------------------------------------------- 3. datasets to train on
def test_dataset_min_score_and_scores_kept(tmp_path, capsys):
    src = scenes(tmp_path / "in", 4)
    out = tmp_path / "out"
    label([str(src), "--out", str(out), *BASE, "--queries", "x", "y", "--dataset-min-score", "0.3"], capsys)
    preds = json.loads((out / "predictions.json").read_text())
    data = json.loads((out / "dataset.json").read_text())
    assert any(p["score"] < 0.3 for p in preds) and all(a["score"] >= 0.3 for a in data["annotations"])
    assert len(data["annotations"]) == sum(p["score"] >= 0.3 for p in preds)


def test_yolo_and_png_mask_exports(tmp_path, capsys):
    src = scenes(tmp_path / "in", 5)
    out = tmp_path / "out"
    label([str(src), "--out", str(out), *BASE, "--queries", "x", "y", "--format", "yolo-seg", "--format", "yolo-det",
           "--masks", "instance", "--set", "export.dataset_min_score=0.1"], capsys)
    data = json.loads((out / "dataset.json").read_text())
    cats = data["categories"]
    for task in ("seg", "det"):
        root = out / f"yolo-{task}"
        spec = yaml.safe_load((root / "data.yaml").read_text())
        assert spec["names"] == {i: c["name"] for i, c in enumerate(cats)} and spec["nc"] == len(cats)
        assert (spec["train"], spec["val"]) == ("images/train", "images/val")
        assert "path" not in spec  # Ultralytics then reads the dataset where data.yaml is: the folder can move
        mapping = json.loads((root / "categories.json").read_text())
        assert {int(k): v["category_id"] for k, v in mapping.items()} == {i: c["id"] for i, c in enumerate(cats)}
        placed = json.loads((root / "images.json").read_text())
        assert sorted(int(k) for k in placed) == sorted(i["id"] for i in data["images"])
        assert {p["split"] for p in placed.values()} == {"train", "val"}  # 5 images, val_fraction 0.1: one in val
        for img in data["images"]:
            entry = placed[str(img["id"])]
            link = root / entry["image"]
            assert entry["image"] == f"images/{entry['split']}/{img['file_name']}"
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            assert link.resolve() == (src / img["file_name"]).resolve()
            lines = (root / "labels" / entry["split"] / img["file_name"]).with_suffix(".txt").read_text().splitlines()
            anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
            assert len(lines) == len(anns)
            H, W = img["height"], img["width"]
            for line, a in zip(lines, anns):
                values = [float(v) for v in line.split()]
                assert int(values[0]) == [c["id"] for c in cats].index(a["category_id"])
                xy = np.array(values[1:])
                assert ((xy >= 0) & (xy <= 1)).all()
                if task == "det":
                    x, y, w, h = a["bbox"]
                    assert np.allclose(xy, [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], atol=1e-6)
                else:
                    poly = (xy.reshape(-1, 2) * [W, H]).reshape(-1).tolist()
                    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], H, W))).astype(bool)
                    m = _ann_mask(a, H, W)
                    assert (back & m).sum() / (back | m).sum() > 0.97  # the outline of the mask (6 decimals)
    masks = sorted((out / "masks-instance").glob("*.png"))
    assert len(masks) == len(data["images"])
    hidden = 0
    for png in masks:
        values = np.array(Image.open(png))
        info = json.loads(png.with_suffix(".json").read_text())
        assert values.dtype == np.uint16 and info["kind"] == "instance"
        img = next(i for i in data["images"] if i["id"] == info["image_id"])
        anns = {a["id"]: a for a in data["annotations"] if a["image_id"] == img["id"]}
        assert {v["annotation_id"] for v in info["values"].values()} == set(anns)
        union = np.zeros(values.shape, bool)
        for v, meta in info["values"].items():
            m = _ann_mask(anns[meta["annotation_id"]], img["height"], img["width"])
            assert ((values == int(v)) <= m).all()  # a value only where its annotation is
            whole = np.array(Image.open(png.parent / meta["complete_in"]))
            assert np.array_equal(whole == int(v), m)  # every mask can be read back exactly
            hidden += meta["complete_in"].startswith("layers/")
            assert meta["category_id"] == anns[meta["annotation_id"]]["category_id"]
            union |= m
        assert np.array_equal(values > 0, union)
    assert hidden > 0  # this run has instances hidden under others: the layers are exercised


# --------------------------------------------------------------- 4. postprocess follows the run
def test_postprocess_follows_the_run_it_reads(tmp_path, capsys):
    src = scenes(tmp_path / "in", 5)
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps([{"id": 5, "name": "x"}, {"id": 9, "name": "y"}]))
    run = tmp_path / "run"
    label([str(src), "--out", str(run), *BASE, "--queries-file", str(cats), "--save-heatmaps", "--overlays",
           "--set", "postprocess.threshold.value=0.3", "--set", "postprocess.min_area_fraction=0.02"], capsys)
    assert main(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(tmp_path / "pp")]) == 0
    pp = tmp_path / "pp"
    meta = yaml.safe_load((pp / "run.yaml").read_text())
    assert meta["config"]["postprocess"]["threshold"]["value"] == 0.3 and meta["source_run"] == str(run / "run.yaml")
    ours = json.loads((pp / "predictions.json").read_text())
    theirs = json.loads((run / "predictions.json").read_text())
    assert {p["category_id"] for p in ours} <= {5, 9}  # the run's ids, not 1..K
    assert len(ours) == len(theirs)  # the same settings (maps differ only by float16 rounding)
    assert sorted(p.name for p in (pp / "overlays").iterdir()) == sorted(p.name for p in (run / "overlays").iterdir())
    # the default configuration would have given something else; --set still overrides the run's
    assert main(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(tmp_path / "pp2"), "--set",
                 "postprocess.threshold.value=0.9"]) == 0
    assert len(json.loads((tmp_path / "pp2" / "predictions.json").read_text())) < len(ours)


# --------------------------------------------------------------------- 5. the shipped model by name
def test_shipped_model_by_name_alone(tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    label([str(src), "--out", str(tmp_path / "out"), "--model", "ovlabel-shapes", "--queries", "red circle",
           "--no-progress"], capsys)
    run = yaml.safe_load((tmp_path / "out" / "run.yaml").read_text())
    assert run["model"]["pretrained"] == "shipped" and run["model"]["sha256"]
    # the model brought its preset (the flags still win) and the config records the weights actually used
    assert run["model_preset"] == "shapes" and run["config"]["model"]["pretrained"] == "shipped"
    shapes = load_config("shapes")
    assert run["config"]["explainer"] == shapes.explainer.model_dump()
    assert run["config"]["postprocess"] == shapes.postprocess.model_dump()
    assert run["config"]["run"]["workers"] == 0 and run["config"]["preprocess"]["size"] == 64


def test_a_model_brings_its_preset_under_the_users_config(tmp_path, capsys):
    shapes, default = load_config("shapes"), load_config(None)
    assert default.model_preset is None and shapes.model_preset is None  # shapes extends itself: nothing added
    alone = load_config(None, [("model.name", "ovlabel-shapes")])
    assert alone.model_preset == "shapes"
    assert alone.model_dump() == shapes.model_dump()
    # a user's config file goes above the preset, and --set above both
    user = tmp_path / "mine.yaml"
    user.write_text("model: {name: ovlabel-shapes}\npostprocess: {presence_threshold: 0.2}\n")
    mine = load_config(str(user), ["preprocess.size=96"])
    assert mine.model_preset == "shapes" and mine.postprocess.presence_threshold == 0.2
    assert mine.preprocess.size == 96 and mine.explainer.layers == shapes.explainer.layers
    assert mine.postprocess.refine == shapes.postprocess.refine
    # a preset extending default keeps its own keys above the model's: pseudo-masks' settings win
    pseudo = load_config("pseudo-masks", [("model.name", "ovlabel-shapes")])
    assert pseudo.model_preset == "shapes" and pseudo.postprocess.presence_threshold == 0.3
    assert pseudo.preprocess.size == 64 and pseudo.export.dataset_min_score == 0.15
    # SigLIP models bring the siglip preset; other models bring none
    siglip = load_config(None, [("model.name", "ViT-B-16-SigLIP-256")])
    assert siglip.model_preset == "siglip" and siglip.postprocess.presence == "sigmoid"
    assert siglip.model.name == "ViT-B-16-SigLIP-256" and siglip.explainer.empty_prompt
    assert load_config(None, [("model.name", "ViT-L-14")]).model_preset is None
    # a complete config read back (run.yaml) is taken as it is
    dumped = alone.model_dump()
    dumped["preprocess"]["size"] = 128
    assert load_config(dumped, model_preset=False).preprocess.size == 128
    # the Python API: keyword overrides and whole sections, the preset under them
    pipe = Pipeline.from_config(model__name="ovlabel-shapes", postprocess={"threshold": {"value": 0.5}})
    assert pipe.cfg.model_preset == "shapes" and pipe.cfg.postprocess.threshold.value == 0.5
    assert pipe.cfg.postprocess.threshold.method == shapes.postprocess.threshold.method  # merged, not replaced
    # without its preset (a complete config), the config still records the weights the model loads
    bare = load_config(None, [("model.name", "ovlabel-shapes")], model_preset=False)
    assert bare.model.pretrained == "laion2b_s34b_b88k" and Pipeline(bare).cfg.model.pretrained == "shipped"
    # a registered model brings the preset registered for it; config show says so
    register_model_preset("my-shapes-*", "shapes")
    try:
        assert load_config(None, [("model.name", "my-shapes-v2")]).preprocess.size == 64
        assert main(["config", "show", "--set", "model.name=my-shapes-v2"]) == 0
        out = capsys.readouterr().out
        assert "its preset 'shapes' applies" in out and yaml.safe_load(out)["preprocess"]["size"] == 64
    finally:
        import ovlabel.config

        ovlabel.config._registered_presets.clear()
    with pytest.raises(ConfigError, match="does not exist"):
        register_model_preset("x*", tmp_path / "missing.yaml")


def test_config_extends_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(tmp_path / "a.yaml"))


# ------------------------------------------------------------------------ 6. offline fails fast
def test_offline_tag_fails_in_seconds(tmp_path, monkeypatch):
    import socket

    from ovlabel.errors import ModelLoadError
    from ovlabel.pipeline.models import load_model

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="not in the local cache .*Network is unreachable.*--pretrained /path/to"
                       ) as e:
        load_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert time.time() - t0 < 5
    # where to get them: the hub repository and file of open_clip's own pretrained table
    import open_clip

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].rstrip("/")
    assert f"open_clip_pytorch_model.bin from https://huggingface.co/{repo}" in str(e.value)


# ------------------------------------------------------------------------------ 7. command line
def test_queries_do_not_swallow_inputs(tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    err = label(["--out", str(tmp_path / "o"), *BASE, "--queries", "cat", str(src)], capsys, 2)
    assert "took" in err and "is a folder" in err and "-q NAME" in err
    label(["--out", str(tmp_path / "o2"), *BASE, "-q", "cat", "-q", "remote control", str(src)], capsys)
    run = yaml.safe_load((tmp_path / "o2" / "run.yaml").read_text())
    assert run["queries"]["names"] == ["cat", "remote control"]



def load_yolo(data_yaml: Path) -> dict[str, list[tuple[Path, list[str]]]]:
    """A YOLO dataset read as Ultralytics documents it: the root is ``path`` or, without it, the folder of
    ``data.yaml``; ``train``/``val`` are image folders under it; an image's labels are at the same place
    with the last ``images`` replaced by ``labels`` and the suffix by ``.txt``. Every image must open and
    every label line name a class of ``names``."""
    spec = yaml.safe_load(data_yaml.read_text())
    root = Path(spec["path"]) if spec.get("path") else data_yaml.parent
    out = {}
    for split in ("train", "val"):
        folder = root / spec[split]
        assert folder.is_dir(), folder
        items = []
        for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"}):
            with Image.open(img) as im:  # through the link or the copy
                im.load()
            parts = list(img.parts)
            k = len(parts) - 1 - parts[::-1].index("images")
            label = Path(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")
            lines = label.read_text().splitlines()
            assert all(0 <= int(line.split()[0]) < len(spec["names"]) for line in lines)
            items.append((img, lines))
        out[split] = items
    return out


def test_formats_never_collide_and_same_stems_get_their_own_labels(tmp_path, capsys):
    src = scenes(tmp_path / "in", 3)
    rng = np.random.default_rng(5)
    for name in ("x.png", "x.jpg"):  # one stem, two images: YOLO would label both as x.txt
        Image.fromarray((rng.random((48, 56, 3)) * 255).astype(np.uint8)).save(src / name)
    out = tmp_path / "out"
    label([str(src), "--out", str(out), *BASE, "--queries", "x", "y", "--masks", "instance",
           "--format", "masks-semantic", "--format", "yolo-det", "--format", "yolo-seg"], capsys)
    data = json.loads((out / "dataset.json").read_text())
    n = len(data["images"])
    assert n == 5
    for kind in ("instance", "semantic"):  # each format in its own folder: one never overwrites the other
        pngs = sorted((out / f"masks-{kind}").glob("*.png"))
        assert len(pngs) == n
        assert {json.loads(p.with_suffix(".json").read_text())["kind"] for p in pngs} == {kind}
    assert not (out / "masks").exists()
    for task in ("det", "seg"):
        loaded = load_yolo(out / f"yolo-{task}" / "data.yaml")
        images = [img for split in ("train", "val") for img, _ in loaded[split]]
        assert len(images) == n and len({p.with_suffix("") for p in images}) == n  # distinct label files
        placed = json.loads((out / f"yolo-{task}" / "images.json").read_text())
        by_name = {e["file_name"]: e["image"] for e in placed.values()}
        ids = {i["file_name"]: i["id"] for i in data["images"]}
        assert Path(by_name["x.png"]).name == f"x_{ids['x.png']}.png"
        assert Path(by_name["x.jpg"]).name == f"x_{ids['x.jpg']}.jpg"
        assert Path(by_name["img_000.png"]).name == "img_000.png"  # names that do not collide are kept


def test_yolo_datasets_survive_a_move_and_split_deterministically(tmp_path, capsys):
    project = tmp_path / "project"
    src = scenes(project / "images", 12)
    out = project / "run"
    label([str(src), "--out", str(out), *BASE, "--queries", "x", "y", "--format", "yolo-seg",
           "--val-fraction", "0.25"], capsys)
    before = load_yolo(out / "yolo-seg" / "data.yaml")
    split = {p.name: s for s in ("train", "val") for p, _ in before[s]}
    assert 0 < sum(s == "val" for s in split.values()) < 12
    # the split is a hash of the image id: the same in another run, on another machine
    from ovlabel.export.formats import in_val
    data = json.loads((out / "dataset.json").read_text())
    assert {i["file_name"]: "val" if in_val(i["id"], 0.25) else "train" for i in data["images"]} == split
    assert "val_fraction 0.25" in (out / "yolo-seg" / "data.yaml").read_text()
    # relative links: the images and the run moved together keep the dataset loadable
    moved = tmp_path / "elsewhere" / "project2"
    moved.parent.mkdir()
    project.rename(moved)
    after = load_yolo(moved / "run" / "yolo-seg" / "data.yaml")
    assert {s: [(p.name, lines) for p, lines in after[s]] for s in after} == \
        {s: [(p.name, lines) for p, lines in before[s]] for s in before}
    # --copy-images: the run folder alone can move (hard links or copies, no links out of it)
    alone = tmp_path / "alone"
    label([str(moved / "images"), "--out", str(alone), *BASE, "--queries", "x", "y", "--format", "yolo-det",
           "--copy-images", "--val-fraction", "0"], capsys)
    spec = yaml.safe_load((alone / "yolo-det" / "data.yaml").read_text())
    assert spec["val"] == spec["train"] == "images/train"  # no validation split asked for: val = train
    assert not any(p.is_symlink() for p in (alone / "yolo-det").rglob("*"))
    shutil.rmtree(moved)
    (alone).rename(tmp_path / "alone-moved")
    loaded = load_yolo(tmp_path / "alone-moved" / "yolo-det" / "data.yaml")
    assert len(loaded["train"]) == 12


def test_verbose_and_quiet_anywhere_and_help_shows_defaults(tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    assert main(["--quiet", "label", str(src), "--out", str(tmp_path / "a"), *BASE, "-q", "x"]) == 0
    assert "random init" not in capsys.readouterr().err  # warnings silenced
    assert main(["label", str(src), "--out", str(tmp_path / "b"), *BASE, "-q", "x", "-v"]) == 0
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = capsys.readouterr().out.split("\noptions:", 1)[1]  # past the usage lines
    for option in ("--size", "--batch-size", "--workers", "--model", "--method", "--device", "--dataset-min-score",
                   "--threads", "--shard"):
        block = text.split(f"\n  {option}", 1)[1].split("\n  -", 1)[0]
        assert "default:" in " ".join(block.split()), option
    assert "(default: 448; config preprocess.size)" in " ".join(text.split())


def test_help_and_methods_start_without_torch():
    code = ("import sys, io, contextlib\nfrom ovlabel.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['methods'])\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_threads_option_and_zero_detections_are_explained(tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    assert main(["label", str(src), "--out", str(tmp_path / "o"), *BASE, "-q", "x", "--threads", "1",
                 "--set", "postprocess.presence_threshold=1.0", "--set", "postprocess.presence=sigmoid"]) == 0
    out = capsys.readouterr().out
    assert "0 detections: every query was judged absent" in out and "presence_threshold = 1.0" in out
    assert main(["label", str(src), "--out", str(tmp_path / "o2"), *BASE, "-q", "x",
                 "--set", "postprocess.min_area_fraction=1.0"]) == 0
    assert "no region of any map passed the threshold" in capsys.readouterr().out


def test_overlay_labels_do_not_overlap():
    from ovlabel.export.overlays import place_labels

    boxes = [(10.0, 10.0, 30.0, 20.0)] * 6 + [(12.0, 12.0, 5.0, 5.0)] * 3  # nine boxes on one spot
    rects = place_labels(boxes, [(40.0, 12.0)] * 9, 200, 150)
    placed = [r for r in rects if r is not None]
    assert len(placed) == 9
    for i, a in enumerate(placed):
        assert 0 <= a[0] and a[2] <= 200 and 0 <= a[1] and a[3] <= 150
        for b in placed[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


# ------------------------------------------------------------------------------- 8. Python API
def test_python_api_names_and_supervision_round_trip(tmp_path, capsys):
    import ovlabel

    for name in ("Pipeline", "ImageResult", "Detections", "ImageMaps", "compute_maps", "read_results"):
        assert name in dir(ovlabel) and name in ovlabel.__all__
        getattr(ovlabel, name)
    assert "XYWH" in ovlabel.Detections.__doc__ and "exclusive" in ovlabel.Detections.__doc__
    src = scenes(tmp_path / "in", 3)
    out = tmp_path / "out"
    # the dataset keeps every detection here, so that both files hold the same ones
    label([str(src), "--out", str(out), *BASE, "-q", "x", "-q", "y", "--dataset-min-score", "0", "--set",
           "export.dataset_class_iou=null"], capsys)
    dets = ovlabel.read_results(out / "predictions.json", out / "dataset.json")
    data = json.loads((out / "dataset.json").read_text())
    assert set(dets) == {i["id"] for i in data["images"] if any(a["image_id"] == i["id"] for a in data["annotations"])}
    for image_id, d in dets.items():
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        assert len(d) == len(anns) and set(d.labels) <= {"x", "y"}
        assert sorted(d.areas.tolist()) == sorted(a["area"] for a in anns)
        sv_d = d.to_supervision()
        assert np.allclose(sv_d.xyxy[:, 2:] - sv_d.xyxy[:, :2], d.boxes[:, 2:])
        assert np.array_equal(sv_d.mask, d.masks)
        # supervision's 0-based class index, with the class names and the COCO ids beside it
        assert np.array_equal(sv_d.class_id, d.category_ids - 1)
        assert np.array_equal(sv_d.data["category_id"], d.category_ids)
        assert list(sv_d.data["class_name"]) == list(d.labels)
        classes = ["y", "x"]  # another order: class_id follows the list given
        assert [classes[i] for i in d.to_supervision(classes).class_id] == list(d.labels)
        assert np.array_equal(d.to_supervision(data["categories"]).class_id, d.category_ids - 1)
        if len(d):
            with pytest.raises(InputError, match="not in the class list"):
                d.to_supervision(["z"])
    assert os.path.exists(out / "predictions.json")
