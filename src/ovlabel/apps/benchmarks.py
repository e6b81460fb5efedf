"""The papers' benchmarks, from their real files (``ovlabel benchmark …``): ImageNet-Segmentation,
OpenImages V7 point labels, ImageNet perturbation tests — for every explainer, zero-shot.

Each run streams over the data with a progress bar, appends one JSON line per sample to
``OUT/records.jsonl`` (the per-sample counts every metric is accumulated from), and can be resumed: the
samples already recorded are skipped. A sample that cannot be read (a missing image) gets a failure
record and the run goes on. At the end ``OUT/results.json`` holds the metrics per method with the run's
provenance, and a Markdown table (methods × metrics) is returned and printed.

Protocols (``../shared/design/methods.md``, "Evaluation protocols"):

* ``imagenet-seg``: each image and mask are resized to ``size×size`` (bicubic; nearest for the mask), the
  top-1 zero-shot class over the ImageNet-1k class names (80 prompt templates; or the user's label list)
  is explained; pixel accuracy, FG/BG mIoU (accumulated over the dataset) and mAP (mean over images of
  the map's average precision), with the map's mean and 0.5 as thresholds;
* ``openimages-points``: each image resized to ``size×size``; one map per class with points in the image
  (its display name in the prompt); binarised at 0.5 and read at the points (yes = foreground, no =
  background, unsure ignored); IoU of foreground and background over all points, averaged (p-mIoU);
* ``perturbation``: shorter side resized to ``size`` and centre crop (CLIP's evaluation transform); the
  predicted (or true) class is explained; 10 %, …, 90 % of the pixels deleted (set to the mean colour)
  from the most (positive) or least (negative) relevant; top-1 accuracy against the explained class at
  each step; trapezoid AUC over 0, 0.1, …, 0.9 ×100.

LeGrad's forward pass also gives the image embedding that picks the class, so the class it explains
costs no second pass; the other methods run their own pass.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..common.files import atomic_write, ensure_writable_dir, write_json
from ..datasets.papers import ImageNetSegmentation, imagenet_classes, read_class_descriptions, read_point_labels
from ..datasets.papers import imagenet_val as list_val
from ..errors import ImageReadError, InputError
from ..evaluation.faithfulness import PERTURBATION_STEPS, perturbation_auc, perturbation_curve
from ..evaluation.report import markdown_table
from ..evaluation.semantic import FgBgMetrics, PointMIoU, fgbg_image_stats, point_counts
from ..export.records import RecordWriter, read_jsonl
from ..legrad import read_tower
from ..legrad.base import finalize_maps, resolve_layers
from ..legrad.explain import compute_maps, get_method
from ..legrad.legrad import legrad_forward, legrad_maps
from ..pipeline.images import read_image
from ..pipeline.models import default_weights, load_model
from ..pipeline.queries import encode_prompts, resolve_templates

PUBLISHED = {
    "imagenet-seg": "LeGrad (OpenCLIP ViT-B/16): pixel accuracy 77.5, mIoU 58.7; Chefer 2021 (supervised ViT): "
                    "pixel accuracy 79.7, mIoU 62.0, mAP 86.0",
    "openimages-points": "LeGrad (OpenCLIP ViT-B/16): p-mIoU 48.4; CheferCAM 5.9, rollout 8.8",
    "perturbation": "see Chefer et al. 2021 (Table 2) and LeGrad (Table 4) for the models they used",
}


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Explainer:
    """A model, the methods to compare, and a zero-shot classifier over class names."""

    model: torch.nn.Module
    methods: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    templates: tuple[str, ...]
    tokenizer: Any
    provenance: dict = field(default_factory=dict)
    _classes: dict = field(default_factory=dict)

    @classmethod
    def load(cls, model: str, pretrained: str | None, methods: Sequence[str], *, templates: str = "imagenet",
             device: str = "cpu") -> Explainer:
        import open_clip

        for m in methods:
            get_method(m)  # an unknown method: error before any work
        lm = load_model(model, default_weights(model, pretrained), device=device)
        tok = open_clip.get_tokenizer(lm.provenance.get("open_clip_arch", lm.name))
        return cls(lm.model, list(methods), tuple(lm.mean), tuple(lm.std), resolve_templates(templates), tok,
                   {**lm.provenance, "device": str(lm.device)})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_embeddings(self, names: Sequence[str], templates: Sequence[str] | None = None,
                         cache: Path | None = None) -> torch.Tensor:
        """Unit embeddings ``[C,E]`` of class names (prompt ensembles), computed once per name; with
        ``cache`` (a ``.pt`` file), kept on disk for resumed runs (1,000 ImageNet classes × 80 templates take
        minutes on a CPU)."""

        templates = tuple(templates or self.templates)
        key = {"names": list(names), "templates": list(templates), "model": self.provenance.get("sha256")}
        if cache is not None and cache.is_file():
            stored = torch.load(cache, weights_only=True)
            if stored.get("key") == key:
                return stored["embeddings"]
        new = [n for n in dict.fromkeys(names) if (n, templates) not in self._classes]
        if new:
            flat = [t.format(n) for n in new for t in templates]
            emb = encode_prompts(self.model, self.tokenizer, flat, self.device)
            for n, e in zip(new, F.normalize(emb.reshape(len(new), len(templates), -1).mean(1), dim=-1)):
                self._classes[(n, templates)] = e
        out = torch.stack([self._classes[(n, templates)] for n in names])
        if cache is not None:
            with atomic_write(cache, "wb") as f:
                torch.save({"key": key, "embeddings": out.cpu()}, f)
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return read_tower(self.model).encode(x.to(self.device))

    def explain(self, x: torch.Tensor, choose: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps ``{method: [B,K,H,W]}`` of the texts ``choose(image embeddings [B,E]) -> [K,E]`` picks; LeGrad
        and the choice share one forward pass."""

        x = x.to(self.device)
        tower = read_tower(self.model)
        out = {}
        if "legrad" in self.methods:
            layers = resolve_layers(None, len(tower.blocks), get_method("legrad").default_layers)
            state = legrad_forward(tower, x, layers)
            with torch.no_grad():
                text = choose(tower.embedding(state.tokens))
            out["legrad"] = finalize_maps(legrad_maps(tower, state, text.to(x.dtype)), tower.patch_size,
                                          text.shape[0])
        else:
            text = choose(self.embed(x))
        for m in self.methods:
            if m != "legrad":
                with torch.no_grad():
                    out[m] = compute_maps(self.model, x, text, method=m)
        return {m: out[m].float().cpu() for m in self.methods}


