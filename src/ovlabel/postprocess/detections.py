"""``Detections``: the one validated result type for the detections of one image.

Everything downstream (COCO export, PNG masks, overlays, NMS) takes this type. Conventions:

* masks are held as compressed RLE (pycocotools), so that a 12-megapixel image with a hundred
  detections costs kilobytes, not a gigabyte; ``masks`` decodes them all (``[N,H,W]`` bool) and
  ``mask(i)`` one of them, when a dense mask is really needed;
* ``boxes``: ``[N,4]`` float64 **XYWH** in pixels, COCO's convention: ``(x, y)`` is the top-left corner of
  the top-left pixel, ``w``/``h`` count pixels (the box ends at ``x + w``, exclusive) — always derived
  from the masks, equal to ``pycocotools.mask.toBbox`` of their RLE;
* ``scores``: ``[N]`` float64 in [0,1]; ``category_ids``: ``[N]`` int64 (the dataset's own ids);
  ``labels``: ``N`` strings (the query / category name);
* optional per-detection ``presence`` and ``evidence`` (the two factors of the score, see
  :mod:`ovlabel.postprocess.scoring`).

Construction checks shapes, dtypes and values and says what was expected. Every operation is empty-safe.
This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import InputError
from .rle import areas as rle_areas
from .rle import decode


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


def _vector(name: str, value, n: int, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype).reshape(-1)
    if arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} entries but there are {n} masks")
    return arr


class Detections:
    """The detections of one image: masks (the source of truth), boxes, scores, category ids, labels.

    Boxes are COCO's **XYWH** in pixels: ``(x, y)`` the top-left corner of the top-left pixel, ``w``/``h``
    the number of pixels, so the box ends at ``x + w`` (exclusive) — ``pycocotools.mask.toBbox`` of the
    mask. :meth:`to_supervision` gives supervision's ``xyxy`` (``x + w``, ``y + h``).

    ``Detections(masks, scores, category_ids, labels)`` takes dense boolean masks ``[N,H,W]``;
    :meth:`from_rles` compressed RLEs and the image size; :meth:`from_coco_results` the COCO results of one
    image (``predictions.json`` entries). Masks are kept as RLE; ``masks`` decodes them all, ``mask(i)``
    one.
    """

    __slots__ = ("_rles", "image_size", "scores", "category_ids", "labels", "boxes", "areas", "presence",
                 "evidence")

    def __init__(self, masks: np.ndarray, scores, category_ids, labels: Sequence[str], boxes=None,
                 presence=None, evidence=None) -> None:
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise InputError(f"masks must be [N,H,W], got shape {masks.shape}")
        if masks.dtype != bool:
            raise InputError(f"masks must be boolean, got {masks.dtype}")
        n = masks.shape[0]
        if n and masks.reshape(n, -1).any(axis=1).min() == 0:
            empty = np.flatnonzero(~masks.reshape(n, -1).any(axis=1)).tolist()
            raise InputError(f"detections {empty} have empty masks; every detection needs at least one pixel")
        self._init(encode_masks(masks), masks.shape[1:], scores, category_ids, labels, presence, evidence)
        if boxes is not None:
            given = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if n else np.zeros((0, 4))
            if given.shape != (n, 4) or not np.allclose(given, self.boxes):
                raise InputError("boxes must be the XYWH bounding boxes of the masks; pass boxes=None to "
                                 "derive them")

    @classmethod
    def from_rles(cls, rles: Sequence[dict], image_size: tuple[int, int], scores, category_ids,
                  labels: Sequence[str], presence=None, evidence=None) -> Detections:
        """From compressed RLEs (``counts`` as bytes or str) of masks of size ``image_size`` ``(H, W)``."""
        H, W = (int(v) for v in image_size)
        out = []
        for i, r in enumerate(rles):
            if [int(v) for v in r["size"]] != [H, W]:
                raise InputError(f"RLE {i} has size {list(r['size'])}, expected the image size {[H, W]}")
            counts = r["counts"]
            out.append({"size": [H, W], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
        self = cls.__new__(cls)
        self._init(out, (H, W), scores, category_ids, labels, presence, evidence)
        if len(out) and self.areas.min() == 0:
            raise InputError(f"detections {np.flatnonzero(self.areas == 0).tolist()} have empty masks; every "
                             "detection needs at least one pixel")
        return self

    def _init(self, rles, size, scores, category_ids, labels, presence, evidence) -> None:
        n = len(rles)
        scores = _vector("scores", scores, n)
        cats = np.asarray(category_ids).reshape(-1)
        if cats.shape[0] != n:
            raise InputError(f"category_ids has {cats.shape[0]} entries but there are {n} masks")
        labels = tuple(str(x) for x in labels)
        if len(labels) != n:
            raise InputError(f"labels has {len(labels)} entries but there are {n} masks")
        if n and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
            raise InputError(f"scores must be finite and in [0,1], got range [{scores.min()}, {scores.max()}]")
        if n and not np.issubdtype(cats.dtype, np.integer):
            if not np.all(np.equal(np.mod(cats, 1), 0)):
                raise InputError(f"category_ids must be integers, got {cats[:5]}")
        self._rles = list(rles)
        self.image_size = (int(size[0]), int(size[1]))
        self.scores = scores
        self.category_ids = cats.astype(np.int64)
        self.labels = labels
        if n:
            self.boxes = np.asarray(mask_utils.toBbox(self._rles), dtype=np.float64).reshape(n, 4)
            self.areas = rle_areas(self._rles)
        else:
            self.boxes, self.areas = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        self.presence = None if presence is None else _vector("presence", presence, n)
        self.evidence = None if evidence is None else _vector("evidence", evidence, n)

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, height: int, width: int) -> Detections:
        return cls.from_rles([], (height, width), np.zeros(0), np.zeros(0, dtype=np.int64), ())

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

        return cls.from_rles([r for d in items for r in d._rles], (height, width), cat("scores"),
                             cat("category_ids"), tuple(lbl for d in items for lbl in d.labels),
                             presence=cat("presence"), evidence=cat("evidence"))

    def __len__(self) -> int:
        return len(self._rles)

    def __repr__(self) -> str:
        return f"Detections({len(self)} on {self.image_size[1]}x{self.image_size[0]}: {', '.join(self.labels[:5])}" \
               f"{', …' if len(self) > 5 else ''})"

    @property
    def masks(self) -> np.ndarray:
        """All masks decoded, ``[N,H,W]`` bool (N·H·W bytes: prefer :meth:`mask` on large images)."""
        if not self._rles:
            return np.zeros((0, *self.image_size), dtype=bool)
        return np.ascontiguousarray(decode(self._rles).transpose(2, 0, 1)).view(bool)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` decoded, ``[H,W]`` bool."""
        return decode(self._rles[i]).view(bool)

    def select(self, index: np.ndarray | Sequence[int] | slice) -> Detections:
        """Subset by integer indices, a boolean mask or a slice (order follows ``index``)."""
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise InputError(f"boolean index has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Detections.from_rles([self._rles[i] for i in idx], self.image_size, self.scores[idx],
                                    self.category_ids[idx], tuple(self.labels[i] for i in idx),
                                    presence=pick(self.presence), evidence=pick(self.evidence))

    def sorted(self) -> Detections:
        """By descending score (stable)."""
        return self.select(np.argsort(-self.scores, kind="stable"))

    def top(self, k: int) -> Detections:
        return self.sorted().select(slice(0, max(0, int(k))))

    @classmethod
    def from_coco_results(cls, results: Sequence[dict], image_size: tuple[int, int],
                          names: dict[int, str] | None = None) -> Detections:
        """The detections of one image from COCO results entries (``predictions.json``): each needs a
        ``segmentation`` (RLE or polygons), a ``category_id`` and a ``score``; labels come from ``names``
        (category id → name), else from a ``label`` field, else the id."""
        from pycocotools import mask as mask_utils

        H, W = (int(v) for v in image_size)
        rles = []
        for i, r in enumerate(results):
            seg = r.get("segmentation")
            if seg is None:
                raise InputError(f"result {i} has no 'segmentation'; Detections hold masks (box-only results "
                                 "cannot be read)")
            if isinstance(seg, list):
                rles.append(mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))
            elif isinstance(seg.get("counts"), list):
                rles.append(mask_utils.frPyObjects(seg, H, W))
            else:
                rles.append(seg)
        cats = [int(r["category_id"]) for r in results]
        labels = [names[c] if names and c in names else str(r.get("label", c)) for c, r in zip(cats, results)]
        return cls.from_rles(rles, (H, W), [float(r["score"]) for r in results], cats, labels)

    def to_supervision(self, classes=None):
        """A ``supervision.Detections`` with supervision's conventions: ``xyxy`` boxes (``x + w``, ``y + h``),
        the masks, ``confidence`` = scores, ``class_id`` = the 0-based index of each detection's class in
        ``classes`` (what ``sv.DetectionDataset.classes[class_id]`` and supervision's annotators read),
        ``data["class_name"]`` = labels and ``data["category_id"]`` = the COCO category ids.

        ``classes``: the ordered class names — a list of names, a :class:`~ovlabel.common.categories.Categories`
        or a COCO ``categories`` list (e.g. ``dataset.json``'s). Without it, ``class_id`` is
        ``category_id − 1``: ovlabel numbers the queries' categories 1..K in the order given, so that is the
        query's index; with a ground truth's category ids (gaps, other order), pass ``classes``.
        Needs ``pip install supervision``."""
        try:
            import supervision as sv
        except ImportError:
            raise ImportError("Detections.to_supervision needs supervision: pip install supervision") from None
        if classes is None:
            class_id = self.category_ids.astype(int) - 1
        else:
            names = list(getattr(classes, "names", classes))
            names = [c["name"] if isinstance(c, dict) else str(c) for c in names]
            missing = sorted(set(self.labels) - set(names))
            if missing:
                raise InputError(f"to_supervision: classes {missing} are not in the class list given ({len(names)} "
                                 "names); pass every class the detections use")
            index = {n: i for i, n in enumerate(names)}
            class_id = np.array([index[label] for label in self.labels], dtype=int)
        xyxy = self.boxes.copy()
        xyxy[:, 2:] += xyxy[:, :2]
        data = ({"class_name": np.array(self.labels, dtype=object), "category_id": self.category_ids.astype(int)}
                if len(self) else {})
        return sv.Detections(xyxy=xyxy.astype(np.float32), mask=self.masks if len(self) else None,
                             confidence=self.scores.astype(np.float32), class_id=class_id.astype(int), data=data)

    def rles(self) -> list[dict]:
        """Compressed RLEs with ``counts`` as ``str`` (JSON-ready)."""
        return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
                for r in self._rles]

    def raw_rles(self) -> list[dict]:
        """Compressed RLEs with ``counts`` as ``bytes``, as pycocotools takes them."""
        return list(self._rles)
