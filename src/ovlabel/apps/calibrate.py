"""``ovlabel calibrate``: the post-processing settings that suit a dataset, searched on a few labelled
images' cached heatmaps, with the gain that generalises measured on held-out folds.

Searched (coordinate descent, two rounds, each setting scored with pycocotools): the threshold (method and
value), instances (components or one per class), the map refinement (when the images are at hand), the
minimum area and the presence threshold; then, with ``per_class``, a threshold per class that has enough
instances (others keep the global one). With ``metric="dataset-f1"`` the score is the F1 (mask IoU 0.5,
:mod:`ovlabel.evaluation.dataset`) of the ``dataset.json`` the setting writes — its results scoring at least
``export.dataset_min_score``, one class per mask — and that threshold is searched too. Cross-validation:
the search runs on ``folds − 1`` folds and is scored on the one left out, against the starting
configuration on the same images; the final settings come from all images.

What makes it fast, without changing a result (a setting scores exactly what ``ovlabel postprocess``
with the written config gives — the tests check it):

* the maps of an image are normalised (and refined) once per refinement and kept while they fit a memory
  budget; refinement runs on all maps of an image at once;
* connected components are found once per (threshold, refinement) for every image: one instance per
  class is the union of the components that pass the minimum area (the largest ones, a prefix), the
  minimum area and the presence threshold only filter, and every fold reuses the same candidates;
* pycocotools scores only what the metric reads (all areas, 100 detections, the classes with ground
  truth), with the mask IoUs of a candidate computed once and reused by every evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..apps.postprocess import source_run
from ..common.categories import Categories
from ..common.files import contained, write_text
from ..config import Config, load_config
from ..errors import InputError
from ..evaluation.dataset import DatasetQuality, dataset_quality
from ..evaluation.semantic import ClassIoU
from ..export.coco import load_coco
from ..export.heatmaps import check_cache_against_gt, list_heatmap_files, load_heatmaps
from ..export.records import cross_class_duplicates
from ..pipeline.images import ImageReadError, read_image
from ..postprocess import ThresholdSpec
from ..postprocess.detect import Candidate, greedy_nms
from ..postprocess.geometry import minmax
from ..postprocess.masks import find_instances
from ..postprocess.refine import RefineSpec
from ..postprocess.rle import decode
from ..postprocess.scoring import combine

METRICS = ("segm-ap", "segm-ap50", "bbox-ap", "miou", "dataset-f1")
DATASET_METRICS = ("dataset-f1",)  # scored on dataset.json (export.dataset_min_score, one class per mask)
THRESHOLDS = [("max_fraction", v) for v in (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)] + \
    [("mean", None), ("otsu", None), ("quantile", 0.9), ("quantile", 0.95)]
MIN_AREA_FRACTIONS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
PRESENCE = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DATASET_MIN_SCORES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)  # searched for the dataset metrics
SEARCHED_REFINERS = ("none", "pamr", "superpixels")  # crf: slow, and an optional extra
MAP_CACHE_BYTES = 2 << 30  # normalised/refined maps kept in memory (beyond it they are recomputed)


@dataclass
class Image:
    id: int
    size: tuple[int, int]
    file_name: str
    record: Any  # HeatmapRecord
    category_ids: list[int]
    presence: np.ndarray
    pixels: np.ndarray | None = None


@dataclass
class Query:
    """The components of one query's map at one (threshold, refinement), largest first."""

    index: int
    category_id: int
    label: str
    presence: float
    rles: list[dict | None]  # str counts; None where nothing reads the mask (see ``Calibrator.candidates``)
    boxes: list[tuple[int, int, int, int]]  # XYWH
    areas: list[int]
    sums: list[float]  # the map summed over each component
    scores: list[float]  # presence × mean of the map, as the post-processor scores each component


