"""The papers' benchmarks on tiny files written in their real formats, with answers computed by hand.

An "oracle" explainer registered here returns the input's brightness as the map, so that the metrics of
hand-made images can be computed by hand; the model is the tiny random-init test model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovlabel import InputError
from ovlabel.apps import benchmarks as B
from ovlabel.cli import main
from ovlabel.legrad.base import METHODS, MethodOutput, register_method
from test_pipeline import TINY

h5py = pytest.importorskip("h5py", reason="h5py is in the dev extra of the README's install")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def brightness(images: torch.Tensor) -> torch.Tensor:
    return (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).mean(1)


if "test_oracle" not in METHODS:
    @register_method("test_oracle", default_layers="last", summary="test: the input's brightness, min-max")
    def _oracle(inp):
        b = brightness(inp.images.float())
        lo = b.flatten(1).min(1).values[:, None, None]
        hi = b.flatten(1).max(1).values[:, None, None]
        m = ((b - lo) / (hi - lo)).unsqueeze(1).expand(-1, inp.text.shape[0], -1, -1)
        return MethodOutput(m.contiguous(), final=True)


@pytest.fixture(scope="module")
def explainer():
    return B.Explainer.load(TINY, "none", ["test_oracle", "legrad"], templates="single")


# ------------------------------------------------------------------------------ ImageNet-Segmentation
def scene(h=32, w=32, obj=(4, 20, 6, 22), distractor=(24, 30, 2, 12)):
    img = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), bool)
    y0, y1, x0, x1 = obj
    img[y0:y1, x0:x1] = 255
    mask[y0:y1, x0:x1] = True
    y0, y1, x0, x1 = distractor
    img[y0:y1, x0:x1] = 128  # not the object, but half as bright: above the map's mean, above 0.5
    return img, mask


def write_mat(path: Path, samples) -> None:
    """MATLAB v7.3 as gtsegs_ijcv.mat: /value/img and /value/gt, N×1 object references; each gt entry a
    1×1 cell whose reference points to the W×H mask; images stored 3×W×H."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((len(samples), 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((len(samples), 1), dtype=h5py.ref_dtype)
        for i, (img, mask) in enumerate(samples):
            d = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0))
            m = refs.create_dataset(f"mask{i}", data=mask.T.astype(np.uint8))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = m.ref
            img_refs[i, 0], gt_refs[i, 0] = d.ref, cell.ref
        v = f.create_group("value")
        v.create_dataset("img", data=img_refs)
        v.create_dataset("gt", data=gt_refs)


def test_imagenet_segmentation_from_its_mat_file(tmp_path, explainer):
    samples = [scene(), scene(obj=(0, 16, 0, 32), distractor=(20, 24, 20, 30)),
               scene(h=32, w=48, obj=(8, 24, 8, 40), distractor=(26, 30, 0, 10))]
    write_mat(tmp_path / "gtsegs_ijcv.mat", samples)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert main(["benchmark", "imagenet-seg", "--mat", str(tmp_path / "gtsegs_ijcv.mat"), "--out",
                 str(tmp_path / "out"), "--model", TINY, "--pretrained", "none", "--methods", "test_oracle",
                 "legrad", "--size", "32", "--labels", str(labels), "--no-progress"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    # by hand: at 32×32 (the third image is squashed: its columns resampled), map = brightness / 255
    correct = total = 0
    inter, union = np.zeros(2), np.zeros(2)
    for img, mask in samples:
        if img.shape[1] != 32:
            img = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC))
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((32, 32), Image.NEAREST)) > 127
        b = img.astype(np.float64).mean(2)
        heat = (b - b.min()) / (b.max() - b.min())
        pred = heat > heat.mean()
        correct += (pred == mask).sum()
        total += mask.size
        for c, (p, g) in enumerate(((~pred, ~mask), (pred, mask))):
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    assert res["test_oracle"]["pixel_accuracy"] == pytest.approx(correct / total)
    assert res["test_oracle"]["miou"] == pytest.approx((inter / union).mean())
    assert res["test_oracle"]["map"] == pytest.approx(1.0)  # the object is the brightest: ranked first
    assert res["test_oracle"]["images"] == 3 and 0 <= res["legrad"]["miou"] <= 1
    # resume: nothing is redone, the same numbers
    records = (tmp_path / "out" / "records.jsonl").read_text()
    assert main(["benchmark", "imagenet-seg", "--mat", str(tmp_path / "gtsegs_ijcv.mat"), "--out",
                 str(tmp_path / "out"), "--model", TINY, "--pretrained", "none", "--methods", "test_oracle",
                 "legrad", "--size", "32", "--labels", str(labels), "--no-progress", "--resume"]) == 0
    assert (tmp_path / "out" / "records.jsonl").read_text() == records
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"] == res


