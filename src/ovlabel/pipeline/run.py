"""A run: its folder, its plan, and the two steps every engine shares — planning and finishing.

``ovlabel label`` (:meth:`ovlabel.pipeline.runner.Pipeline.run`) is ``plan_run`` → an engine's ``execute``
(:mod:`ovlabel.pipeline.engines`) → ``finish_run``:

* :func:`plan_run` — inputs, image ids, the run manifest (created at the first start, compared on every
  later one), this shard's deterministic batches and which of them a previous attempt finished;
* an engine labels the batches still to do (``Pipeline.label_batch``: decoded images in, records out) and
  appends their records through :class:`ovlabel.pipeline.engines.sink.RecordSink`;
* :func:`finish_run` — ``run.yaml`` and, for an unsharded run, the merge into ``predictions.json`` and
  ``dataset.json`` and the dataset formats.

Runs stream, so memory stays flat, and a killed run (even ``kill -9``) loses at most the batch in
flight. ``resume=True`` skips the batches already recorded (failed images are recorded too and not
retried, unless ``retry_failed=True``); ``shard=(i, n)`` takes every n-th image of the deterministic image
list, so n processes split a dataset with no overlap, and ``ovlabel merge`` (or the run itself when
n = 1) merges the records. A resumed run forms its batches exactly as before, so an interrupted run ends
with the same files; a sharded run's batches hold other images than an unsharded run's, so its scores can
differ in the last float digits (batched matrix products sum in another order; masks and ids are the same
— with ``run.batch_size`` 1 everything is identical).

:class:`RunLayout` is the one place the run folder's file names are spelled.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..common.categories import Categories, load_categories
from ..common.files import ensure_writable_dir, output_stem, remove_stale_temps, sha256_file, write_yaml
from ..errors import InputError, OutputError
from ..export.coco import check_png_category_ids, load_coco
from ..export.formats import EXPORTERS, check_formats, write_dataset
from ..export.records import DATASET, PREDICTIONS, merged_records
from . import manifest as run_manifest
from .images import ImageItem, coco_inputs, collect_inputs, input_root

if TYPE_CHECKING:  # this module stays torch-free: `ovlabel merge` and decode workers use RunLayout
    from .queries import QuerySet

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class RunLayout:
    """The files of a run folder (of one shard of it: ``shard = (i, n)``)."""

    out_dir: Path
    shard: tuple[int, int] = (0, 1)

    @property
    def tag(self) -> str:
        i, n = self.shard
        return "" if n == 1 else f".shard-{i}-of-{n}"

    @property
    def records(self) -> Path:
        return self.out_dir / "records" / f"records{self.tag}.jsonl"

    @property
    def run_yaml(self) -> Path:
        return self.out_dir / f"run{self.tag}.yaml"

    @property
    def manifest(self) -> Path:
        return self.out_dir / run_manifest.NAME

    @property
    def predictions(self) -> Path:
        return self.out_dir / PREDICTIONS

    @property
    def dataset(self) -> Path:
        return self.out_dir / DATASET

    @property
    def heatmaps(self) -> Path:
        return self.out_dir / "heatmaps"

    @property
    def overlays(self) -> Path:
        return self.out_dir / "overlays"

    def heatmap(self, item: ImageItem) -> Path:
        return self.heatmaps / f"{stem(item)}.npz"

    def overlay(self, item: ImageItem) -> Path:
        return self.overlays / f"{stem(item)}.jpg"

    def outputs(self, formats: dict) -> dict:
        """What ``run.yaml`` says the run wrote (names relative to the folder)."""
        return {"predictions": self.predictions.name, "dataset": self.dataset.name, "formats": formats}

    # the files of any run folder (all its shards), for merge and postprocess
    @staticmethod
    def record_files(folder: Path) -> list[Path]:
        return sorted((Path(folder) / "records").glob("records*.jsonl"))

    @staticmethod
    def run_files(folder: Path) -> list[Path]:
        """``run.yaml`` and the shards' ``run.shard-I-of-N.yaml``."""
        return sorted(Path(folder).glob("run*.yaml"))

    @staticmethod
    def source_files(folder: Path) -> list[Path]:
        """The files that say what run a folder holds, best first: ``run.yaml``, the shards' files, the
        manifest."""
        folder = Path(folder)
        return [folder / "run.yaml", *sorted(folder.glob("run.shard-*-of-*.yaml")), folder / run_manifest.NAME]


