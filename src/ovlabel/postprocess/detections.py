"""``Detections``: the one validated result type for the detections of one image.

Everything downstream (COCO export, PNG masks, overlays, NMS) takes this type. Conventions:

* ``masks``: ``[N,H,W]`` bool at the image's resolution — the source of truth;
* ``boxes``: ``[N,4]`` float64 **XYWH** in pixels (COCO), always derived from the masks and equal to
  ``pycocotools.mask.toBbox`` of their RLE;
* ``scores``: ``[N]`` float64 in [0,1]; ``category_ids``: ``[N]`` int64 (the dataset's own ids);
  ``labels``: ``N`` strings (the query / category name);
* optional per-detection ``presence`` and ``evidence`` (the two factors of the score, see
  :mod:`ovlabel.postprocess.scoring`).

Construction checks shapes, dtypes and values and says what was expected. Every operation is empty-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import InputError


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Binary masks ``[N,H,W]`` → compressed RLEs (``counts`` as bytes, as pycocotools returns them)."""
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0))  # one copy; [H,W,N] column-major as pycocotools needs
    return mask_utils.encode(fortran.view(np.uint8) if fortran.dtype == bool else fortran.astype(np.uint8, order="F"))


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """XYWH boxes ``[N,4]`` of binary masks, identical to ``toBbox`` of their RLEs (zeros if empty)."""
    n = masks.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float64)
    for i in range(n):
        ys = np.flatnonzero(masks[i].any(axis=1))
        if ys.size == 0:
            continue
        xs = np.flatnonzero(masks[i].any(axis=0))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1 - xs[0], ys[-1] + 1 - ys[0])
    return boxes


@dataclass(frozen=True)
class Detections:
    masks: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    labels: tuple[str, ...]
    boxes: np.ndarray = field(default=None)  # derived from masks when not given
    presence: np.ndarray | None = None
    evidence: np.ndarray | None = None

    def __post_init__(self) -> None:
        masks = np.asarray(self.masks)
        if masks.ndim != 3:
            raise InputError(f"masks must be [N,H,W], got shape {masks.shape}")
        if masks.dtype != bool:
            raise InputError(f"masks must be boolean, got {masks.dtype}")
        n = masks.shape[0]
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        cats = np.asarray(self.category_ids).reshape(-1)
        labels = tuple(str(x) for x in self.labels)
        for name, arr in (("scores", scores), ("category_ids", cats)):
            if arr.shape[0] != n:
                raise InputError(f"{name} has {arr.shape[0]} entries but there are {n} masks")
        if len(labels) != n:
            raise InputError(f"labels has {len(labels)} entries but there are {n} masks")
        if n and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
            raise InputError(f"scores must be finite and in [0,1], got range [{scores.min()}, {scores.max()}]")
        if n and not np.issubdtype(cats.dtype, np.integer):
            if not np.all(np.equal(np.mod(cats, 1), 0)):
                raise InputError(f"category_ids must be integers, got {cats[:5]}")
        cats = cats.astype(np.int64)
        if n and masks.reshape(n, -1).any(axis=1).min() == 0:
            empty = np.flatnonzero(~masks.reshape(n, -1).any(axis=1)).tolist()
            raise InputError(f"detections {empty} have empty masks; every detection needs at least one pixel")
        derived = masks_to_boxes(masks)
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4) if n else np.zeros((0, 4))
            if boxes.shape != (n, 4) or not np.allclose(boxes, derived):
                raise InputError("boxes must be the XYWH bounding boxes of the masks; pass boxes=None to "
                                 "derive them")
        extras = {}
        for name in ("presence", "evidence"):
            val = getattr(self, name)
            if val is not None:
                val = np.asarray(val, dtype=np.float64).reshape(-1)
                if val.shape[0] != n:
                    raise InputError(f"{name} has {val.shape[0]} entries but there are {n} masks")
            extras[name] = val
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "category_ids", cats)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "boxes", derived)
        for name, val in extras.items():
            object.__setattr__(self, name, val)

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, height: int, width: int) -> Detections:
        return cls(np.zeros((0, height, width), dtype=bool), np.zeros(0), np.zeros(0, dtype=np.int64), ())

    @classmethod
    def concatenate(cls, items: Sequence[Detections], height: int, width: int) -> Detections:
        items = [d for d in items if len(d)]
        if not items:
            return cls.empty(height, width)
        for d in items:
            if d.image_size != (height, width):
                raise InputError(f"cannot concatenate detections of size {d.image_size} into ({height}, {width})")

        def cat(name):
            vals = [getattr(d, name) for d in items]
            return None if any(v is None for v in vals) else np.concatenate(vals)

        return cls(np.concatenate([d.masks for d in items]), cat("scores"), cat("category_ids"),
                   tuple(lbl for d in items for lbl in d.labels), presence=cat("presence"),
                   evidence=cat("evidence"))

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def areas(self) -> np.ndarray:
        return self.masks.reshape(len(self), self.masks.shape[1] * self.masks.shape[2]).sum(axis=1).astype(np.int64)

    def select(self, index: np.ndarray | Sequence[int] | slice) -> Detections:
        """Subset by integer indices, a boolean mask or a slice (order follows ``index``)."""
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise InputError(f"boolean index has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Detections(self.masks[idx], self.scores[idx], self.category_ids[idx],
                          tuple(self.labels[i] for i in idx), presence=pick(self.presence),
                          evidence=pick(self.evidence))

    def sorted(self) -> Detections:
        """By descending score (stable)."""
        return self.select(np.argsort(-self.scores, kind="stable"))

    def top(self, k: int) -> Detections:
        return self.sorted().select(slice(0, max(0, int(k))))

    def rles(self) -> list[dict]:
        """Compressed RLEs with ``counts`` as ``str`` (JSON-ready)."""
        out = []
        for r in encode_masks(self.masks):
            out.append({"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")})
        return out
