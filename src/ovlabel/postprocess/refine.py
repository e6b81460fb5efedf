"""Refining maps to the image's own edges before they are thresholded (``postprocess.refine``).

A map from a ViT is a bilinear upsampling of a coarse token grid: its boundaries are blurred over a patch.
The image knows where the edges are. Every refiner here is built once per image and then refines each
query's map (``[H,W]`` float, the image's resolution); large images are refined at ``max_side`` pixels
on their longer side and brought back bilinearly.

* ``superpixels`` — scikit-image superpixels (SLIC, or Felzenszwalb's graph segmentation); every
  superpixel takes the mean of the map over its pixels.
* ``pamr`` — pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as the training-free CLIP
  segmenters use it: affinities from the colour differences to the 8 neighbours at several dilations,
  normalised by the local colour spread and turned into weights by a softmax over the neighbours; the map
  is then averaged with those weights ``iterations`` times.
* ``crf`` — a fully connected CRF (Krähenbühl & Koltun) with Gaussian and bilateral kernels, unary from
  the map as a foreground probability; needs pydensecrf2 (``pip install "ovlabel[crf]"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

REFINERS = ("none", "superpixels", "pamr", "crf")


@dataclass(frozen=True)
class RefineSpec:
    method: str = "none"
    superpixels: str = "felzenszwalb"  # felzenszwalb | slic
    segments: int = 250  # SLIC: about this many superpixels
    compactness: float = 10.0  # SLIC: colour vs space
    scale: float = 100.0  # Felzenszwalb: larger, larger segments
    iterations: int = 10  # PAMR and CRF
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # PAMR
    crf_bilateral: tuple[float, float, float] = (30.0, 13.0, 10.0)  # CRF: spatial sd, colour sd, weight
    crf_gaussian: tuple[float, float] = (3.0, 3.0)  # CRF: spatial sd, weight
    max_side: int = 1024

    def __post_init__(self) -> None:
        if self.method not in REFINERS:
            raise InputError(f"refine method {self.method!r} is not known; expected one of {REFINERS}")
        if self.superpixels not in ("slic", "felzenszwalb"):
            raise InputError(f"superpixels must be 'slic' or 'felzenszwalb', got {self.superpixels!r}")

    def for_image(self, image: np.ndarray | None) -> Refiner | None:
        """The refiner of one image (``uint8 [H,W,3]``), or ``None`` for ``none``."""
        if self.method == "none":
            return None
        if image is None:
            raise InputError(f"postprocess.refine {self.method!r} needs the image (ovlabel postprocess: --images)")
        return {"superpixels": Superpixels, "pamr": PAMR, "crf": DenseCRF}[self.method](image, self)


class Refiner(ABC):
    """Works at ``max_side`` at most: ``refine(map)`` takes and returns the image's resolution."""

    def __init__(self, image: np.ndarray, spec: RefineSpec) -> None:
        self.size = image.shape[:2]
        H, W = self.size
        s = min(1.0, spec.max_side / max(H, W))
        self.work = (max(1, round(H * s)), max(1, round(W * s)))
        self.image = image if self.work == (H, W) else _resize_image(image, self.work)
        self.spec = spec

    def refine(self, heat: np.ndarray) -> np.ndarray:
        """One map ``[H,W]`` → refined, same shape."""
        return self.refine_many(np.asarray(heat)[None])[0]

    def refine_many(self, heats: np.ndarray) -> np.ndarray:
        """Maps ``[K,H,W]`` of this image → refined, ``[K,H,W]`` float32 (each map on its own: the result
        of a map does not depend on the others)."""
        heats = np.asarray(heats, dtype=np.float32)
        small = heats if self.work == self.size else np.stack([_resize(h, self.work) for h in heats])
        out = self._refine_many(np.ascontiguousarray(small))
        return out if self.work == self.size else np.stack([_resize(h, self.size) for h in out])

    def _refine_many(self, heats: np.ndarray) -> np.ndarray:
        return np.stack([self._refine(h) for h in heats])

    @abstractmethod
    def _refine(self, heat: np.ndarray) -> np.ndarray:
        """One map at the working resolution → refined, same shape."""


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


