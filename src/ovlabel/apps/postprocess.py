"""Re-threshold cached heatmaps into COCO files, with no model (``ovlabel postprocess``)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..common.categories import Categories, load_categories
from ..common.files import contained, ensure_writable_dir, fsync_dir, relative_name_problem, write_yaml
from ..config import Config, load_config, parse_yaml, read_text_file
from ..errors import ImageReadError, InputError
from ..export.coco import load_coco
from ..export.formats import write_dataset
from ..export.heatmaps import check_cache_against_gt, load_heatmaps, scan_heatmap_files
from ..export.overlays import draw_overlay, save_image_atomic
from ..export.records import RecordWriter
from ..pipeline import manifest as run_manifest
from ..pipeline.images import ImageItem, read_image
from ..pipeline.run import RunLayout
from ..postprocess import Postprocessor

log = logging.getLogger(__name__)


def source_run(heatmap_dir: str | Path) -> tuple[Path | None, dict]:
    """The run that wrote ``heatmap_dir``, read from the run folder the heatmaps are in: its
    ``run.yaml``; before ``ovlabel merge``, a shard's ``run.shard-I-of-N.yaml`` (every shard has the run's
    configuration and categories); without either, its ``manifest.json`` (the settings that change
    results, the category ids and the images folder). ``(None, {})`` when the folder holds none of them
    (heatmaps written by another tool). A run file that is there but unreadable, or not a run file, is an
    error — never a silent fall back on defaults, which would renumber the categories."""
    run_dir = Path(heatmap_dir).absolute().parent
    *run_files, manifest_path = RunLayout.source_files(run_dir)
    for path in run_files:
        if not os.path.lexists(path):
            continue
        where = f"{path} (the run that wrote these heatmaps)"
        meta = parse_yaml(read_text_file(path, "run file", error=InputError), where, error=InputError)
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise InputError(f"{where} is not an ovlabel run file (a mapping with a 'config' section); restore it, "
                             "or pass --config and --coco-gt/--categories")
        return path, meta
    if os.path.lexists(manifest_path):
        m = run_manifest.load(manifest_path)
        try:
            settings = m["settings"]
            meta = {"config": {"postprocess": dict(settings["postprocess"]), "export": dict(settings["export"])},
                    "queries": {"ids": list(settings["queries"]["ids"]), "names": list(settings["queries"]["names"])},
                    "image_root": m["inputs"].get("image_root")}
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{manifest_path} (the run that wrote these heatmaps) lacks its settings ({e})") from None
        log.warning("%s has no run.yaml: following its manifest (%s)", run_dir, manifest_path.name)
        return manifest_path, meta
    return None, {}


def check_not_a_run(out_dir: Path, source: Path | None) -> None:
    """Refuse to write a re-thresholded result into a labelling run's own folder: it would replace that
    run's ``run.yaml`` (versions, weights sha256, failures)."""
    out = Path(out_dir)
    same = source is not None and out.is_dir() and os.path.samefile(out, source.parent)
    if same or RunLayout(out).manifest.exists():
        raise InputError(f"--out {out_dir} is the folder of a labelling run: writing there would replace its run.yaml "
                         f"(its versions, weights and failures); choose another folder, e.g. {Path(out_dir) / 'post'}")


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
    progress: bool = False,
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
    if config is not None:
        cfg = load_config(config, overrides)
    elif run.get("config"):
        cfg = load_config(dict(run["config"]), overrides, model_preset=False)
        log.info("configuration of %s, with the given overrides", run_yaml)
    else:
        cfg = load_config(None, overrides)
        log.warning("no run.yaml or manifest.json beside %s (heatmaps of another tool?): the default configuration "
                    "applies; pass --config to choose one", heatmap_dir)
    post = Postprocessor.from_config(cfg.postprocess)
    files, skipped = scan_heatmap_files(heatmap_dir)
    for s in skipped:
        log.warning("skipped %s: %s", s["file"], s["error"])
    if not files:
        raise InputError(f"no .npz heatmap files under {heatmap_dir}"
                         + (f" that can be read ({len(skipped)} skipped: {skipped[0]['error']})" if skipped else ""))
    if gt is not None and categories is not None:
        raise InputError("pass either a ground truth (--coco-gt) or a categories file (--categories), not both")
    check_not_a_run(Path(out_dir), run_yaml)
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
    failures: list[dict] = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".postprocess-") as tmp:
        records = Path(tmp) / "records.jsonl"
        with RecordWriter(records) as writer:
            for f in tqdm(files, desc="ovlabel postprocess: maps -> masks", unit="img", disable=not progress,
                          dynamic_ncols=True):
                rec = load_heatmaps(f, max_pixels=cfg.run.max_pixels)
                if cats is None:
                    cats = Categories.from_names(rec.queries)
                    log.warning("no categories given: ids 1..%d follow the query order of %s (pass --coco-gt or "
                                "--categories to choose them)", len(cats), f)
                if rec.image_id in seen:
                    raise InputError(f"{f}: field 'image_id' {rec.image_id} is also used by {seen[rec.image_id]}")
                seen[rec.image_id] = f
                H, W = rec.size
                image = {"id": rec.image_id, "file_name": rec.file_name, "width": W, "height": H}
                if gt_coco is not None:
                    image["file_name"] = check_cache_against_gt(f, rec, gt_coco, gt)
                problem = relative_name_problem(image["file_name"])
                if problem is not None:  # never a file operation: a failure record that says why
                    writer.write(image, error=f"{problem} (heatmap file {f.name})")
                    failures.append({"file": str(f), "error": problem})
                    continue
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
        staged, layout = RunLayout(Path(tmp)), RunLayout(out_dir)
        pictures = sorted(staged.overlays.glob("*.jpg"))
        if pictures:
            layout.overlays.mkdir(exist_ok=True)
            for p in pictures:
                os.replace(p, layout.overlays / p.name)
            fsync_dir(layout.overlays)
        paths = {i: contained(root, seen_name) for i, seen_name in names.items()} if root is not None else {}
        if progress:
            print("ovlabel postprocess: writing predictions.json, dataset.json"
                  + "".join(f", {name}/" for name in cfg.export.all_formats), file=sys.stderr, flush=True)
        summary = write_dataset([records], out_dir, cats, export_cfg=cfg.export.model_dump(), gt=gt_coco,
                                image_root=root.absolute() if root is not None else None, image_paths=paths)
    write_yaml(layout.run_yaml, {
        "ovlabel": __version__, "status": "complete", "command": command if command is not None else " ".join(sys.argv),
        "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "heatmaps": str(Path(heatmap_dir).absolute()), "source_run": str(run_yaml) if run_yaml else None,
        "image_root": str(root.absolute()) if root is not None else None,
        "queries": {"names": list(cats.names), "ids": list(cats.ids)} if cats is not None else None,
        "config": cfg.model_dump(exclude={"extends"}),
        "counts": {"images": summary["images"], "annotations": summary["annotations"], "failed": len(failures),
                   "skipped": len(skipped)},
        "failures": failures, "skipped": skipped,
        "outputs": layout.outputs(summary["formats"]),
    })
    summary["failures"], summary["skipped"] = failures, skipped
    return summary


