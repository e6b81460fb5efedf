"""Re-threshold cached heatmaps into COCO files, with no model (``ovlabel postprocess``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..config import Config, load_config
from ..errors import CocoFormatError, InputError
from ..export.categories import Categories, load_categories
from ..export.coco import load_coco
from ..export.files import ensure_writable_dir
from ..export.heatmaps import list_heatmap_files, load_heatmaps
from ..export.records import RecordWriter, finalize
from ..postprocess import Postprocessor

log = logging.getLogger(__name__)


def postprocess_heatmaps(
    heatmap_dir: str | Path,
    out_dir: str | Path,
    *,
    config: Config | str | Path | dict | None = None,
    gt: str | Path | None = None,
    categories: str | Path | None = None,
) -> dict:
    """Cached heatmaps (``*.npz``, see :mod:`ovlabel.export.heatmaps`) → ``predictions.json`` and
    ``dataset.json`` in ``out_dir``.

    Category ids come from the ground truth (``gt``), from a categories file, or — with neither — from
    the query order of the first heatmap file (ids 1..K, said in the log). Every query must be one of the
    categories. Nothing is written unless every file is valid.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
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
    out_dir = ensure_writable_dir(out_dir)

    seen: dict[int, Path] = {}
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
                cat_ids = [cats.id_of(q, source=f"{f}: field 'queries'") for q in rec.queries]
                try:
                    dets = post(rec.maps, rec.queries, cat_ids, rec.presence)
                except InputError as e:
                    raise InputError(f"{f}: {e}") from None
                writer.write(image, dets)
        summary = finalize([records], out_dir, cats, gt=gt_coco, segmentation=cfg.export.segmentation)
    return summary
