"""Mapping between original image pixels and the model input (resize keeping the aspect ratio, then
pad bottom/right to the patch grid), and :class:`ImageMaps`: an image's maps kept at model resolution,
brought to original pixels one query at a time.

``to_original`` crops the padding and resizes bilinearly with pixel-centre alignment
(``align_corners=False``, no antialiasing). That makes the mapping exact to the pixel: a map that is 1 on
an input square whose edges land on original pixel edges, thresholded at 0.5 after mapping, covers
exactly that square on the original image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError


@dataclass(frozen=True)
class Letterbox:
    original: tuple[int, int]  # (H0, W0)
    resized: tuple[int, int]  # (h, w): the image content inside the input
    padded: tuple[int, int]  # (H, W): the model input, a multiple of the patch size

    @classmethod
    def fit(cls, original: tuple[int, int], size: int, patch: int | tuple[int, int],
            mode: str = "longest") -> Letterbox:
        """Resize so the ``longest`` (or ``shortest``) side is ``size``, then pad to the patch grid."""
        H0, W0 = (int(v) for v in original)
        if H0 < 1 or W0 < 1:
            raise InputError(f"image has zero area ({W0}x{H0}); expected at least 1x1 pixels")
        if mode not in ("longest", "shortest"):
            raise InputError(f"resize mode must be 'longest' or 'shortest', got {mode!r}")
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        ref = max(H0, W0) if mode == "longest" else min(H0, W0)
        scale = size / ref
        h, w = max(1, round(H0 * scale)), max(1, round(W0 * scale))
        return cls((H0, W0), (h, w), (math.ceil(h / ph) * ph, math.ceil(w / pw) * pw))

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per original pixel, (y, x)."""
        return self.resized[0] / self.original[0], self.resized[1] / self.original[1]

    @property
    def padding(self) -> tuple[int, int]:
        """Rows added at the bottom, columns added at the right."""
        return self.padded[0] - self.resized[0], self.padded[1] - self.resized[1]

    def to_original(self, maps: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Maps ``[..., H, W]`` on the model input → ``[..., H0, W0]`` on the original image (float32)."""
        t = torch.as_tensor(maps)
        if tuple(t.shape[-2:]) != tuple(self.padded):
            raise InputError(f"maps have size {tuple(t.shape[-2:])}, expected the model input size {self.padded}")
        lead = t.shape[:-2]
        t = t[..., : self.resized[0], : self.resized[1]].float().reshape(-1, 1, *self.resized)
        if tuple(self.resized) != tuple(self.original):
            t = F.interpolate(t, size=self.original, mode="bilinear", align_corners=False, antialias=False)
        return t.reshape(*lead, *self.original)


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One map ``[h,w]`` → ``[H,W]`` float32: bilinear, pixel-centre aligned, no antialiasing (as
    :meth:`Letterbox.to_original`); a copy even when the size is unchanged."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
    if tuple(t.shape) == tuple(size):
        return t.numpy().copy()
    out = F.interpolate(t[None, None], size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    return out[0, 0].numpy()


def tile_weight(h: int, w: int) -> np.ndarray:
    """A smooth window (1 in the centre, tapering to 0.1 at the borders) for fusing tiles."""
    wy = 0.1 + 0.9 * np.sin(np.pi * (np.arange(h) + 0.5) / h)
    wx = 0.1 + 0.9 * np.sin(np.pi * (np.arange(w) + 0.5) / w)
    return np.outer(wy, wx).astype(np.float32)


def minmax(heat: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Per-map min-max to [0,1] (float32: ``(heat − lo) / (hi − lo)``); a constant map becomes zeros.
    Runs on torch's threads, in place with ``inplace=True`` when ``heat`` is a C-contiguous float32 array."""
    heat = np.asarray(heat, dtype=np.float32)
    out = heat if inplace and heat.flags.c_contiguous and heat.flags.writeable else np.array(heat, order="C")
    t = torch.from_numpy(out)
    lo_t, hi_t = torch.aminmax(t)
    lo, hi = float(lo_t), float(hi_t)
    if hi <= lo:
        return np.zeros_like(heat, dtype=np.float32)
    t.sub_(lo).div_(float(np.float32(hi - lo)))
    return out


@dataclass(frozen=True)
class ImageMaps:
    """The ``K`` maps of one image, kept at model resolution, and how they map to its ``size`` ``(H, W)``.

    * plain: ``maps`` ``[K,h,w]`` cover the whole image; a query's map on the image is ``maps[k]``
      resized bilinearly (pixel centres aligned) to ``size``;
    * tiled: ``maps`` ``[N,K,h,w]`` are the raw maps of ``N`` square tiles ``tiles[n] = (y0, y1, x0, x1)``;
      each is resized to its tile, weighted by :func:`tile_weight` and averaged where tiles overlap, then
      min-max normalised per query.

    ``query(k)`` (or ``maps_[k]``) computes one full-resolution map at a time, so memory stays at one
    ``H×W`` map whatever ``K`` is; :meth:`full` stacks them all.
    """

    maps: np.ndarray
    size: tuple[int, int]
    tiles: tuple[tuple[int, int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        m = np.asarray(self.maps)
        want = 4 if self.tiles is not None else 3
        if m.ndim != want:
            raise InputError(f"maps must be {'[N,K,h,w] (tiles)' if want == 4 else '[K,h,w]'}, got shape {m.shape}")
        if self.tiles is not None and len(self.tiles) != m.shape[0]:
            raise InputError(f"{m.shape[0]} tile maps but {len(self.tiles)} tile regions")
        H, W = (int(v) for v in self.size)
        if H < 1 or W < 1 or m.shape[-1] < 1 or m.shape[-2] < 1:
            raise InputError(f"maps of shape {m.shape} for an image of {W}x{H}: zero area")
        object.__setattr__(self, "size", (H, W))

    def __len__(self) -> int:
        return int(self.maps.shape[1] if self.tiles is not None else self.maps.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(K, H, W)``: the shape of :meth:`full`."""
        return (len(self), *self.size)

    def query(self, k: int) -> np.ndarray:
        """Query ``k``'s map on the image, ``[H,W]`` float32 (a new array)."""
        if self.tiles is None:
            return resize_map(self.maps[k], self.size)
        acc = np.zeros(self.size, dtype=np.float32)
        weight = np.zeros(self.size, dtype=np.float32)
        for (y0, y1, x0, x1), m in zip(self.tiles, self.maps[:, k]):
            win = tile_weight(y1 - y0, x1 - x0)
            acc[y0:y1, x0:x1] += resize_map(m, (y1 - y0, x1 - x0)) * win
            weight[y0:y1, x0:x1] += win
        acc /= np.maximum(weight, 1e-12)
        return minmax(acc, inplace=True)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.query(k)

    def finite(self, k: int) -> bool:
        """Whether query ``k``'s maps are all finite (checked at model resolution: cheap)."""
        return bool(np.isfinite(self.maps[:, k] if self.tiles is not None else self.maps[k]).all())

    def full(self) -> np.ndarray:
        """All maps on the image, ``[K,H,W]`` float32 (``K·H·W·4`` bytes)."""
        out = np.empty(self.shape, dtype=np.float32)
        for k in range(len(self)):
            out[k] = self.query(k)
        return out

    @classmethod
    def from_tiles(cls, size: tuple[int, int], tiles: Sequence, maps: Sequence[np.ndarray]) -> ImageMaps:
        """Tiles given as objects with ``y0, y1, x0, x1`` and their maps ``[K,h,w]``."""
        regions = tuple((int(t.y0), int(t.y1), int(t.x0), int(t.x1)) for t in tiles)
        return cls(np.stack([np.asarray(m, dtype=np.float32) for m in maps]), size, regions)
