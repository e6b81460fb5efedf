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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..errors import InputError
from ..postprocess.geometry import Letterbox
from .images import DecodedImage, ImageItem, decode_item


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


@dataclass
class Prepared:
    """An item of a run, prepared for the model (or the reason it could not be)."""

    item: ImageItem
    image: np.ndarray | None = None
    tensor: torch.Tensor | None = None
    letterbox: Letterbox | None = None
    tiles: list[tuple[Tile, torch.Tensor, Letterbox]] | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (H, W) of the decoded image


class PreparedImages(torch.utils.data.Dataset):
    """Decoding and preprocessing of run items, as DataLoader workers run them (one item at a time)."""

    def __init__(self, items: Sequence[ImageItem], cfg: Config, patch: tuple[int, int], norm: Normalization,
                 keep_image: bool) -> None:
        self.items, self.cfg, self.patch, self.norm, self.keep_image = list(items), cfg, patch, norm, keep_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        decoded = decode_item(self.items[i], self.cfg.run.max_pixels, self.cfg.run.max_aspect_ratio)
        return prepare_decoded(decoded, self.cfg, self.patch, self.norm, self.keep_image)


def prepare(item: ImageItem, image: np.ndarray, cfg: Config, patch, norm: Normalization, keep_image: bool) -> Prepared:
    """An image ready for the model: its input tensor and letterbox, and its tiles when tiling applies
    (``keep_image``: the pixels stay, for overlays and map refinement)."""
    pre = cfg.preprocess
    tiles = None
    if pre.tile.enabled:
        regions = tile_regions(image.shape[0], image.shape[1], pre.size, pre.tile.min_scale, pre.tile.overlap)
        if regions:
            tiles = []
            for t in regions:
                tensor, lb = to_input(image[t.y0 : t.y1, t.x0 : t.x1], pre.size, patch, norm, pre.resize)
                tiles.append((t, tensor, lb))
    tensor, lb = to_input(image, pre.size, patch, norm, pre.resize)
    keep = keep_image or tiles is not None
    return Prepared(item, image if keep else None, tensor, lb, tiles, size=tuple(image.shape[:2]))


def prepare_decoded(decoded: DecodedImage, cfg: Config, patch, norm: Normalization, keep_image: bool) -> Prepared:
    """:func:`prepare` for a decoded item; a decoding or preprocessing failure is kept as ``error``."""
    if decoded.error is not None:
        return Prepared(decoded.item, error=decoded.error)
    try:
        return prepare(decoded.item, decoded.image, cfg, patch, norm, keep_image)
    except (InputError, ValueError, MemoryError) as e:
        return Prepared(decoded.item, error=f"preprocessing failed: {type(e).__name__}: {e}")


def collate(batch: list[Prepared]) -> list[Prepared]:
    """DataLoader collation: a batch stays a list of :class:`Prepared` (their sizes differ)."""
    return batch
