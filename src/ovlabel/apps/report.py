"""``ovlabel report RUN``: a self-contained HTML report of a run, opened from the folder with no server and no
network.

``RUN/report/index.html`` holds the page, its script and style, and the run's summary (classes, counts,
score histograms, failures and, with a ground truth, per-class AP and PR curves); the gallery's data is
split into pages (``pages/page-NNNN.js``, loaded by ``<script>`` tags, which browsers allow from
``file://`` where they refuse ``fetch``) of ``page_size`` images, each with a thumbnail
(``thumbs/<id>.jpg``) and, when the run kept its heatmaps, the maps of its best queries (``maps/``, loaded
only when an image is opened). So a run of 10,000 images is 10,000 small thumbnails and 50 page files,
never one huge file.

Detections are drawn in the browser from their outlines (the outer boundary of each mask, at thumbnail
scale) and boxes; a class filter and a score slider choose what is shown. With a ground truth (``gt``, or
the one the run was labelled from), each image also says its false positives and misses at mask IoU 0.5
among the detections shown (each detection's outcome of the greedy matching by score, which holds for any
score threshold and set of classes).
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..common.files import atomic_write, contained, write_text
from ..errors import InputError
from ..evaluation.coco import evaluate
from ..evaluation.dataset import outcomes
from ..export.coco import load_coco, mask_polygons, read_json
from ..export.heatmaps import list_heatmap_files, load_heatmaps
from ..pipeline.images import ImageReadError, read_image
from ..pipeline.run import RunLayout
from ..postprocess.rle import decode
from .postprocess import source_run

log = logging.getLogger(__name__)

PAGE_SIZE = 200
THUMB = 256  # longest side of a thumbnail, in pixels
MAPS_PER_IMAGE = 3
HIST_BINS = 20
PAGE_DIR = Path(__file__).resolve().parent / "report_page"  # the page's HTML, style and script


def _thumbnail(pixels: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    import cv2

    h, w = pixels.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return pixels, scale


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", durable=False) as f:
        Image.fromarray(pixels).save(f, format="JPEG", quality=85)


def _outline(det: dict, scale: float) -> list[list[float]]:
    seg = det["segmentation"]
    mask = decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}) > 0
    out = []
    for poly in mask_polygons(mask):
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) * scale
        if len(xy) > 64:  # enough to draw at thumbnail size
            xy = xy[np.linspace(0, len(xy) - 1, 64).astype(int)]
        out.append([round(float(v), 1) for v in xy.reshape(-1)])
    return out


def _map_image(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h = np.nan_to_num(heat.astype(np.float32))
    lo, hi = float(h.min()), float(h.max())
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    h = cv2.resize(h, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, gt: str | Path | None = None,
                 page_size: int = PAGE_SIZE, thumb: int = THUMB, progress: bool = False) -> dict:
    """Write the report of the run in ``run_dir`` into ``out_dir`` (default ``run_dir/report``); see the
    module docstring. Returns a summary (the page, image and page counts, bytes written)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.predictions.is_file() or not layout.dataset.is_file():
        raise InputError(f"{run_dir} has no predictions.json and dataset.json: report a finished run (after "
                         "ovlabel merge for a sharded one)")
    if page_size < 1 or thumb < 16:
        raise InputError(f"page size must be >= 1 and thumbnails >= 16 px, got {page_size} and {thumb}")
    _, run = source_run(layout.heatmaps)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    dataset = read_json(layout.dataset, "dataset")
    predictions = read_json(layout.predictions, "predictions")
    _check_run_files(dataset, predictions, run_dir)
    for sub in ("pages", "thumbs", "maps"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    categories = dataset["categories"]
    index = {c["id"]: i for i, c in enumerate(categories)}
    names = {c["id"]: c["name"] for c in categories}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for p in predictions:
        by_image[p["image_id"]].append(p)
    root_text = run.get("image_root") or (dataset.get("info") or {}).get("image_root")
    root = Path(root_text) if root_text else None
    default_score = float(((run.get("config") or {}).get("export") or {}).get("dataset_min_score") or 0.0)

    gt_path = gt if gt is not None else ((run.get("inputs") or {}).get("coco_gt") if isinstance(run.get("inputs"), dict)
                                         else None)
    truth = load_coco(gt_path) if gt_path else None
    per_image_eval: dict[int, dict] = {}
    evaluation: dict[str, Any] | None = None
    if truth is not None:
        known = set(truth.getImgIds())
        scored = [p for p in predictions if p["image_id"] in known]
        metrics = evaluate(truth, scored, ("segm", "bbox"), curves=True, unknown_images="warn") if scored else None
        if metrics:
            gt_names = {c["id"]: c["name"] for c in truth.dataset["categories"]}
            evaluation = {
                "segm_ap": metrics["segm"]["stats"]["AP"], "bbox_ap": metrics["bbox"]["stats"]["AP"],
                "per_class": {n: {t: _number(metrics[t]["per_class"].get(n)) for t in ("segm", "bbox")}
                              for n in gt_names.values()},
                "pr50": {n: [round(v, 4) for v in c] for n, c in metrics["segm"]["pr50"].items()},
            }
        # each detection's outcome at mask IoU 0.5 (greedy by score, so it holds whatever the page's score
        # slider and class filter keep) and each image's ground-truth instances per class
        for p, t in zip(predictions, outcomes(truth, predictions)):
            if t > -2:
                p["_t"] = int(t)
        for a in truth.loadAnns(truth.getAnnIds(imgIds=sorted(known), iscrowd=False)):
            if a["category_id"] in index:
                per_class = per_image_eval.setdefault(a["image_id"], {}).setdefault("gt", {})
                k = index[a["category_id"]]
                per_class[k] = per_class.get(k, 0) + 1
        for image_id in known:
            per_image_eval.setdefault(image_id, {}).setdefault("gt", {})

    maps_of: dict[int, list[dict]] = {}  # the maps of each image's best queries, rendered in one pass
    if layout.heatmaps.is_dir():
        for f in list_heatmap_files(layout.heatmaps):
            try:
                rec = load_heatmaps(f)
            except InputError as e:
                log.warning("report: heatmap file %s skipped: %s", f.name, e)
                continue
            if by_image.get(rec.image_id):
                maps_of[rec.image_id] = _render_maps(rec, by_image[rec.image_id], index, names, out, thumb)

    images = sorted(dataset["images"], key=lambda i: i["id"])
    counts = np.zeros(len(categories), dtype=np.int64)
    hist = np.zeros((len(categories), HIST_BINS), dtype=np.int64)
    for p in predictions:
        k = index[p["category_id"]]
        counts[k] += 1
        hist[k, min(HIST_BINS - 1, int(p["score"] * HIST_BINS))] += 1
    n_pages = max(1, -(-len(images) // page_size))
    bar = tqdm(total=len(images), desc="ovlabel report: thumbnails and pages", unit="img", disable=not progress,
               dynamic_ncols=True)
    for page in range(n_pages):
        entries = []
        for img in images[page * page_size : (page + 1) * page_size]:
            entries.append(_entry(img, by_image.get(img["id"], []), index, root, out, thumb, maps_of.get(img["id"]),
                                  per_image_eval.get(img["id"])))
            bar.update()
        text = f"window.ovlabelPage({page + 1}, {json.dumps(entries, separators=(',', ':'), allow_nan=False)});\n"
        write_text(out / "pages" / f"page-{page + 1:04d}.js", text, durable=False)
    bar.close()
    failures = [{"file": str(f.get("file") or f.get("image")), "error": str(f.get("error"))}
                for f in (run.get("failures") or []) if isinstance(f, dict)]
    summary = {
        "run": str(run_dir.absolute()), "title": f"ovlabel report — {run_dir.absolute().name}",
        "classes": [c["name"] for c in categories], "counts": counts.tolist(), "histograms": hist.tolist(),
        "images": len(images), "detections": len(predictions), "pages": n_pages, "page_size": page_size,
        "default_score": default_score, "failures": failures, "evaluation": evaluation,
        "model": (run.get("model") or {}).get("model") if isinstance(run.get("model"), dict) else None,
        "command": run.get("command"),
    }
    write_text(out / "index.html", _page(summary), durable=False)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"index": str(out / "index.html"), "images": len(images), "pages": n_pages, "bytes": size,
            "index_bytes": (out / "index.html").stat().st_size}


def _check_run_files(dataset: Any, predictions: Any, run_dir: Path) -> None:
    """The run's files are input: image ids name files of the report (``thumbs/<id>.jpg``), so they must be
    integers; sizes positive; every prediction of a known image and category."""
    def bad(what: str) -> InputError:
        return InputError(f"{run_dir}: {what}; is it a run folder written by ovlabel?")

    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list) or \
            not isinstance(dataset.get("categories"), list) or not isinstance(predictions, list):
        raise bad("dataset.json must hold 'images' and 'categories' lists, predictions.json a list")
    for img in dataset["images"]:
        if not isinstance(img, dict) or type(img.get("id")) is not int or not isinstance(img.get("file_name"), str) \
                or not all(type(img.get(k)) is int and img[k] > 0 for k in ("width", "height")):
            raise bad(f"dataset.json has an image entry {str(img)[:120]} without an integer id, a file name and a "
                      "positive integer width and height")
    ids = {img["id"] for img in dataset["images"]}
    cats = {c.get("id") for c in dataset["categories"] if isinstance(c, dict)}
    for p in predictions:
        if not isinstance(p, dict) or p.get("image_id") not in ids or p.get("category_id") not in cats:
            raise bad(f"predictions.json has a detection {str(p)[:120]} of an image or category that "
                      "dataset.json does not list")


def _render_maps(rec: Any, dets: list[dict], index: dict[int, int], names: dict[int, str], out: Path,
                 thumb: int) -> list[dict]:
    """The maps of the image's best-scoring classes (up to ``MAPS_PER_IMAGE``) as thumbnail-sized JPEGs,
    opened on demand in the page."""
    H, W = rec.size
    scale = min(1.0, thumb / max(H, W))
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    query = {q: k for k, q in enumerate(rec.queries)}
    best: list[int] = []
    for d in sorted(dets, key=lambda d: -d["score"]):
        if d["category_id"] not in best:
            best.append(d["category_id"])
    maps = []
    for cat_id in best[:MAPS_PER_IMAGE]:
        k = query.get(names[cat_id])
        if k is None:
            continue
        _save_jpeg(out / "maps" / f"{rec.image_id}_{k}.jpg", _map_image(rec.maps.query(k), size))
        maps.append({"c": index[cat_id], "src": f"maps/{rec.image_id}_{k}.jpg"})
    return maps


def _entry(img: dict, dets: list[dict], index: dict[int, int], root: Path | None, out: Path, thumb: int,
           maps: list[dict] | None, evaluation: dict | None) -> dict:
    """One image of a gallery page: its thumbnail, its detections at thumbnail scale, its maps."""
    H, W = int(img["height"]), int(img["width"])
    scale = min(1.0, thumb / max(H, W))
    entry: dict[str, Any] = {"id": img["id"], "file": img["file_name"], "w": W, "h": H,
                             "tw": max(1, round(W * scale)), "th": max(1, round(H * scale))}
    if evaluation is not None:
        entry.update(evaluation)
    try:
        if root is None:
            raise InputError("the run recorded no image folder")
        pixels = read_image(contained(root, img["file_name"]))  # a name from the file never leads outside
        small, scale = _thumbnail(pixels, thumb)
        entry["tw"], entry["th"] = small.shape[1], small.shape[0]
        _save_jpeg(out / "thumbs" / f"{img['id']}.jpg", small)
        entry["thumb"] = f"thumbs/{img['id']}.jpg"
    except (InputError, ImageReadError, OSError) as e:
        entry["missing"] = str(e)
    entry["dets"] = [{"c": index[d["category_id"]], "s": round(float(d["score"]), 4),
                      "b": [round(float(v) * scale, 1) for v in d["bbox"]], "p": _outline(d, scale),
                      **({"t": d["_t"]} if "_t" in d else {})}
                     for d in sorted(dets, key=lambda d: -d["score"])]
    if maps is not None:
        entry["maps"] = maps
    return entry


def _number(v: float | None) -> float | None:
    """A figure for JSON: ``None`` where pycocotools has none (NaN, or −1)."""
    return None if v is None or not np.isfinite(v) or v < 0 else float(v)


def _page(summary: dict) -> str:
    """``index.html``: the page (``report_page/``) with its style, script and the run's summary inlined."""
    data = json.dumps(summary, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    part = {name: (PAGE_DIR / name).read_text(encoding="utf-8") for name in ("report.html", "report.css", "report.js")}
    return (part["report.html"].replace("__TITLE__", html.escape(summary["title"])).replace("__DATA__", data)
            .replace("__STYLE__", part["report.css"]).replace("__SCRIPT__", part["report.js"]))
