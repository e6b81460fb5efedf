"""COCO evaluation with pycocotools' own ``COCOeval`` — the reference numbers, not a re-implementation.

``evaluate`` returns, per IoU type, the standard 12 numbers exactly as ``COCOeval.stats`` and the AP of
each category (mean precision over IoU thresholds and recall, area "all", 100 detections — detectron2's
per-category AP). Segmentation is evaluated with the ``bbox`` field removed from the results, so that
pycocotools' area ranges use the mask area (as detectron2 does).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import CocoFormatError
from ..export.coco import check_results, load_coco, quiet, read_json

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def results_for(results: list[dict], iou_type: str) -> list[dict]:
    """The results as pycocotools should see them for ``iou_type``."""
    out = copy.deepcopy(results)
    if iou_type == "segm":
        missing = [i for i, r in enumerate(out) if "segmentation" not in r]
        if missing:
            raise CocoFormatError(f"segm evaluation needs 'segmentation' in every result; results {missing[:10]} "
                                  "have none")
        for r in out:
            r.pop("bbox", None)
    elif iou_type == "bbox":
        missing = [i for i, r in enumerate(out) if "bbox" not in r]
        if missing:
            raise CocoFormatError(f"bbox evaluation needs 'bbox' in every result; results {missing[:10]} have none")
    return out


def image_sizes(gt: COCO) -> dict[int, tuple[int, int]]:
    """``image id → (height, width)`` of the ground-truth images that give both."""
    out = {}
    for i, img in gt.imgs.items():
        h, w = img.get("height"), img.get("width")
        if isinstance(h, int) and isinstance(w, int):
            out[i] = (h, w)
    return out


def _empty_results(gt: COCO) -> COCO:
    dt = COCO()
    dt.dataset = {"images": copy.deepcopy(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                  "annotations": []}
    with quiet():
        dt.createIndex()
    return dt


def evaluate(gt: COCO | str | Path, results: list[dict] | str | Path,
             iou_types: tuple[str, ...] | list[str] = IOU_TYPES, *, verbose: bool = False,
             source: str = "results", curves: bool = False, unknown_images: str = "error") -> dict:
    """``{iou_type: {"stats": {name: value}, "per_class": {category name: AP}}}`` (values as pycocotools
    computes them, in [0,1]; -1 where pycocotools has no data). ``curves`` adds ``"pr50"``: per category,
    the precision at pycocotools' 101 recall points at IoU 0.5 (area all, 100 detections).

    ``unknown_images``: results naming images the ground truth lacks are an error (``"error"``), or are
    left out with a warning (``"warn"``; the count is in ``out["left_out"]``) — unless none is known."""
    if not isinstance(gt, COCO):
        gt = load_coco(gt)
    if isinstance(results, (str, Path)):
        source = str(results)
        results = read_json(results, "results")
    left_out = None
    if unknown_images == "warn" and isinstance(results, list):
        known = set(gt.getImgIds())
        unknown = sorted({r.get("image_id") for r in results if isinstance(r, dict)} - known, key=str)
        if unknown:
            kept = [r for r in results if not isinstance(r, dict) or r.get("image_id") in known]
            if results and not kept:
                raise CocoFormatError(f"{source}: none of the {len(unknown)} images the results name is in the "
                                      f"ground truth (ids {unknown[:10]}); is this the right ground truth?")
            left_out = {"results": len(results) - len(kept), "images": len(unknown), "image_ids": unknown[:20]}
            warnings.warn(f"{source}: {left_out['results']} results name {len(unknown)} images that the ground "
                          f"truth lacks (ids {unknown[:10]}{', …' if len(unknown) > 10 else ''}); they are left out "
                          "of the evaluation", stacklevel=2)
            results = kept
    check_results(results, gt.getImgIds(), gt.getCatIds(), source, sizes=image_sizes(gt))
    out = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise CocoFormatError(f"iou type {iou_type!r} is not supported; expected one of {IOU_TYPES}")
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            dt = gt.loadRes(results_for(results, iou_type)) if results else _empty_results(gt)
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        per_class = {}
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[gt.cats[cat_id]["name"]] = float(np.mean(p)) if p.size else float("nan")
        out[iou_type] = {"stats": {n: float(v) for n, v in zip(STAT_NAMES, ev.stats)}, "per_class": per_class}
        if curves:
            out[iou_type]["pr50"] = {gt.cats[c]["name"]: precision[0, :, k, 0, -1].tolist()
                                     for k, c in enumerate(ev.params.catIds)}
    if left_out is not None:
        out["left_out"] = left_out
    return out


def format_table(metrics: dict) -> str:
    """A plain-text table: the 12 numbers per IoU type, then per-class AP (×100)."""
    types = list(metrics)
    lines = [f"{'metric':<8}" + "".join(f"{t:>10}" for t in types)]
    for name in STAT_NAMES:
        lines.append(f"{name:<8}" + "".join(f"{100 * metrics[t]['stats'][name]:>10.2f}" for t in types))
    names = list(next(iter(metrics.values()))["per_class"]) if metrics else []
    if names:
        width = max(12, max(len(n) for n in names) + 2)
        lines.append("")
        lines.append(f"{'category AP':<{width}}" + "".join(f"{t:>10}" for t in types))
        for n in names:
            lines.append(f"{n:<{width}}" + "".join(f"{100 * metrics[t]['per_class'][n]:>10.2f}" for t in types))
    return "\n".join(lines)