def _to_input(image: np.ndarray, size: int, mean, std, mode: str) -> torch.Tensor:
    """``squash``: resize to size×size (the papers' segmentation protocol); ``crop``: shorter side to
    ``size``, then the centre ``size×size`` (CLIP's evaluation transform). Bicubic; normalised."""
    from PIL import Image

    im = Image.fromarray(image)
    if mode == "squash":
        im = im.resize((size, size), Image.BICUBIC)
    else:
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


# -------------------------------------------------------------------------------------------- the run
class _Run:
    """Records (resume), progress, provenance and the final table of one benchmark run."""

    def __init__(self, kind: str, out_dir: str | Path, explainer: Explainer, *, resume: bool, progress: bool,
                 command: str | None, data: dict, settings: dict) -> None:
        self.kind, self.ex = kind, explainer
        self.out = ensure_writable_dir(out_dir)
        self.records = self.out / "records.jsonl"
        self.meta = {"ovlabel": __version__, "benchmark": kind, "data": data, "settings": settings,
                     "methods": explainer.methods, "model": explainer.provenance,
                     "command": command if command is not None else " ".join(sys.argv),
                     "versions": {"python": platform.python_version(), "torch": torch.__version__},
                     "published": PUBLISHED[kind]}
        meta_path = self.out / "benchmark.json"
        if self.records.exists() and not resume:
            raise InputError(f"{self.out} already holds a {kind} run; pass --resume to continue it, or another --out")
        if resume and meta_path.exists():
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            same = ("benchmark", "data", "settings", "methods")
            diff = [k for k in same if old.get(k) != self.meta.get(k)]
            if diff or old.get("model", {}).get("sha256") != explainer.provenance.get("sha256"):
                raise InputError(f"cannot resume {self.out}: it was run with other {', '.join(diff) or 'weights'}; "
                                 "choose another --out")
        write_json(meta_path, self.meta, indent=1)
        self.done = {str(r["key"]) for r in read_jsonl([self.records])} if resume else set()
        self.progress = progress

    def loop(self, keys: Iterable[Any], total: int, work: Callable[[Any], dict]) -> None:
        from tqdm import tqdm

        todo = [k for k in keys if str(k) not in self.done]
        bar = tqdm(total=total, initial=total - len(todo), unit="img", disable=not self.progress,
                   desc=f"benchmark {self.kind}", dynamic_ncols=True)
        failed = 0
        with RecordWriter(self.records) as writer:
            for k in todo:
                try:
                    rec = {"key": k, **work(k)}
                except InputError as e:
                    rec = {"key": k, "error": str(e)}
                    failed += 1
                writer.append([rec])
                bar.update(1)
                bar.set_postfix(failed=failed)
        bar.close()

    def latest(self) -> list[dict]:
        latest: dict[str, dict] = {}
        for r in read_jsonl([self.records]):
            latest[str(r["key"])] = r
        return list(latest.values())

    def finish(self, results: dict, header: list[str], rows: list[list]) -> dict:
        failures = [{"key": r["key"], "error": r["error"]} for r in self.latest() if "error" in r]
        summary = {**self.meta, "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "results": results, "failures": failures,
                   "table": markdown_table(header, rows)}
        write_json(self.out / "results.json", summary, indent=1)
        return summary


