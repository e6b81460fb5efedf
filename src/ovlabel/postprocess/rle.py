"""Compressed RLE (pycocotools) from masks known only inside a box — no full-size mask is built.

COCO's RLE runs over the image in column-major order, starting with a run of zeros. A mask that is zero
outside a box ``[y0, y0+h) × [x0, x0+w)`` is encoded from the box alone: its runs are the box's runs,
with the rows above and below the box (and the columns left and right of it) added to the zero runs.
The result is identical to ``pycocotools.mask.encode`` of the full mask (tested).
"""

from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils


def encode_crop(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict:
    """Compressed RLE (``counts`` as bytes) of a ``height × width`` mask that equals ``crop`` at
    ``(y0, x0)`` and is zero elsewhere."""
    h, w = crop.shape
    if y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
        raise ValueError(f"crop {h}x{w} at ({y0}, {x0}) does not fit a {height}x{width} image")
    col = np.zeros((w, h + 2), dtype=np.int8)  # each column of the box, padded with a zero above and below
    col[:, 1:-1] = crop.T
    d = np.diff(col, axis=1)  # +1 where a run of ones starts, -1 where it ends (per column)
    flat = np.flatnonzero(d)  # in column-major order of the image: by column, then row
    c, r = np.divmod(flat, h + 1)
    pos = (x0 + c) * height + y0 + r  # starts (d = +1) and exclusive ends (d = -1) alternate
    starts, ends = pos[0::2], pos[1::2]
    runs = np.empty(2 * len(starts) + 1, dtype=np.int64)
    edges = np.empty(2 * len(starts) + 2, dtype=np.int64)
    edges[0] = 0
    edges[1:-1:2] = starts
    edges[2:-1:2] = ends
    edges[-1] = height * width
    runs[:] = np.diff(edges)
    # runs of ones that touch across box columns (a run ending at a column's bottom that continues at
    # the next column's top) happen only when the box spans the full height: merge zero-length gaps
    if len(starts) > 1 and (runs[2:-1:2] == 0).any():
        merged = [int(runs[0])]
        for i in range(1, len(runs), 2):
            ones, zeros = int(runs[i]), int(runs[i + 1])
            if len(merged) >= 3 and merged[-1] == 0:
                merged.pop()
                merged[-1] += ones
            else:
                merged.append(ones)
            merged.append(zeros)
        counts = merged
    else:
        counts = runs.tolist()
    if counts and counts[-1] == 0:
        counts.pop()
    return mask_utils.frPyObjects({"counts": counts, "size": [int(height), int(width)]}, int(height), int(width))


def encode_full(mask: np.ndarray) -> dict:
    """Compressed RLE of a full ``[H,W]`` boolean mask."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))


def decode(rles: dict | list[dict]) -> np.ndarray:
    """``pycocotools.mask.decode`` (one RLE → ``[H,W]``, a list → ``[H,W,N]`` uint8), without the
    DeprecationWarning that pycocotools 2.0 raises under NumPy 2 on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return mask_utils.decode(rles)


def areas(rles: list[dict]) -> np.ndarray:
    """Pixel counts of compressed RLEs. ``pycocotools.mask.area`` fails for more than 255 RLEs at once
    under NumPy 2 (it sizes a ``uint8`` array by their count), so they go in chunks."""
    out = [np.asarray(mask_utils.area(rles[i : i + 255]), dtype=np.int64).reshape(-1)
           for i in range(0, len(rles), 255)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