def test_bad_mat_files(tmp_path, explainer):
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("something", data=np.zeros(3))
    with pytest.raises(InputError, match="has no dataset /value/img, /value/gt"):
        B.imagenet_segmentation(tmp_path / "other.mat", tmp_path / "o", explainer)
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(InputError, match="is not a MATLAB v7.3"):
        B.imagenet_segmentation(tmp_path / "v5.mat", tmp_path / "o", explainer)


# ------------------------------------------------------------------------------------ OpenImages points
def _png_as_jpg(path: Path, img: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # exact pixels behind a .jpg name (decoded by content)
    path.write_bytes(buf.getvalue())


def write_points(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes", "UnsureVotes"])
        for image_id, x, y, mid, answer in rows:
            w.writerow([image_id, x, y, mid, answer, "ih", 1, 0, 0])


def test_openimages_points(tmp_path, explainer):
    imgs = tmp_path / "images"
    imgs.mkdir()
    a, _ = scene()
    _png_as_jpg(imgs / "aaa.jpg", a)
    (tmp_path / "classes.csv").write_text("LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n")
    # points as fractions; object rows 4..20, columns 6..22 of 32; distractor rows 24..30, cols 2..12
    rows = [("aaa", 0.4, 0.3, "/m/01", "yes"),    # on the object → tp
            ("aaa", 0.05, 0.05, "/m/01", "no"),   # background → tn
            ("aaa", 0.2, 0.85, "/m/01", "no"),    # the distractor (0.502 > 0.5) → fp
            ("aaa", 0.9, 0.9, "/m/02", "yes"),    # background but labelled yes → fn
            ("aaa", 0.5, 0.5, "/m/02", "unsure"),  # not read
            ("bbb", 0.5, 0.5, "/m/01", "yes")]    # bbb.jpg is missing → a failure record
    write_points(tmp_path / "points.csv", rows)
    r = B.openimages_points(tmp_path / "points.csv", tmp_path / "classes.csv", imgs, tmp_path / "out", explainer,
                            size=32, progress=False)
    o = r["results"]["test_oracle"]
    tp, fp, fn, tn = 1, 1, 1, 1
    assert o["points"] == 4
    assert o["iou_foreground"] == pytest.approx(tp / (tp + fp + fn))
    assert o["iou_background"] == pytest.approx(tn / (tn + fn + fp))
    assert o["p_miou"] == pytest.approx((tp / 3 + tn / 3) / 2)
    assert [f["key"] for f in r["failures"]] == ["bbb"] and "missing" in r["failures"][0]["error"]
    assert "| test_oracle |" in r["table"]


@pytest.mark.parametrize("case,match", [
    ("columns", "lacks the column\\(s\\) \\['EstimatedYesNo'"),
    ("mid", "1 label MID\\(s\\) are not in the class descriptions, e.g. /m/99 \\(line 2\\)"),
])
def test_bad_point_files(tmp_path, explainer, case, match):
    (tmp_path / "classes.csv").write_text("LabelName,DisplayName\n/m/01,Cat\n")
    if case == "columns":
        (tmp_path / "points.csv").write_text("ImageId,X,Y,Label\naaa,0.1,0.1,/m/01\n")
    else:
        write_points(tmp_path / "points.csv", [("aaa", 0.1, 0.1, "/m/99", "yes")])
    with pytest.raises(InputError, match=match):
        B.openimages_points(tmp_path / "points.csv", tmp_path / "classes.csv", tmp_path, tmp_path / "o", explainer)


# ------------------------------------------------------------------------------------------ perturbation
class BrightnessClassifier(B.Explainer):
    """Zero-shot over 1000 classes where class 0 wins while the image's mean brightness exceeds 0.3, else
    class 1 — so that the perturbation curves can be worked out by hand."""

    def class_embeddings(self, names, templates=None, cache=None):
        c = torch.zeros(len(names), 24)
        c[:, 2] = 1.0  # every other class: far from both
        c[0] = torch.eye(24)[0]
        c[1] = torch.eye(24)[1]
        return c

    def embed(self, x):
        e = torch.zeros(x.shape[0], 24)
        e[:, 0] = brightness(x).flatten(1).mean(1)
        e[:, 1] = 0.3
        return e

    def explain(self, x, choose):
        from ovlabel import compute_maps

        text = choose(self.embed(x))
        return {"test_oracle": compute_maps(self.model, x, text, method="test_oracle")}


def test_perturbation_on_an_imagenet_folder(tmp_path, explainer):
    root = tmp_path / "val"
    (root / "n01440764").mkdir(parents=True)  # class 0 (tench)
    (root / "n01443537").mkdir()  # class 1 (goldfish)
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = 255  # half the pixels at brightness 1: mean 0.5 → class 0
    Image.fromarray(img).save(root / "n01440764" / "ILSVRC2012_val_00000001.JPEG", format="PNG")
    Image.fromarray(img).save(root / "n01443537" / "ILSVRC2012_val_00000002.JPEG", format="PNG")
    ex = BrightnessClassifier(explainer.model, ["test_oracle"], MEAN, STD, ("{}",), explainer.tokenizer, {})
    r = B.perturbation(root, tmp_path / "out", ex, size=32, target="true", progress=False)
    # by hand: deleted pixels take the mean colour (brightness m = mean(MEAN)); positive deletes the
    # bright half first, then the dark one: brightness (0.5 − min(f, 0.5)) + f·m
    m = float(np.mean(MEAN))
    fractions = np.round(np.arange(10) * 0.1, 1)
    still_0 = (0.5 - np.minimum(fractions, 0.5)) + fractions * m > 0.3
    # negative deletes the dark half first: brightness (0.5 − max(f − 0.5, 0)) + f·m: class 0 throughout
    pos = {0: still_0.astype(float), 1: (~still_0).astype(float)}  # correct w.r.t. the true class
    neg = {0: np.ones(10), 1: np.zeros(10)}
    o = r["results"]["test_oracle"]

    def auc(y):
        return float(np.sum((y[1:] + y[:-1]) * 0.1) / 2)

    assert o["positive_curve"] == pytest.approx(((pos[0] + pos[1]) / 2).tolist())
    assert o["negative_curve"] == pytest.approx(((neg[0] + neg[1]) / 2).tolist())
    assert o["positive_auc"] == pytest.approx(auc((pos[0] + pos[1]) / 2))
    assert o["negative_auc"] == pytest.approx(auc((neg[0] + neg[1]) / 2))
    assert o["top1"] == pytest.approx(0.5) and o["images"] == 2


def test_flat_imagenet_folder_needs_the_devkit(tmp_path):
    from ovlabel.datasets.papers import imagenet_val

    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", format="PNG")
    with pytest.raises(InputError, match="pass --devkit"):
        imagenet_val(tmp_path / "val")
    from scipy.io import savemat

    dk = tmp_path / "devkit" / "data"
    dk.mkdir(parents=True)
    synsets = np.zeros((2,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    synsets[0] = (490, "n01440764", 0)  # the devkit's own ids are not the class indices
    synsets[1] = (361, "n01443537", 0)
    savemat(dk / "meta.mat", {"synsets": synsets})
    (dk / "ILSVRC2012_validation_ground_truth.txt").write_text("361\n")
    assert imagenet_val(tmp_path / "val", tmp_path / "devkit") == [(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG",
                                                                   1)]