def _result_rows(results: dict, metrics: list[tuple[str, str]]) -> tuple[list[str], list[list]]:
    header = ["method", *[name for name, _ in metrics]]
    rows = [[m, *[100 * r[key] if isinstance(r.get(key), float) else r.get(key) for _, key in metrics]]
            for m, r in results.items()]
    return header, rows


# ------------------------------------------------------------------------------ ImageNet-Segmentation
def imagenet_segmentation(mat: str | Path, out_dir: str | Path, explainer: Explainer, *, size: int = 224,
                          labels: Sequence[str] | None = None, max_images: int | None = None, resume: bool = False,
                          progress: bool = True, command: str | None = None) -> dict:
    data = ImageNetSegmentation(mat)
    names = list(labels) if labels else imagenet_classes()[1]
    n = len(data) if max_images is None else min(len(data), max_images)
    stat = Path(mat).stat()
    run = _Run("imagenet-seg", out_dir, explainer, resume=resume, progress=progress, command=command,
               data={"mat": str(Path(mat).absolute()), "bytes": stat.st_size, "images": n},
               settings={"size": size, "labels": "user" if labels else "imagenet-1k", "classes": len(names),
                         "templates": len(explainer.templates)})
    classes = explainer.class_embeddings(names, cache=run.out / "classes.pt")

    def work(i: int) -> dict:
        image, mask = data[i]
        x = _to_input(image, size, explainer.mean, explainer.std, "squash")
        m = _resize_mask(mask, size)
        chosen: list[int] = []

        def choose(emb: torch.Tensor) -> torch.Tensor:
            k = int((F.normalize(emb.float(), dim=-1) @ classes.T.to(emb.device)).argmax(1)[0])
            chosen.append(k)
            return classes[k : k + 1].to(emb.device)

        maps = explainer.explain(x, choose)
        return {"class": chosen[0], "methods": {meth: {"mean": fgbg_image_stats(mp[0, 0].numpy(), m, "mean"),
                                                        "half": fgbg_image_stats(mp[0, 0].numpy(), m, 0.5)}
                                                 for meth, mp in maps.items()}}

    try:
        run.loop(range(n), n, work)
    finally:
        data.close()
    results = {}
    for meth in explainer.methods:
        mean, half = FgBgMetrics("mean"), FgBgMetrics(0.5)
        for r in run.latest():
            if "methods" in r:
                mean.add(r["methods"][meth]["mean"])
                half.add(r["methods"][meth]["half"])
        a, b = mean.result(), half.result()
        results[meth] = {"pixel_accuracy": a["pixel_accuracy"], "miou": a["miou"], "map": a["map"],
                         "pixel_accuracy_0.5": b["pixel_accuracy"], "miou_0.5": b["miou"], "images": a["images"]}
    header, rows = _result_rows(results, [("pixel acc (mean)", "pixel_accuracy"), ("mIoU (mean)", "miou"),
                                          ("mAP", "map"), ("pixel acc (0.5)", "pixel_accuracy_0.5"),
                                          ("mIoU (0.5)", "miou_0.5"), ("images", "images")])
    return run.finish(results, header, rows)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


