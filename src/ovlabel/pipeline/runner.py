"""The labelling pipeline: load → preprocess → encode queries → explain (all queries, one forward per
batch) → postprocess → records. ``Pipeline`` labels one image (``pipe(image)``) or one batch
(:meth:`Pipeline.label_batch`, engine-neutral: decoded images in, records out); :meth:`Pipeline.run` runs
a whole labelling job: :func:`ovlabel.pipeline.run.plan_run`, an engine of :mod:`ovlabel.pipeline.engines`,
:func:`ovlabel.pipeline.run.finish_run`. One image that fails — unreadable, out of memory, non-finite
maps — becomes a failure record; the run goes on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.categories import Categories
from ..common.files import fault_point
from ..config import Config, load_config
from ..errors import ConfigError, ImageReadError, OutputError
from ..export.heatmaps import save_heatmaps
from ..export.overlays import draw_overlay, save_image_atomic
from ..export.records import make_record
from ..legrad.explain import get_method
from ..postprocess import Detections, ImageMaps, Postprocessor
from ..postprocess.scoring import presence_of
from .backend import Backend, TorchBackend
from .engines import get_engine
from .images import DecodedImage, ImageItem, as_rgb
from .models import LoadedModel, default_weights, load_model
from .onnx_backend import OnnxBackend
from .preprocess import Normalization, Prepared, prepare, prepare_decoded
from .queries import EMPTY_PROMPT, QuerySet, build_queries, embed_queries
from .run import RunLayout, finish_run, plan_run

log = logging.getLogger(__name__)


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


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides as dotted keys: ``model__name`` → ``model.name`` (its value set as given); a whole
    section given as a dict (``postprocess={"threshold": {"method": "otsu"}}``) is merged into the section,
    one dotted key per leaf."""
    def leaves(prefix: str, value: Any) -> dict[str, Any]:
        if not (isinstance(value, dict) and value):
            return {prefix: value}
        return {k: v for key, sub in value.items() for k, v in leaves(f"{prefix}.{key}", sub).items()}

    out: dict[str, Any] = {}
    for k, v in overrides.items():
        out.update(leaves(k, v) if "." not in k and "__" not in k else {k.replace("__", "."): v})
    return out


class Pipeline:
    """The labelling pipeline. Build it with :meth:`from_config`; call it on one image, or :meth:`run` it
    over inputs into an output folder."""

    def __init__(self, config: Config, *, model: LoadedModel | None = None, backend: Backend | None = None) -> None:
        weights = default_weights(config.model.name, config.model.pretrained)
        if model is None and weights != config.model.pretrained:  # the config records the weights used
            config = config.model_copy(update={"model": config.model.model_copy(update={"pretrained": weights})})
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
        cfg = load_config(source, _dotted(overrides) or None)
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
    def has_model_loaded(self) -> bool:
        return self._backend is not None or self._model is not None

    @property
    def keep_image(self) -> bool:
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
        return presence_of(self.backend.logits, embeddings, text, background, self.cfg.postprocess.presence,
                           self.backend.has_logit_bias)

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
        arr = as_rgb(image, self.cfg.run.max_pixels)
        item = ImageItem(0, Path(str(image)) if isinstance(image, (str, Path)) else Path("image"), "image")
        prep = prepare(item, arr, self.cfg, self.patch, self.normalization, keep_image=self.keep_image)
        return self.process([prep], qs, text, bg)[0]

    # ------------------------------------------------------------------------------------- per batch
    def label_batch(self, images: Sequence[DecodedImage], out_dir: str | Path | None = None, *,
                    queries: Sequence[str] | None = None, categories: Categories | None = None) -> list[dict]:
        """Label decoded images (from any engine) and return their records, ready for
        :meth:`ovlabel.export.records.RecordWriter.append`. Per-image outputs (heatmaps, overlays, masks)
        are written into ``out_dir`` when the config asks for them."""
        qs, text, bg = self.queries(queries, categories)
        norm = self.normalization
        prepared = [prepare_decoded(d, self.cfg, self.patch, norm, self.keep_image) for d in images]
        return self.label_prepared(prepared, qs, text, bg, None if out_dir is None else Path(out_dir))

    def label_prepared(self, batch: list[Prepared], qs: QuerySet, text, bg, out_dir: Path | None) -> list[dict]:
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
                    self.write_extras(out_dir, prep, res)
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
    def run(self, inputs: Sequence[str | Path] = (), out_dir: str | Path = "ovlabel-out", *,
            queries: Sequence[str] | None = None, queries_file: str | Path | None = None,
            coco_gt: str | Path | None = None, images_dir: str | Path | None = None, resume: bool = False,
            shard: tuple[int, int] = (0, 1), retry_failed: bool = False, command: str | None = None,
            engine: str = "local", engine_options: Any = None) -> dict:
        """Label ``inputs`` into ``out_dir``: plan (:func:`~ovlabel.pipeline.run.plan_run`), execute with the
        engine registered as ``engine`` (``"local"``: this process and its DataLoader workers; ``"ray"``: a Ray
        cluster, ``engine_options`` its ``RayOptions``), finish (:func:`~ovlabel.pipeline.run.finish_run`).
        Returns the run summary (what ``run.yaml`` holds)."""
        eng = get_engine(engine)
        planner, options = self, engine_options
        if hasattr(eng, "before_plan"):  # checks before any work, and who plans (e.g. on the CPU)
            planner, options = eng.before_plan(self, options)
        plan = plan_run(planner, inputs, out_dir, queries=queries, queries_file=queries_file, coco_gt=coco_gt,
                        images_dir=images_dir, resume=resume, shard=shard, retry_failed=retry_failed,
                        command=command)
        counts = eng.execute(planner, plan, options, config=self.cfg)
        return finish_run(planner, plan, counts)

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

    def output_dirs(self, out_dir: Path) -> list[Path]:
        """The folders of per-image outputs this pipeline writes (to fsync before their records)."""
        exp, layout = self.cfg.export, RunLayout(out_dir)
        wanted = {layout.heatmaps: exp.heatmaps, layout.overlays: exp.overlays}
        return [d for d, on in wanted.items() if on and d.is_dir()]

    def write_extras(self, out_dir: Path, prep: Prepared, res: ImageResult) -> None:
        """The per-image outputs the config asks for: the heatmap cache and the overlay picture."""
        exp, layout = self.cfg.export, RunLayout(out_dir)
        if exp.heatmaps:
            save_heatmaps(layout.heatmap(prep.item), res.maps, res.queries, prep.item.id,
                          prep.item.file_name, presence=res.presence, durable=False)
        if exp.overlays and prep.image is not None:
            save_image_atomic(layout.overlay(prep.item),
                              draw_overlay(prep.image, res.detections, res.maps, res.queries, res.presence),
                              durable=False)


def _failure(e: BaseException, during: str = "labelling") -> str:
    """The reason recorded for an image whose processing raised ``e``."""
    if isinstance(e, OutputError):
        raise e
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "out of memory" if isinstance(e, MemoryError) or "out of memory" in message.lower() else type(e).__name__
    return f"{during} failed ({kind}){': ' + message if message else ''}"


__all__ = ["ImageResult", "Pipeline"]
