"""Streaming results: one JSON line per image, merged at the end into ``predictions.json`` and
``dataset.json``.

A run appends one record per finished image to ``records*.jsonl`` after every batch, so memory stays
flat and a killed run loses at most the batch in flight: on ``--resume`` the images with a record are
skipped. A record is ``{"image": {id, file_name, width, height}, "results": [...]}`` or
``{"image": {...}, "error": "why"}``.

Durability: a batch's records are written as complete lines with one append and fsynced; a new record
file's folder is fsynced. A write cut short (a kill mid-write, a full disk) can only leave half a line
at the end of the file: :class:`RecordWriter` cuts it off when it opens the file, and a full disk makes
the writer cut back to the last batch before it raises (:func:`ovlabel.common.files.append_lines`).

:func:`finalize` merges any number of record files (shards, resumed runs): one record per image id (the
last one wins), images sorted by id, annotation ids 1..N in that order — so the merged files do not
depend on how the work was split or interrupted. Both outputs are validated with pycocotools in chunks
and written atomically.

This module does not import torch (decode and write workers of a distributed engine use it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..common.categories import Categories
from ..common.files import (
    append_lines,
    atomic_write,
    cut_torn_tail,
    fault_point,
    file_mode,
    fsync_dir,
    json_text,
    output_error,
)
from ..errors import CocoFormatError
from ..postprocess.detections import Detections
from .coco import check_results, coco_from_dict, detections_to_results, quiet, segmentation_for_dataset

log = logging.getLogger(__name__)

VALIDATE_CHUNK = 2000
PREDICTIONS = "predictions.json"  # every detection, for evaluation
DATASET = "dataset.json"  # the pseudo-label dataset


def make_record(image: dict, dets: Detections | None = None, error: str | None = None) -> dict:
    """The record of one image: its detections (COCO results without ``image_id``, plus ``label``) or
    the reason it failed."""
    rec: dict = {"image": image}
    if error is not None:
        rec["error"] = error
        return rec
    if dets is None:
        raise ValueError("a record needs detections or an error")
    results = detections_to_results(image["id"], dets)
    for r, label in zip(results, dets.labels):
        r.pop("image_id")
        r["label"] = label
    rec["results"] = results
    return rec


class RecordWriter:
    """Append-only JSONL of per-image records (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, file_mode())
        except OSError as e:
            raise output_error(e, self.path) from e
        self.torn_bytes = cut_torn_tail(self._fd)
        if new:
            os.fsync(self._fd)
            fsync_dir(self.path.parent)
        self._pending: list[str] = []

    def append(self, records: Iterable[dict]) -> None:
        """Write records as complete lines and fsync (one call per batch)."""
        lines = [json_text(r) for r in records]
        if lines:
            append_lines(self._fd, lines, self.path)
            fault_point("record", len(lines))

    def write(self, image: dict, dets: Detections | None = None, error: str | None = None) -> None:
        """Queue the record of one image; :meth:`flush` writes the queue."""
        self._pending.append(json_text(make_record(image, dets, error)))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            append_lines(self._fd, pending, self.path)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(paths: Iterable[str | Path], what: str = "record") -> Iterator[dict]:
    """JSON objects, one per line, of the given files in order; a malformed line is tolerated only as a
    file's last line (a write cut short by a kill)."""
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise CocoFormatError(f"{path}: line {i + 1} is not valid JSON (the file is corrupt)") from None
            if not isinstance(rec, dict):
                raise CocoFormatError(f"{path}: line {i + 1} is not a {what}")
            yield rec


def read_records(paths: Iterable[str | Path]) -> Iterator[dict]:
    """The per-image records of the given files in order (see :func:`read_jsonl`)."""
    for rec in read_jsonl(paths, "an ovlabel record"):
        if "image" not in rec:
            raise CocoFormatError("a line of the records is not an ovlabel record (it has no 'image')")
        yield rec


def merged_records(paths: Iterable[str | Path]) -> list[dict]:
    """One record per image id (the last written wins), sorted by id."""
    latest: dict[int, dict] = {}
    for rec in read_records(paths):
        latest[int(rec["image"]["id"])] = rec
    return [latest[k] for k in sorted(latest)]