@dataclass
class Setting:
    threshold: tuple[str, float | None]
    instances: str
    refine: str
    min_area_fraction: float
    presence_threshold: float
    class_thresholds: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    dataset_min_score: float | None = None  # searched for the dataset metrics (export.dataset_min_score)

    def key(self, name: str | None = None) -> tuple:
        thr = self.class_thresholds.get(name, self.threshold) if name else self.threshold
        return (thr, self.refine)

    def frozen(self) -> tuple:
        return (self.threshold, self.instances, self.refine, self.min_area_fraction, self.presence_threshold,
                tuple(sorted(self.class_thresholds.items())), self.dataset_min_score)


class Calibrator:
    def __init__(self, heatmap_dir: str | Path, gt: str | Path, *, config: Any = None, images: str | Path | None = None,
                 metric: str = "segm-ap", min_instances: int = 10, cache_bytes: int = MAP_CACHE_BYTES) -> None:
        if metric not in METRICS:
            raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
        run_yaml, run = source_run(heatmap_dir)
        if config is not None:
            self.base = config if isinstance(config, Config) else load_config(config)
        elif run.get("config"):
            self.base = load_config(dict(run["config"]), model_preset=False)
        else:
            self.base = load_config(None)
        self.gt = load_coco(gt)
        self.metric = metric
        self.min_instances = min_instances
        cats = Categories.from_coco(self.gt.dataset["categories"])
        root = Path(images) if images is not None else (Path(run["image_root"]) if run.get("image_root") else None)
        if images is not None and not root.is_dir():
            raise InputError(f"the images folder {root} does not exist")
        self.images: dict[int, Image] = {}
        for f in list_heatmap_files(heatmap_dir):  # FIFOs and other non-files skipped, with a warning
            rec = load_heatmaps(f, max_pixels=self.base.run.max_pixels)
            check_cache_against_gt(f, rec, self.gt, gt)  # id, size and file name: another run's caches refused
            img = self.gt.imgs[rec.image_id]
            if rec.image_id in self.images:
                raise InputError(f"{f}: image {rec.image_id} has two heatmap files")
            ids = [cats.id_of(q, source=f"{f}: field 'queries'") for q in rec.queries]
            pres = np.ones(len(ids)) if rec.presence is None else np.asarray(rec.presence, dtype=np.float64)
            self.images[rec.image_id] = Image(rec.image_id, rec.size, img["file_name"], rec, ids, pres)
        if len(self.images) < 2:
            raise InputError(f"calibration needs labelled images: {heatmap_dir} holds {len(self.images)} "
                             "heatmap file(s)")
        self.root = root if root is not None and root.is_dir() else None
        self.refiners = SEARCHED_REFINERS if self.root is not None else ("none",)
        self._cands: dict[tuple, dict[int, list[Query]]] = {}
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._cache_left = cache_bytes
        self._unions: dict[tuple, tuple[dict, int, float]] = {}
        self._eval = None
        self._gt_pairs = {(a["image_id"], a["category_id"]) for a in self.gt.dataset["annotations"]}
        self._all_masks = metric in ("miou", *DATASET_METRICS) or self.base.postprocess.nms is not None
        self._scores: dict[tuple, float] = {}
        self.evaluations = 0

    # ----------------------------------------------------------------------------------- candidates
    def _pixels(self, im: Image) -> np.ndarray:
        if im.pixels is None:
            path = contained(self.root, im.file_name)  # a ground-truth name never leads a read elsewhere
            try:
                im.pixels = read_image(path)
            except ImageReadError as e:
                raise InputError(f"{path}: {e} (the refinement search needs the images; "
                                 "leave --images out to search without it)") from None
            if im.pixels.shape[:2] != im.size:
                raise InputError(f"{self.root / im.file_name} is {im.pixels.shape[1]}x{im.pixels.shape[0]} but "
                                 f"its heatmaps are {im.size[1]}x{im.size[0]}")
        return im.pixels

    def maps(self, im: Image, refine: str) -> np.ndarray:
        """``[K,H,W]``: the image's maps as the post-processor thresholds them (refined, then min-max)."""

        key = (im.id, refine)
        if key in self._maps:
            return self._maps[key]
        maps = im.record.maps
        raw = np.stack([maps.query(k) for k in range(len(maps))])
        if refine != "none":
            base = self.base.postprocess.refine.model_dump()
            spec = RefineSpec(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in base.items()},
                                 "method": refine})
            raw = spec.for_image(self._pixels(im)).refine_many(raw)
        out = np.stack([minmax(h, inplace=True) for h in raw])
        if out.nbytes <= self._cache_left:
            self._maps[key] = out
            self._cache_left -= out.nbytes
        return out

    def candidates(self, key: tuple) -> dict[int, list[Query]]:
        """The components of every query of every image at (threshold, refinement)."""

        if key not in self._cands:
            (method, value), refine = key
            spec = ThresholdSpec(method, value)
            pp = self.base.postprocess
            out = {}
            for im in self.images.values():
                maps = self.maps(im, refine)
                qs = []
                for k, h in enumerate(maps):
                    # components below the configured minimum area can never be emitted (the searched
                    # minimum areas only add to it), alone or in a union
                    found = find_instances(h, spec, instances="components", min_area=pp.min_area, opening=pp.opening,
                                           closing=pp.closing, fill_holes=pp.fill_holes)
                    if not len(found):
                        continue
                    areas = found.areas
                    # AP reads a detection's mask only where its class has ground truth in the image (an
                    # IoU); elsewhere it is a false positive whatever its shape
                    need = self._all_masks or (im.id, im.category_ids[k]) in self._gt_pairs
                    rles, boxes = [], []
                    oy, ox = found.offset
                    for j in range(len(found)):
                        y0, y1, x0, x1 = found.box(j)
                        boxes.append((x0 + ox, y0 + oy, x1 - x0, y1 - y0))
                        if need:
                            r = found.rle(j)
                            rles.append({"size": r["size"], "counts": r["counts"].decode("ascii")})
                        else:
                            rles.append(None)
                    means = found.mean(h)
                    pres = float(im.presence[k])
                    qs.append(Query(k, im.category_ids[k], im.record.queries[k], pres, rles, boxes,
                                    [int(a) for a in areas], (means * areas).tolist(),
                                    [combine(pres, float(m)) for m in means]))
                out[im.id] = qs
            self._cands[key] = out
        return self._cands[key]

    def _union(self, key: tuple, image_id: int, q: Query, n: int) -> tuple:
        """The first ``n`` components of ``q`` as one instance: RLE, area, score, box."""
        from pycocotools import mask as mask_utils

        uid = (key, image_id, q.index, n)
        if uid not in self._unions:
            if n == 1 or q.rles[0] is None:
                rle = q.rles[0]
            else:
                merged = mask_utils.merge([{"size": r["size"], "counts": r["counts"].encode()} for r in q.rles[:n]])
                rle = {"size": merged["size"], "counts": merged["counts"].decode("ascii")}
            area = int(sum(q.areas[:n]))
            # the post-processor's mean over a union: the components' sums added in order, over the total area
            mean = sum(q.sums[:n]) / float(np.sum(np.asarray(q.areas[:n], dtype=np.float64)))
            b = np.asarray(q.boxes[:n])
            x0, y0 = b[:, 0].min(), b[:, 1].min()
            box = (int(x0), int(y0), int((b[:, 0] + b[:, 2]).max() - x0), int((b[:, 1] + b[:, 3]).max() - y0))
            self._unions[uid] = (rle, area, combine(q.presence, float(mean)), box)
        return self._unions[uid]

    def results(self, s: Setting, ids: list[int]) -> list[dict]:
        """COCO results of ``s`` on the images ``ids``, as ``ovlabel postprocess`` would write them (each
        carries ``_uid``, the candidate's identity)."""
        pp = self.base.postprocess
        names = {c["name"] for c in self.gt.dataset["categories"]} & set(s.class_thresholds)
        tables = {name: self.candidates(s.key(name)) for name in names}
        default = self.candidates(s.key())
        key_of = {name: s.key(name) for name in names}
        out = []
        for i in ids:
            im = self.images[i]
            H, W = im.size
            min_area = max(1, int(pp.min_area), int(np.ceil(s.min_area_fraction * H * W)))
            qs = sorted([q for q in default[i] if q.label not in names]
                        + [q for name in names for q in tables[name][i] if q.label == name], key=lambda q: q.index)
            kept = []
            for q in qs:
                if q.presence < s.presence_threshold:
                    continue
                key = key_of.get(q.label, s.key())
                if s.instances == "class":
                    n = sum(a >= min_area for a in q.areas)  # largest first: a prefix
                    if n == 0:
                        continue
                    rle, area, score, box = self._union(key, i, q, n)
                    parts = [Candidate(score, (q.index, 0), q.index, rle, q.presence, box=box, area=area,
                                       uid=(key, i, q.index, "u", n))]
                else:
                    parts = [Candidate(q.scores[j], (q.index, j), q.index, q.rles[j], q.presence, box=q.boxes[j],
                                       area=q.areas[j], uid=(key, i, q.index, "c", j))
                             for j in range(len(q.areas)) if q.areas[j] >= min_area]
                kept += [c for c in parts if c.score >= pp.score_threshold]
            kept.sort(key=Candidate.rank)
            if pp.nms is not None:
                kept = self._nms(kept)
            for c in kept[: pp.max_detections]:
                out.append({"image_id": i, "category_id": im.category_ids[c.query], "segmentation": c.rle,
                            "bbox": [float(v) for v in c.box], "score": c.score, "area": c.area, "_uid": c.uid})
        return out

    def _nms(self, kept: list[Candidate]) -> list[Candidate]:
        """The post-processor's NMS over one image's candidates (best first)."""
        if len(kept) < 2:
            return kept
        if self.base.postprocess.nms == "mask":
            objs = [{"size": c.rle["size"], "counts": c.rle["counts"].encode()} for c in kept]
        else:
            objs = [[float(v) for v in c.box] for c in kept]
        return [kept[i] for i in greedy_nms(objs, self.base.postprocess.nms_iou)]

    # -------------------------------------------------------------------------------------- metrics
    def score(self, s: Setting, ids: list[int], category: int | None = None) -> float:
        """The metric of ``s`` on images ``ids`` (of one category with ``category``)."""
        memo = (s.frozen(), tuple(ids), category)
        if memo not in self._scores:
            self.evaluations += 1
            res = self.results(s, ids)
            if self.metric == "miou":
                self._scores[memo] = self._miou(res, ids)
            elif self.metric in DATASET_METRICS:
                self._scores[memo] = self.dataset_quality(s, res, ids, category).f1
            else:
                self._scores[memo] = self._ap(res, ids, category)
        return self._scores[memo]

    def dataset_quality(self, s: Setting, res: list[dict], ids: list[int],
                        category: int | None = None) -> DatasetQuality:
        """Precision and recall (mask IoU 0.5) of the ``dataset.json`` that ``res`` gives: the results
        scoring at least the setting's dataset threshold, one class per mask (``export.dataset_class_iou``)."""
        by: dict[int, list[dict]] = defaultdict(list)
        for r in res:
            by[r["image_id"]].append(r)
        min_score = s.dataset_min_score if s.dataset_min_score is not None else self.base.export.dataset_min_score
        kept = []
        for group in by.values():
            dropped = cross_class_duplicates(group, min_score, self.base.export.dataset_class_iou)
            kept += [r for i, r in enumerate(group) if i not in dropped and r["score"] >= min_score]
        if category is not None:
            kept = [r for r in kept if r["category_id"] == category]
        return dataset_quality(self.gt, kept, image_ids=ids, category_ids=None if category is None else [category])

    def _ap(self, res: list[dict], ids: list[int], category: int | None) -> float:
        if not res:
            return 0.0
        cats = [category] if category is not None else sorted(
            {a["category_id"] for a in self.gt.loadAnns(self.gt.getAnnIds(imgIds=ids))})
        if self._eval is None:
            self._eval = _cached_eval_class()(self.gt, "bbox" if self.metric == "bbox-ap" else "segm")
        with contextlib.redirect_stdout(io.StringIO()):
            p = self._eval.run(res, ids, cats)  # [T,R,K]: as COCOeval.summarize reads AP and AP50
        if self.metric == "segm-ap50":
            p = p[0]
        p = p[p > -1]
        return float(p.mean()) if p.size else 0.0

    def _miou(self, res: list[dict], ids: list[int]) -> float:
        acc = ClassIoU()
        by: dict[int, list] = {}
        for r in res:
            by.setdefault(r["image_id"], []).append(r)
        for i in ids:
            img = self.gt.imgs[i]
            shape = (img["height"], img["width"])
            g: dict = {}
            for a in self.gt.loadAnns(self.gt.getAnnIds(imgIds=[i], iscrowd=None)):
                m = self.gt.annToMask(a).astype(bool)
                g[a["category_id"]] = g[a["category_id"]] | m if a["category_id"] in g else m
            p: dict = {}
            for r in by.get(i, []):
                m = decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}) > 0
                p[r["category_id"]] = p[r["category_id"]] | m if r["category_id"] in p else m
            acc.update(p, g, shape)
        return float(acc.result()["miou"]) if acc.union else 0.0

    # --------------------------------------------------------------------------------------- search
    def start(self) -> Setting:
        pp = self.base.postprocess
        return Setting((pp.threshold.method, pp.threshold.value), pp.instances,
                       pp.refine.method if pp.refine.method in self.refiners else "none", pp.min_area_fraction,
                       pp.presence_threshold,
                       {k: (v.method, v.value) for k, v in pp.class_thresholds.items()},
                       self.base.export.dataset_min_score if self.metric in DATASET_METRICS else None)

    def search(self, ids: list[int], per_class: bool) -> tuple[Setting, float]:
        best = self.start()
        best.class_thresholds = {}
        value = self.score(best, ids)
        grids = [("threshold", THRESHOLDS), ("instances", ("components", "class")), ("refine", self.refiners),
                 ("min_area_fraction", MIN_AREA_FRACTIONS), ("presence_threshold", PRESENCE)]
        if self.metric in DATASET_METRICS:
            grids.append(("dataset_min_score", DATASET_MIN_SCORES))
        for _ in range(2):
            changed = False
            for name, grid in grids:
                for v in grid:
                    if getattr(best, name) == v:
                        continue
                    trial = copy.copy(best)
                    setattr(trial, name, v)
                    got = self.score(trial, ids)
                    if got > value + 1e-9:
                        best, value, changed = trial, got, True
            if not changed:
                break
        if per_class:
            best = copy.copy(best)
            best.class_thresholds = {}
            counts: dict[int, int] = {}
            for a in self.gt.loadAnns(self.gt.getAnnIds(imgIds=ids, iscrowd=False)):
                counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
            for cat in self.gt.dataset["categories"]:
                if counts.get(cat["id"], 0) < self.min_instances:
                    continue  # too few instances to tune on: the global threshold
                own = self.score(best, ids, cat["id"])
                for thr in THRESHOLDS:
                    if thr == best.threshold:
                        continue
                    trial = copy.copy(best)
                    trial.class_thresholds = {**best.class_thresholds, cat["name"]: thr}
                    got = self.score(trial, ids, cat["id"])
                    if got > own + 1e-9:
                        own, best = got, trial
            value = self.score(best, ids)
        return best, value


