"""Pictures to check a run: the image with masks, boxes, labels and scores, beside the heatmap of the
best-scoring query."""

from __future__ import annotations

import colorsys
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..postprocess.detections import Detections


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, stable colour per category index (golden-ratio hues)."""
    h = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


MIN_SIDE = 320  # small images are enlarged (nearest neighbour) so that labels stay readable


def _enlarge(a: np.ndarray, f: int) -> np.ndarray:
    return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def draw_overlay(image: np.ndarray, dets: Detections, heatmaps: np.ndarray | None = None,
                 queries: tuple[str, ...] = ()) -> np.ndarray:
    """RGB ``uint8``: masks tinted per category, boxes, ``label score`` tags; with ``heatmaps`` a second
    panel shows the (jet-coloured) map of the best detection's query, or of the first query. Images
    smaller than 320 px are enlarged by an integer factor first."""
    f = max(1, int(np.ceil(MIN_SIDE / max(1, min(image.shape[:2])))))
    image = _enlarge(image, f)
    if f > 1:
        dets = Detections(_enlarge(dets.masks.transpose(1, 2, 0), f).transpose(2, 0, 1), dets.scores,
                          dets.category_ids, dets.labels)
        heatmaps = None if heatmaps is None else _enlarge(np.asarray(heatmaps).transpose(1, 2, 0), f).transpose(2, 0, 1)
    canvas = image.astype(np.float32).copy()
    for i in range(len(dets) - 1, -1, -1):
        c = np.array(colour(int(dets.category_ids[i])), dtype=np.float32)
        m = dets.masks[i]
        canvas[m] = 0.55 * canvas[m] + 0.45 * c
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    H, W = image.shape[:2]
    font = ImageFont.load_default(size=max(10, min(H, W) // 28)) if hasattr(ImageFont, "load_default") else None
    for i in range(len(dets)):
        x, y, w, h = dets.boxes[i]
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
    heat = np.clip(heatmaps[k].astype(np.float32), 0, 1)
    jet = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blend = (0.5 * image.astype(np.float32) + 0.5 * jet.astype(np.float32)).astype(np.uint8)
    right = Image.fromarray(blend)
    if queries:
        ImageDraw.Draw(right).text((4, 4), f"map: {queries[k]}", fill=(255, 255, 255), font=font)
    gap = np.full((H, max(2, W // 100), 3), 255, dtype=np.uint8)
    return np.concatenate([panel, gap, np.asarray(right)], axis=1)


def save_image_atomic(path: str | Path, rgb: np.ndarray, quality: int = 90) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(rgb).save(tmp, quality=quality) if path.suffix.lower() in (".jpg", ".jpeg") \
            else Image.fromarray(rgb).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
