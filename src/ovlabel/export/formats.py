"""Dataset exporters: the pseudo-label dataset in the formats training code reads. Torch-free.

Every exporter runs after the records are merged (``ovlabel label``, ``ovlabel merge``, ``ovlabel
postprocess``) and reads the finished ``dataset.json``, so all formats hold exactly the same labels (those
scoring at least ``export.dataset_min_score``). One exporter is one function registered by name with
:func:`register_exporter`; ``export.formats`` lists those a run writes (``ovlabel formats`` prints them).

Built in:

* ``masks-instance`` — ``masks/<id>_<name>.png``, 16-bit, one value per annotation of the image (1..n by
  descending score, 0 = background; where instances overlap the pixel holds the higher-scoring one),
  and ``masks/<id>_<name>.json`` mapping each value to its annotation id, category id and name, score,
  and the file that holds its mask whole (``complete_in``, relative to ``masks/``): an instance partly
  hidden by better ones is also written in ``layers/<id>_<name>.layer<i>.png``, where no two instances
  overlap — nothing is lost;
* ``masks-semantic`` — the same files with pixel value = category id (1..65,535; 0 = background), the
  best-scoring annotation winning overlaps; the JSON maps each value to its category name;
* ``yolo-seg`` / ``yolo-det`` — an Ultralytics YOLO dataset in ``yolo-seg/`` or ``yolo-det/``:
  ``images/<file name>`` (symbolic links to the images), ``labels/<file name>.txt`` (one line per
  annotation: class index, then the polygon of its mask — the outer boundary of its largest part — or its
  box centre and size, normalised to [0, 1]; an empty file for an image without labels), ``data.yaml``
  (``path``, ``train``/``val`` = ``images``, ``names``: class index → category name) and
  ``categories.json`` (class index → COCO category id, since YOLO classes are 0..C-1).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..common.files import atomic_write, contained, fsync_dir, json_text, output_stem, write_json, write_text
from ..config import formats_of
from ..errors import InputError
from ..postprocess.rle import decode
from .coco import check_png_category_ids, mask_polygons
from .records import DATASET, finalize

log = logging.getLogger(__name__)


@dataclass
class ExportContext:
    """What an exporter gets: the COCO dataset, the run folder, and where each image is."""

    dataset: dict
    out_dir: Path
    image_paths: dict[int, Path] = field(default_factory=dict)

    def annotations_by_image(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {img["id"]: [] for img in self.dataset["images"]}
        for a in self.dataset["annotations"]:
            out.setdefault(a["image_id"], []).append(a)
        return out


Exporter = Callable[[ExportContext], dict]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Register ``fn(ctx: ExportContext) -> summary dict`` as the format ``name``."""

    def wrap(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn

    return wrap


def check_formats(formats: list[str]) -> None:
    """Refuse (``InputError``) format names that no exporter is registered under, listing those that are."""
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise InputError(f"unknown export format(s) {unknown}; available: {', '.join(sorted(EXPORTERS))}")


def export(formats: list[str], dataset_path: str | Path, out_dir: str | Path,
           image_paths: dict[int, Path] | None = None) -> dict[str, dict]:
    """Write each of ``formats`` from ``dataset_path`` (a ``dataset.json``) into ``out_dir``."""
    check_formats(formats)
    if not formats:
        return {}
    with open(dataset_path, encoding="utf-8") as f:
        dataset = json.load(f)
    ctx = ExportContext(dataset, Path(out_dir), dict(image_paths or {}))
    return {name: EXPORTERS[name](ctx) for name in formats}


def write_dataset(record_paths, out_dir: str | Path, categories, *, export_cfg: dict, gt=None,
                  image_root: str | Path | None = None, image_paths: dict[int, Path] | None = None) -> dict:
    """The end of every run, merge or re-threshold: records → ``predictions.json`` and ``dataset.json``
    (:func:`ovlabel.export.records.finalize`), then the dataset formats the ``export`` section asks for."""

    info = {"description": "ovlabel pseudo-labels", "version": __version__}
    if image_root is not None:
        info["image_root"] = str(image_root)
    out_dir = Path(out_dir)
    merged = finalize(record_paths, out_dir, categories, gt=gt, segmentation=export_cfg.get("segmentation", "rle"),
                      info=info, dataset_min_score=float(export_cfg.get("dataset_min_score") or 0.0))
    merged["formats"] = export(formats_of(export_cfg), out_dir / DATASET, out_dir, image_paths)
    return merged


def _rle(a: dict, height: int, width: int) -> dict:
    """An annotation's segmentation as a pycocotools RLE (``bytes`` counts)."""
    seg = a["segmentation"]
    if isinstance(seg, dict):
        counts = seg["counts"]
        return {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    from pycocotools import mask as mask_utils

    return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))