def stem(item: ImageItem) -> str:
    """The name of an image's per-image outputs, kept inside their folder: ``<id>_<sanitised stem>``."""
    return output_stem(item.id, item.file_name)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class RunPlan:
    """What an engine and :func:`finish_run` need (see :func:`plan_run`)."""

    layout: RunLayout
    manifest: dict
    queries: QuerySet
    batches: list[list[ImageItem]]  # this shard's share
    todo: list[list[ImageItem]]  # the batches not finished yet
    meta: dict
    gt: Any = None
    ignored: list[str] = field(default_factory=list)
    retry_failed: bool = False

    @property
    def out_dir(self) -> Path:
        return self.layout.out_dir

    @property
    def shard(self) -> tuple[int, int]:
        return self.layout.shard

    @property
    def tag(self) -> str:
        return self.layout.tag

    @property
    def records(self) -> Path:
        return self.layout.records

    @property
    def image_paths(self) -> dict[int, Path]:
        return {it.id: it.path for it in run_manifest.items(self.manifest)}


def plan_run(pipe: Any, inputs: Sequence[str | Path] = (), out_dir: str | Path = "ovlabel-out", *,
             queries: Sequence[str] | None = None, queries_file: str | Path | None = None,
             coco_gt: str | Path | None = None, images_dir: str | Path | None = None, resume: bool = False,
             shard: tuple[int, int] = (0, 1), retry_failed: bool = False, command: str | None = None) -> RunPlan:
    """Check everything that can be wrong before any work, freeze the run in its manifest (or check this
    command against it) and list this shard's batches and those still to do. ``pipe``: the
    :class:`~ovlabel.pipeline.runner.Pipeline` whose settings and queries the run uses."""
    started = now()
    cfg = pipe.cfg
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise InputError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
    check_formats(cfg.export.all_formats)
    gt = None
    categories = None
    ignored: list[str] = []
    skipped: list[dict] = []
    if coco_gt is not None:
        if images_dir is None:
            raise InputError("--coco-gt needs --images-dir (the folder the file names are relative to)")
        if inputs:
            raise InputError("pass either INPUTS or --coco-gt with --images-dir, not both")
        if queries or queries_file:
            raise InputError("--coco-gt brings its own categories (ids kept); do not also pass --queries or "
                             "--queries-file")
        gt = load_coco(coco_gt)
        categories = Categories.from_coco(gt.dataset["categories"])
        scanned = coco_inputs(gt, images_dir)
        input_desc: dict = {"coco_gt": str(Path(coco_gt).absolute()), "coco_gt_sha256": sha256_file(coco_gt),
                            "images_dir": str(Path(images_dir).absolute()),
                            "image_root": str(Path(images_dir).absolute())}
    else:
        if not inputs:
            raise InputError("no inputs: pass folders, image files or .txt lists, or --coco-gt with --images-dir")
        scanned, ignored = collect_inputs(list(inputs), skipped)
        if skipped:
            log.warning("%d entr%s of the input folders not searched (hidden, or links to folders), listed in "
                        "run.yaml: %s", len(skipped), "y" if len(skipped) == 1 else "ies",
                        ", ".join(s["path"] for s in skipped[:3]) + (", …" if len(skipped) > 3 else ""))
        input_desc = {"paths": [str(Path(i).expanduser().absolute()) for i in inputs],
                      "image_root": str(input_root(scanned)) if scanned else None}
    if queries_file is not None:
        categories = load_categories(queries_file)
    qs, _, _ = pipe.queries(queries, categories)
    if "masks-semantic" in cfg.export.all_formats:
        check_png_category_ids(qs.categories.ids)
    layout = RunLayout(ensure_writable_dir(out_dir), (index, count))
    if layout.records.exists() and not resume:
        raise InputError(f"{layout.out_dir} already holds a run ({layout.records.relative_to(layout.out_dir)}); pass "
                         "--resume to continue it, or choose another --out")
    current = run_manifest.build(inputs=input_desc, items=scanned, settings=pipe.settings(qs), shards=count)
    if layout.manifest.exists() or resume:
        if not layout.manifest.exists():
            if layout.records.exists():
                raise InputError(f"{layout.out_dir} has records but no {run_manifest.NAME} (a run of an older "
                                 "ovlabel?); it cannot be resumed safely — start it again in a new --out")
            stored = run_manifest.create(layout.manifest, current)
        else:
            stored = run_manifest.load(layout.manifest)
        run_manifest.check_same_run(stored, current, str(layout.out_dir))
    else:
        stored = run_manifest.create(layout.manifest, current)
        run_manifest.check_same_run(stored, current, str(layout.out_dir))  # another shard may have won the race
    items = run_manifest.items(stored)
    if stored["images_sha256"] != current["images_sha256"]:
        known = {it.file_name for it in items}
        added = [it.file_name for it in scanned if it.file_name not in known]
        missing = len(known - {it.file_name for it in scanned})
        log.warning("the inputs changed since this run started: %d new file(s) are not part of it (start a "
                    "new run for them: %s), %d listed file(s) are gone and will be reported as failures; "
                    "image ids stay as they were", len(added), ", ".join(added[:5]), missing)

    B = cfg.run.batch_size
    mine = items[index::count]  # by image: shards differ by at most one image, whatever the batch size
    batches = [mine[k : k + B] for k in range(0, len(mine), B)]
    done = done_ids(layout.records, retry_failed) if resume else set()
    todo = [b for b in batches if not all(it.id in done for it in b)]
    names = {f"{stem(it)}{ext}" for b in batches for it in b for ext in (".npz", ".jpg", ".png", ".json")}
    for sub in (layout.heatmaps, layout.overlays):  # a killed attempt's temporary files
        remove_stale_temps(sub, names)
    remove_stale_temps(layout.out_dir, {layout.run_yaml.name, layout.predictions.name, layout.dataset.name}
                       if count == 1 else {layout.run_yaml.name})
    if count == 1:  # the dataset formats (each in the folder named after it), written by this run's finish only
        for sub in EXPORTERS:
            remove_stale_temps(layout.out_dir / sub, recursive=True)
    meta = provenance(pipe, qs, started, command, shard, inputs, coco_gt, images_dir)
    meta["image_root"] = stored["inputs"].get("image_root")
    if skipped:
        meta["skipped_entries"] = skipped
    plan = RunPlan(layout, stored, qs, batches, todo, meta, gt, ignored, retry_failed)
    write_yaml(layout.run_yaml, {**meta, "status": "running"})
    return plan