class Superpixels(Refiner):
    def __init__(self, image: np.ndarray, spec: RefineSpec) -> None:
        super().__init__(image, spec)
        from skimage.segmentation import felzenszwalb, slic

        if spec.superpixels == "slic":
            self.labels = slic(self.image, n_segments=spec.segments, compactness=spec.compactness, start_label=0)
        else:
            self.labels = felzenszwalb(self.image, scale=spec.scale, sigma=0.5, min_size=10)
        self.flat = self.labels.ravel()
        self.count = np.bincount(self.flat)

    def _refine(self, heat: np.ndarray) -> np.ndarray:
        sums = np.bincount(self.flat, weights=heat.ravel().astype(np.float64), minlength=self.count.size)
        return (sums / np.maximum(self.count, 1)).astype(np.float32)[self.labels]


def _shifted(x: torch.Tensor, dilations: tuple[int, ...], centre: bool = False):
    """``x`` ``[C,H,W]`` → its values at the 8 neighbours (and the centre) for every dilation, one
    ``[C,H,W]`` view at a time; borders replicated (padding once by the largest dilation and reading at
    offset ``d`` is the same as replicating by ``d``: both clamp the coordinates)."""
    D = max(dilations)
    H, W = x.shape[-2:]
    p = F.pad(x[None], [D, D, D, D], mode="replicate")[0]
    for d in dilations:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if centre or (dy, dx) != (0, 0):
                    yield p[:, D + dy * d : D + dy * d + H, D + dx * d : D + dx * d + W]


class PAMR(Refiner):
    def __init__(self, image: np.ndarray, spec: RefineSpec) -> None:
        super().__init__(image, spec)
        x = torch.from_numpy(self.image.astype(np.float32) / 255.0).permute(2, 0, 1)  # [3,H,W]
        dil = tuple(spec.dilations)
        std = torch.stack(list(_shifted(x, dil, centre=True)), dim=1).std(dim=1, keepdim=True)  # [3,1,H,W]
        diff = (torch.stack(list(_shifted(x, dil)), dim=1) - x[:, None]).abs()  # [3,P,H,W]
        logits = (-diff / (1e-8 + 0.1 * std)).mean(0)  # [P,H,W]: over the colour channels
        self.weights = torch.softmax(logits, dim=0)
        self.dil = dil

    def _refine_many(self, heats: np.ndarray) -> np.ndarray:
        m = torch.from_numpy(heats)  # [K,H,W]: every map at once, the same weights
        for _ in range(self.spec.iterations):
            acc = torch.zeros_like(m)
            for w, v in zip(self.weights, _shifted(m, self.dil)):
                acc.addcmul_(v, w)
            m = acc
        return m.numpy()

    def _refine(self, heat: np.ndarray) -> np.ndarray:
        return self._refine_many(heat[None])[0]


class DenseCRF(Refiner):
    def __init__(self, image: np.ndarray, spec: RefineSpec) -> None:
        super().__init__(image, spec)
        try:
            import pydensecrf.densecrf as dcrf  # installed by the pydensecrf2 package
        except ImportError:
            raise InputError("postprocess.refine 'crf' needs pydensecrf2: pip install 'ovlabel[crf]'") from None
        self.dcrf = dcrf
        self.rgb = np.ascontiguousarray(self.image)

    def _refine(self, heat: np.ndarray) -> np.ndarray:
        from pydensecrf.utils import unary_from_softmax

        H, W = heat.shape
        lo, hi = float(heat.min()), float(heat.max())
        p = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        p = np.clip(p, 1e-5, 1 - 1e-5).astype(np.float32)
        crf = self.dcrf.DenseCRF2D(W, H, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]))))
        gs, gw = self.spec.crf_gaussian
        bs, bc, bw = self.spec.crf_bilateral
        crf.addPairwiseGaussian(sxy=gs, compat=gw)
        crf.addPairwiseBilateral(sxy=bs, srgb=bc, rgbim=self.rgb, compat=bw)
        q = np.asarray(crf.inference(self.spec.iterations), dtype=np.float32).reshape(2, H, W)
        return q[1]
