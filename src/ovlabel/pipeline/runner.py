"""The labelling pipeline: load → preprocess → encode queries → explain (all queries, one forward per
batch) → postprocess → write. ``Pipeline`` is the Python API; ``ovlabel label`` calls ``Pipeline.run``.

A run is three steps, so that other execution engines can reuse the first and the last:

* :meth:`Pipeline.plan` — inputs, image ids, the run manifest (created at the first start, compared on
  every later one), this shard's deterministic batches and which of them a previous attempt finished;
* :meth:`Pipeline.execute` — the local engine: images decoded in DataLoader workers, each batch labelled
  by :meth:`Pipeline.label_batch` (engine-neutral: decoded images in, records out) and appended to
  ``OUTDIR/records/`` as complete lines, fsynced;
* :meth:`Pipeline.finish` — ``run.yaml`` and, for an unsharded run, the merge into ``predictions.json``
  and ``dataset.json``.

Runs stream, so memory stays flat, and a killed run (even ``kill -9``) loses at most the batch in
flight. ``resume=True`` skips the batches already recorded (failed images are recorded too and not
retried, unless ``retry_failed=True``); ``shard=(i, n)`` takes every n-th batch of the deterministic batch
list, so n processes split a dataset with no overlap, and ``ovlabel merge`` (or the run itself when
n = 1) merges the records. Batches are formed identically in every case, so results do not depend on how
a run was split or interrupted. One image that fails — unreadable, out of memory, non-finite maps —
becomes a failure record; the run goes on.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import Config, deep_merge, load_config
from ..errors import ConfigError, ImageReadError, InputError, OutputError
from ..export.categories import Categories, load_categories
from ..export.coco import check_png_category_ids, load_coco
from ..export.files import (
    ensure_writable_dir,
    fault_point,
    fsync_dir,
    output_stem,
    remove_stale_temps,
    sha256_file,
    write_yaml,
)
from ..export.formats import write_dataset
from ..export.heatmaps import save_heatmaps
from ..export.overlays import draw_overlay, save_image_atomic
from ..export.records import RecordWriter, make_record, read_records
from ..postprocess import Detections, ImageMaps, Letterbox, Postprocessor
from ..postprocess.scoring import presence_from_logits
from . import manifest as run_manifest
from .backend import Backend, TorchBackend
from .images import DecodedImage, ImageItem, coco_inputs, collect_inputs, decode_item, input_root
from .models import LoadedModel, default_weights, load_model
from .preprocess import Normalization, Tile, tile_regions, to_input
from .queries import QuerySet, build_queries, embed_queries

log = logging.getLogger(__name__)
EMPTY_PROMPT = "a photo of a"
EXTRA_DIRS = ("heatmaps", "overlays", "masks")


@dataclass
class ImageResult:
    """The detections of one image and its maps (``maps``: model resolution with the geometry back to
    the image; ``heatmaps``: ``[K,H,W]`` float32 at the image's resolution, computed on access)."""

    detections: Detections
    maps: ImageMaps
    queries: tuple[str, ...]
    presence: np.ndarray

    @property
    def heatmaps(self) -> np.ndarray:
        return self.maps.full()


@dataclass
class Prepared:
    item: ImageItem
    image: np.ndarray | None = None
    tensor: torch.Tensor | None = None
    letterbox: Letterbox | None = None
    tiles: list[tuple[Tile, torch.Tensor, Letterbox]] | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (H, W) of the decoded image


@dataclass
class RunPlan:
    """Everything :meth:`Pipeline.execute` and :meth:`Pipeline.finish` need (see :meth:`Pipeline.plan`)."""

    out_dir: Path
    shard: tuple[int, int]
    records: Path
    run_yaml: Path
    manifest: dict
    queries: QuerySet
    batches: list[list[ImageItem]]  # this shard's share
    todo: list[list[ImageItem]]  # the batches not finished yet
    meta: dict
    gt: Any = None
    ignored: list[str] = field(default_factory=list)
    retry_failed: bool = False

    @property
    def tag(self) -> str:
        i, n = self.shard
        return "" if n == 1 else f".shard-{i}-of-{n}"


def safe_name(item: ImageItem) -> str:
    """A file name for per-image outputs that stays inside its folder: ``<id>_<sanitised stem>``."""
    return output_stem(item.id, item.file_name)


class _Dataset(torch.utils.data.Dataset):
    """Decoding and preprocessing, run in DataLoader workers."""

    def __init__(self, items: Sequence[ImageItem], cfg: Config, patch: tuple[int, int], norm: Normalization,
                 keep_image: bool) -> None:
        self.items, self.cfg, self.patch, self.norm, self.keep_image = list(items), cfg, patch, norm, keep_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        decoded = decode_item(self.items[i], self.cfg.run.max_pixels, self.cfg.run.max_aspect_ratio)
        return prepare_decoded(decoded, self.cfg, self.patch, self.norm, self.keep_image)


def prepare(item: ImageItem, image: np.ndarray, cfg: Config, patch, norm: Normalization, keep_image: bool) -> Prepared:
    pre = cfg.preprocess
    tiles = None
    if pre.tile.enabled:
        regions = tile_regions(image.shape[0], image.shape[1], pre.size, pre.tile.min_scale, pre.tile.overlap)
        if regions:
            tiles = []
            for t in regions:
                tensor, lb = to_input(image[t.y0 : t.y1, t.x0 : t.x1], pre.size, patch, norm, pre.resize)
                tiles.append((t, tensor, lb))
    tensor, lb = to_input(image, pre.size, patch, norm, pre.resize)
    keep = keep_image or tiles is not None
    return Prepared(item, image if keep else None, tensor, lb, tiles, size=tuple(image.shape[:2]))


def prepare_decoded(decoded: DecodedImage, cfg: Config, patch, norm: Normalization, keep_image: bool) -> Prepared:
    if decoded.error is not None:
        return Prepared(decoded.item, error=decoded.error)
    try:
        return prepare(decoded.item, decoded.image, cfg, patch, norm, keep_image)
    except (InputError, ValueError, MemoryError) as e:
        return Prepared(decoded.item, error=f"preprocessing failed: {type(e).__name__}: {e}")


def _collate(batch: list[Prepared]) -> list[Prepared]:
    return batch


class Pipeline:
    """The labelling pipeline. Build it with :meth:`from_config`; call it on one image, or :meth:`run` it
    over inputs into an output folder."""

    def __init__(self, config: Config, *, model: LoadedModel | None = None, backend: Backend | None = None) -> None:
        from ..legrad.explain import get_method

        self.cfg = config
        self._model = model
        self._backend = backend
        self._query_cache: dict[str, tuple[QuerySet, torch.Tensor, torch.Tensor | None]] = {}
        self._empty: torch.Tensor | None = None
        self._contrast: torch.Tensor | None = None
        self.stats: dict[str, int] = {}  # where candidates went, over the images processed (see Postprocessor)
        self.postprocessor = Postprocessor.from_config(config.postprocess)
        self.method = get_method(config.explainer.method)  # unknown method: error before any work
        if config.explainer.contrast != "none" and config.explainer.method != "legrad":
            raise ConfigError(f"explainer.contrast changes LeGrad's target; the {config.explainer.method} explainer "
                              "does not take it (set explainer.contrast: none, or method: legrad)")

    @classmethod
    def from_config(cls, source: str | Path | dict | Config | None = None, *, backend: str | None = None,
                    onnx_dir: str | Path | None = None, **overrides: Any) -> Pipeline:
        """``source``: a preset name, a YAML path, a dict or a :class:`Config`. ``overrides``: dotted keys
        (``**{"model.name": "ViT-B-16"}``, or ``model__name=...``) or whole sections as dicts
        (``postprocess={"threshold": {"method": "otsu"}}``). ``backend="onnx"`` with ``onnx_dir`` runs the
        graphs of an ``ovlabel export-onnx`` folder in onnxruntime."""
        if backend is not None:
            overrides["model.backend"] = backend
        if onnx_dir is not None:
            overrides["model.onnx_dir"] = str(onnx_dir)
        dotted = {}
        sections = {}
        for k, v in overrides.items():
            if isinstance(v, dict) and "." not in k and "__" not in k:
                sections[k] = v
            else:
                dotted[k.replace("__", ".")] = v
        if isinstance(source, Config):
            base = source.model_dump()
        elif isinstance(source, dict):
            base = dict(source)
        else:
            base = None
        if sections:
            base = deep_merge(base if base is not None else load_config(source).model_dump(), sections)
        cfg = load_config(base if base is not None else source, dotted or None)
        return cls(cfg)

    # ------------------------------------------------------------------------------------------ model
    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            m = self.cfg.model
            self._model = load_model(m.name, default_weights(m.name, m.pretrained), device=m.device,
                                     precision=m.precision)
        return self._model

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            if self.cfg.model.backend == "onnx":
                from .onnx_backend import OnnxBackend

                self._backend = OnnxBackend(self.cfg.model.onnx_dir, self.cfg)
            else:
                self._backend = TorchBackend(self.model, self.cfg.explainer)
        return self._backend

    @property
    def patch(self) -> tuple[int, int]:
        return self.backend.patch_size

    def layers(self) -> list[int]:
        return list(self.backend.layers)

    @property
    def _keep_image(self) -> bool:
        """Whether the decoded pixels stay with a prepared image (overlays and map refinement need them)."""
        return self.cfg.export.overlays or self.cfg.postprocess.refine.method != "none"

    @property
    def normalization(self) -> Normalization:
        """``preprocess.mean``/``std`` when set, else the model's own."""
        pre, be = self.cfg.preprocess, self.backend
        return Normalization(tuple(pre.mean) if pre.mean else be.mean, tuple(pre.std) if pre.std else be.std)

    def queries(self, names: Sequence[str] | None = None, categories: Categories | None = None):
        """The query set and its embeddings ``(qs, text [K,E], background [M,E] | None)``, computed once
        per distinct query set."""
        qs = build_queries(self.cfg.queries, categories, list(names) if names else None)
        key = json.dumps(qs.describe(), sort_keys=True)
        if key not in self._query_cache:
            text, bg = embed_queries(self.backend.encode_text, qs)
            self._query_cache[key] = (qs, text, bg)
            if self.cfg.explainer.contrast != "none":
                if bg is None:
                    raise ConfigError(f"explainer.contrast {self.cfg.explainer.contrast!r} explains each query "
                                      "against the background prompts: set queries.background (or negatives)")
                self._contrast = bg
            if self.cfg.explainer.empty_prompt and self._empty is None:
                self._empty = self.backend.encode_text([EMPTY_PROMPT])[0]
        return self._query_cache[key]

    # -------------------------------------------------------------------------------------- inference
    def _explain(self, tensors: list[torch.Tensor], text: torch.Tensor, raw: bool = False):
        """Maps ``[K,H,W]`` and embeddings for input tensors, batched by shape (order kept).

        With ``explainer.shifts = s > 1`` every input is also explained at the ``s×s − 1`` offsets
        ``(i·ph/s, j·pw/s)`` (padded top-left by the offset and bottom-right to the next patch) and the
        maps, shifted back, are averaged: the token grid then samples the image every ``patch/s`` pixels
        instead of every patch — test-time shift averaging for finer maps, at ``s²`` times the cost.
        """
        s = self.cfg.explainer.shifts
        ph, pw = self.patch
        offsets = [(i * ph // s, j * pw // s) for i in range(s) for j in range(s)]
        jobs = []  # (tensor index, offset, input)
        for n, t in enumerate(tensors):
            H, W = t.shape[1:]
            for dy, dx in offsets:
                if (dy, dx) == (0, 0):
                    jobs.append((n, (0, 0), t))
                else:
                    padded = t.new_zeros(3, H + ph, W + pw)
                    padded[:, dy : dy + H, dx : dx + W] = t
                    jobs.append((n, (dy, dx), padded))
        maps_out, emb_out = self._explain_inputs([j[2] for j in jobs], text, raw)
        maps: list = [None] * len(tensors)
        embs: list = [None] * len(tensors)
        for (n, (dy, dx), _), m, e in zip(jobs, maps_out, emb_out):
            H, W = tensors[n].shape[1:]
            m = m[:, dy : dy + H, dx : dx + W]
            maps[n] = m if maps[n] is None else maps[n] + m
            if (dy, dx) == (0, 0):
                embs[n] = e
        return [m / len(offsets) for m in maps], embs

    def _explain_inputs(self, tensors: list[torch.Tensor], text: torch.Tensor, raw: bool):
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        maps: list = [None] * len(tensors)
        embs: list = [None] * len(tensors)
        empty = self._empty if self.cfg.explainer.empty_prompt else None
        contrast = self._contrast if self.cfg.explainer.contrast != "none" else None
        for idx in groups.values():
            out_maps, out_embs = self.backend.explain(torch.stack([tensors[i] for i in idx]), text, raw=raw,
                                                      empty=empty, contrast=contrast)
            for j, i in enumerate(idx):
                maps[i] = out_maps[j]
                embs[i] = out_embs[j]
        return maps, embs

    def presence(self, embeddings: torch.Tensor, text: torch.Tensor, background: torch.Tensor | None) -> np.ndarray:
        """Presence ``[B,K]`` of each query in each image (see :mod:`ovlabel.postprocess.scoring`)."""
        K = text.shape[0]
        full = text if background is None or background.shape[0] == 0 else torch.cat([text, background])
        logits = self.backend.logits(embeddings, full)
        return presence_from_logits(logits[:, :K], logits[:, K:] if full is not text else None,
                                    self.cfg.postprocess.presence, self.backend.has_logit_bias)

    def _finish(self, prep: Prepared, maps: ImageMaps, emb, qs: QuerySet, text, bg) -> ImageResult:
        pres = self.presence(emb[None], text, bg)[0]
        dets = self.postprocessor(maps, qs.names, qs.categories.ids, pres, stats=self.stats, image=prep.image)
        return ImageResult(dets, maps, qs.names, pres)

    def process(self, batch: list[Prepared], qs: QuerySet, text, bg) -> list[ImageResult | None]:
        """Results for prepared images (``None`` where ``prep.error`` is set)."""
        ok = [p for p in batch if p.error is None]
        plain = [p for p in ok if not p.tiles]
        results: dict[int, ImageResult] = {}
        if plain:
            maps, embs = self._explain([p.tensor for p in plain], text)
            for p, m, e in zip(plain, maps, embs):
                h, w = p.letterbox.resized
                self._check_finite(m, p)
                image_maps = ImageMaps(m[:, :h, :w].numpy(), p.letterbox.original)
                results[id(p)] = self._finish(p, image_maps, e, qs, text, bg)
        for p in ok:
            if p.tiles:
                raw, _ = self._explain([t for _, t, _ in p.tiles], text, raw=True)
                crops = []
                for (_, _, lb), m in zip(p.tiles, raw):
                    self._check_finite(m, p)
                    crops.append(m[:, : lb.resized[0], : lb.resized[1]].numpy())
                emb = self.backend.embed(p.tensor[None])[0]
                image_maps = ImageMaps.from_tiles(p.size, [t for t, _, _ in p.tiles], crops)
                results[id(p)] = self._finish(p, image_maps, emb, qs, text, bg)
        return [results.get(id(p)) for p in batch]

    @staticmethod
    def _check_finite(maps: torch.Tensor, prep: Prepared) -> None:
        if not torch.isfinite(maps).all():
            raise FloatingPointError("the explainer returned NaN or infinite maps (half-precision overflow? "
                                     "try --precision fp32)")

    def __call__(self, image: str | Path | np.ndarray | Any, queries: Sequence[str] | None = None) -> ImageResult:
        """Label one image (a path, a PIL image or an RGB array) with ``queries`` (default: the config's)."""
        qs, text, bg = self.queries(queries)
        arr = _as_rgb(image, self.cfg.run.max_pixels)
        item = ImageItem(0, Path(str(image)) if isinstance(image, (str, Path)) else Path("image"), "image")
        prep = prepare(item, arr, self.cfg, self.patch, self.normalization, keep_image=self._keep_image)
        return self.process([prep], qs, text, bg)[0]

    # ------------------------------------------------------------------------------------- per batch
    def label_batch(self, images: Sequence[DecodedImage], out_dir: str | Path | None = None, *,
                    queries: Sequence[str] | None = None, categories: Categories | None = None) -> list[dict]:
        """Label decoded images (from any engine) and return their records, ready for
        :meth:`ovlabel.export.records.RecordWriter.append`. Per-image outputs (heatmaps, overlays, masks)
        are written into ``out_dir`` when the config asks for them."""
        qs, text, bg = self.queries(queries, categories)
        norm = self.normalization
        prepared = [prepare_decoded(d, self.cfg, self.patch, norm, self._keep_image) for d in images]
        return self._label_prepared(prepared, qs, text, bg, None if out_dir is None else Path(out_dir))

    def _label_prepared(self, batch: list[Prepared], qs: QuerySet, text, bg, out_dir: Path | None) -> list[dict]:
        """Records of a prepared batch. A batch that fails is retried image by image; an image that fails
        alone gets a failure record (``--strict``: the run stops there). Writing errors (a full disk) stop
        the run."""
        try:
            results: list[ImageResult | str | None] = list(self.process(batch, qs, text, bg))
        except Exception as e:  # noqa: BLE001 — one image's failure must not stop a run
            if len(batch) == 1:
                results = [_failure(e)]
            else:
                log.info("batch failed (%s); retrying its images one by one", e)
                results = []
                for p in batch:
                    try:
                        results.extend(self.process([p], qs, text, bg))
                    except Exception as e1:  # noqa: BLE001
                        results.append(_failure(e1))
        records = []
        for prep, res in zip(batch, results):
            image = {"id": prep.item.id, "file_name": prep.item.file_name}
            if isinstance(res, ImageResult) and out_dir is not None:
                try:
                    self._write_extras(out_dir, prep, res)
                except OutputError:
                    raise
                except Exception as e:  # noqa: BLE001
                    res = _failure(e, "writing its outputs")
                fault_point("image")  # its files written, its record not yet
            if isinstance(res, ImageResult):
                H, W = res.maps.size
                records.append(make_record({**image, "width": int(W), "height": int(H)}, res.detections))
                continue
            error = prep.error if res is None else res
            if self.cfg.run.strict:
                raise ImageReadError(f"{prep.item.path}: {error}")
            log.warning("skipped %s: %s", prep.item.path, error)
            records.append(make_record({**image, "width": 0, "height": 0}, error=error))
        return records

    # ------------------------------------------------------------------------------------------- runs
    def run(
        self,
        inputs: Sequence[str | Path] = (),
        out_dir: str | Path = "ovlabel-out",
        *,
        queries: Sequence[str] | None = None,
        queries_file: str | Path | None = None,
        coco_gt: str | Path | None = None,
        images_dir: str | Path | None = None,
        resume: bool = False,
        shard: tuple[int, int] = (0, 1),
        retry_failed: bool = False,
        command: str | None = None,
        engine: str = "local",
        ray: Any = None,
    ) -> dict:
        """Label ``inputs`` into ``out_dir``: :meth:`plan`, execute, :meth:`finish` (see the module
        docstring). ``engine``: ``"local"`` (:meth:`execute`: this process and its DataLoader workers) or
        ``"ray"`` (:mod:`ovlabel.pipeline.ray_engine`; ``ray``: its ``RayOptions``). Returns the run summary."""
        if engine not in ("local", "ray"):
            raise InputError(f"engine must be 'local' or 'ray', got {engine!r}")
        if engine == "ray":
            from . import ray_engine

            options = ray if ray is not None else ray_engine.RayOptions()
            if str(self.cfg.model.device).startswith("cuda") and not options.gpus_per_actor:
                # a CUDA model in an actor without a GPU fails on the worker after its start: reserve one,
                # so that a cluster without GPUs is refused before any work
                options = dataclasses.replace(options, gpus_per_actor=1.0)
                log.info("--device %s with --engine ray: one GPU per actor (--gpus-per-actor 1)", self.cfg.model.device)
            ray_engine._connect_check()  # Ray missing: say so before any work
        planner = self
        if engine == "ray" and self._backend is None and str(self.cfg.model.device).startswith("cuda"):
            # the driver only plans (text embeddings, settings) and merges: on the CPU, so that a head node
            # without a GPU can drive GPU actors; the actors load the model where Ray places them
            cfg = self.cfg.model_copy(deep=True)
            cfg.model.device = "cpu"
            planner = type(self)(cfg)
        plan = planner.plan(inputs, out_dir, queries=queries, queries_file=queries_file, coco_gt=coco_gt,
                            images_dir=images_dir, resume=resume, shard=shard, retry_failed=retry_failed,
                            command=command)
        if engine == "ray":
            counts = ray_engine.execute(planner, plan, options, config=self.cfg)
        else:
            counts = self.execute(plan)
        return planner.finish(plan, counts)

    def plan(
        self,
        inputs: Sequence[str | Path] = (),
        out_dir: str | Path = "ovlabel-out",
        *,
        queries: Sequence[str] | None = None,
        queries_file: str | Path | None = None,
        coco_gt: str | Path | None = None,
        images_dir: str | Path | None = None,
        resume: bool = False,
        shard: tuple[int, int] = (0, 1),
        retry_failed: bool = False,
        command: str | None = None,
    ) -> RunPlan:
        """Check everything that can be wrong before any work, freeze the run in its manifest (or check
        this command against it) and list this shard's batches and those still to do."""
        started = _now()
        cfg = self.cfg
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise InputError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
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
        qs, _, _ = self.queries(queries, categories)
        if "masks-semantic" in cfg.export.all_formats:
            check_png_category_ids(qs.categories.ids)
        out_dir = ensure_writable_dir(out_dir)
        tag = "" if count == 1 else f".shard-{index}-of-{count}"
        records = out_dir / "records" / f"records{tag}.jsonl"
        manifest_path = out_dir / run_manifest.NAME
        if records.exists() and not resume:
            raise InputError(f"{out_dir} already holds a run ({records.relative_to(out_dir)}); pass --resume to "
                             "continue it, or choose another --out")
        settings = self.settings(qs)
        current = run_manifest.build(inputs=input_desc, items=scanned, settings=settings, shards=count)
        if manifest_path.exists() or resume:
            if not manifest_path.exists():
                if records.exists():
                    raise InputError(f"{out_dir} has records but no {run_manifest.NAME} (a run of an older "
                                     "ovlabel?); it cannot be resumed safely — start it again in a new --out")
                stored = run_manifest.create(manifest_path, current)
            else:
                stored = run_manifest.load(manifest_path)
            run_manifest.check_same_run(stored, current, str(out_dir))
        else:
            stored = run_manifest.create(manifest_path, current)
            run_manifest.check_same_run(stored, current, str(out_dir))  # another shard may have won the race
        items = run_manifest.items(stored)
        if stored["images_sha256"] != current["images_sha256"]:
            known = {it.file_name for it in items}
            added = [it.file_name for it in scanned if it.file_name not in known]
            missing = len(known - {it.file_name for it in scanned})
            log.warning("the inputs changed since this run started: %d new file(s) are not part of it (start a "
                        "new run for them: %s), %d listed file(s) are gone and will be reported as failures; "
                        "image ids stay as they were", len(added), ", ".join(added[:5]), missing)

        B = cfg.run.batch_size
        batches = [items[k : k + B] for k in range(0, len(items), B)][index::count]
        done = _done_ids(records, retry_failed) if resume else set()
        todo = [b for b in batches if not all(it.id in done for it in b)]
        names = {f"{safe_name(it)}{ext}" for b in batches for it in b for ext in (".npz", ".jpg", ".png", ".json")}
        for sub in EXTRA_DIRS:  # temporary files a killed attempt of this shard left behind
            remove_stale_temps(out_dir / sub, names)
        remove_stale_temps(out_dir, {f"run{tag}.yaml", "predictions.json", "dataset.json"} if count == 1
                           else {f"run{tag}.yaml"})
        if count == 1:  # the dataset formats, written by this run's finish only
            for sub in ("masks", "yolo-seg", "yolo-det"):
                remove_stale_temps(out_dir / sub, recursive=True)
        meta = self._provenance(cfg, qs, started, command, shard, inputs, coco_gt, images_dir)
        meta["image_root"] = stored["inputs"].get("image_root")
        if skipped:
            meta["skipped_entries"] = skipped
        plan = RunPlan(out_dir, (index, count), records, out_dir / f"run{tag}.yaml", stored, qs, batches, todo,
                       meta, gt, ignored, retry_failed)
        write_yaml(plan.run_yaml, {**meta, "status": "running"})
        return plan

    def settings(self, qs: QuerySet) -> dict:
        """Everything that changes a run's results, as recorded in its manifest."""
        cfg, be = self.cfg, self.backend
        model = {k: v for k, v in be.describe().items() if k not in ("device", "mean", "std", "checkpoint", "onnx_dir")}
        norm = self.normalization
        return {
            "model": model,
            "explainer": {"method": cfg.explainer.method, "layers": self.layers(),
                          "empty_prompt": cfg.explainer.empty_prompt, "shifts": cfg.explainer.shifts,
                          "contrast": cfg.explainer.contrast},
            "queries": qs.describe(),
            "preprocess": {**cfg.preprocess.model_dump(), "mean": list(norm.mean), "std": list(norm.std)},
            "postprocess": cfg.postprocess.model_dump(),
            "export": cfg.export.model_dump(),
            "run": {"batch_size": cfg.run.batch_size, "max_pixels": cfg.run.max_pixels,
                    "max_aspect_ratio": cfg.run.max_aspect_ratio},
        }

    def execute(self, plan: RunPlan) -> dict:
        """The local engine: decode in DataLoader workers, label batch by batch, append the records."""
        cfg = self.cfg
        todo_items = [it for b in plan.todo for it in b]
        loader = torch.utils.data.DataLoader(
            _Dataset(todo_items, cfg, self.patch, self.normalization, self._keep_image),
            batch_size=cfg.run.batch_size, shuffle=False,
            num_workers=cfg.run.workers if len(todo_items) > 1 else 0, collate_fn=_collate, persistent_workers=False)
        counts = {"images": sum(len(b) for b in plan.batches), "resumed_skipped": sum(len(b) for b in plan.batches)
                  - len(todo_items), "labelled": 0, "failed": 0, "detections": 0}
        qs, text, bg = self.queries(None, plan.queries.categories)
        self.stats = {}
        from tqdm import tqdm

        progress = tqdm(total=len(todo_items), unit="img", disable=not cfg.run.progress, dynamic_ncols=True,
                        desc=f"ovlabel{plan.tag}")
        done = 0
        try:
            with RecordWriter(plan.records) as writer:
                if writer.torn_bytes:
                    log.warning("%s ended with a partial record (%d bytes, cut off by an interruption); removed",
                                plan.records, writer.torn_bytes)
                for batch in loader:
                    records = self._label_prepared(batch, qs, text, bg, plan.out_dir)
                    for sub in self._extra_dirs(plan.out_dir):  # outputs durable before their records
                        fsync_dir(sub)
                    writer.append(records)
                    done += len(records)
                    for r in records:
                        if "error" in r:
                            counts["failed"] += 1
                        else:
                            counts["labelled"] += 1
                            counts["detections"] += len(r["results"])
                    progress.update(len(batch))
                    progress.set_postfix(failed=counts["failed"], dets=counts["detections"])
        except OutputError as e:
            raise OutputError(f"{e}\n{done} image(s) labelled in this attempt are kept in {plan.records}; once "
                              "the problem is fixed, rerun the same command with --resume") from None
        finally:
            progress.close()
        counts["postprocess"] = dict(self.stats)
        return counts

    def _extra_dirs(self, out_dir: Path) -> list[Path]:
        exp = self.cfg.export
        wanted = {"heatmaps": exp.heatmaps, "overlays": exp.overlays}
        return [out_dir / d for d, on in wanted.items() if on and (out_dir / d).is_dir()]

    def finish(self, plan: RunPlan, counts: dict) -> dict:
        """Write ``run.yaml`` and, for an unsharded run, merge the records into the COCO files."""
        cfg = self.cfg
        failures = [{"file": r["image"]["file_name"], "error": r["error"]}
                    for r in _latest_records([plan.records]) if "error" in r]
        summary = {**plan.meta, "status": "complete", "end_time": _now(), "counts": counts, "failures": failures,
                   "ignored_non_images": plan.ignored}
        if plan.shard[1] == 1:
            try:
                merged = write_dataset([plan.records], plan.out_dir, plan.queries.categories,
                                       export_cfg=cfg.export.model_dump(), gt=plan.gt,
                                       image_root=plan.manifest["inputs"].get("image_root"),
                                       image_paths={it.id: it.path for it in run_manifest.items(plan.manifest)})
            except OutputError as e:
                raise OutputError(f"{e}\nAll images are labelled (records kept); once the problem is fixed, rerun the "
                                  "same command with --resume to write the merged files") from None
            summary["outputs"] = {"predictions": "predictions.json", "dataset": "dataset.json",
                                  "annotations": merged["annotations"], "images": merged["images"],
                                  "formats": merged["formats"]}
        write_yaml(plan.run_yaml, summary)
        return summary

    def _write_extras(self, out_dir: Path, prep: Prepared, res: ImageResult) -> None:
        exp = self.cfg.export
        name = safe_name(prep.item)
        if exp.heatmaps:
            save_heatmaps(out_dir / "heatmaps" / f"{name}.npz", res.maps, res.queries, prep.item.id,
                          prep.item.file_name, presence=res.presence, durable=False)
        if exp.overlays and prep.image is not None:
            save_image_atomic(out_dir / "overlays" / f"{name}.jpg",
                              draw_overlay(prep.image, res.detections, res.maps, res.queries, res.presence),
                              durable=False)

    def _provenance(self, cfg: Config, qs: QuerySet, started, command, shard, inputs, coco_gt, images_dir) -> dict:
        import open_clip
        import timm

        return {
            "ovlabel": __version__,
            "versions": {k: str(v) for k, v in {
                "python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
                "timm": timm.__version__, "numpy": np.__version__,
                "pycocotools": _dist_version("pycocotools")}.items()},
            "command": command if command is not None else " ".join(sys.argv),
            "start_time": started,
            "shard": f"{shard[0]}/{shard[1]}",
            "image_root": None,
            "inputs": [str(i) for i in inputs] if inputs else {"coco_gt": str(coco_gt), "images_dir": str(images_dir)},
            "model": self.backend.describe(),
            "explainer": {"method": cfg.explainer.method, "layers": self.layers(),
                          "layers_setting": cfg.explainer.layers, "empty_prompt": cfg.explainer.empty_prompt},
            "queries": qs.describe(),
            "config": cfg.model_dump(exclude={"extends"}),
        }


def _failure(e: BaseException, during: str = "labelling") -> str:
    """The reason recorded for an image whose processing raised ``e``."""
    if isinstance(e, OutputError):
        raise e
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "out of memory" if isinstance(e, MemoryError) or "out of memory" in message.lower() else type(e).__name__
    return f"{during} failed ({kind}){': ' + message if message else ''}"


def _latest_records(paths) -> list[dict]:
    latest: dict[int, dict] = {}
    for rec in read_records(paths):
        latest[int(rec["image"]["id"])] = rec
    return [latest[k] for k in sorted(latest)]


def _done_ids(records: Path, retry_failed: bool) -> set[int]:
    """Ids with a record (with ``retry_failed``, only those whose latest record is not a failure)."""
    return {int(r["image"]["id"]) for r in _latest_records([records]) if not (retry_failed and "error" in r)}


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Moved to :func:`ovlabel.pipeline.merge.merge_runs` (kept here for imports of earlier versions)."""
    from .merge import merge_runs as _merge

    return _merge(run_dirs, out_dir)


def _as_rgb(image, max_pixels: int) -> np.ndarray:
    from PIL import Image

    from .images import _rgb, _to_uint8, read_image

    if isinstance(image, (str, Path)):
        return read_image(image, max_pixels)
    if isinstance(image, Image.Image):
        return _rgb(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"an image array must be [H,W,3] (RGB) or [H,W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr)
    return np.ascontiguousarray(arr[..., :3])


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["ImageResult", "Pipeline", "RunPlan"]