def calibrate(heatmap_dir: str | Path, gt: str | Path, out: str | Path, *, metric: str = "segm-ap",
              per_class: bool = False, folds: int = 5, config: Any = None, images: str | Path | None = None,
              seed: int = 0, min_instances: int = 10, progress: bool = False) -> dict:
    """Search, cross-validate and write ``out`` (a config usable with ``--config``; see the module
    docstring). Returns the calibration record."""

    t0 = time.perf_counter()
    cal = Calibrator(heatmap_dir, gt, config=config, images=images, metric=metric, min_instances=min_instances)
    ids = sorted(cal.images)
    if folds < 2 or folds > len(ids):
        raise InputError(f"--folds must be between 2 and the number of images ({len(ids)}), got {folds}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = [sorted(ids[j] for j in order[f::folds]) for f in range(folds)]
    start = cal.start()
    cv = []
    bar = tqdm(total=folds + 1, desc="ovlabel calibrate: search on fold 1", unit="search", disable=not progress,
               dynamic_ncols=True)
    for f, held in enumerate(parts):
        train = sorted(set(ids) - set(held))
        tuned, _ = cal.search(train, per_class)
        cv.append({"fold": f, "images": len(held), "start": cal.score(start, held), "tuned": cal.score(tuned, held)})
        bar.update()
        bar.set_description(f"ovlabel calibrate: search on fold {f + 2}" if f + 1 < folds else
                            "ovlabel calibrate: final search on all images")
    final, value = cal.search(ids, per_class)
    bar.update()
    bar.close()
    gain = float(np.mean([c["tuned"] - c["start"] for c in cv]))
    record = {
        "metric": metric, "images": len(ids), "folds": cv,
        "held_out": {"start": float(np.mean([c["start"] for c in cv])),
                     "tuned": float(np.mean([c["tuned"] for c in cv])), "gain": gain},
        "all_images": {"start": cal.score(start, ids), "tuned": value},
        "chosen": {"threshold": list(final.threshold), "instances": final.instances, "refine": final.refine,
                   "min_area_fraction": final.min_area_fraction, "presence_threshold": final.presence_threshold,
                   "class_thresholds": {k: list(v) for k, v in final.class_thresholds.items()},
                   **({"dataset_min_score": final.dataset_min_score} if final.dataset_min_score is not None else {})},
        "searched": {"thresholds": [list(t) for t in THRESHOLDS], "instances": ["components", "class"],
                     "refine": list(cal.refiners), "min_area_fraction": list(MIN_AREA_FRACTIONS),
                     "presence_threshold": list(PRESENCE), "per_class": per_class, "min_instances": min_instances,
                     **({"dataset_min_score": list(DATASET_MIN_SCORES)} if metric in DATASET_METRICS else {})},
        "heatmaps": str(Path(heatmap_dir).absolute()), "ground_truth": str(Path(gt).absolute()),
        "evaluations": cal.evaluations, "seconds": round(time.perf_counter() - t0, 1),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    cfg = apply(cal.base, final)
    cfg["calibration"] = record
    write_text(out, overlay_yaml(cfg))
    return record


LABEL_SECTIONS = ("model", "explainer", "preprocess", "queries", "postprocess")  # what the labels depend on


def apply(base: Config, s: Setting) -> dict:
    """The overlay of the setting ``s``: the searched settings, and those of the base configuration that
    the labels depend on (the maps were made and the search scored with them) where they differ from what
    the model alone gives (the defaults and the model's preset, which loading the overlay puts under it).
    Nothing of ``export`` (but the tuned dataset threshold) or ``run``: those are the run's, not the labels'."""
    data = base.model_dump(exclude={"extends", "calibration"})
    pp = data["postprocess"]
    pp["threshold"] = {"method": s.threshold[0], "value": s.threshold[1]}
    pp["instances"] = s.instances
    pp["refine"]["method"] = s.refine
    pp["min_area_fraction"] = s.min_area_fraction
    pp["presence_threshold"] = s.presence_threshold
    pp["class_thresholds"] = {k: {"method": m, "value": v} for k, (m, v) in s.class_thresholds.items()}
    reference = load_config(None, [("model.name", base.model.name)]).model_dump(exclude={"extends", "calibration"})
    out = _diff({k: data[k] for k in LABEL_SECTIONS}, reference)
    out["model"] = {"name": base.model.name, **out.get("model", {})}  # the model names its preset: always said
    out = {k: out[k] for k in LABEL_SECTIONS if k in out}
    if s.dataset_min_score is not None:
        out["export"] = {"dataset_min_score": s.dataset_min_score}
    return out


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict) and k != "class_thresholds":
            d = _diff(v, b[k])
            if d:
                out[k] = d
        elif v != b.get(k):
            out[k] = v
    return out


def overlay_yaml(cfg: dict) -> str:
    import yaml

    rec = cfg.get("calibration", {})
    h = rec.get("held_out", {})
    head = (f"# ovlabel calibrate: {rec.get('metric')} on {rec.get('images')} labelled images; held-out gain "
            f"{100 * h.get('gain', 0):+.1f} points ({100 * h.get('start', 0):.1f} -> {100 * h.get('tuned', 0):.1f}, "
            f"{len(rec.get('folds', []))} folds). Use: --config THIS_FILE\n")
    return head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def _cached_eval_class():
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class CachedEval(COCOeval):
        """pycocotools' COCOeval — its matching (``evaluateImg``) and accumulation unchanged — fed with
        the calibrator's results directly, scoring what AP and AP50 read (all areas, 100 detections), and
        remembering work by the candidates' identities (``_uid``): a candidate's IoUs with the ground
        truth are computed once, and an (image, class) whose detections did not change is not matched
        again. The ground truth is prepared once, as ``COCOeval._prepare`` prepares it."""

        def __init__(self, gt, iou_type):
            super().__init__(gt, None, iou_type)
            self.params.areaRng, self.params.areaRngLbl, self.params.maxDets = [[0, 1e10]], ["all"], [100]
            self.gt_index: dict[tuple[int, int], list[dict]] = {}
            for ann in gt.loadAnns(gt.getAnnIds()):
                g = dict(ann)
                if iou_type == "segm":
                    g["segmentation"] = gt.annToRLE(ann)
                g["ignore"] = bool(g.get("iscrowd", 0))  # what _prepare sets
                self.gt_index.setdefault((g["image_id"], g["category_id"]), []).append(g)
            self.iou_rows: dict[tuple, np.ndarray] = {}
            self.matched: dict[tuple, dict | None] = {}

        def run(self, results: list[dict], ids: list[int], cats: list[int]) -> np.ndarray:
            p = self.params
            p.imgIds, p.catIds = sorted(set(ids)), sorted(set(cats))
            self._dts = defaultdict(list)  # as COCOeval._prepare builds them
            for n, r in enumerate(results):
                self._dts[r["image_id"], r["category_id"]].append({**r, "id": n + 1})
            self._gts = defaultdict(list, self.gt_index)
            self.ious = {}
            self.evalImgs = [self._matched(i, c) for c in p.catIds for i in p.imgIds]
            self._paramsEval = copy.deepcopy(p)
            self.accumulate()
            return self.eval["precision"][:, :, :, 0, 0]

        def _matched(self, img: int, cat: int):
            dts = self._dts.get((img, cat), [])
            key = (img, cat, tuple(d["_uid"] for d in dts))
            if key not in self.matched:
                self.ious[img, cat] = self.computeIoU(img, cat)
                self.matched[key] = self.evaluateImg(img, cat, self.params.areaRng[0], self.params.maxDets[-1])
            return self.matched[key]

        def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
            gt, dt = self._gts.get((imgId, catId), []), self._dts.get((imgId, catId), [])
            if len(gt) == 0 or len(dt) == 0:
                return []
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][: self.params.maxDets[-1]]
            field = "segmentation" if self.params.iouType == "segm" else "bbox"
            todo = [d for d in dt if (d["_uid"], imgId, catId) not in self.iou_rows]
            if todo:
                rows = mask_utils.iou([d[field] for d in todo], [g[field] for g in gt],
                                      [int(g["iscrowd"]) for g in gt])
                for d, row in zip(todo, np.asarray(rows).reshape(len(todo), len(gt))):
                    self.iou_rows[d["_uid"], imgId, catId] = row
            return np.stack([self.iou_rows[d["_uid"], imgId, catId] for d in dt])

    return CachedEval
