"""COCO files: results to evaluate, datasets of pseudo-labels to train on, and PNG label masks.

Invariants of everything written here (tested):

* boxes are XYWH and equal ``pycocotools.mask.toBbox`` of the written segmentation;
* ``area`` is the area of the written segmentation (mask pixels), never the box area;
* segmentations are compressed RLE with ``str`` counts (or polygons by option), never empty;
* annotation ids are unique (1..N), ``iscrowd`` is 0;
* category ids are the ground truth's or the user's own — never renumbered;
* polygons (``export.segmentation: polygon``) trace pixel edges, so they rasterise back to the mask
  exactly; a mask with holes, or any mask a polygon cannot reproduce with IoU ≥ 0.98, keeps its RLE;
* files are validated with pycocotools before they are written, and written atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..common.files import atomic_write, file_kind, write_json
from ..errors import CocoFormatError, InputError
from ..postprocess.detections import Detections
from ..postprocess.masks import fill_mask_holes
from ..postprocess.rle import decode

POLYGON_MIN_IOU = 0.98
PNG_MAX_VALUE = 65535


# ------------------------------------------------------------------------------------------------- I/O
def quiet():
    """Silence pycocotools' progress prints ("creating index...")."""
    return contextlib.redirect_stdout(io.StringIO())


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    """Write JSON atomically (see :func:`ovlabel.common.files.atomic_write`)."""
    return write_json(path, obj, indent=indent)


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    kind = file_kind(path)
    if kind not in (None, "missing"):
        raise CocoFormatError(f"{what} file {path} is not a regular file ({kind}); never opened")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CocoFormatError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{what} file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                              f"column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{what} file {path} cannot be read: {e}") from None


def coco_from_dict(dataset: dict, source: str = "dataset") -> COCO:
    """A ``pycocotools.coco.COCO`` from a dataset dict, after checking its required fields."""
    if not isinstance(dataset, dict):
        raise CocoFormatError(f"{source}: a COCO dataset is a JSON object, got {type(dataset).__name__}")
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list):
            raise CocoFormatError(f"{source}: field '{key}' must be a list")
    dataset.setdefault("annotations", [])
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise CocoFormatError(f"{source}: images[{i}] has no 'id'")
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise CocoFormatError(f"{source}: categories[{i}] needs 'id' and 'name'")
    ids = [c["id"] for c in dataset["categories"]]
    if len(set(ids)) != len(ids):
        raise CocoFormatError(f"{source}: category ids are not unique")
    for what, items in (("image", dataset["images"]), ("annotation", dataset["annotations"])):
        seen: set = set()
        dup: set = set()
        for x in items:
            if isinstance(x, dict) and "id" in x:
                (dup if x["id"] in seen else seen).add(x["id"])
        dup = sorted(dup, key=str)
        if dup:
            raise CocoFormatError(f"{source}: {what} ids are not unique ({dup[:10]} used more than once); COCO tools "
                                  f"would silently keep only one {what} per id")
    coco = COCO()
    coco.dataset = dataset
    with quiet():
        coco.createIndex()
    return coco


def load_coco(path: str | Path) -> COCO:
    """Load a COCO ground-truth / dataset file with errors that name the file and the field."""
    return coco_from_dict(read_json(path, "COCO"), str(path))


# -------------------------------------------------------------------------------------------- results
def detections_to_results(image_id: int, dets: Detections) -> list[dict]:
    """COCO results entries for one image (bbox XYWH, score, compressed RLE with str counts, mask area)."""
    out = []
    for rle, box, area, score, cat in zip(dets.rles(), dets.boxes, dets.areas, dets.scores, dets.category_ids):
        out.append({
            "image_id": int(image_id),
            "category_id": int(cat),
            "bbox": [float(v) for v in box],
            "score": float(score),
            "segmentation": rle,
            "area": int(area),
        })
    return out