def finish_run(pipe: Any, plan: RunPlan, counts: dict) -> dict:
    """Write ``run.yaml`` and, for an unsharded run, merge the records into the COCO files."""
    failures = [{"file": r["image"]["file_name"], "error": r["error"]}
                for r in merged_records([plan.records]) if "error" in r]
    summary = {**plan.meta, "status": "complete", "end_time": now(), "counts": counts, "failures": failures,
               "ignored_non_images": plan.ignored}
    if plan.shard[1] == 1:
        try:
            merged = write_dataset([plan.records], plan.out_dir, plan.queries.categories,
                                   export_cfg=pipe.cfg.export.model_dump(), gt=plan.gt,
                                   image_root=plan.manifest["inputs"].get("image_root"),
                                   image_paths=plan.image_paths)
        except OutputError as e:
            raise OutputError(f"{e}\nAll images are labelled (records kept); once the problem is fixed, rerun the "
                              "same command with --resume to write the merged files") from None
        summary["outputs"] = {**plan.layout.outputs(merged["formats"]), "annotations": merged["annotations"],
                              "images": merged["images"]}
    write_yaml(plan.layout.run_yaml, summary)
    return summary


def done_ids(records: Path, retry_failed: bool) -> set[int]:
    """Ids with a record (with ``retry_failed``, only those whose latest record is not a failure)."""
    return {int(r["image"]["id"]) for r in merged_records([records]) if not (retry_failed and "error" in r)}


