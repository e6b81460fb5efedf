"""Streaming results: one JSON line per image, merged at the end into ``predictions.json`` and
``dataset.json``.

A run appends one record per finished image to ``records*.jsonl`` (flushed and fsynced per batch), so
memory stays flat and a killed run loses at most the batch in flight: on ``--resume`` the images with a
record are skipped. A record is ``{"image": {id, file_name, width, height}, "results": [...]}`` or
``{"image": {...}, "error": "why"}``. A line cut short by a kill is ignored when reading.

:func:`finalize` merges any number of record files (shards, resumed runs): one record per image id (the
last one wins), images sorted by id, annotation ids 1..N in that order — so the merged files do not
depend on how the work was split or interrupted. Both outputs are validated with pycocotools in chunks
and written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import CocoFormatError
from ..postprocess.detections import Detections
from .categories import Categories
from .coco import _segmentation, check_results, coco_from_dict, detections_to_results, quiet

VALIDATE_CHUNK = 2000


class RecordWriter:
    """Append-only JSONL of per-image records."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, image: dict, dets: Detections | None = None, error: str | None = None) -> None:
        rec: dict = {"image": image}
        if error is not None:
            rec["error"] = error
        else:
            assert dets is not None
            results = detections_to_results(image["id"], dets)
            for r, label in zip(results, dets.labels):
                r.pop("image_id")
                r["label"] = label
            rec["results"] = results
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(paths: Iterable[str | Path]) -> Iterator[dict]:
    """Records of the given files in order; a malformed line is tolerated only as a file's last line
    (a write cut short by a kill)."""
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
            if not isinstance(rec, dict) or "image" not in rec:
                raise CocoFormatError(f"{path}: line {i + 1} is not an ovlabel record")
            yield rec


def done_image_ids(paths: Iterable[str | Path]) -> set[int]:
    return {int(r["image"]["id"]) for r in read_records(paths)}


def merged_records(paths: Iterable[str | Path]) -> list[dict]:
    """One record per image id (the last written wins), sorted by id."""
    latest: dict[int, dict] = {}
    for rec in read_records(paths):
        latest[int(rec["image"]["id"])] = rec
    return [latest[k] for k in sorted(latest)]


class _JsonArrayWriter:
    """Writes a JSON array (or an object ending in an array) item by item into a temporary file."""

    def __init__(self, path: Path, head: str = "[", tail: str = "]") -> None:
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.f = os.fdopen(fd, "w", encoding="utf-8")
        self.f.write(head)
        self.tail = tail
        self.first = True

    def add(self, obj) -> None:
        self.f.write(("" if self.first else ",") + "\n" + json.dumps(obj, ensure_ascii=False))
        self.first = False

    def commit(self) -> None:
        self.f.write("\n" + self.tail + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        Path(self.tmp).unlink(missing_ok=True)


def finalize(
    record_paths: Iterable[str | Path],
    out_dir: str | Path,
    categories: Categories,
    *,
    gt: COCO | None = None,
    segmentation: str = "rle",
    info: dict | None = None,
) -> dict:
    """Merge records into ``out_dir/predictions.json`` and ``out_dir/dataset.json``. Returns counts and
    the failures (image and reason)."""
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

    preds = _JsonArrayWriter(out_dir / "predictions.json")
    head = json.dumps({"info": info or {"description": "ovlabel pseudo-labels"}, "licenses": [],
                       "images": images, "categories": categories.to_coco()}, ensure_ascii=False)
    data = _JsonArrayWriter(out_dir / "dataset.json", head=head[:-1] + ', "annotations": [', tail="]}")
    n_ann = 0
    chunk: list[dict] = []
    try:
        for rec in ok:
            image = rec["image"]
            h, w = int(image["height"]), int(image["width"])
            for r in rec["results"]:
                if r["category_id"] not in cat_ids:
                    raise CocoFormatError(f"record of image {image['id']}: category {r['category_id']} is not "
                                          "in the category list")
                res = {"image_id": image["id"], "category_id": r["category_id"], "bbox": r["bbox"],
                       "score": r["score"], "segmentation": r["segmentation"], "area": r["area"]}
                preds.add(res)
                chunk.append(res)
                rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"]}
                if segmentation == "polygon":
                    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
                    seg, decoded = _segmentation(mask.astype(bool), rle, "polygon")
                else:
                    seg, decoded = rle, {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
                n_ann += 1
                data.add({"id": n_ann, "image_id": image["id"], "category_id": r["category_id"],
                          "segmentation": seg, "area": int(mask_utils.area(decoded)),
                          "bbox": [float(v) for v in mask_utils.toBbox(decoded)], "iscrowd": 0,
                          "score": r["score"]})
                if (h, w) != tuple(rle["size"]):
                    raise CocoFormatError(f"image {image['id']}: mask size {rle['size']} differs from the image "
                                          f"size {[h, w]}")
                if len(chunk) >= VALIDATE_CHUNK:
                    _validate_chunk(chunk, gt, img_ids)
                    chunk = []
        _validate_chunk(chunk, gt, img_ids)
        preds.commit()
        data.commit()
    except BaseException:
        preds.abort()
        data.abort()
        raise
    coco_from_dict(json.loads((out_dir / "dataset.json").read_text(encoding="utf-8")), "dataset.json")
    return {"images": len(ok), "annotations": n_ann, "failures": failures}


def _validate_chunk(chunk: list[dict], gt: COCO, img_ids) -> None:
    if not chunk:
        return
    check_results(chunk, img_ids, gt.getCatIds(), "predictions")
    with quiet():
        gt.loadRes([dict(r) for r in chunk])

