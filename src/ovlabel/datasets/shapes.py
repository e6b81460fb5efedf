"""Generated scenes of coloured shapes with exact instance masks: the offline dataset of ovlabel.

Six shapes × six colours = 36 classes ("red circle", …). A scene has zero to several objects of varied
size, position and rotation on a textured, noisy, low-saturation background; objects may partly occlude
each other (the masks are the visible parts). Canvases may be non-square. Everything is a deterministic
function of the seed, and fast (hundreds of scenes per second on one core).

Written as a COCO dataset (``images/*.png`` + ``annotations.json`` with RLE masks) by
:func:`write_coco`; :func:`scene_arrays` gives in-memory arrays for training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..common.files import atomic_write, fsync_dir, write_json

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "magenta": (210, 50, 205),
    "cyan": (40, 200, 215),
}
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


@dataclass
class Scene:
    image: np.ndarray  # [H,W,3] uint8 RGB
    masks: list[np.ndarray]  # visible instance masks [H,W] bool
    labels: list[str]


def _polygon(kind: str, radius: float, angle: float) -> np.ndarray | None:
    def ring(n, r, phase=0.0):
        t = phase + angle + np.arange(n) * 2 * math.pi / n
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)

    if kind == "square":
        return ring(4, radius * 1.25, math.pi / 4)
    if kind == "triangle":
        return ring(3, radius * 1.3, -math.pi / 2)
    if kind == "star":
        outer, inner = ring(5, radius * 1.25, -math.pi / 2), ring(5, radius * 0.5, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    if kind == "cross":
        a, b = radius * 1.1, radius * 0.38
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]])
        c, s = math.cos(angle), math.sin(angle)
        return pts @ np.array([[c, s], [-s, c]])
    return None  # circle, ring: drawn as circles


def shape_mask(kind: str, height: int, width: int, cy: float, cx: float, radius: float, angle: float) -> np.ndarray:
    m = np.zeros((height, width), dtype=np.uint8)
    if kind in ("circle", "ring"):
        cv2.circle(m, (round(cx), round(cy)), max(1, round(radius)), 1, -1, lineType=cv2.LINE_8)
        if kind == "ring":
            cv2.circle(m, (round(cx), round(cy)), max(1, round(radius * 0.5)), 0, -1, lineType=cv2.LINE_8)
    else:
        pts = _polygon(kind, radius, angle) + np.array([cx, cy])
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return m.astype(bool)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation blotches + optional stripes + pixel noise."""
    g = rng.uniform(60, 190)
    cells = rng.integers(3, 7)
    base = g + rng.normal(0, 18, size=(cells, cells, 1)) + rng.normal(0, 10, size=(cells, cells, 3))
    img = cv2.resize(base.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.4:
        period = rng.uniform(4, 12)
        theta = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        img += (8 * np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period))[..., None]
    img += rng.normal(0, 7, size=img.shape)
    return img


def generate_scene(rng: np.random.Generator, height: int, width: int, n_objects: int,
                   min_radius: float = 0.12, max_radius: float = 0.26, max_tries: int = 40) -> Scene:
    """One scene with up to ``n_objects`` objects; each object keeps at least 60 % of itself visible."""
    img = background(rng, height, width)
    short = min(height, width)
    full_masks: list[np.ndarray] = []
    labels: list[str] = []
    colours: list[np.ndarray] = []
    tries = 0
    while len(full_masks) < n_objects and tries < max_tries:
        tries += 1
        kind = SHAPES[rng.integers(len(SHAPES))]
        cname = list(COLOURS)[rng.integers(len(COLOURS))]
        r = rng.uniform(min_radius, max_radius) * short
        cy, cx = rng.uniform(r * 0.6, height - r * 0.6), rng.uniform(r * 0.6, width - r * 0.6)
        m = shape_mask(kind, height, width, cy, cx, r, rng.uniform(0, 2 * math.pi))
        if m.sum() < 30:
            continue
        # the new object goes on top: every earlier object must stay ≥ 60 % visible
        on_top = m.copy()
        ok = True
        for prev in reversed(full_masks):
            if (prev & ~on_top).sum() < 0.6 * prev.sum():
                ok = False
                break
            on_top |= prev
        if not ok:
            continue
        full_masks.append(m)
        labels.append(f"{cname} {kind}")
        colours.append(np.array(COLOURS[cname], dtype=np.float32) + rng.normal(0, 12, 3))
    # paint in order (later on top), visible masks = not covered by later objects
    visible = []
    covered = np.zeros((height, width), dtype=bool)
    for i in range(len(full_masks) - 1, -1, -1):
        v = full_masks[i] & ~covered
        covered |= full_masks[i]
        visible.append(v)
    visible = visible[::-1]
    for m, col in zip(full_masks, colours):
        shade = col + rng.normal(0, 6, size=(int(m.sum()), 3))
        img[m] = shade
    image = np.clip(img, 0, 255).astype(np.uint8)
    return Scene(image, visible, labels)


def scene_sizes(rng: np.random.Generator, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return tuple(sizes[rng.integers(len(sizes))])


def generate(n: int, seed: int, *, sizes: Sequence[tuple[int, int]] = ((64, 64),), min_objects: int = 1,
             max_objects: int = 3, empty_fraction: float = 0.0):
    """Yield ``n`` scenes, deterministically for ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = scene_sizes(rng, sizes)
        k = 0 if rng.random() < empty_fraction else int(rng.integers(min_objects, max_objects + 1))
        yield generate_scene(rng, h, w, k)


def scene_arrays(n: int, seed: int, size: int = 64, **kwargs) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """``images [n,size,size,3] uint8``, multi-hot ``labels [n,36]`` and the scenes (training pools)."""
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, len(CLASSES)), dtype=np.float32)
    scenes = []
    for i, s in enumerate(generate(n, seed, sizes=((size, size),), **kwargs)):
        images[i] = s.image
        for lbl in s.labels:
            labels[i, CLASSES.index(lbl)] = 1
        scenes.append(s)
    return images, labels, scenes


def categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": name.split()[1]} for i, name in enumerate(CLASSES)]


def write_coco(out_dir: str | Path, n: int, seed: int, *, sizes: Sequence[tuple[int, int]] = ((64, 96), (96, 64),
               (80, 80), (72, 112)), min_objects: int = 1, max_objects: int = 3, empty_fraction: float = 0.0,
               first_id: int = 1) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json`` (COCO, RLE masks)."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    cat_id = {c["name"]: c["id"] for c in categories()}
    for i, scene in enumerate(generate(n, seed, sizes=sizes, min_objects=min_objects, max_objects=max_objects,
                                       empty_fraction=empty_fraction)):
        image_id = first_id + i
        name = f"scene_{image_id:06d}.png"
        with atomic_write(out_dir / "images" / name, "wb", durable=False) as f:
            Image.fromarray(scene.image).save(f, format="PNG")
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for m, lbl in zip(scene.masks, scene.labels):
            if not m.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[lbl],
                "segmentation": {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")},
                "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
    path = out_dir / "annotations.json"
    fsync_dir(out_dir / "images")
    write_json(path, {"info": {"description": f"ovlabel shapes, seed {seed}"}, "images": images,
                      "annotations": annotations, "categories": categories()})
    return path
