"""Dataset exporters: the pseudo-label dataset in the formats training code reads. Torch-free.

Every exporter runs after the records are merged (``ovlabel label``, ``ovlabel merge``, ``ovlabel
postprocess``) and reads the finished ``dataset.json``, so all formats hold exactly the same labels (those
scoring at least ``export.dataset_min_score``). One exporter is one function registered by name with
:func:`register_exporter`; ``export.formats`` lists those a run writes (``ovlabel formats`` prints them).

Built in:

Each format writes its own folder, named after it, so no two formats share a file.

* ``masks-instance`` — ``masks-instance/<id>_<name>.png``, 16-bit, one value per annotation of the image
  (1..n by descending score, 0 = background; where instances overlap the pixel holds the higher-scoring
  one), and ``masks-instance/<id>_<name>.json`` mapping each value to its annotation id, category id and
  name, score, and the file that holds its mask whole (``complete_in``, relative to the folder): an
  instance partly hidden by better ones is also written in ``layers/<id>_<name>.layer<i>.png``, where no two
  instances overlap — nothing is lost;
* ``masks-semantic`` — ``masks-semantic/``: the same files with pixel value = category id (1..65,535;
  0 = background), the best-scoring annotation winning overlaps; the JSON maps each value to its category;
* ``yolo-seg`` / ``yolo-det`` — an Ultralytics YOLO dataset in ``yolo-seg/`` or ``yolo-det/``:
  ``images/{train,val}/<file name>`` (relative symbolic links to the images, or hard links / copies with
  ``export.copy_images``), ``labels/{train,val}/<file name>.txt`` (one line per annotation: class index,
  then the polygon of its mask — the outer boundary of its largest part — or its box centre and size,
  normalised to [0, 1]; an empty file for an image without labels), ``data.yaml`` (``train``/``val`` and
  ``names``: class index → category name; no ``path``, so Ultralytics reads the dataset where
  ``data.yaml`` is and the folder can move), ``categories.json`` (class index → COCO category id, since
  YOLO classes are 0..C-1) and ``images.json`` (image id → its file in the dataset and its split). The
  split is deterministic: an image is in ``val`` when a hash of its id falls below
  ``export.val_fraction`` (at least one image when the fraction is above 0). Images whose names differ
  only by extension (``x.png``, ``x.jpg``) get distinct names (``x_<id>.png``), so no label file is shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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
    options: dict = field(default_factory=dict)  # the run's ``export`` section (val_fraction, copy_images, …)

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
           image_paths: dict[int, Path] | None = None, options: dict | None = None) -> dict[str, dict]:
    """Write each of ``formats`` from ``dataset_path`` (a ``dataset.json``) into ``out_dir``; ``options``:
    the ``export`` section."""
    check_formats(formats)
    if not formats:
        return {}
    with open(dataset_path, encoding="utf-8") as f:
        dataset = json.load(f)
    ctx = ExportContext(dataset, Path(out_dir), dict(image_paths or {}), dict(options or {}))
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
                      info=info, dataset_min_score=float(export_cfg.get("dataset_min_score") or 0.0),
                      dataset_class_iou=export_cfg.get("dataset_class_iou"))
    merged["formats"] = export(formats_of(export_cfg), out_dir / DATASET, out_dir, image_paths, export_cfg)
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
    folder = ctx.out_dir / f"masks-{kind}"
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
    return {"folder": folder.name, "images": n}


@register_exporter("masks-instance")
def masks_instance(ctx: ExportContext) -> dict:
    return _masks(ctx, "instance")


@register_exporter("masks-semantic")
def masks_semantic(ctx: ExportContext) -> dict:
    return _masks(ctx, "semantic")


def in_val(image_id: int, fraction: float) -> bool:
    """Whether image ``image_id`` is in the validation split: a hash of the id, uniform in [0, 1), below
    ``fraction`` (the same on every machine and run)."""
    return _unit_hash(image_id) < fraction


def _unit_hash(image_id: int) -> float:
    return int.from_bytes(hashlib.sha256(f"ovlabel-split:{int(image_id)}".encode()).digest()[:8], "big") / 2.0**64


def _split(ids: list[int], fraction: float) -> set[int]:
    """The validation image ids (at least one of two or more images when ``fraction`` > 0)."""
    val = {i for i in ids if in_val(i, fraction)}
    if fraction > 0 and not val and len(ids) >= 2:
        val = {min(ids, key=_unit_hash)}
    if len(val) == len(ids) and len(ids) >= 2:
        val.discard(max(ids, key=_unit_hash))
    return val


def _dataset_names(images: list[dict]) -> dict[int, str]:
    """Each image's file name inside a YOLO dataset (relative, as in ``dataset.json``): names whose label
    files would coincide (``x.png`` and ``x.jpg``, which both label as ``x.txt``) get the image id added."""
    stems: dict[str, list[int]] = {}
    for img in images:
        stems.setdefault(str(Path(img["file_name"]).with_suffix("")).casefold(), []).append(img["id"])
    out = {}
    for img in images:
        name = Path(img["file_name"])
        if len(stems[str(name.with_suffix("")).casefold()]) > 1:
            name = name.with_name(f"{name.stem}_{img['id']}{name.suffix}")
        out[img["id"]] = str(name)
    return out


def _place_image(source: Path, dest: Path, copy: bool) -> None:
    """``dest`` becomes the image: a relative symbolic link (the dataset and the images can move together),
    or with ``copy`` a hard link where the filesystem allows, else a copy (the dataset stands alone)."""
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    if not copy:
        os.symlink(os.path.relpath(source, dest.parent), dest)
        return
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _remove_previous(root: Path) -> None:
    """Remove the images and labels a previous export of this dataset listed in its ``images.json`` (a
    re-export may split or name them otherwise). Names read from the file are contained in the dataset."""
    listing = root / "images.json"
    if not listing.is_file():
        return
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
        images = [str(e["image"]) for e in entries.values()]
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("%s is not an ovlabel image list; earlier files there are left as they are", listing)
        return
    for image in images:
        parts = Path(image).parts
        if len(parts) < 3 or parts[0] != "images":
            continue
        label = str(Path("labels", *parts[1:]).with_suffix(".txt"))
        for name in (image, label):
            try:
                path = contained(root, name, for_writing=True)
            except InputError:
                continue
            if path.is_symlink() or path.is_file():
                path.unlink()


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
    fraction = float(ctx.options.get("val_fraction") or 0.0)
    copy = bool(ctx.options.get("copy_images"))
    _remove_previous(root)
    names = _dataset_names(ctx.dataset["images"])
    val = _split([img["id"] for img in ctx.dataset["images"]], fraction)
    n_labels = 0
    skipped: list[dict] = []
    placed: dict[str, dict] = {}
    for img in ctx.dataset["images"]:
        H, W = int(img["height"]), int(img["width"])
        split = "val" if img["id"] in val else "train"
        try:  # a name read from dataset.json never leads a link, unlink or write outside this dataset
            link = contained(root / "images" / split, names[img["id"]], for_writing=True)
            label = contained(root / "labels" / split, str(Path(names[img["id"]]).with_suffix(".txt")),
                              for_writing=True)
        except InputError as e:
            log.warning("yolo-%s: image %s left out: %s", task, img["id"], e)
            skipped.append({"image_id": img["id"], "file_name": img["file_name"], "error": str(e)})
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        _place_image(Path(os.path.abspath(ctx.image_paths[img["id"]])), link, copy)
        placed[str(img["id"])] = {"file_name": img["file_name"], "image": link.relative_to(root).as_posix(),
                                  "split": split}
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
    splits = {s: sum(p["split"] == s for p in placed.values()) for s in ("train", "val")}
    for sub in ("images", "labels"):
        for split in ("train", "val"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
            fsync_dir(root / sub / split)
    data = {"train": "images/train", "val": "images/val" if splits["val"] else "images/train",
            "nc": len(cats), "names": {i: c["name"] for i, c in enumerate(cats)}}
    head = ("# ovlabel pseudo-labels (Ultralytics YOLO). No 'path': Ultralytics reads the dataset from this "
            "file's folder,\n# so the folder can be moved. Split: val_fraction "
            f"{fraction} by a hash of the image id ({splits['train']} train, {splits['val']} val).\n")
    write_text(root / "data.yaml", head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    write_json(root / "categories.json", {str(i): {"category_id": c["id"], "name": c["name"]}
                                          for i, c in enumerate(cats)}, indent=1)
    write_json(root / "images.json", placed, indent=1)
    summary = {"folder": root.name, "images": len(placed), "labels": n_labels, "train": splits["train"],
               "val": splits["val"], "val_fraction": fraction, "images_as": "copies" if copy else "links"}
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
