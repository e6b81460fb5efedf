"""``Postprocessor``: the maps of one image → scored instance masks and boxes (``Detections``).

Queries are processed one at a time — map at full resolution → threshold → components → compact
candidates (RLE, score) → map freed — so memory stays at a few full-resolution maps whatever the number
of queries; masks are never materialised for candidates, and NMS and top-k run on RLEs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import InputError
from .detections import Detections
from .geometry import ImageMaps, minmax
from .masks import ThresholdSpec, find_instances
from .refine import RefineSpec
from .scoring import combine

REFINE_CHUNK_PIXELS = 2**23  # maps refined together (32 MB of float32)
NMS_KINDS = (None, "mask", "box")


def _in_order(fn, items: list, threads: int):
    """``(item, fn(item))`` in the order of ``items``, computed by up to ``threads`` threads with at most
    ``threads`` results waiting (so that a few full-resolution maps are alive at a time)."""
    if threads <= 1 or len(items) <= 1:
        for it in items:
            yield it, fn(it)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ovlabel-post") as pool:
        pending = deque()
        queue = iter(items)
        for it in queue:
            pending.append((it, pool.submit(fn, it)))
            if len(pending) >= threads:
                break
        while pending:
            it, fut = pending.popleft()
            result = fut.result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield it, result


def nms(dets: Detections, iou_threshold: float, kind: str = "mask") -> Detections:
    """Greedy cross-class non-maximum suppression on mask or box IoU (pycocotools)."""
    if len(dets) < 2:
        return dets
    dets = dets.sorted()
    if kind == "mask":
        objs = dets.raw_rles()
    elif kind == "box":
        objs = dets.boxes.tolist()
    else:
        raise InputError(f"nms must be 'mask' or 'box', got {kind!r}")
    return dets.select(greedy_nms(objs, iou_threshold))


def greedy_nms(objs: list, iou_threshold: float) -> list[int]:
    """Indices kept by greedy NMS over ``objs`` (RLEs or ``[x,y,w,h]`` boxes, best first)."""
    iou = mask_utils.iou(objs, objs, [0] * len(objs))
    keep: list[int] = []
    for i in range(len(objs)):
        if all(iou[i, j] <= iou_threshold for j in keep):
            keep.append(i)
    return keep


def as_image_maps(heatmaps: Any) -> ImageMaps:
    """``ImageMaps``, a ``[K,H,W]`` array or tensor → ``ImageMaps`` (arrays are taken as full resolution)."""
    if isinstance(heatmaps, ImageMaps):
        return heatmaps
    if hasattr(heatmaps, "detach"):  # a torch tensor
        heatmaps = heatmaps.detach().cpu().numpy()
    heat = np.asarray(heatmaps)
    if heat.ndim != 3:
        raise InputError(f"heatmaps must be [K,H,W], got shape {heat.shape}")
    K, H, W = heat.shape
    if H == 0 or W == 0:
        raise InputError(f"heatmaps have zero area ({W}x{H})")
    return ImageMaps(heat, (H, W))


class Candidate(NamedTuple):
    """A region that may become a detection — the one candidate type of the post-processor and the
    calibrator: its score (presence × evidence), its rank among equal scores (``order``: arrival), the
    query it belongs to and its mask (RLE, ``str`` counts; ``None`` where nothing reads it). The
    post-processor also keeps presence and evidence; the calibrator the box, the area and an identity."""

    score: float
    order: Any
    query: int
    rle: dict | None
    presence: float = 1.0
    evidence: float = 0.0
    box: tuple | None = None
    area: int | None = None
    uid: Any = None

    def rank(self) -> tuple:
        """Sort key: best score first, then arrival."""
        return (-self.score, self.order)


@dataclass(frozen=True)
class Postprocessor:
    """Thresholds, morphology, instances and scores, with explicit arguments (see ``from_config``).

    ``min_area`` is in pixels of the heatmap (the original image); ``min_area_fraction`` is relative to
    the image area; the larger applies. ``class_thresholds`` overrides ``threshold`` per label.
    ``threads``: queries of large images (≥ 1 megapixel) processed at once (results do not depend on it).
    """

    threshold: ThresholdSpec = ThresholdSpec("max_fraction", 0.5)
    class_thresholds: Mapping[str, ThresholdSpec] = field(default_factory=dict)
    instances: str = "components"
    min_area: int = 16
    min_area_fraction: float = 0.005
    opening: int = 0
    closing: int = 0
    fill_holes: bool = True
    presence_threshold: float = 0.0
    score_threshold: float = 0.0
    max_detections: int = 100
    nms: str | None = None
    nms_iou: float = 0.5
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    refine: RefineSpec = RefineSpec()

    def __post_init__(self) -> None:
        if self.nms not in NMS_KINDS:
            raise InputError(f"nms must be one of {NMS_KINDS}, got {self.nms!r}")
        if self.max_detections < 0:
            raise InputError(f"max_detections must be >= 0, got {self.max_detections}")

    @classmethod
    def from_config(cls, cfg) -> Postprocessor:
        """From the ``postprocess`` section of a run config (:class:`ovlabel.config.PostprocessConfig`)."""
        return cls(
            threshold=ThresholdSpec(cfg.threshold.method, cfg.threshold.value),
            class_thresholds={k: ThresholdSpec(v.method, v.value) for k, v in cfg.class_thresholds.items()},
            instances=cfg.instances,
            min_area=cfg.min_area,
            min_area_fraction=cfg.min_area_fraction,
            opening=cfg.opening,
            closing=cfg.closing,
            fill_holes=cfg.fill_holes,
            presence_threshold=cfg.presence_threshold,
            score_threshold=cfg.score_threshold,
            max_detections=cfg.max_detections,
            nms=cfg.nms,
            nms_iou=cfg.nms_iou,
            refine=RefineSpec(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in cfg.refine.model_dump().items()}),
        )

    def __call__(
        self,
        heatmaps: ImageMaps | np.ndarray,
        labels: Sequence[str],
        category_ids: Sequence[int],
        presence: Sequence[float] | np.ndarray | None = None,
        *,
        stats: dict | None = None,
        image: np.ndarray | None = None,
    ) -> Detections:
        """The maps of one image — ``ImageMaps`` or a ``[K,H,W]`` array (normalised or raw) — → its
        detections, best first. ``stats`` (a dict) counts where candidates went: ``queries``, ``absent``
        (below the presence threshold), ``no_region`` (nothing above the threshold and minimum area),
        ``candidates``, ``below_score``. ``image`` (RGB ``uint8`` at the maps' size) is needed by
        ``refine`` (:mod:`ovlabel.postprocess.refine`)."""
        maps = as_image_maps(heatmaps)
        K = len(maps)
        if len(labels) != K or len(category_ids) != K:
            raise InputError(f"{K} heatmaps but {len(labels)} labels and {len(category_ids)} category ids")
        pres = np.ones(K) if presence is None else np.asarray(presence, dtype=np.float64).reshape(-1)
        if pres.shape != (K,) or not np.isfinite(pres).all() or pres.min() < 0 or pres.max() > 1:
            raise InputError(f"presence must be {K} finite values in [0,1], got {pres.tolist()[:8]}")
        kept, tally = self.candidates(maps, labels, pres, image)
        if stats is not None:
            for key, v in tally.items():
                stats[key] = stats.get(key, 0) + int(v)
        return self.detections(kept, maps.size, labels, category_ids)

    def candidates(self, maps: ImageMaps, labels: Sequence[str], pres: np.ndarray,
                   image: np.ndarray | None = None) -> tuple[list[Candidate], dict[str, int]]:
        """The candidates that can still be emitted, one query at a time, and the tallies. Without NMS only
        the best ``max_detections`` can be emitted, so a candidate's RLE is built only while it is among
        them (ties rank by arrival, as a stable sort would); with NMS every candidate needs its mask."""
        K = len(maps)
        H, W = maps.size
        min_area = max(int(self.min_area), int(np.ceil(self.min_area_fraction * H * W)))
        cap = None if self.nms is not None else int(self.max_detections)
        kept: list[Candidate] = []
        worst: tuple[float, int] | None = None  # (score, position in `kept`) of the candidate to evict
        n = 0
        active = [k for k in range(K) if pres[k] >= self.presence_threshold]
        tally = {"queries": K, "absent": K - len(active), "no_region": 0, "candidates": 0, "below_score": 0}
        for k in active:
            if not maps.finite(k):
                raise InputError(f"heatmaps [{k}] contain NaN or infinite values")

        refiner = self.refine.for_image(image)
        if refiner is not None and refiner.size != (H, W):
            raise InputError(f"the image is {refiner.size[1]}x{refiner.size[0]} but its maps are {W}x{H}")

        refined: dict[int, np.ndarray] = {}

        def instances(k: int):
            h = minmax(refined.pop(k) if refiner is not None else maps.query(k), inplace=True)
            spec = self.class_thresholds.get(labels[k], self.threshold)
            found = find_instances(h, spec, instances=self.instances, min_area=min_area, opening=self.opening,
                                   closing=self.closing, fill_holes=self.fill_holes)
            return found, found.mean(h)

        def in_order():
            """``(k, (instances, means))`` of the active queries in order; refined maps are made a chunk of
            queries at a time (one pass of the refiner for several maps, memory bounded by the chunk)."""
            threads = self.threads if H * W >= 2**20 else 1
            step = max(1, len(active) if refiner is None else REFINE_CHUNK_PIXELS // (H * W))
            for i in range(0, len(active), step):
                chunk = active[i : i + step]
                if refiner is not None:
                    refined.update(zip(chunk, refiner.refine_many(np.stack([maps.query(k) for k in chunk]))))
                yield from _in_order(instances, chunk, threads=threads)

        for k, (found, means) in in_order():
            tally["no_region"] += len(means) == 0
            tally["candidates"] += len(means)
            for j, ev in enumerate(means):
                score = combine(float(pres[k]), float(ev))
                n += 1
                if score < self.score_threshold:
                    tally["below_score"] += 1
                    continue
                if cap is not None and len(kept) >= cap:
                    if cap == 0 or score <= worst[0]:
                        continue
                    kept[worst[1]] = Candidate(score, n, k, found.rle(j), float(pres[k]), float(ev))
                else:
                    kept.append(Candidate(score, n, k, found.rle(j), float(pres[k]), float(ev)))
                if cap is not None and len(kept) >= cap:
                    pos = min(range(len(kept)), key=lambda i: (kept[i].score, -kept[i].order))
                    worst = (kept[pos].score, pos)
            del found
        return kept, tally

    def detections(self, kept: list[Candidate], size: tuple[int, int], labels: Sequence[str],
                   category_ids: Sequence[int]) -> Detections:
        """The candidates, best first (then NMS and ``max_detections``), as :class:`Detections`."""
        if not kept:
            return Detections.empty(*size)
        kept = sorted(kept, key=Candidate.rank)
        dets = Detections.from_rles([c.rle for c in kept], size, [c.score for c in kept],
                                    [int(category_ids[c.query]) for c in kept], tuple(labels[c.query] for c in kept),
                                    presence=[c.presence for c in kept], evidence=[c.evidence for c in kept])
        if self.nms is not None:
            dets = nms(dets, self.nms_iou, self.nms).select(slice(0, self.max_detections))
        return dets
