"""A small generated COCO set with exact masks, and heatmap caches made from it (for oracle tests)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ovlabel.export.heatmaps import save_heatmaps

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 12, "name": "bar"}]
ABSENT = [{"id": 20, "name": "star"}]


def _shape(kind: str, h: int, w: int, y: int, x: int, s: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    if kind == "square":
        m[y : y + s, x : x + s] = 1
    elif kind == "disc":
        cv2.circle(m, (x + s // 2, y + s // 2), s // 2, 1, -1)
    else:
        m[y : y + max(3, s // 3), x : x + 2 * s] = 1
    return m[:h, :w].astype(bool)


# (height, width, [(category name, y, x, size)]): non-square images, objects on the borders, tiny objects
SCENES = [
    (60, 96, [("square", 0, 0, 14), ("disc", 20, 40, 18), ("bar", 45, 70, 12)]),
    (80, 50, [("disc", 60, 30, 24), ("square", 10, 10, 6), ("square", 30, 36, 14)]),
    (64, 64, [("bar", 2, 2, 20), ("bar", 40, 20, 14), ("disc", 20, 44, 20)]),
    (45, 120, [("square", 30, 105, 15), ("disc", 5, 5, 9), ("bar", 10, 40, 16)]),
    (70, 70, [("square", 5, 5, 4), ("disc", 30, 30, 30)]),
]


def make_gt(directory: Path) -> tuple[Path, dict]:
    """Write gt.json; return its path and {image_id: {category name: [instance masks]}}."""
    images, annotations, truth = [], [], {}
    for i, (h, w, objects) in enumerate(SCENES):
        image_id = 100 + i
        images.append({"id": image_id, "file_name": f"scene_{i}.png", "width": w, "height": h})
        truth[image_id] = {}
        for name, y, x, s in objects:
            m = _shape(name, h, w, y, x, s)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": next(c["id"] for c in CATEGORIES if c["name"] == name),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
            truth[image_id].setdefault(name, []).append(m)
    gt = {"images": images, "annotations": annotations, "categories": CATEGORIES + ABSENT}
    path = directory / "gt.json"
    path.write_text(json.dumps(gt))
    return path, truth


def write_oracle_heatmaps(directory: Path, truth: dict, *, blur: float = 1.0, absent: bool = False,
                          seed: int = 0) -> Path:
    """Blurred ground-truth masks as heatmaps (one per present class, plus absent-class maps with low
    presence when ``absent``)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i, (image_id, per_class) in enumerate(sorted(truth.items())):
        h, w = SCENES[i][0], SCENES[i][1]
        queries, maps, presence = [], [], []
        for c in CATEGORIES + (ABSENT if absent else []):
            union = np.zeros((h, w), dtype=np.float32)
            for m in per_class.get(c["name"], []):
                union = np.maximum(union, m.astype(np.float32))
            if union.any():
                heat, p = cv2.GaussianBlur(union, (0, 0), blur), 0.95
            elif absent:  # an absent class still gets a min-max hot spot somewhere, but low presence
                heat = np.zeros((h, w), dtype=np.float32)
                cy, cx = rng.integers(5, h - 5), rng.integers(5, w - 5)
                cv2.circle(heat, (int(cx), int(cy)), 6, 1.0, -1)
                heat, p = cv2.GaussianBlur(heat, (0, 0), 2.0), 0.01
            else:
                heat, p = union, 0.02
            queries.append(c["name"])
            maps.append(heat)
            presence.append(p)
        save_heatmaps(directory / f"scene_{i}.npz", np.stack(maps), queries, image_id, f"scene_{i}.png",
                      presence=np.array(presence))
    return directory