# ------------------------------------------------------------------------------------------ provenance
def provenance(pipe: Any, qs: QuerySet, started, command, shard, inputs, coco_gt, images_dir) -> dict:
    """What ``run.yaml`` records of a run: versions, command, times, model, explainer, queries, config."""
    import numpy as np  # the versions of the labelling process (imported here: the module stays torch-free)
    import open_clip
    import timm
    import torch

    cfg = pipe.cfg
    return {
        "ovlabel": __version__,
        "versions": {k: str(v) for k, v in {
            "python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "numpy": np.__version__,
            "pycocotools": dist_version("pycocotools")}.items()},
        "command": command if command is not None else " ".join(sys.argv),
        "start_time": started,
        "shard": f"{shard[0]}/{shard[1]}",
        "image_root": None,
        "inputs": [str(i) for i in inputs] if inputs else {"coco_gt": str(coco_gt), "images_dir": str(images_dir)},
        "model": pipe.backend.describe(),
        "explainer": {"method": cfg.explainer.method, "layers": pipe.layers(),
                      "layers_setting": cfg.explainer.layers, "empty_prompt": cfg.explainer.empty_prompt},
        "queries": qs.describe(),
        "model_preset": cfg.model_preset,
        "config": cfg.model_dump(exclude={"extends"}),
    }


def dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------- shards
def shard_from_environment(env: dict[str, str] | None = None) -> tuple[int, int]:
    """``--shard auto``: ``(index, count)`` from a SLURM job array (``SLURM_ARRAY_TASK_ID`` with
    ``SLURM_ARRAY_TASK_COUNT``, or ``_MIN``/``_MAX``/``_STEP``) or torchrun (``RANK``, ``WORLD_SIZE``)."""
    env = dict(os.environ if env is None else env)

    def ints(*names: str) -> list[int] | None:
        if not all(env.get(n) not in (None, "") for n in names):
            return None
        try:
            return [int(env[n]) for n in names]
        except ValueError:
            raise InputError("--shard auto: " + ", ".join(f"{n}={env[n]!r}" for n in names) +
                             " are not integers") from None

    slurm = ints("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    if slurm is not None:
        first = ints("SLURM_ARRAY_TASK_MIN")
        index, count = slurm[0] - (first[0] if first else 0), slurm[1]
        step = ints("SLURM_ARRAY_TASK_STEP")
        if step and step[0] != 1:
            raise InputError(f"--shard auto: the SLURM array has a step of {step[0]}; use a contiguous array "
                             "(--array=0-N) or pass --shard I/N")
        source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    else:
        torchrun = ints("RANK", "WORLD_SIZE")
        if torchrun is None:
            raise InputError("--shard auto found no scheduler in the environment (SLURM_ARRAY_TASK_ID and "
                             "SLURM_ARRAY_TASK_COUNT of a SLURM job array, or RANK and WORLD_SIZE of torchrun); "
                             "pass --shard I/N")
        index, count = torchrun
        source = "RANK/WORLD_SIZE"
    if not (count >= 1 and 0 <= index < count):
        raise InputError(f"--shard auto: {source} give shard {index} of {count}, which is not a valid shard")
    return index, count
