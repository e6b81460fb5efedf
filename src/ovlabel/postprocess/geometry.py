"""Mapping between original image pixels and the model input (resize keeping the aspect ratio, then
pad bottom/right to the patch grid).

``to_original`` crops the padding and resizes bilinearly with pixel-centre alignment
(``align_corners=False``, no antialiasing). That makes the mapping exact to the pixel: a map that is 1 on
an input square whose edges land on original pixel edges, thresholded at 0.5 after mapping, covers
exactly that square on the original image.
"""

from __future__ import annotations

import math
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

    def box_to_original(self, box_xywh: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """An XYWH box on the input → on the original image (padding is bottom/right only)."""
        sy, sx = self.scale
        x, y, w, h = box_xywh
        return x / sx, y / sy, w / sx, h / sy
