"""The labelling pipeline: load → preprocess → encode queries → explain (all queries, one forward per
batch) → postprocess → write. ``Pipeline`` is the Python API; ``ovlabel label`` calls ``Pipeline.run``.

Runs stream: one JSON line per image is appended to ``OUTDIR/records/`` after every batch, so memory
stays flat and a killed run (even ``kill -9``) loses at most the batch in flight. ``resume=True`` skips the
batches already recorded; ``shard=(i, n)`` takes every n-th batch of the deterministic batch list, so n
processes split a dataset with no overlap, and ``ovlabel merge`` (or the run itself when n = 1) merges the
records into ``predictions.json`` and ``dataset.json``. Batches are formed identically in every case, so
results do not depend on how a run was split or interrupted.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..config import Config, deep_merge, load_config
from ..errors import ConfigError, ImageReadError, InputError
from ..export.categories import Categories, load_categories
from ..export.coco import load_coco, write_label_png
from ..export.heatmaps import save_heatmaps
from ..export.overlays import draw_overlay, save_image_atomic
from ..export.records import RecordWriter, done_image_ids, finalize, read_records
from ..legrad import read_tower, resolve_layers
from ..legrad.explain import explain, get_method
from ..postprocess import Detections, Letterbox, Postprocessor, presence_scores
from .images import ImageItem, coco_inputs, collect_inputs, read_image
from .models import LoadedModel, load_model
from .offline import ensure_writable_dir
from .preprocess import Normalization, Tile, fuse_tiles, tile_regions, to_input
from .queries import QuerySet, build_queries, encode_prompts, encode_queries

log = logging.getLogger(__name__)
EMPTY_PROMPT = "a photo of a"


@dataclass
class ImageResult:
    """The detections and heatmaps of one image (heatmaps ``[K,H,W]`` float32 at its resolution)."""

    detections: Detections
    heatmaps: np.ndarray
    queries: tuple[str, ...]
    presence: np.ndarray


@dataclass
class Prepared:
    item: ImageItem
    image: np.ndarray | None = None
    tensor: torch.Tensor | None = None
    letterbox: Letterbox | None = None
    tiles: list[tuple[Tile, torch.Tensor, Letterbox]] | None = None
    error: str | None = None


def safe_name(item: ImageItem) -> str:
    """A file name for per-image outputs that stays inside its folder: ``<id>_<sanitised stem>``."""
    stem = Path(item.file_name).stem
    stem = re.sub(r"[^\w.\-]+", "_", stem, flags=re.UNICODE).strip("._") or "image"
    return f"{item.id:06d}_{stem[:80]}"


class _Dataset(torch.utils.data.Dataset):
    """Decoding and preprocessing, run in DataLoader workers."""

    def __init__(self, items: Sequence[ImageItem], cfg: Config, patch: tuple[int, int], norm: Normalization,
                 keep_image: bool) -> None:
        self.items, self.cfg, self.patch, self.norm, self.keep_image = list(items), cfg, patch, norm, keep_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        item = self.items[i]
        try:
            image = read_image(item.path, self.cfg.run.max_pixels)
        except ImageReadError as e:
            return Prepared(item, error=str(e))
        return prepare(item, image, self.cfg, self.patch, self.norm, self.keep_image)


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
    return Prepared(item, image if keep else None, tensor, lb, tiles)


def _collate(batch: list[Prepared]) -> list[Prepared]:
    return batch


class Pipeline:
    """The labelling pipeline. Build it with :meth:`from_config`; call it on one image, or :meth:`run` it
    over inputs into an output folder."""

    def __init__(self, config: Config, *, model: LoadedModel | None = None) -> None:
        self.cfg = config
        self._model = model
        self._query_cache: dict[tuple, tuple[QuerySet, torch.Tensor, torch.Tensor | None]] = {}
        self.postprocessor = Postprocessor.from_config(config.postprocess)
        self.method = get_method(config.explainer.method)  # unknown method: error before any work

    @classmethod
    def from_config(cls, source: str | Path | dict | Config | None = None, **overrides: Any) -> Pipeline:
        """``source``: a preset name, a YAML path, a dict or a :class:`Config`. ``overrides``: dotted keys
        (``**{"model.name": "ViT-B-16"}``, or ``model__name=...``) or whole sections as dicts
        (``postprocess={"threshold": {"method": "otsu"}}``)."""
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
            self._model = load_model(m.name, m.pretrained, device=m.device, precision=m.precision)
        return self._model

    @property
    def patch(self) -> tuple[int, int]:
        return read_tower(self.model.model).patch_size

    def layers(self) -> list[int]:
        return resolve_layers(self.cfg.explainer.layers, len(read_tower(self.model.model).blocks),
                              self.method.default_layers)

    def queries(self, names: Sequence[str] | None = None, categories: Categories | None = None):
        """The query set and its embeddings (computed once per distinct query list)."""
        import open_clip

        key = (tuple(names or ()), None if categories is None else (categories.ids, categories.names))
        if key not in self._query_cache:
            qs = build_queries(self.cfg.queries, categories, list(names) if names else None)
            lm = self.model
            tokenizer = open_clip.get_tokenizer(lm.provenance.get("open_clip_arch", lm.name))
            text, bg = encode_queries(lm.model, tokenizer, qs, lm.device)
            self._query_cache[key] = (qs, text, bg)
            if self.cfg.explainer.empty_prompt:
                self._empty = encode_prompts(lm.model, tokenizer, [EMPTY_PROMPT], lm.device)[0]
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
        lm = self.model
        ex = self.cfg.explainer
        options: dict = {}
        if ex.chunk_size:
            options["chunk_size"] = ex.chunk_size
        if ex.empty_prompt and not raw:
            options["empty_prompt"] = self._empty
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        maps: list = [None] * len(tensors)
        embs: list = [None] * len(tensors)
        for idx in groups.values():
            batch = torch.stack([tensors[i] for i in idx]).to(lm.device, lm.dtype)
            out = explain(lm.model, batch, text.to(lm.dtype), method=ex.method, layers=ex.layers,
                          normalize=not raw, embeddings=True, **options)
            for j, i in enumerate(idx):
                maps[i] = out.maps[j].float().cpu()
                embs[i] = out.embeddings[j].float()
        return maps, embs

    def _finish(self, prep: Prepared, maps, emb, qs: QuerySet, text, bg) -> ImageResult:
        if prep.tiles:
            heat = fuse_tiles(prep.image.shape[:2], [t for t, _, _ in prep.tiles], maps)
        else:
            heat = prep.letterbox.to_original(maps).numpy()
        pres = presence_scores(self.model.model, emb[None], text, bg, self.cfg.postprocess.presence)[0]
        dets = self.postprocessor(heat, qs.names, qs.categories.ids, pres)
        return ImageResult(dets, np.asarray(heat, dtype=np.float32), qs.names, pres)  # no copy when float32

    def process(self, batch: list[Prepared], qs: QuerySet, text, bg) -> list[ImageResult | None]:
        """Results for prepared images (``None`` where ``prep.error`` is set)."""
        ok = [p for p in batch if p.error is None]
        plain = [p for p in ok if not p.tiles]
        results: dict[int, ImageResult] = {}
        if plain:
            maps, embs = self._explain([p.tensor for p in plain], text)
            for p, m, e in zip(plain, maps, embs):
                results[id(p)] = self._finish(p, m, e, qs, text, bg)
        for p in ok:
            if p.tiles:
                raw, _ = self._explain([t for _, t, _ in p.tiles], text, raw=True)
                tile_maps = [lb.to_original(m).numpy() for (_, _, lb), m in zip(p.tiles, raw)]
                _, (emb,) = self._explain([p.tensor], text)
                results[id(p)] = self._finish(p, tile_maps, emb, qs, text, bg)
        return [results.get(id(p)) for p in batch]

    def __call__(self, image: str | Path | np.ndarray | Any, queries: Sequence[str] | None = None) -> ImageResult:
        """Label one image (a path, a PIL image or an RGB array) with ``queries`` (default: the config's)."""
        qs, text, bg = self.queries(queries)
        arr = _as_rgb(image, self.cfg.run.max_pixels)
        item = ImageItem(0, Path(str(image)) if isinstance(image, (str, Path)) else Path("image"), "image")
        lm = self.model
        prep = prepare(item, arr, self.cfg, self.patch, Normalization(lm.mean, lm.std), keep_image=False)
        return self.process([prep], qs, text, bg)[0]

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
        command: str | None = None,
    ) -> dict:
        """Label ``inputs`` into ``out_dir`` (see the module docstring). Returns the run summary."""
        started = _now()
        cfg = self.cfg
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise InputError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
        # ---- everything that can be wrong is checked before any work
        gt = None
        categories = None
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
            items = coco_inputs(gt, images_dir)
            ignored: list[str] = []
        else:
            if not inputs:
                raise InputError("no inputs: pass folders, image files or .txt lists, or --coco-gt with --images-dir")
            items, ignored = collect_inputs(list(inputs))
        if queries_file is not None:
            categories = load_categories(queries_file)
        qs, text, bg = self.queries(queries, categories)
        out_dir = ensure_writable_dir(out_dir)
        tag = "" if count == 1 else f".shard-{index}-of-{count}"
        records = out_dir / "records" / f"records{tag}.jsonl"
        if records.exists() and not resume:
            raise InputError(f"{out_dir} already holds a run ({records.relative_to(out_dir)}); pass --resume to "
                             "continue it, or choose another --out")
        lm = self.model
        layer_ids = self.layers()

        # ---- deterministic batches; this shard's share; skip what a previous attempt finished
        B = cfg.run.batch_size
        batches = [items[k : k + B] for k in range(0, len(items), B)][index::count]
        done = done_image_ids([records]) if resume else set()
        todo = [b for b in batches if not all(it.id in done for it in b)]
        todo_items = [it for b in todo for it in b]
        skipped = sum(len(b) for b in batches) - len(todo_items)
        meta = self._provenance(cfg, qs, layer_ids, started, command, shard, inputs, coco_gt, images_dir)
        run_yaml = out_dir / f"run{tag}.yaml"
        _write_yaml(run_yaml, {**meta, "status": "running"})

        norm = Normalization(lm.mean, lm.std)
        keep_image = cfg.export.overlays
        loader = torch.utils.data.DataLoader(
            _Dataset(todo_items, cfg, self.patch, norm, keep_image), batch_size=B, shuffle=False,
            num_workers=cfg.run.workers if len(todo_items) > 1 else 0, collate_fn=_collate,
            persistent_workers=False)
        counts = {"images": sum(len(b) for b in batches), "resumed_skipped": skipped, "labelled": 0, "failed": 0,
                  "detections": 0}
        from tqdm import tqdm

        progress = tqdm(total=len(todo_items), unit="img", disable=not cfg.run.progress, dynamic_ncols=True,
                        desc=f"ovlabel{tag}")
        with RecordWriter(records) as writer:
            for batch in loader:
                results = self.process(batch, qs, text, bg)
                for prep, res in zip(batch, results):
                    image_info = {"id": prep.item.id, "file_name": prep.item.file_name}
                    if res is None:
                        if cfg.run.strict:
                            writer.flush()
                            raise ImageReadError(f"{prep.item.path}: {prep.error}")
                        writer.write({**image_info, "width": 0, "height": 0}, error=prep.error)
                        counts["failed"] += 1
                        log.warning("skipped %s: %s", prep.item.path, prep.error)
                        continue
                    H, W = res.heatmaps.shape[1:]
                    image_info.update(width=int(W), height=int(H))
                    self._write_extras(out_dir, prep, res)
                    writer.write(image_info, res.detections)
                    counts["labelled"] += 1
                    counts["detections"] += len(res.detections)
                writer.flush()
                progress.update(len(batch))
                progress.set_postfix(failed=counts["failed"], dets=counts["detections"])
        progress.close()

        failures = [{"file": r["image"]["file_name"], "error": r["error"]}
                    for r in read_records([records]) if "error" in r]
        summary = {**meta, "status": "complete", "end_time": _now(), "counts": counts, "failures": failures,
                   "ignored_non_images": ignored}
        if count == 1:
            merged = finalize([records], out_dir, qs.categories, gt=gt, segmentation=cfg.export.segmentation,
                              info={"description": "ovlabel pseudo-labels", "version": __version__})
            summary["outputs"] = {"predictions": "predictions.json", "dataset": "dataset.json",
                                  "annotations": merged["annotations"], "images": merged["images"]}
        _write_yaml(run_yaml, summary)
        return summary

    def _write_extras(self, out_dir: Path, prep: Prepared, res: ImageResult) -> None:
        exp = self.cfg.export
        name = safe_name(prep.item)
        if exp.heatmaps:
            save_heatmaps(out_dir / "heatmaps" / f"{name}.npz", res.heatmaps, res.queries, prep.item.id,
                          prep.item.file_name, presence=res.presence)
        if exp.masks:
            write_label_png(out_dir / "masks" / f"{name}.png", res.detections, exp.masks)
        if exp.overlays and prep.image is not None:
            save_image_atomic(out_dir / "overlays" / f"{name}.jpg",
                              draw_overlay(prep.image, res.detections, res.heatmaps, res.queries))

    def _provenance(self, cfg: Config, qs: QuerySet, layer_ids, started, command, shard, inputs, coco_gt,
                    images_dir) -> dict:
        import open_clip
        import timm

        lm = self.model
        return {
            "ovlabel": __version__,
            "versions": {k: str(v) for k, v in {
                "python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
                "timm": timm.__version__, "numpy": np.__version__,
                "pycocotools": _dist_version("pycocotools")}.items()},
            "command": command if command is not None else " ".join(sys.argv),
            "start_time": started,
            "shard": f"{shard[0]}/{shard[1]}",
            "inputs": [str(i) for i in inputs] if inputs else {"coco_gt": str(coco_gt), "images_dir": str(images_dir)},
            "model": {**lm.provenance, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                      "mean": list(lm.mean), "std": list(lm.std)},
            "explainer": {"method": cfg.explainer.method, "layers": layer_ids,
                          "layers_setting": cfg.explainer.layers, "empty_prompt": cfg.explainer.empty_prompt},
            "queries": qs.describe(),
            "config": cfg.model_dump(exclude={"extends"}),
        }


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Merge the records of shard runs (or any runs over disjoint or repeated images) into one set of
    files in ``out_dir``; identical to a single-process run of the same images and config."""
    run_dirs = [Path(d) for d in run_dirs]
    metas, record_files = [], []
    for d in run_dirs:
        yamls = sorted(d.glob("run*.yaml"))
        recs = sorted((d / "records").glob("records*.jsonl"))
        if not yamls or not recs:
            raise InputError(f"{d} is not an ovlabel run folder (no run*.yaml and records/records*.jsonl)")
        for y in yamls:
            metas.append((y, yaml.safe_load(y.read_text(encoding="utf-8"))))
        record_files += recs
    incomplete = [str(y) for y, m in metas if m.get("status") != "complete"]
    if incomplete:
        raise InputError(f"runs not complete (resume them first): {', '.join(incomplete)}")
    first = metas[0][1]
    for y, m in metas[1:]:
        for key in ("queries", "config"):
            if m.get(key) != first.get(key):
                raise ConfigError(f"{y} was run with different {key} than {metas[0][0]}; only runs of the same "
                                  "configuration can be merged")
    cats = Categories(tuple(first["queries"]["ids"]), tuple(first["queries"]["names"]))
    out_dir = ensure_writable_dir(out_dir)
    inputs = first.get("inputs")
    gt = load_coco(inputs["coco_gt"]) if isinstance(inputs, dict) and inputs.get("coco_gt") not in (None, "None") \
        else None
    merged = finalize(record_files, out_dir, cats, gt=gt, segmentation=first["config"]["export"]["segmentation"],
                      info={"description": "ovlabel pseudo-labels", "version": __version__})
    summary = {"ovlabel": __version__, "status": "complete", "merged_from": [str(y) for y, _ in metas],
               "end_time": _now(), "queries": first["queries"], "config": first["config"],
               "model": first["model"], "explainer": first["explainer"],
               "counts": {"images": merged["images"], "annotations": merged["annotations"],
                          "failed": len(merged["failures"])}, "failures": merged["failures"]}
    _write_yaml(out_dir / "run.yaml", summary)
    return summary


def _as_rgb(image, max_pixels: int) -> np.ndarray:
    from PIL import Image

    if isinstance(image, (str, Path)):
        return read_image(image, max_pixels)
    if isinstance(image, Image.Image):
        from .images import _rgb

        return _rgb(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"an image array must be [H,W,3] (RGB) or [H,W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        from .images import _to_uint8

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


def _write_yaml(path: Path, data: dict) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)