def finalize(
    record_paths: Iterable[str | Path],
    out_dir: str | Path,
    categories: Categories,
    *,
    gt: COCO | None = None,
    segmentation: str = "rle",
    info: dict | None = None,
    dataset_min_score: float = 0.0,
    dataset_class_iou: float | None = None,
) -> dict:
    """Merge records into ``out_dir/predictions.json`` (every detection, for evaluation) and
    ``out_dir/dataset.json`` (the pseudo-labels: detections scoring at least ``dataset_min_score``, the
    score kept as an annotation field; with ``dataset_class_iou``, an annotation whose mask overlaps a
    better-scoring one of another class at that IoU or more is left out: one mask, one class). Returns
    counts and the failures (image and reason); warns when the dataset keeps many near-zero scores."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = merged_records(record_paths)
    ok = [r for r in records if "error" not in r]
    failures = [{"image": r["image"].get("file_name", r["image"]["id"]), "error": r["error"]}
                for r in records if "error" in r]
    images = [r["image"] for r in ok]
    cat_ids = set(categories.ids)
    if gt is None:
        gt = coco_from_dict({"images": [dict(i) for i in images], "categories": categories.to_coco(),
                             "annotations": []}, "the run's images")
    img_ids = gt.getImgIds()

    head = json_text({"info": info or {"description": "ovlabel pseudo-labels"}, "licenses": [],
                      "images": images, "categories": categories.to_coco()})
    n_ann = n_low = n_cross = 0
    chunk: list[dict] = []
    with atomic_write(out_dir / PREDICTIONS, "w", encoding="utf-8") as pf, \
            atomic_write(out_dir / DATASET, "w", encoding="utf-8") as df:
        preds = _JsonArray(pf, "[", "]")
        data = _JsonArray(df, head[:-1] + ', "annotations": [', "]}")
        for rec in ok:
            image = rec["image"]
            h, w = int(image["height"]), int(image["width"])
            dropped = cross_class_duplicates(rec["results"], dataset_min_score, dataset_class_iou)
            n_cross += len(dropped)
            for index, r in enumerate(rec["results"]):
                if r["category_id"] not in cat_ids:
                    raise CocoFormatError(f"record of image {image['id']}: category {r['category_id']} is not "
                                          "in the category list")
                res = {"image_id": image["id"], "category_id": r["category_id"], "bbox": r["bbox"],
                       "score": r["score"], "segmentation": r["segmentation"], "area": r["area"]}
                preds.add(res)
                chunk.append(res)
                rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"]}
                if (h, w) != tuple(rle["size"]):
                    raise CocoFormatError(f"image {image['id']}: mask size {rle['size']} differs from the image "
                                          f"size {[h, w]}")
                if r["score"] < dataset_min_score or index in dropped:
                    continue
                seg, decoded = segmentation_for_dataset(rle, segmentation)
                n_ann += 1
                n_low += r["score"] < NEAR_ZERO_SCORE
                data.add({"id": n_ann, "image_id": image["id"], "category_id": r["category_id"],
                          "segmentation": seg, "area": int(mask_utils.area(decoded)),
                          "bbox": [float(v) for v in mask_utils.toBbox(decoded)], "iscrowd": 0,
                          "score": r["score"]})
                if len(chunk) >= VALIDATE_CHUNK:
                    _validate_chunk(chunk, gt, img_ids)
                    chunk = []
        _validate_chunk(chunk, gt, img_ids)
        preds.close()
        data.close()
        fault_point("finalize")  # both files written, neither renamed into place
    coco_from_dict(json.loads((out_dir / DATASET).read_text(encoding="utf-8")), DATASET)
    if n_low >= 10 and n_low > NEAR_ZERO_SHARE * n_ann:
        log.warning("%s keeps %d annotations (of %d) scoring below %g: most are likely false positives; raise "
                    "export.dataset_min_score (--dataset-min-score) or run ovlabel calibrate --metric dataset-f1",
                    DATASET, n_low, n_ann, NEAR_ZERO_SCORE)
    return {"images": len(ok), "annotations": n_ann, "failures": failures, "near_zero_annotations": n_low,
            "cross_class_duplicates": n_cross}


NEAR_ZERO_SCORE = 0.01  # an annotation scoring below this is "near zero" (scores are in [0, 1])
NEAR_ZERO_SHARE = 0.25  # a dataset with more near-zero annotations than this share gets a warning


def cross_class_duplicates(results: list[dict], min_score: float, iou: float | None) -> set[int]:
    """Indices of the image's dataset annotations whose mask overlaps a better-scoring annotation of
    another class with IoU ≥ ``iou`` (checked best first, against those kept)."""
    if iou is None:
        return set()
    order = sorted((i for i, r in enumerate(results) if r["score"] >= min_score), key=lambda i: -results[i]["score"])
    kept: list[int] = []
    dropped: set[int] = set()
    rles = {i: {"size": results[i]["segmentation"]["size"],
                "counts": results[i]["segmentation"]["counts"].encode("ascii")} for i in order}
    for i in order:
        others = [j for j in kept if results[j]["category_id"] != results[i]["category_id"]]
        if others and np.max(mask_utils.iou([rles[i]], [rles[j] for j in others], [0] * len(others))) >= iou:
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


class _JsonArray:
    """Writes a JSON array (or an object ending in an array) item by item into an open file."""

    def __init__(self, f, head: str, tail: str) -> None:
        self.f, self.tail, self.first = f, tail, True
        f.write(head)

    def add(self, obj) -> None:
        self.f.write(("" if self.first else ",") + "\n" + json_text(obj))
        self.first = False

    def close(self) -> None:
        self.f.write("\n" + self.tail + "\n")


def _validate_chunk(chunk: list[dict], gt: COCO, img_ids) -> None:
    if not chunk:
        return
    check_results(chunk, img_ids, gt.getCatIds(), "predictions")
    with quiet():
        gt.loadRes([dict(r) for r in chunk])

