"""Heatmap → binary mask → instances: thresholds, morphology, connected components.

Thresholds (``ThresholdSpec(method, value)``), each applied to one ``[H,W]`` heatmap; foreground is
``heat > t`` (strict, as in Chefer's "map > its mean" protocol):

* ``fixed``: ``t = value``;
* ``mean``: ``t`` = the map's own mean (Chefer et al.);
* ``otsu``: Otsu's threshold (scikit-image);
* ``quantile``: ``t`` = the ``value`` quantile of the map (e.g. 0.9 keeps the hottest 10 %);
* ``max_fraction``: ``t = value · max(map)``.

Morphology and hole filling use OpenCV (elliptic kernels, flood fill); components are OpenCV's
8-connected components.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu

from ..errors import InputError
from .rle import encode_crop

THRESHOLD_METHODS = ("fixed", "mean", "otsu", "quantile", "max_fraction")


@dataclass(frozen=True)
class ThresholdSpec:
    method: str = "mean"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.method not in THRESHOLD_METHODS:
            raise InputError(f"threshold method {self.method!r} is not known; expected one of {THRESHOLD_METHODS}")
        needs_value = self.method in ("fixed", "quantile", "max_fraction")
        if needs_value and self.value is None:
            raise InputError(f"threshold method {self.method!r} needs a value")
        if self.method in ("quantile", "max_fraction") and not 0 <= float(self.value) <= 1:
            raise InputError(f"threshold {self.method} value must be in [0,1], got {self.value}")

    def __call__(self, heat: np.ndarray) -> float:
        """The threshold for one heatmap."""
        if self.method == "fixed":
            return float(self.value)
        if self.method == "mean":
            return float(heat.mean())
        if self.method == "quantile":
            return float(np.quantile(heat, float(self.value)))
        if self.method == "max_fraction":
            return float(self.value) * float(heat.max())
        # otsu: undefined on a constant map → nothing is foreground
        if heat.max() <= heat.min():
            return float(heat.max())
        return float(threshold_otsu(heat))


def _ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def clean_mask(mask: np.ndarray, *, opening: int = 0, closing: int = 0, fill_holes: bool = False) -> np.ndarray:
    """Morphological opening then closing (kernel diameters in pixels, 0 = off) and hole filling."""
    out = _as_u8(mask)
    if opening > 1:
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, _ellipse(opening))
    if closing > 1:
        out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, _ellipse(closing))
    if fill_holes:
        out = fill_mask_holes(out)
    if out.flags.c_contiguous and not np.may_share_memory(out, mask):
        return out.view(bool)  # a new 0/1 array: reinterpret, no copy
    return out.astype(bool)


def _as_u8(mask: np.ndarray) -> np.ndarray:
    """A 0/1 ``uint8`` view of a boolean mask (no copy), or a converted copy of any other mask."""
    if mask.dtype == bool and mask.flags.c_contiguous:
        return mask.view(np.uint8)
    return (mask != 0).astype(np.uint8)


def fill_mask_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary mask (background regions not connected to the border, 4-connected —
    the same result as ``scipy.ndimage.binary_fill_holes``), with OpenCV's flood fill."""
    h, w = mask.shape
    background = np.ones((h + 2, w + 2), dtype=np.uint8)
    background[1:-1, 1:-1] = mask == 0
    cv2.floodFill(background, None, (0, 0), 2, flags=4)
    return (background[1:-1, 1:-1] != 2).astype(np.uint8)


