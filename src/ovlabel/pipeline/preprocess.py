"""Image → model input, keeping the aspect ratio; optional tiling of large images.

The image is resized (bicubic, antialiased) so its longest (or shortest) side is ``size``, normalised with
the model's mean/std and padded bottom/right with zeros (the mean colour) to the patch grid. The
:class:`~ovlabel.postprocess.geometry.Letterbox` records the mapping back to original pixels.

Tiling (images whose long side exceeds ``min_scale × size``): the image is covered by overlapping square
tiles, each processed at the input size; their raw (unnormalised) maps are kept at model resolution and
fused one query at a time (:class:`~ovlabel.postprocess.geometry.ImageMaps`): each is mapped back to its
tile's region, averaged with a smooth window, then min-max normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..postprocess.geometry import Letterbox


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def to_input(image: np.ndarray, size: int, patch: tuple[int, int], norm: Normalization,
             mode: str = "longest") -> tuple[torch.Tensor, Letterbox]:
    """RGB ``uint8 [H,W,3]`` → normalised, padded ``[3,H',W']`` float32 and its letterbox."""
    lb = Letterbox.fit(image.shape[:2], size, patch, mode)
    h, w = lb.resized
    pil = Image.fromarray(image)
    if (h, w) != image.shape[:2]:
        pil = pil.resize((w, h), Image.BICUBIC, reducing_gap=None)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(norm.mean).view(3, 1, 1)) / torch.tensor(norm.std).view(3, 1, 1)
    out = torch.zeros(3, *lb.padded, dtype=torch.float32)
    out[:, :h, :w] = x
    return out, lb


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int


def tile_regions(height: int, width: int, size: int, min_scale: float, overlap: float) -> list[Tile]:
    """Overlapping square tiles covering the image, or ``[]`` when the image is small enough.

    With ``k = ceil(long / (min_scale·size))`` tiles along the long side, each tile has side
    ``ceil(long / k)`` (at most the short side) and consecutive tiles overlap by ``overlap``.
    """
    long = max(height, width)
    if long <= min_scale * size:
        return []
    k = math.ceil(long / (min_scale * size))
    side = min(math.ceil(long / k), height, width)
    stride = max(1, int(side * (1 - overlap)))

    def starts(n: int) -> list[int]:
        if n <= side:
            return [0]
        out = list(range(0, n - side, stride)) + [n - side]
        return sorted(set(out))

    return [Tile(y, y + side, x, x + side) for y in starts(height) for x in starts(width)]