def read_results(results: str | Path | list[dict], gt: COCO | str | Path | None = None) -> dict[int, Detections]:
    """COCO results (``predictions.json``, or the list) → ``{image_id: Detections}``. Image sizes come from
    the results' RLEs (or the ground truth ``gt`` for polygons); category names from ``gt``."""
    if isinstance(results, (str, Path)):
        results = read_json(results, "results")
    coco = load_coco(gt) if isinstance(gt, (str, Path)) else gt
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]} if coco is not None else None
    by_image: dict[int, list[dict]] = {}
    for r in check_results(results, {r.get("image_id") for r in results if isinstance(r, dict)} if coco is None
                           else coco.getImgIds(), ({r.get("category_id") for r in results if isinstance(r, dict)}
                                                   if coco is None else coco.getCatIds()), "results"):
        by_image.setdefault(int(r["image_id"]), []).append(r)
    out = {}
    for image_id, rs in sorted(by_image.items()):
        seg = rs[0].get("segmentation")
        if isinstance(seg, dict) and "size" in seg:
            size = tuple(seg["size"])
        elif coco is not None:
            size = (coco.imgs[image_id]["height"], coco.imgs[image_id]["width"])
        else:
            raise CocoFormatError(f"image {image_id}: polygon results need the ground truth for the image size")
        out[image_id] = Detections.from_coco_results(rs, size, names).sorted()
    return out


def check_results(results: Any, image_ids: Iterable[int], category_ids: Iterable[int], source: str,
                  sizes: dict[int, tuple[int, int]] | None = None) -> list[dict]:
    """Structural checks of a results list and of its ids against the ground truth; with ``sizes``
    (image id → ``(height, width)``), the geometry too: boxes of finite numbers with ``w, h >= 0``, RLE of
    the image's size whose runs cover it exactly, polygons of finite ``x, y`` pairs — a result that would
    be scored on garbage (or crash the decoder) is refused, naming it."""
    if not isinstance(results, list):
        raise CocoFormatError(f"{source}: COCO results are a JSON list of detections, got {type(results).__name__}")
    images, cats = set(image_ids), set(category_ids)
    bad_img, bad_cat = set(), set()
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise CocoFormatError(f"{source}: results[{i}] is not an object")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise CocoFormatError(f"{source}: results[{i}] has no '{key}'")
        if "bbox" not in r and "segmentation" not in r:
            raise CocoFormatError(f"{source}: results[{i}] has neither 'bbox' nor 'segmentation'")
        if "bbox" in r and (not isinstance(r["bbox"], list) or len(r["bbox"]) != 4):
            raise CocoFormatError(f"{source}: results[{i}].bbox must be [x, y, w, h]")
        if isinstance(r["score"], bool) or not isinstance(r["score"], (int, float)) or not np.isfinite(r["score"]):
            raise CocoFormatError(f"{source}: results[{i}].score must be a finite number")
        if not _hashable(r["image_id"]) or r["image_id"] not in images:
            bad_img.add(repr(r["image_id"]) if not _hashable(r["image_id"]) else r["image_id"])
        elif sizes is not None and r["image_id"] in sizes:
            problem = geometry_problem(r, sizes[r["image_id"]])
            if problem:
                raise CocoFormatError(f"{source}: results[{i}] (image {r['image_id']}): {problem}")
        if not _hashable(r["category_id"]) or r["category_id"] not in cats:
            bad_cat.add(repr(r["category_id"]) if not _hashable(r["category_id"]) else r["category_id"])
    if bad_img:
        raise CocoFormatError(f"{source}: field 'image_id' has ids not in the ground truth: "
                              f"{sorted(bad_img, key=str)[:20]}")
    if bad_cat:
        raise CocoFormatError(f"{source}: field 'category_id' has ids not in the ground truth: "
                              f"{sorted(bad_cat, key=str)[:20]} (valid: {sorted(cats)[:20]})")
    return results


