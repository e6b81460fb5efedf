"""COCO files: results to evaluate, datasets of pseudo-labels to train on, and PNG label masks.

Invariants of everything written here (tested):

* boxes are XYWH and equal ``pycocotools.mask.toBbox`` of the written segmentation;
* ``area`` is the area of the written segmentation (mask pixels), never the box area;
* segmentations are compressed RLE with ``str`` counts (or polygons by option), never empty;
* annotation ids are unique (1..N), ``iscrowd`` is 0;
* category ids are the ground truth's or the user's own — never renumbered;
* files are validated with pycocotools before they are written, and written atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import CocoFormatError
from ..postprocess.detections import Detections


# ------------------------------------------------------------------------------------------------- I/O
def quiet():
    """Silence pycocotools' progress prints ("creating index...")."""
    return contextlib.redirect_stdout(io.StringIO())


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CocoFormatError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{what} file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                              f"column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{what} file {path} cannot be read: {e}") from None


def coco_from_dict(dataset: dict, source: str = "dataset") -> COCO:
    """A ``pycocotools.coco.COCO`` from a dataset dict, after checking its required fields."""
    if not isinstance(dataset, dict):
        raise CocoFormatError(f"{source}: a COCO dataset is a JSON object, got {type(dataset).__name__}")
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list):
            raise CocoFormatError(f"{source}: field '{key}' must be a list")
    dataset.setdefault("annotations", [])
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise CocoFormatError(f"{source}: images[{i}] has no 'id'")
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise CocoFormatError(f"{source}: categories[{i}] needs 'id' and 'name'")
    ids = [c["id"] for c in dataset["categories"]]
    if len(set(ids)) != len(ids):
        raise CocoFormatError(f"{source}: category ids are not unique")
    coco = COCO()
    coco.dataset = dataset
    with quiet():
        coco.createIndex()
    return coco


def load_coco(path: str | Path) -> COCO:
    """Load a COCO ground-truth / dataset file with errors that name the file and the field."""
    return coco_from_dict(read_json(path, "COCO"), str(path))


# -------------------------------------------------------------------------------------------- results
def detections_to_results(image_id: int, dets: Detections) -> list[dict]:
    """COCO results entries for one image (bbox XYWH, score, compressed RLE with str counts, mask area)."""
    out = []
    for rle, box, area, score, cat in zip(dets.rles(), dets.boxes, dets.areas, dets.scores, dets.category_ids):
        out.append({
            "image_id": int(image_id),
            "category_id": int(cat),
            "bbox": [float(v) for v in box],
            "score": float(score),
            "segmentation": rle,
            "area": int(area),
        })
    return out


def check_results(results: Any, image_ids: Iterable[int], category_ids: Iterable[int], source: str) -> list[dict]:
    """Structural checks of a results list and of its ids against the ground truth."""
    if not isinstance(results, list):
        raise CocoFormatError(f"{source}: COCO results are a JSON list of detections, got {type(results).__name__}")
    images, cats = set(image_ids), set(category_ids)
    bad_img, bad_cat = set(), set()
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise CocoFormatError(f"{source}: results[{i}] is not an object")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise CocoFormatError(f"{source}: results[{i}] has no '{key}'")
        if "bbox" not in r and "segmentation" not in r:
            raise CocoFormatError(f"{source}: results[{i}] has neither 'bbox' nor 'segmentation'")
        if "bbox" in r and (not isinstance(r["bbox"], list) or len(r["bbox"]) != 4):
            raise CocoFormatError(f"{source}: results[{i}].bbox must be [x, y, w, h]")
        if not isinstance(r["score"], (int, float)) or not np.isfinite(r["score"]):
            raise CocoFormatError(f"{source}: results[{i}].score must be a finite number")
        if r["image_id"] not in images:
            bad_img.add(r["image_id"])
        if r["category_id"] not in cats:
            bad_cat.add(r["category_id"])
    if bad_img:
        raise CocoFormatError(f"{source}: field 'image_id' has ids not in the ground truth: {sorted(bad_img)[:20]}")
    if bad_cat:
        raise CocoFormatError(f"{source}: field 'category_id' has ids not in the ground truth: "
                              f"{sorted(bad_cat)[:20]} (valid: {sorted(cats)[:20]})")
    return results


# -------------------------------------------------------------------------------------------- dataset
def _polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= 3:
            # contour points are pixel indices; +0.5 puts them on pixel centres in COCO's continuous frame
            polys.append([float(v) + 0.5 for v in c.reshape(-1)])
    return polys


def _segmentation(mask: np.ndarray, rle: dict, mode: str) -> tuple[Any, dict]:
    """The segmentation to write and the RLE COCO will decode from it (for area and bbox)."""
    if mode == "polygon":
        polys = _polygons(mask)
        if polys:
            h, w = mask.shape
            decoded = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            if mask_utils.area(decoded) > 0:
                return polys, decoded
        # too small for a polygon: keep the exact RLE rather than an empty segmentation
    return rle, {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


# ------------------------------------------------------------------------------------------ PNG masks
def label_image(dets: Detections, kind: str = "instance") -> np.ndarray:
    """``[H,W]`` label map: ``instance`` → 1..N by descending score (0 = background); ``semantic`` → the
    category id of the best-scoring detection covering each pixel."""
    if kind not in ("instance", "semantic"):
        raise CocoFormatError(f"label mask kind must be 'instance' or 'semantic', got {kind!r}")
    H, W = dets.image_size
    dets = dets.sorted()
    top = len(dets) if kind == "instance" else int(dets.category_ids.max(initial=0))
    out = np.zeros((H, W), dtype=np.uint16 if top > 255 else np.uint8)
    for i in range(len(dets) - 1, -1, -1):  # paint lowest scores first: the best one wins overlaps
        out[dets.masks[i]] = (i + 1) if kind == "instance" else dets.category_ids[i]
    return out


def write_label_png(path: str | Path, dets: Detections, kind: str = "instance") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = label_image(dets, kind)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(labels).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
