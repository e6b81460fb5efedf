"""``ovlabel demo``: the whole job on a fresh machine, offline — generate held-out shape scenes, label them
with the shipped ``ovlabel-shapes`` model through the real pipeline, evaluate, and write a report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..common.files import write_text
from ..datasets.shapes import write_coco
from ..evaluation.coco import evaluate, format_table
from ..evaluation.report import markdown_table, overlay_grid, per_class_ap_chart, pr_curves
from ..evaluation.semantic import semantic_evaluation
from ..export.coco import atomic_write_json, load_coco
from ..pipeline.run import RunLayout
from ..pipeline.runner import Pipeline
from .report import write_report

DEMO_SIZES = ((64, 96), (96, 64), (80, 80), (72, 112), (64, 64))


def random_object_baseline(gt) -> float:
    """Pointing game of a map that points at a random object of the scene: mean over (image, present
    class) pairs of the fraction of the scene's objects that belong to the class."""
    scores = []
    for img_id in gt.imgs:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
        if not anns:
            continue
        cats = [a["category_id"] for a in anns]
        for c in set(cats):
            scores.append(cats.count(c) / len(cats))
    return float(np.mean(scores)) if scores else float("nan")


def run_demo(out_dir: str | Path = "ovlabel-demo", *, images: int = 40, seed: int = 2025, config: str = "shapes",
             overrides: dict | None = None, mask_score_threshold: float = 0.3, progress: bool = True) -> dict:
    t0 = time.time()
    out_dir = Path(out_dir)
    data = out_dir / "data"
    gt_path = write_coco(data, images, seed, sizes=DEMO_SIZES, min_objects=1, max_objects=3)
    t_gen = time.time() - t0
    pipe = Pipeline.from_config(config, **{"export.overlays": True, "export.heatmaps": True,
                                           "run.progress": progress, **(overrides or {})})
    run_dir = out_dir / "run"
    t1 = time.time()
    summary = pipe.run(coco_gt=gt_path, images_dir=data / "images", out_dir=run_dir, command="ovlabel demo")
    t_label = time.time() - t1
    gt = load_coco(gt_path)
    layout = RunLayout(run_dir)
    results = json.loads(layout.predictions.read_text())
    metrics = evaluate(gt, results, curves=True)
    sem = semantic_evaluation(gt, results, heatmap_dir=layout.heatmaps, score_threshold=mask_score_threshold)
    baseline = random_object_baseline(gt)

    fig = out_dir / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    overlays = sorted(layout.overlays.glob("*.jpg"))[:12]
    overlay_grid(overlays, fig / "overlays.png", columns=2, width=1600)  # overlays are wide: image and maps
    per_class_ap_chart(metrics["segm"]["per_class"], fig / "per_class_ap.png", "segm AP per class")
    pr = metrics["segm"]["pr50"]
    valid = {k: np.asarray(v) for k, v in pr.items() if (np.asarray(v) >= 0).any()}
    mean_curve = np.nanmean(np.stack([np.where(v < 0, np.nan, v) for v in valid.values()]), 0) if valid else None
    shown = dict(list(valid.items())[:5])
    if mean_curve is not None:
        shown["mean over classes"] = np.nan_to_num(mean_curve, nan=-1)
    pr_curves(shown, fig / "pr_segm_iou50.png", "segm precision-recall, IoU 0.5")

    s, b = metrics["segm"]["stats"], metrics["bbox"]["stats"]
    maps = sem["maps"]
    result = {
        "images": images, "seed": seed, "config": config, "model": summary["model"],
        "explainer": summary["explainer"],
        "bbox": b, "segm": s, "mask_miou": sem["masks"]["miou"], "mask_score_threshold": mask_score_threshold,
        "pointing_game": maps["pointing_game"], "random_object_baseline": baseline,
        "fgbg_miou_mean_threshold": maps["mean_threshold"]["miou"],
        "seconds": {"generate": round(t_gen, 2), "label": round(t_label, 2), "total": round(time.time() - t0, 2)},
    }
    atomic_write_json(out_dir / "metrics.json", {**result, "coco": metrics, "semantic": sem}, indent=2)
    rows = [["segm", 100 * s["AP"], 100 * s["AP50"], 100 * s["AP75"], 100 * s["AR100"]],
            ["bbox", 100 * b["AP"], 100 * b["AP50"], 100 * b["AP75"], 100 * b["AR100"]]]
    report = f"""# ovlabel demo

{images} generated held-out scenes (seed {seed}, 36 colour–shape classes, non-square canvases) labelled with the
shipped model `{summary['model'].get('model')}` ({summary['model'].get('sha256', '')[:12]}…), explainer
`{summary['explainer']['method']}` on blocks {summary['explainer']['layers']}, config `{config}`, through the real
pipeline (`ovlabel label`); evaluated with pycocotools.

{markdown_table(["", "AP", "AP50", "AP75", "AR100"], rows)}

| localisation | value |
|---|---|
| pointing game (maps of the classes present) | {100 * maps['pointing_game']:.1f} % |
| random object of the scene (baseline) | {100 * baseline:.1f} % |
| mask mIoU (scores ≥ {mask_score_threshold}) | {100 * sem['masks']['miou']:.1f} |
| FG/BG mIoU of the maps (mean threshold) | {100 * maps['mean_threshold']['miou']:.1f} |

Time: {result['seconds']['total']:.1f} s in all ({result['seconds']['label']:.1f} s labelling).

## Overlays
![overlays](figures/overlays.png)

## Per-class AP (segm)
![per-class AP](figures/per_class_ap.png)

## Precision–recall (segm, IoU 0.5)
![PR curves](figures/pr_segm_iou50.png)

## COCO numbers (pycocotools)
```
{format_table({k: metrics[k] for k in ("bbox", "segm")})}
```

Open `report/index.html` in a browser for the gallery (class filter, score slider, maps), per-class AP and
PR curves. Files: `run/predictions.json` (COCO results), `run/dataset.json` (pseudo-labels), `run/overlays/`,
`run/heatmaps/`, `run/run.yaml` (provenance), `metrics.json`; the data: `data/annotations.json`, `data/images/`.
"""
    write_text(out_dir / "report.md", report)
    result["report"] = write_report(run_dir, out_dir / "report", gt=gt_path)["index"]  # the HTML report
    return result