def _mask(a: dict, height: int, width: int) -> np.ndarray:
    """An annotation's mask ``[H,W]`` bool (RLE or polygons)."""
    return decode(_rle(a, height, width)).view(bool)


def _overlaps(rles: list[dict]) -> np.ndarray:
    """``[n,n]`` bool: whether masks ``i`` and ``j`` share a pixel, from the RLEs (pycocotools' ``iou``
    with the crowd rule gives intersection / area of ``i``; boxes that miss are skipped in C)."""
    from pycocotools import mask as mask_utils

    n = len(rles)
    if n < 2:
        return np.zeros((n, n), dtype=bool)
    inter = np.asarray(mask_utils.iou(rles, rles, [1] * n)).reshape(n, n) > 0
    np.fill_diagonal(inter, False)
    return inter


def _save_png(path: Path, values: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path, "wb", durable=False) as f:
        Image.fromarray(values).save(f, format="PNG")


def _masks(ctx: ExportContext, kind: str) -> dict:
    cats = {c["id"]: c["name"] for c in ctx.dataset["categories"]}
    if kind == "semantic":
        check_png_category_ids(cats)
    folder = ctx.out_dir / "masks"
    by_image = ctx.annotations_by_image()
    n = 0
    for img in ctx.dataset["images"]:
        H, W = int(img["height"]), int(img["width"])
        anns = sorted(by_image.get(img["id"], []), key=lambda a: -a.get("score", 0.0))
        if len(anns) > 65535:
            raise InputError(f"image {img['id']} has {len(anns)} annotations; a 16-bit PNG holds 65,535")
        stem = output_stem(img["id"], img["file_name"])
        values: dict[str, dict] = {}
        if kind == "instance":
            # bounded work: the masks stay RLE; which instances overlap comes from pycocotools in C, and
            # the label image and each layer are painted one decoded mask at a time
            rles = [_rle(a, H, W) for a in anns]
            overlap = _overlaps(rles)
            out = np.zeros((H, W), dtype=np.uint16)
            for v in range(len(anns), 0, -1):  # lowest score first: the best wins overlaps
                out[_mask(anns[v - 1], H, W)] = v
            # an instance partly hidden under better ones (one that overlaps a higher-scoring one) is also
            # written whole, in a layer file where no two instances overlap, so that every mask can be read
            # back exactly
            layers: list[list[int]] = []
            for i, a in enumerate(anns):
                where = f"{stem}.png"
                if overlap[i, :i].any():
                    free = next((k for k, members in enumerate(layers) if not overlap[i, members].any()), None)
                    if free is None:
                        layers.append([])
                        free = len(layers) - 1
                    layers[free].append(i)
                    where = f"layers/{stem}.layer{free + 1}.png"
                values[str(i + 1)] = {"annotation_id": a["id"], "category_id": a["category_id"],
                                      "name": cats[a["category_id"]], "score": a.get("score"), "complete_in": where}
            for k, members in enumerate(layers, start=1):
                layer = np.zeros((H, W), dtype=np.uint16)
                for i in members:
                    layer[_mask(anns[i], H, W)] = i + 1
                _save_png(folder / "layers" / f"{stem}.layer{k}.png", layer)
        else:
            top = max(cats, default=0)
            out = np.zeros((H, W), dtype=np.uint16 if top > 255 else np.uint8)
            for a in reversed(anns):
                out[_mask(a, H, W)] = a["category_id"]
            values = {str(c): {"category_id": c, "name": cats[c]} for c in sorted({a["category_id"] for a in anns})}
        _save_png(folder / f"{stem}.png", out)
        write_text(folder / f"{stem}.json", json_text(
            {"image_id": img["id"], "file_name": img["file_name"], "kind": kind, "background": 0,
             "values": values}, indent=1), durable=False)
        n += 1
    if n:
        fsync_dir(folder)
        if (folder / "layers").is_dir():
            fsync_dir(folder / "layers")
    return {"folder": "masks", "images": n}