# ------------------------------------------------------------------------------------ OpenImages points
def openimages_points(points: str | Path, classes: str | Path, images: str | Path, out_dir: str | Path,
                      explainer: Explainer, *, size: int = 224, max_images: int | None = None,
                      template: str = "a photo of a {}.", resume: bool = False, progress: bool = True,
                      command: str | None = None) -> dict:
    names = read_class_descriptions(classes)
    labels = read_point_labels(points, names)
    folder = Path(images)
    if not folder.is_dir():
        raise InputError(f"--images {folder} is not a folder")
    ids = sorted(labels)[:max_images] if max_images else sorted(labels)
    run = _Run("openimages-points", out_dir, explainer, resume=resume, progress=progress, command=command,
               data={"points": str(Path(points).absolute()), "classes": str(Path(classes).absolute()),
                     "images": str(folder.absolute()), "image_count": len(ids)},
               settings={"size": size, "template": template, "threshold": 0.5})

    def work(image_id: str) -> dict:
        path = folder / f"{image_id}.jpg"
        if not path.is_file():
            raise InputError(f"{path} is missing")

        try:
            image = read_image(path)
        except ImageReadError as e:
            raise InputError(f"{path}: {e}") from None
        pts = [p for p in labels[image_id] if p.yes is not None]
        mids = sorted({p.mid for p in pts})
        if not mids:
            return {"methods": {}}
        text = explainer.class_embeddings([names[m] for m in mids], [template])
        x = _to_input(image, size, explainer.mean, explainer.std, "squash")
        maps = explainer.explain(x, lambda emb: text.to(emb.device))
        out: dict = {}
        for meth, mp in maps.items():
            counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
            for k, mid in enumerate(mids):
                sel = [p for p in pts if p.mid == mid]
                c = point_counts(mp[0, k].numpy(), [(p.x * size, p.y * size) for p in sel], [p.yes for p in sel])
                counts = {key: counts[key] + c[key] for key in counts}
            out[meth] = counts
        return {"classes": len(mids), "methods": out}

    run.loop(ids, len(ids), work)
    results = {}
    for meth in explainer.methods:
        acc = PointMIoU()
        for r in run.latest():
            if meth in r.get("methods", {}):
                acc.add(r["methods"][meth])
        results[meth] = acc.result()
    header, rows = _result_rows(results, [("p-mIoU", "p_miou"), ("IoU fg", "iou_foreground"),
                                          ("IoU bg", "iou_background"), ("points", "points")])
    return run.finish(results, header, rows)


# ----------------------------------------------------------------------------------------- perturbation
def perturbation(imagenet_val: str | Path, out_dir: str | Path, explainer: Explainer, *,
                 devkit: str | Path | None = None, target: str = "predicted", size: int = 224,
                 max_images: int | None = None, resume: bool = False, progress: bool = True,
                 command: str | None = None) -> dict:
    if target not in ("predicted", "true"):
        raise InputError(f"--target must be 'predicted' or 'true', got {target!r}")
    items = list_val(imagenet_val, devkit)[:max_images] if max_images else list_val(imagenet_val, devkit)
    truth = {str(p.relative_to(imagenet_val)): c for p, c in items}
    run = _Run("perturbation", out_dir, explainer, resume=resume, progress=progress, command=command,
               data={"imagenet_val": str(Path(imagenet_val).absolute()), "images": len(items)},
               settings={"size": size, "target": target, "steps": list(PERTURBATION_STEPS),
                         "templates": len(explainer.templates)})
    classes = explainer.class_embeddings(imagenet_classes()[1], cache=run.out / "classes.pt")

    def classify(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(explainer.embed(x).float(), dim=-1) @ classes.T.to(explainer.device)

    def work(key: str) -> dict:
        try:
            image = read_image(Path(imagenet_val) / key)
        except ImageReadError as e:
            raise InputError(f"{key}: {e}") from None
        x = _to_input(image, size, explainer.mean, explainer.std, "crop")
        chosen: list[int] = []

        def choose(emb: torch.Tensor) -> torch.Tensor:
            pred = int((F.normalize(emb.float(), dim=-1) @ classes.T.to(emb.device)).argmax(1)[0])
            k = pred if target == "predicted" else truth[key]
            chosen.extend([pred, k])
            return classes[k : k + 1].to(emb.device)

        maps = explainer.explain(x, choose)
        pred, k = chosen

        def correct(images: torch.Tensor) -> torch.Tensor:
            return (classify(images).argmax(1).cpu() == k).float()

        curves = {}
        for meth, mp in maps.items():
            curves[meth] = {sign: perturbation_curve(correct, x, mp[:, 0], positive=sign == "positive")[0].tolist()
                            for sign in ("positive", "negative")}
        return {"true": truth[key], "predicted": pred, "explained": k, "methods": curves}

    run.loop(sorted(truth), len(truth), work)
    results = {}
    for meth in explainer.methods:
        ok = [r for r in run.latest() if "methods" in r]
        out = {"images": len(ok), "top1": float(np.mean([r["predicted"] == r["true"] for r in ok])) if ok else
               float("nan")}
        for sign in ("positive", "negative"):
            curve = np.mean([r["methods"][meth][sign] for r in ok], axis=0) if ok else np.full(10, np.nan)
            out[f"{sign}_curve"] = curve.tolist()
            out[f"{sign}_auc"] = perturbation_auc(curve) / 100.0
        results[meth] = out
    header, rows = _result_rows(results, [("positive AUC (lower is better)", "positive_auc"),
                                          ("negative AUC (higher is better)", "negative_auc"),
                                          ("clean top-1", "top1"), ("images", "images")])
    return run.finish(results, header, rows)
