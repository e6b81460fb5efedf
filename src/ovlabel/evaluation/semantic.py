"""Semantic metrics for maps and masks (``methods.md``, "Evaluation protocols").

* :class:`FgBgMetrics` — FG/BG segmentation (ImageNet-Segmentation protocol): each map is binarised at its
  own mean (Chefer) or a fixed threshold; pixel accuracy and mIoU over {background, foreground} are
  accumulated over the dataset; mAP is the mean over images of the average precision of the map against
  the mask.
* :class:`PointMIoU` — point-level localisation (OpenImages V7 protocol): each map binarised at 0.5 and
  read only at annotated points (yes = foreground, no = background); IoU of foreground and background
  over all points, averaged.
* :class:`ClassIoU` — class-wise IoU of predicted vs ground-truth label masks accumulated over a dataset
  (mIoU over the classes that occur).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..export.coco import check_results
from ..export.heatmaps import check_cache_against_gt, list_heatmap_files, load_heatmaps
from ..postprocess.rle import decode
from .coco import image_sizes
from .faithfulness import pointing_game


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise average precision (as ``sklearn.metrics.average_precision_score``): ``Σ (Rₙ − Rₙ₋₁) Pₙ``
    over the distinct score thresholds. ``nan`` when there is no positive."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    npos = int(labels.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct threshold
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fgbg_image_stats(heat: np.ndarray, mask: np.ndarray, threshold: str | float = "mean") -> dict:
    """One image's FG/BG counts: correct pixels, pixels, intersection and union of background and
    foreground, and the average precision of the map against the mask (``None`` without foreground)."""
    heat = np.asarray(heat, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if heat.shape != mask.shape:
        raise InputError(f"map {heat.shape} and mask {mask.shape} must have the same shape")
    t = heat.mean() if threshold == "mean" else float(threshold)
    pred = heat > t
    inter, union = [], []
    for p, g in ((~pred, ~mask), (pred, mask)):
        inter.append(int(np.logical_and(p, g).sum()))
        union.append(int(np.logical_or(p, g).sum()))
    ap = average_precision(heat, mask)
    return {"correct": int((pred == mask).sum()), "total": int(mask.size), "inter": inter, "union": union,
            "ap": None if np.isnan(ap) else ap}


class FgBgMetrics:
    """Accumulates FG/BG pixel accuracy, mIoU and mAP over a dataset of (map, mask) pairs."""

    def __init__(self, threshold: str | float = "mean") -> None:
        if not (threshold == "mean" or isinstance(threshold, (int, float))):
            raise InputError(f"threshold must be 'mean' or a number, got {threshold!r}")
        self.threshold = threshold
        self.correct = 0
        self.total = 0
        self.inter = np.zeros(2)
        self.union = np.zeros(2)
        self.aps: list[float] = []

    def update(self, heat: np.ndarray, mask: np.ndarray) -> None:
        self.add(fgbg_image_stats(heat, mask, self.threshold))

    def add(self, stats: dict) -> None:
        """Accumulate one image's :func:`fgbg_image_stats` (for runs that store them and resume)."""
        self.correct += int(stats["correct"])
        self.total += int(stats["total"])
        self.inter += np.asarray(stats["inter"], dtype=np.float64)
        self.union += np.asarray(stats["union"], dtype=np.float64)
        if stats["ap"] is not None and not np.isnan(stats["ap"]):
            self.aps.append(float(stats["ap"]))

    def result(self) -> dict[str, float]:
        iou = np.divide(self.inter, self.union, out=np.zeros(2), where=self.union > 0)
        return {
            "pixel_accuracy": self.correct / self.total if self.total else float("nan"),
            "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]),
            "miou": float(iou.mean()) if self.total else float("nan"),
            "map": float(np.mean(self.aps)) if self.aps else float("nan"),
            "images": len(self.aps),
        }


def point_counts(heat: np.ndarray, points: Sequence[Sequence[float]], labels: Sequence[bool],
                 threshold: float = 0.5) -> dict:
    """A map read at labelled points ``(x, y)`` (pixels; the pixel holding the point): true/false
    positives and negatives of ``map > threshold`` against the labels."""
    heat = np.asarray(heat)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels).astype(bool).reshape(-1)
    if pts.shape[0] != lab.shape[0]:
        raise InputError(f"{pts.shape[0]} points but {lab.shape[0]} labels")
    x = np.clip(np.floor(pts[:, 0]).astype(int), 0, heat.shape[1] - 1)
    y = np.clip(np.floor(pts[:, 1]).astype(int), 0, heat.shape[0] - 1)
    pred = heat[y, x] > threshold
    return {"tp": int((pred & lab).sum()), "fp": int((pred & ~lab).sum()), "fn": int((~pred & lab).sum()),
            "tn": int((~pred & ~lab).sum())}