@register_exporter("masks-instance")
def masks_instance(ctx: ExportContext) -> dict:
    return _masks(ctx, "instance")


@register_exporter("masks-semantic")
def masks_semantic(ctx: ExportContext) -> dict:
    return _masks(ctx, "semantic")


def _yolo(ctx: ExportContext, task: str) -> dict:
    import yaml

    root = ctx.out_dir / f"yolo-{task}"
    cats = ctx.dataset["categories"]
    index = {c["id"]: i for i, c in enumerate(cats)}
    by_image = ctx.annotations_by_image()
    missing = [img["file_name"] for img in ctx.dataset["images"] if img["id"] not in ctx.image_paths]
    if missing:
        raise InputError(f"the YOLO export links the images, but where {missing[:3]} are is not known; give the "
                         "images folder (--images)")
    n_labels = 0
    skipped: list[dict] = []
    for img in ctx.dataset["images"]:
        H, W = int(img["height"]), int(img["width"])
        try:  # a name read from dataset.json never leads a link, unlink or write outside this dataset
            link = contained(root / "images", img["file_name"], for_writing=True)
            label = contained(root / "labels", str(Path(img["file_name"]).with_suffix(".txt")), for_writing=True)
        except InputError as e:
            log.warning("yolo-%s: image %s left out: %s", task, img["id"], e)
            skipped.append({"image_id": img["id"], "file_name": img["file_name"], "error": str(e)})
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        target = Path(os.path.abspath(ctx.image_paths[img["id"]]))
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)
        lines = []
        for a in sorted(by_image.get(img["id"], []), key=lambda a: a["id"]):
            cls = index[a["category_id"]]
            if task == "det":
                x, y, w, h = a["bbox"]
                lines.append(f"{cls} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}")
                continue
            polys = mask_polygons(_mask(a, H, W))
            if not polys:
                continue
            poly = max(polys, key=_polygon_area)
            xy = np.asarray(poly).reshape(-1, 2) / np.array([W, H])
            lines.append(f"{cls} " + " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).reshape(-1)))
        n_labels += len(lines)
        write_text(label, "".join(line + "\n" for line in lines), durable=False)
    for sub in ("images", "labels"):
        fsync_dir(root / sub)
    names = {i: c["name"] for i, c in enumerate(cats)}
    write_text(root / "data.yaml", yaml.safe_dump({"path": str(root.absolute()), "train": "images", "val": "images",
                                                   "names": names}, sort_keys=False, allow_unicode=True))
    write_json(root / "categories.json", {str(i): {"category_id": c["id"], "name": c["name"]}
                                          for i, c in enumerate(cats)}, indent=1)
    summary = {"folder": root.name, "images": len(ctx.dataset["images"]) - len(skipped), "labels": n_labels}
    if skipped:
        summary["skipped"] = skipped
    return summary


def _polygon_area(poly: list[float]) -> float:
    xy = np.asarray(poly).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2)


@register_exporter("yolo-seg")
def yolo_seg(ctx: ExportContext) -> dict:
    return _yolo(ctx, "seg")


@register_exporter("yolo-det")
def yolo_det(ctx: ExportContext) -> dict:
    return _yolo(ctx, "det")
