"""How good a pseudo-label dataset is: precision and recall of its annotations against a ground truth.

An annotation is a true positive when it matches a ground-truth instance of its class with IoU ≥ ``iou``
(masks, or boxes with ``iou_type="bbox"``). Matching is COCO's greedy one, per image and class: the
annotations best score first, each taking the unmatched ground-truth instance it overlaps most; an
annotation that matches nothing but a crowd region is ignored (neither a hit nor a miss). Because the
matching is greedy by score, the annotations kept by a score threshold are matched exactly as they are in
the full set: one matching gives precision and recall at every threshold (:func:`precision_recall_curve`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


@dataclass(frozen=True)
class DatasetQuality:
    precision: float
    recall: float
    f1: float
    true_positives: int
    annotations: int
    instances: int

    def as_dict(self) -> dict:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "true_positives": self.true_positives, "annotations": self.annotations,
                "instances": self.instances}


def _quality(tp: int, n: int, instances: int) -> DatasetQuality:
    p = tp / n if n else 1.0  # an empty dataset claims nothing wrong
    r = tp / instances if instances else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return DatasetQuality(float(p), float(r), float(f1), int(tp), int(n), int(instances))


def _geometry(a: dict, height: int, width: int, iou_type: str):
    if iou_type == "bbox":
        return [float(v) for v in a["bbox"]]
    seg = a["segmentation"]
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    counts = seg["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def match(gt: COCO, annotations: list[dict], *, iou: float = 0.5, iou_type: str = "segm",
          image_ids: list[int] | None = None,
          category_ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The greedy matching: ``(scores, outcome, instances)`` with ``outcome`` 1 (hit), 0 (miss) or −1
    (ignored: a crowd region) per annotation, best score first, and the count of non-crowd ground-truth
    instances of ``image_ids`` (default: the ground truth's images) and ``category_ids`` (default: all)."""
    scores, outcome, _, instances = _match(gt, annotations, iou, iou_type, image_ids, category_ids)
    return scores, outcome, instances


def outcomes(gt: COCO, annotations: list[dict], *, iou: float = 0.5, iou_type: str = "segm",
             image_ids: list[int] | None = None, category_ids: list[int] | None = None) -> np.ndarray:
    """:func:`match`'s outcome of each annotation, in the order given (−2: not matched, its image or class
    left out). Greedy by score, so the outcome of an annotation holds for any score threshold or subset of
    classes that keeps it."""
    _, outcome, which, _ = _match(gt, annotations, iou, iou_type, image_ids, category_ids)
    out = np.full(len(annotations), -2, dtype=np.int64)
    out[which] = outcome
    return out


def _match(gt: COCO, annotations: list[dict], iou: float, iou_type: str, image_ids: list[int] | None,
           category_ids: list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    ids = set(gt.getImgIds() if image_ids is None else image_ids)
    cats = None if category_ids is None else set(category_ids)
    preds: dict[tuple[int, int], list[tuple[int, dict]]] = defaultdict(list)
    for n, a in enumerate(annotations):
        if a["image_id"] in ids and (cats is None or a["category_id"] in cats):
            preds[(a["image_id"], a["category_id"])].append((n, a))
    instances = sum(1 for a in gt.loadAnns(gt.getAnnIds(imgIds=sorted(ids), iscrowd=False))
                    if cats is None or a["category_id"] in cats)
    scores, outcome, which = [], [], []
    for (image_id, cat), pairs in preds.items():
        pairs.sort(key=lambda p: -float(p[1].get("score", 1.0)))
        group = [a for _, a in pairs]
        which += [n for n, _ in pairs]
        img = gt.imgs[image_id]
        h, w = int(img["height"]), int(img["width"])
        truth = gt.loadAnns(gt.getAnnIds(imgIds=[image_id], catIds=[cat], iscrowd=None))
        truth.sort(key=lambda a: bool(a.get("iscrowd", 0)))  # instances first, then crowd regions
        crowd = [bool(a.get("iscrowd", 0)) for a in truth]
        if truth:
            ious = np.asarray(mask_utils.iou([_geometry(a, h, w, iou_type) for a in group],
                                             [_geometry(a, h, w, iou_type) for a in truth], crowd)).reshape(
                len(group), len(truth))
        else:
            ious = np.zeros((len(group), 0))
        taken = np.zeros(len(truth), dtype=bool)
        for i, a in enumerate(group):
            scores.append(float(a.get("score", 1.0)))
            best, where = iou, -1
            for j in range(len(truth)):
                if crowd[j] or taken[j] or ious[i, j] < best:
                    continue
                best, where = ious[i, j], j
            if where >= 0:
                taken[where] = True
                outcome.append(1)
            elif any(c and ious[i, j] >= iou for j, c in enumerate(crowd)):
                outcome.append(-1)
            else:
                outcome.append(0)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return (np.asarray(scores)[order], np.asarray(outcome, dtype=np.int64)[order],
            np.asarray(which, dtype=np.int64)[order], instances)


def dataset_quality(gt: COCO, annotations: list[dict], *, iou: float = 0.5, iou_type: str = "segm",
                    image_ids: list[int] | None = None, category_ids: list[int] | None = None,
                    min_score: float = 0.0) -> DatasetQuality:
    """Precision, recall and F1 of the annotations scoring at least ``min_score``."""
    scores, outcome, instances = match(gt, annotations, iou=iou, iou_type=iou_type, image_ids=image_ids,
                                       category_ids=category_ids)
    keep = scores >= min_score
    return _quality(int((outcome[keep] == 1).sum()), int((outcome[keep] >= 0).sum()), instances)


def precision_recall_curve(gt: COCO, annotations: list[dict], *, iou: float = 0.5, iou_type: str = "segm",
                           image_ids: list[int] | None = None) -> list[tuple[float, DatasetQuality]]:
    """``(score threshold, quality)`` for every distinct score, highest first: the dataset a
    ``dataset_min_score`` of that threshold keeps."""
    scores, outcome, instances = match(gt, annotations, iou=iou, iou_type=iou_type, image_ids=image_ids)
    tp = np.cumsum(outcome == 1)
    n = np.cumsum(outcome >= 0)
    out = []
    for i in range(len(scores)):
        if i + 1 < len(scores) and scores[i + 1] == scores[i]:
            continue  # a threshold keeps every annotation of its score
        out.append((float(scores[i]), _quality(int(tp[i]), int(n[i]), instances)))
    return out
