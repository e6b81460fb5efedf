"""Re-threshold cached heatmaps into COCO files, with no model (``ovlabel postprocess``)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml

from .. import __version__
from ..config import Config, load_config
from ..errors import CocoFormatError, ImageReadError, InputError
from ..export.categories import Categories, load_categories
from ..export.coco import load_coco
from ..export.files import ensure_writable_dir, fsync_dir, output_stem, write_yaml
from ..export.formats import write_dataset
from ..export.heatmaps import list_heatmap_files, load_heatmaps
from ..export.records import RecordWriter
from ..postprocess import Postprocessor

log = logging.getLogger(__name__)


def source_run(heatmap_dir: str | Path) -> tuple[Path | None, dict]:
    """The run that wrote ``heatmap_dir`` (its ``run.yaml`` beside the folder), or ``(None, {})``."""
    run_yaml = Path(heatmap_dir).parent / "run.yaml"
    if not run_yaml.is_file():
        return None, {}
    try:
        meta = yaml.safe_load(run_yaml.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{run_yaml} (the run that wrote these heatmaps) is not readable: {e}") from None
    return run_yaml, meta if isinstance(meta, dict) else {}


def postprocess_heatmaps(
    heatmap_dir: str | Path,
    out_dir: str | Path,
    *,
    config: Config | str | Path | dict | None = None,
    overrides: list[str] | dict | None = None,
    gt: str | Path | None = None,
    categories: str | Path | None = None,
    images: str | Path | None = None,
    command: str | None = None,
) -> dict:
    """Cached heatmaps (``*.npz``, see :mod:`ovlabel.export.heatmaps`) → ``predictions.json``,
    ``dataset.json``, the configured dataset formats and overlays in ``out_dir``, and its ``run.yaml``.

    It follows the run that wrote the heatmaps (its ``run.yaml`` beside the heatmaps folder): that run's
    configuration is the starting point unless ``config`` is given (``overrides`` apply on top), its
    category ids are kept, and its images are found where it read them (``images`` to override).
    Category ids otherwise come from the ground truth (``gt``), a categories file, or the query order of
    the first heatmap file (ids 1..K, said in the log). Every query must be one of the categories.
    Nothing is written unless every file is valid.
    """
    run_yaml, run = source_run(heatmap_dir)
    if isinstance(config, Config):
        cfg = load_config(config, overrides)
    elif config is not None:
        cfg = load_config(config, overrides)
    elif run.get("config"):
        cfg = load_config({k: v for k, v in run["config"].items()}, overrides)
        log.info("configuration of %s, with the given overrides", run_yaml)
    else:
        cfg = load_config(None, overrides)
    post = Postprocessor.from_config(cfg.postprocess)
    files = list_heatmap_files(heatmap_dir)
    if not files:
        raise InputError(f"no .npz heatmap files under {heatmap_dir}")
    if gt is not None and categories is not None:
        raise InputError("pass either a ground truth (--coco-gt) or a categories file (--categories), not both")
    gt_coco = load_coco(gt) if gt is not None else None
    cats: Categories | None = None
    if gt_coco is not None:
        cats = Categories.from_coco(gt_coco.dataset["categories"])
    elif categories is not None:
        cats = load_categories(categories)
    elif isinstance(run.get("queries"), dict) and run["queries"].get("ids"):
        cats = Categories(tuple(run["queries"]["ids"]), tuple(run["queries"]["names"]))
    root = Path(images) if images is not None else (Path(run["image_root"]) if run.get("image_root") else None)
    if root is not None and not root.is_dir():
        raise InputError(f"the images folder {root} does not exist" + ("" if images is not None else
                         f" (recorded by {run_yaml}); pass --images"))
    refine = cfg.postprocess.refine.method != "none"
    if (cfg.export.overlays or refine or any(f.startswith("yolo") for f in cfg.export.all_formats)) and root is None:
        raise InputError("overlays, map refinement and YOLO datasets need the images: pass --images (the folder the "
                         "heatmaps' file names are relative to)")
    out_dir = ensure_writable_dir(out_dir)
    seen: dict[int, Path] = {}
    names: dict[int, str] = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".postprocess-") as tmp:
        records = Path(tmp) / "records.jsonl"
        with RecordWriter(records) as writer:
            for f in files:
                rec = load_heatmaps(f)
                if cats is None:
                    cats = Categories.from_names(rec.queries)
                    log.info("no categories given: ids 1..%d follow the query order of %s", len(cats), f)
                if rec.image_id in seen:
                    raise InputError(f"{f}: field 'image_id' {rec.image_id} is also used by {seen[rec.image_id]}")
                seen[rec.image_id] = f
                H, W = rec.size
                if gt_coco is not None:
                    img = gt_coco.imgs.get(rec.image_id)
                    if img is None:
                        raise CocoFormatError(f"{f}: field 'image_id' {rec.image_id} is not an image of {gt}")
                    if (img.get("height"), img.get("width")) != (H, W):
                        raise CocoFormatError(f"{f}: field 'heatmaps' is {W}x{H} but image {rec.image_id} of {gt} "
                                              f"is {img.get('width')}x{img.get('height')}")
                image = {"id": rec.image_id, "file_name": rec.file_name, "width": W, "height": H}
                if gt_coco is not None:
                    image["file_name"] = gt_coco.imgs[rec.image_id].get("file_name", rec.file_name)
                names[rec.image_id] = image["file_name"]
                cat_ids = [cats.id_of(q, source=f"{f}: field 'queries'") for q in rec.queries]
                pixels = _image(root, image, rec) if refine else None
                try:
                    dets = post(rec.maps, rec.queries, cat_ids, rec.presence, image=pixels)
                except InputError as e:
                    raise InputError(f"{f}: {e}") from None
                writer.write(image, dets)
                if len(seen) % 64 == 0:
                    writer.flush()
                if cfg.export.overlays:  # into the temporary folder: moved into place once all files are valid
                    _overlay(Path(tmp), root, rec, image, dets)
        pictures = sorted((Path(tmp) / "overlays").glob("*.jpg"))
        if pictures:
            (out_dir / "overlays").mkdir(exist_ok=True)
            for p in pictures:
                os.replace(p, out_dir / "overlays" / p.name)
            fsync_dir(out_dir / "overlays")
        paths = {i: root / seen_name for i, seen_name in names.items()} if root is not None else {}
        summary = write_dataset([records], out_dir, cats, export_cfg=cfg.export.model_dump(), gt=gt_coco,
                                image_root=root.absolute() if root is not None else None, image_paths=paths)
    write_yaml(out_dir / "run.yaml", {
        "ovlabel": __version__, "status": "complete", "command": command if command is not None else " ".join(sys.argv),
        "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "heatmaps": str(Path(heatmap_dir).absolute()), "source_run": str(run_yaml) if run_yaml else None,
        "image_root": str(root.absolute()) if root is not None else None,
        "queries": {"names": list(cats.names), "ids": list(cats.ids)} if cats is not None else None,
        "config": cfg.model_dump(exclude={"extends"}),
        "counts": {"images": summary["images"], "annotations": summary["annotations"]},
        "outputs": {"predictions": "predictions.json", "dataset": "dataset.json", "formats": summary["formats"]},
    })
    return summary


def _image(root: Path, image: dict, rec):
    """The pixels of a cached image, for map refinement (its size must be the heatmaps')."""
    from .images import read_image

    try:
        pixels = read_image(root / image["file_name"])
    except ImageReadError as e:
        raise InputError(f"{root / image['file_name']}: {e} (map refinement needs the image)") from None
    if pixels.shape[:2] != rec.size:
        raise InputError(f"{root / image['file_name']} is {pixels.shape[1]}x{pixels.shape[0]} but its heatmaps are "
                         f"{rec.size[1]}x{rec.size[0]}")
    return pixels


def _overlay(out_dir: Path, root: Path, rec, image: dict, dets) -> None:
    from ..export.overlays import draw_overlay, save_image_atomic
    from .images import read_image

    try:
        pixels = read_image(root / image["file_name"])
    except ImageReadError as e:
        log.warning("no overlay for %s: %s", image["file_name"], e)
        return
    if pixels.shape[:2] != rec.size:
        log.warning("no overlay for %s: the image is %dx%d but its heatmaps are %dx%d", image["file_name"],
                    pixels.shape[1], pixels.shape[0], rec.size[1], rec.size[0])
        return
    save_image_atomic(out_dir / "overlays" / f"{output_stem(image['id'], image['file_name'])}.jpg",
                      draw_overlay(pixels, dets, rec.maps, rec.queries, rec.presence))