@dataclass(frozen=True)
class Instances:
    """The instances of one thresholded heatmap, kept as a component label image of the part of the map
    that holds foreground (``labels`` at ``offset`` in an image of ``shape``): masks and RLEs are built
    only for the instances that are emitted; means are read within each component's box."""

    labels: np.ndarray  # int32 [h,w], OpenCV component labels (0 = background), at `offset`
    groups: tuple[tuple[int, ...], ...]  # component labels of each instance; largest instance first
    stats: np.ndarray  # OpenCV stats per component label (in `labels` coordinates): left, top, width, height, area
    offset: tuple[int, int] = (0, 0)  # (y0, x0) of `labels` in the image
    shape: tuple[int, int] | None = None  # (H, W) of the image; default: the shape of `labels`

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.shape) if self.shape is not None else tuple(self.labels.shape)

    @property
    def areas(self) -> np.ndarray:
        """Pixels per instance."""
        return np.array([self.stats[list(g), cv2.CC_STAT_AREA].sum() for g in self.groups], dtype=np.float64)

    def box(self, i: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of instance ``i`` in ``labels`` coordinates (end exclusive)."""
        st = self.stats[list(self.groups[i])]
        x0, y0 = int(st[:, 0].min()), int(st[:, 1].min())
        x1, y1 = int((st[:, 0] + st[:, 2]).max()), int((st[:, 1] + st[:, 3]).max())
        return y0, y1, x0, x1

    def crop(self, i: int) -> tuple[np.ndarray, int, int]:
        """Instance ``i``'s mask within its box, and the box's top-left corner in image coordinates."""
        g = self.groups[i]
        y0, y1, x0, x1 = self.box(i)
        lab = self.labels[y0:y1, x0:x1]
        m = lab == g[0] if len(g) == 1 else np.isin(lab, g)
        return m, y0 + self.offset[0], x0 + self.offset[1]

    def rle(self, i: int) -> dict:
        """Compressed RLE (bytes counts) of instance ``i`` on the image, built from its box alone."""
        m, y0, x0 = self.crop(i)
        return encode_crop(m, y0, x0, *self.image_shape)

    def mask(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """The boolean ``[H,W]`` mask of instance ``i`` on the image (written into ``out`` when given)."""
        out = np.empty(self.image_shape, dtype=bool) if out is None else out
        out[...] = False
        m, y0, x0 = self.crop(i)
        out[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] = m
        return out

    def mean(self, heat: np.ndarray) -> np.ndarray:
        """Mean of ``heat`` (the image's map, ``[H,W]``) inside each instance, each component read within
        its bounding box."""
        oy, ox = self.offset

        def total(c: int) -> float:
            x, y, w, h = (int(v) for v in self.stats[c, :4])
            window = heat[oy + y : oy + y + h, ox + x : ox + x + w]
            return float(window[self.labels[y : y + h, x : x + w] == c].sum(dtype=np.float64))

        return np.array([sum(total(c) for c in g) for g in self.groups], dtype=np.float64) / self.areas


def _label(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """8-connected component labels, the labels with at least ``min_area`` pixels (largest first), stats."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(_as_u8(mask), connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    keep = [i for i in range(1, n) if area[i] >= max(1, min_area)]
    keep.sort(key=lambda i: -area[i])
    return labels, keep, stats


def components(mask: np.ndarray, min_area: int = 0) -> list[np.ndarray]:
    """8-connected components of a binary mask with at least ``min_area`` pixels, largest first."""
    if not mask.any():
        return []
    labels, keep, _ = _label(mask, min_area)
    return [labels == i for i in keep]


def foreground_box(fg: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)``: the box of the foreground grown by ``margin`` (clipped), or ``None``."""
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg[rows[0] : rows[-1] + 1].any(axis=0))
    H, W = fg.shape
    return (max(0, int(rows[0]) - margin), min(H, int(rows[-1]) + 1 + margin),
            max(0, int(cols[0]) - margin), min(W, int(cols[-1]) + 1 + margin))


def find_instances(
    heat: np.ndarray,
    threshold: ThresholdSpec,
    *,
    instances: str = "components",
    min_area: int = 0,
    opening: int = 0,
    closing: int = 0,
    fill_holes: bool = False,
) -> Instances:
    """The instances of one heatmap ``[H,W]``: threshold, :func:`clean_mask`, 8-connected components of at
    least ``min_area`` pixels. ``instances``: ``"components"`` (each component is one instance) or
    ``"class"`` (one instance per class: the union of those components).

    Only the box around the foreground (grown by the morphology kernels, so that opening, closing and
    hole filling see what they would see on the whole map) is cleaned and labelled: on a large image the
    cost follows the size of what was found, not of the image.
    """
    if instances not in ("components", "class"):
        raise InputError(f"instances must be 'components' or 'class', got {instances!r}")
    fg = heat > threshold(heat)
    margin = (opening + closing + 2) if (opening > 1 or closing > 1) else 0
    box = foreground_box(fg, margin)
    if box is None:
        return Instances(np.zeros((0, 0), np.int32), (), np.zeros((1, 5), np.int32), (0, 0), fg.shape)
    y0, y1, x0, x1 = box
    crop = clean_mask(fg[y0:y1, x0:x1], opening=opening, closing=closing, fill_holes=fill_holes)
    if not crop.any():
        return Instances(np.zeros((0, 0), np.int32), (), np.zeros((1, 5), np.int32), (0, 0), fg.shape)
    labels, keep, stats = _label(crop, min_area)
    groups = ((tuple(keep),) if keep else ()) if instances == "class" else tuple((i,) for i in keep)
    return Instances(labels, groups, stats, (y0, x0), fg.shape)


def heat_to_instances(heat: np.ndarray, threshold: ThresholdSpec, **options) -> list[np.ndarray]:
    """Binary instance masks of one heatmap ``[H,W]``, largest first (options: :func:`find_instances`)."""
    found = find_instances(heat, threshold, **options)
    return [found.mask(i) for i in range(len(found))]
