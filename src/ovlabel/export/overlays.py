"""Pictures to check a run: the image with masks, boxes, labels and scores, beside the heatmap of the
best-scoring query."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..postprocess.detections import Detections
from .files import atomic_write


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, stable colour per category index (golden-ratio hues)."""
    h = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


MIN_SIDE = 320  # small images are enlarged (nearest neighbour) so that labels stay readable


def _enlarge(a: np.ndarray, f: int) -> np.ndarray:
    return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def draw_overlay(image: np.ndarray, dets: Detections, heatmaps: Any = None,
                 queries: tuple[str, ...] = ()) -> np.ndarray:
    """RGB ``uint8``: masks tinted per category, boxes, ``label score`` tags; with ``heatmaps`` (a
    ``[K,H,W]`` array or :class:`~ovlabel.postprocess.geometry.ImageMaps`: anything where ``heatmaps[k]``
    is query ``k``'s map) a second panel shows the (jet-coloured) map of the best detection's query, or of
    the first query. Images smaller than 320 px are enlarged by an integer factor first. Masks are
    decoded one at a time."""
    f = max(1, int(np.ceil(MIN_SIDE / max(1, min(image.shape[:2])))))
    image = _enlarge(image, f)
    canvas = image.astype(np.float32)
    for i in range(len(dets) - 1, -1, -1):
        c = np.array(colour(int(dets.category_ids[i])), dtype=np.float32)
        m = _enlarge(dets.mask(i), f)
        canvas[m] = 0.55 * canvas[m] + 0.45 * c
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    del canvas
    draw = ImageDraw.Draw(out)
    H, W = image.shape[:2]
    font = ImageFont.load_default(size=max(10, min(H, W) // 28))
    for i in range(len(dets)):
        x, y, w, h = (float(v) * f for v in dets.boxes[i])
        c = colour(int(dets.category_ids[i]))
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=c, width=max(1, min(H, W) // 200))
        tag = f"{dets.labels[i]} {dets.scores[i]:.2f}"
        tb = draw.textbbox((x, y), tag, font=font)
        ty = max(0, y - (tb[3] - tb[1]) - 2)
        draw.rectangle([x, ty, x + (tb[2] - tb[0]) + 4, ty + (tb[3] - tb[1]) + 2], fill=c)
        draw.text((x + 2, ty), tag, fill=(0, 0, 0), font=font)
    panel = np.asarray(out)
    if heatmaps is None or len(heatmaps) == 0:
        return panel
    k = queries.index(dets.labels[0]) if len(dets) and dets.labels[0] in queries else 0
    heat = _enlarge(np.clip(np.asarray(heatmaps[k], dtype=np.float32), 0, 1), f)
    jet = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blend = (0.5 * image.astype(np.float32) + 0.5 * jet.astype(np.float32)).astype(np.uint8)
    right = Image.fromarray(blend)
    if queries:
        ImageDraw.Draw(right).text((4, 4), f"map: {queries[k]}", fill=(255, 255, 255), font=font)
    gap = np.full((H, max(2, W // 100), 3), 255, dtype=np.uint8)
    return np.concatenate([panel, gap, np.asarray(right)], axis=1)


def save_image_atomic(path: str | Path, rgb: np.ndarray, quality: int = 90, *, durable: bool = True) -> Path:
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else (path.suffix.lstrip(".").upper() or "PNG")
    with atomic_write(path, "wb", durable=durable) as f:
        if fmt == "JPEG":
            Image.fromarray(rgb).save(f, format=fmt, quality=quality)
        else:
            Image.fromarray(rgb).save(f, format=fmt)
    return path