def _hashable(v: Any) -> bool:
    return isinstance(v, (int, str, float)) and not isinstance(v, bool)


def _finite_numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) \
        and bool(np.isfinite(np.asarray(v, dtype=np.float64)).all())


def geometry_problem(r: dict, size: tuple[int, int]) -> str | None:
    """What is wrong with a result's box or segmentation on an image of ``size`` ``(height, width)``."""
    H, W = size
    if "bbox" in r:
        if not _finite_numbers(r["bbox"]):
            return f"bbox {r['bbox']!r} must be 4 finite numbers [x, y, w, h]"
        if r["bbox"][2] < 0 or r["bbox"][3] < 0:
            return f"bbox {r['bbox']!r} has a negative width or height"
    if "area" in r and (isinstance(r["area"], bool) or not isinstance(r["area"], (int, float))
                        or not np.isfinite(r["area"]) or r["area"] < 0):
        return f"area {r['area']!r} must be a finite number >= 0"
    if "segmentation" not in r:
        return None
    seg = r["segmentation"]
    if isinstance(seg, dict):
        size_ = seg.get("size")
        if not (isinstance(size_, list) and len(size_) == 2 and all(isinstance(v, int) for v in size_)):
            return f"segmentation size {size_!r} must be [height, width]"
        if tuple(size_) != (H, W):
            return f"mask size {size_} differs from the image size {[H, W]} (height, width)"
        counts = seg.get("counts")
        runs = _rle_runs(counts)
        if runs is None:
            return "segmentation counts are not RLE (a compressed string or a list of run lengths)"
        if (runs < 0).any() or int(runs.sum()) != H * W:
            return f"segmentation RLE runs cover {int(runs.sum())} pixels, not the image's {H * W}"
        return None
    if isinstance(seg, list):
        if not seg or not all(_finite_numbers(p) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            return "segmentation polygons must be lists of at least 3 finite (x, y) pairs"
        return None
    return f"segmentation must be RLE or polygons, got {type(seg).__name__}"


def _rle_runs(counts: Any) -> np.ndarray | None:
    """The run lengths of RLE ``counts``: a list of ints, or pycocotools' compressed string (decoded as
    its ``rleFrString`` does, vectorised); ``None`` when it is neither."""
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            return None
        return np.asarray(counts, dtype=np.int64) if counts else np.zeros(0, np.int64)
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(counts, str):
        return None
    c = np.frombuffer(counts.encode("latin-1", errors="replace"), dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if ((c < 0) | (c > 63)).any() or c[-1] & 0x20:
        return None  # characters outside the alphabet, or a number cut short
    ends = np.flatnonzero((c & 0x20) == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    k = np.arange(c.size) - np.repeat(starts, ends - starts + 1)
    if k.max() > 11:
        return None  # a run longer than 2^60: not an image
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    sign = (c[ends] & 0x10) != 0
    x = np.where(sign, x | (-1 << (5 * (k[ends] + 1))), x)
    out = x.copy()
    for parity in (1, 0):  # runs m > 2 are deltas to run m - 2
        idx = np.arange(3 if parity else 4, x.size, 2)
        if idx.size:
            out[idx] = out[idx - 2][0] + np.cumsum(x[idx])
    return out


# -------------------------------------------------------------------------------------------- dataset
def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Polygons (COCO: flat ``[x1, y1, x2, y2, …]``) of the outer boundaries of a binary mask.

    They follow pixel edges (marching squares at level 0.5 on the zero-padded mask, 8-connected
    foreground, corners cut through the edge midpoints), in COCO's continuous frame where pixel ``(x, y)``
    covers ``[x, x+1) × [y, y+1)``, so pycocotools rasterises them back to the same pixels — no half-pixel
    shift. Holes are not representable and are not traced.
    """
    from skimage import measure

    padded = np.pad(mask.astype(np.uint8), 1)
    polys = []
    for c in measure.find_contours(padded, 0.5, fully_connected="high"):
        c = measure.approximate_polygon(c, tolerance=0)  # drops collinear points only
        if len(c) > 1 and np.array_equal(c[0], c[-1]):
            c = c[:-1]
        if len(c) >= 3:
            xy = np.stack([c[:, 1] - 0.5, c[:, 0] - 0.5], axis=1)  # padded index → COCO coordinates
            polys.append([float(v) for v in xy.reshape(-1)])
    return polys


def has_holes(mask: np.ndarray) -> bool:
    """Whether a binary mask encloses background (4-connected background not reaching the border)."""

    return bool((fill_mask_holes(mask) != (mask != 0)).any())


def segmentation_for_dataset(rle: dict, mode: str) -> tuple[Any, dict]:
    """The segmentation to write into ``dataset.json`` for a compressed RLE with ``str`` counts, and the
    RLE (``bytes`` counts) that COCO tools will decode from it, for its area and box.

    ``rle`` mode writes the RLE itself. ``polygon`` mode writes :func:`mask_polygons` when they
    reproduce the mask (no holes, IoU ≥ 0.98 — in practice exactly), else the RLE for that annotation.
    """
    exact = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    if mode == "rle":
        return rle, exact
    if mode != "polygon":
        raise InputError(f"segmentation must be 'rle' or 'polygon', got {mode!r}")
    mask = decode(exact)
    if has_holes(mask):
        return rle, exact
    polys = mask_polygons(mask)
    if polys:
        h, w = mask.shape
        decoded = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        if float(mask_utils.iou([decoded], [exact], [0])[0, 0]) >= POLYGON_MIN_IOU:
            return polys, decoded
    return rle, exact


# ------------------------------------------------------------------------------------------ PNG masks
def label_image(dets: Detections, kind: str = "instance") -> np.ndarray:
    """``[H,W]`` label map: ``instance`` → 1..N by descending score (0 = background); ``semantic`` → the
    category id of the best-scoring detection covering each pixel.

    Values are ``uint8`` when they fit, else ``uint16``. Values that a 16-bit PNG cannot hold are
    refused, never wrapped: more than 65,535 instances, or category ids outside 1..65,535 (0 is the
    background) for ``semantic``.
    """
    if kind not in ("instance", "semantic"):
        raise CocoFormatError(f"label mask kind must be 'instance' or 'semantic', got {kind!r}")
    H, W = dets.image_size
    dets = dets.sorted()
    if kind == "instance":
        values = np.arange(1, len(dets) + 1)
        if len(dets) > PNG_MAX_VALUE:
            raise InputError(f"{len(dets)} detections do not fit a 16-bit instance PNG (at most {PNG_MAX_VALUE})")
    else:
        values = dets.category_ids
        check_png_category_ids(values)
    top = int(values.max(initial=0))
    out = np.zeros((H, W), dtype=np.uint16 if top > 255 else np.uint8)
    for i in range(len(dets) - 1, -1, -1):  # paint lowest scores first: the best one wins overlaps
        out[dets.mask(i)] = values[i]
    return out


def check_png_category_ids(ids: Iterable[int]) -> None:
    """Category ids written as semantic PNG values must be 1..65,535 (0 is the background)."""
    bad = sorted({int(i) for i in ids if not 1 <= int(i) <= PNG_MAX_VALUE})
    if bad:
        raise InputError(f"semantic PNG masks store category ids as 16-bit values 1..{PNG_MAX_VALUE} (0 is the "
                         f"background), but category ids {bad[:10]} do not fit; use instance masks "
                         "(--masks instance) or renumber the categories")


def write_label_png(path: str | Path, dets: Detections, kind: str = "instance", *, durable: bool = True) -> Path:
    labels = label_image(dets, kind)
    with atomic_write(path, "wb", durable=durable) as f:
        Image.fromarray(labels).save(f, format="PNG")
    return Path(path)
