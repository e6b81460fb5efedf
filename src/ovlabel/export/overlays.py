"""Pictures to check a run: the image with masks, boxes and ``label score`` tags (placed so that they do
not overlap), beside the maps of the queries that matter most."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..common.files import atomic_write
from ..postprocess.detections import Detections


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, stable colour per category index (golden-ratio hues)."""
    h = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


MIN_SIDE = 320  # small images are enlarged (nearest neighbour) so that labels stay readable
MAX_SIDE = 1600  # large images are reduced to this longest side per panel
MAX_MAPS = 3  # map panels: the queries with detections (best first), then the most present ones


def _enlarge(a: np.ndarray, f: int) -> np.ndarray:
    return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def _resize(a: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if a.shape[:2] == size:
        return a
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(a, (size[1], size[0]), interpolation=interp)


def place_labels(boxes: list[tuple[float, float, float, float]], sizes: list[tuple[float, float]],
                 width: int, height: int) -> list[tuple[float, float, float, float] | None]:
    """Rectangles ``(x0, y0, x1, y1)`` for text tags of sizes ``(w, h)`` attached to boxes ``(x, y, w, h)``,
    in priority order, none overlapping another: above the box, inside its top, below it, inside its
    bottom, then stepping down the image from there, in the box's column or beside it; ``None`` for a tag
    with no free place (its box and mask are still drawn)."""
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float, float, float] | None] = []

    def free(r) -> bool:
        return all(r[2] <= p[0] or r[0] >= p[2] or r[3] <= p[1] or r[1] >= p[3] for p in placed)

    for (x, y, w, h), (tw, th) in zip(boxes, sizes):
        rect = None
        for cx in (x, x + w - tw, x - tw, x + w):
            cx = min(max(0.0, cx), max(0.0, width - tw))
            for start in (y - th, y, y + h, y + h - th):
                for k in range(int(height // max(th, 1)) + 1):
                    cy = min(max(0.0, start + k * th), max(0.0, height - th))
                    r = (cx, cy, cx + tw, cy + th)
                    if free(r):
                        rect = r
                        break
                if rect is not None:
                    break
            if rect is not None:
                break
        if rect is not None:
            placed.append(rect)
        out.append(rect)
    return out


def _map_queries(dets: Detections, queries: tuple[str, ...], presence: Any, n: int) -> list[int]:
    """Which queries get a map panel: those with detections (by their best score), then by presence."""
    order: list[int] = []
    for label in dets.sorted().labels:
        k = queries.index(label) if label in queries else None
        if k is not None and k not in order:
            order.append(k)
    rest = list(range(len(queries)))
    if presence is not None:
        rest.sort(key=lambda k: -float(presence[k]))
    order += [k for k in rest if k not in order]
    return order[:n]


def draw_overlay(image: np.ndarray, dets: Detections, heatmaps: Any = None, queries: tuple[str, ...] = (),
                 presence: Any = None, max_maps: int = MAX_MAPS) -> np.ndarray:
    """RGB ``uint8``: masks tinted per category, boxes, ``label score`` tags that do not overlap; with
    ``heatmaps`` (a ``[K,H,W]`` array or :class:`~ovlabel.postprocess.geometry.ImageMaps`: anything where
    ``heatmaps[k]`` is query ``k``'s map) up to ``max_maps`` more panels show the (jet-coloured) maps of the
    queries with detections, best first, then of the most present queries, each titled with its query.
    Images smaller than 320 px are enlarged by an integer factor, larger than 1600 px reduced. Masks and
    maps are brought to the panel one at a time."""
    H0, W0 = image.shape[:2]
    f = max(1, int(np.ceil(MIN_SIDE / max(1, min(H0, W0)))))
    size = (H0 * f, W0 * f)
    if max(size) > MAX_SIDE:
        r = MAX_SIDE / max(size)
        size = (max(1, round(size[0] * r)), max(1, round(size[1] * r)))
    sy, sx = size[0] / H0, size[1] / W0
    base = _enlarge(image, f) if f > 1 else _resize(image, size, nearest=False)
    canvas = base.astype(np.float32)
    for i in range(len(dets) - 1, -1, -1):
        c = np.array(colour(int(dets.category_ids[i])), dtype=np.float32)
        m = dets.mask(i)
        m = _enlarge(m, f) if f > 1 else _resize(m.view(np.uint8), size, nearest=True).view(bool)
        canvas[m] = 0.55 * canvas[m] + 0.45 * c
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    del canvas
    draw = ImageDraw.Draw(out)
    H, W = size
    font = ImageFont.load_default(size=max(10, min(H, W) // 28))
    boxes, tags, sizes = [], [], []
    for i in range(len(dets)):
        x, y, w, h = (float(v) for v in dets.boxes[i])
        box = (x * sx, y * sy, w * sx, h * sy)
        tag = f"{dets.labels[i]} {dets.scores[i]:.2f}"
        tb = draw.textbbox((0, 0), tag, font=font)
        boxes.append(box)
        tags.append(tag)
        sizes.append((tb[2] - tb[0] + 4, tb[3] - tb[1] + 2))
        draw.rectangle([box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1],
                       outline=colour(int(dets.category_ids[i])), width=max(1, min(H, W) // 200))
    for i, rect in enumerate(place_labels(boxes, sizes, W, H)):
        if rect is not None:
            draw.rectangle(list(rect), fill=colour(int(dets.category_ids[i])))
            draw.text((rect[0] + 2, rect[1]), tags[i], fill=(0, 0, 0), font=font)
    panels = [np.asarray(out)]
    if heatmaps is not None and len(heatmaps) > 0:
        names = queries or tuple(f"query {k}" for k in range(len(heatmaps)))
        for k in _map_queries(dets, names, presence, max_maps):
            heat = np.clip(np.asarray(heatmaps[k], dtype=np.float32), 0, 1)
            heat = _enlarge(heat, f) if f > 1 else _resize(heat, size, nearest=False)
            jet = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
            panel = Image.fromarray((0.5 * base.astype(np.float32) + 0.5 * jet.astype(np.float32)).astype(np.uint8))
            title = f"map: {names[k]}" + (f" (presence {float(presence[k]):.2f})" if presence is not None else "")
            pd = ImageDraw.Draw(panel)
            tb = pd.textbbox((4, 4), title, font=font)
            pd.rectangle([tb[0] - 2, tb[1] - 2, tb[2] + 2, tb[3] + 2], fill=(0, 0, 0))
            pd.text((4, 4), title, fill=(255, 255, 255), font=font)
            panels.append(np.asarray(panel))
    if len(panels) == 1:
        return panels[0]
    gap = np.full((H, max(2, W // 100), 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1)


def save_image_atomic(path: str | Path, rgb: np.ndarray, quality: int = 90, *, durable: bool = True) -> Path:
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else (path.suffix.lstrip(".").upper() or "PNG")
    with atomic_write(path, "wb", durable=durable) as f:
        if fmt == "JPEG":
            Image.fromarray(rgb).save(f, format=fmt, quality=quality)
        else:
            Image.fromarray(rgb).save(f, format=fmt)
    return path