class PointMIoU:
    """p-mIoU: maps read at labelled points. ``update(map, points, labels)`` with ``points`` ``[N,2]``
    as (x, y) pixel coordinates and ``labels`` ``[N]`` booleans (True = the class is there)."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.tp = self.fp = self.fn = self.tn = 0

    def update(self, heat: np.ndarray, points: Sequence[Sequence[float]], labels: Sequence[bool]) -> None:
        self.add(point_counts(heat, points, labels, self.threshold))

    def add(self, counts: dict) -> None:
        """Accumulate one map's :func:`point_counts`."""
        for k in ("tp", "fp", "fn", "tn"):
            setattr(self, k, getattr(self, k) + int(counts[k]))

    def result(self) -> dict[str, float]:
        fg = self.tp / max(1, self.tp + self.fp + self.fn)
        bg = self.tn / max(1, self.tn + self.fn + self.fp)
        return {"iou_foreground": fg, "iou_background": bg, "p_miou": (fg + bg) / 2,
                "points": self.tp + self.fp + self.fn + self.tn}


class ClassIoU:
    """Class-wise IoU of label masks accumulated over a dataset; ``update(pred, gt)`` take per-class
    boolean masks ``{class: [H,W]}`` (a missing class is empty)."""

    def __init__(self) -> None:
        self.inter: dict = {}
        self.union: dict = {}

    def update(self, pred: dict, gt: dict, shape: tuple[int, int]) -> None:
        empty = np.zeros(shape, dtype=bool)
        for c in set(pred) | set(gt):
            p, g = pred.get(c, empty), gt.get(c, empty)
            self.inter[c] = self.inter.get(c, 0) + int(np.logical_and(p, g).sum())
            self.union[c] = self.union.get(c, 0) + int(np.logical_or(p, g).sum())

    def result(self) -> dict:
        per_class = {c: self.inter[c] / self.union[c] for c in self.union if self.union[c] > 0}
        return {"miou": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
                "per_class": per_class}


def _known(image_id, gt) -> bool:
    return isinstance(image_id, int) and image_id in gt.imgs


def semantic_evaluation(gt, results: list[dict], *, heatmap_dir=None, score_threshold: float = 0.5) -> dict:
    """Semantic metrics of a run against a COCO ground truth (``pycocotools.coco.COCO``).

    * ``masks``: class-wise IoU of the union of predicted masks scoring ≥ ``score_threshold`` against the
      union of ground-truth masks, per category, accumulated over the ground-truth images;
    * ``maps`` (with ``heatmap_dir``): FG/BG metrics (mean threshold and 0.5) and the pointing game of
      each cached map whose query is a category present in the image.
    """

    # results of images the ground truth lacks are left out (as ``evaluate(unknown_images="warn")`` does);
    # the others are checked, geometry included, before any mask is decoded
    if isinstance(results, list):
        results = [r for r in results if not isinstance(r, dict) or _known(r.get("image_id"), gt)]
    results = check_results(results, gt.getImgIds(), gt.getCatIds(), "results", sizes=image_sizes(gt))

    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_threshold and "segmentation" in r:
            by_image.setdefault(r["image_id"], []).append(r)
    names = {c: gt.cats[c]["name"] for c in gt.cats}
    class_iou = ClassIoU()
    gt_masks: dict[int, dict[str, np.ndarray]] = {}
    for img_id, img in gt.imgs.items():
        shape = (int(img["height"]), int(img["width"]))
        g: dict[str, np.ndarray] = {}
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=[img_id], iscrowd=None)):
            m = gt.annToMask(ann).astype(bool)
            name = names[ann["category_id"]]
            g[name] = g[name] | m if name in g else m
        p: dict[str, np.ndarray] = {}
        for r in by_image.get(img_id, []):
            m = decode({"size": r["segmentation"]["size"],
                                   "counts": r["segmentation"]["counts"].encode("ascii")}).astype(bool)
            name = names[r["category_id"]]
            p[name] = p[name] | m if name in p else m
        class_iou.update(p, g, shape)
        gt_masks[img_id] = g
    out: dict = {"masks": {"score_threshold": score_threshold, **class_iou.result()}}
    if heatmap_dir is not None:
        fgbg_mean, fgbg_half = FgBgMetrics("mean"), FgBgMetrics(0.5)
        hits = []
        for f in list_heatmap_files(heatmap_dir):
            rec = load_heatmaps(f)
            g = gt_masks.get(rec.image_id)
            if g is None:
                continue
            check_cache_against_gt(f, rec, gt, "the ground truth")
            maps = rec.maps
            for k, q in enumerate(rec.queries):
                if q in g:
                    heat = maps.query(k)
                    fgbg_mean.update(heat, g[q])
                    fgbg_half.update(heat, g[q])
                    hits.append(bool(pointing_game(heat[None], g[q][None])[0]))
        out["maps"] = {"mean_threshold": fgbg_mean.result(), "threshold_0.5": fgbg_half.result(),
                       "pointing_game": float(np.mean(hits)) if hits else float("nan"), "pairs": len(hits)}
    return out