def _image(root: Path, image: dict, rec):
    """The pixels of a cached image, for map refinement (its size must be the heatmaps')."""
    path = contained(root, image["file_name"])
    try:
        pixels = read_image(path)
    except ImageReadError as e:
        raise InputError(f"{path}: {e} (map refinement needs the image)") from None
    if pixels.shape[:2] != rec.size:
        raise InputError(f"{root / image['file_name']} is {pixels.shape[1]}x{pixels.shape[0]} but its heatmaps are "
                         f"{rec.size[1]}x{rec.size[0]}")
    return pixels


def _overlay(staging: Path, root: Path, rec, image: dict, dets) -> None:
    try:
        pixels = read_image(contained(root, image["file_name"]))
    except ImageReadError as e:
        log.warning("no overlay for %s: %s", image["file_name"], e)
        return
    if pixels.shape[:2] != rec.size:
        log.warning("no overlay for %s: the image is %dx%d but its heatmaps are %dx%d", image["file_name"],
                    pixels.shape[1], pixels.shape[0], rec.size[1], rec.size[0])
        return
    item = ImageItem(image["id"], root / image["file_name"], image["file_name"])
    save_image_atomic(RunLayout(staging).overlay(item), draw_overlay(pixels, dets, rec.maps, rec.queries, rec.presence))
