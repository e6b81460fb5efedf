"""Proof by training: is a model trained on ovlabel's pseudo-labels any good? (autodistill's flow: label →
train a target model.)

    python benchmarks/distill.py                         # 1,000 training scenes, 200 test scenes
    python benchmarks/distill.py --train 300 --epochs 5  # a quick look

1. Generate a training split (``--train`` scenes, ``--seed``) and a test split (``--test``, another seed).
2. The teacher: ``ovlabel label TRAIN/images --queries-file classes.txt --model ovlabel-shapes --format
   yolo-seg`` — the shipped model with the default dataset settings, no option chosen for this benchmark.
3. The same student trained twice with the same budget: on ovlabel's ``yolo-seg/`` dataset, and on the exact
   ground truth written by the same exporter (so both datasets differ only in their labels): Ultralytics'
   ``yolo11n-seg.yaml`` from scratch (no pretrained weights), ``--epochs`` epochs at ``--imgsz``, on the CPU.
   Ultralytics brings its own OpenCV, so it is installed in its own virtual environment (``--venv``, made
   with ``--system-site-packages`` to share torch) when missing.
4. Both students and the teacher are evaluated on the test split with pycocotools (segm and bbox AP); the
   gap is split into missed objects, false positives and boundaries (matches at IoU 0.5 that fail at 0.75).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import in_folder

STUDENT = r'''
import json, sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from ultralytics import YOLO

data, out, name, epochs, imgsz, batch, test_json, test_images, results = sys.argv[1:]
model = YOLO("yolo11n-seg.yaml")  # from scratch: no pretrained weights
model.train(data=data, epochs=int(epochs), imgsz=int(imgsz), batch=int(batch), workers=0, device="cpu",
            pretrained=False, amp=False, plots=False, seed=0, deterministic=True, project=out, name=name,
            exist_ok=True, verbose=False, val=False)
test = json.loads(Path(test_json).read_text())
index_to_id = {i: c["id"] for i, c in enumerate(test["categories"])}
preds = []
for img in test["images"]:
    r = model.predict(str(Path(test_images) / img["file_name"]), imgsz=int(imgsz), conf=0.001, iou=0.6,
                      max_det=100, retina_masks=True, device="cpu", verbose=False)[0]
    if r.masks is None:
        continue
    masks = r.masks.data.cpu().numpy() > 0.5
    for m, c, s in zip(masks, r.boxes.cls.cpu().numpy(), r.boxes.conf.cpu().numpy()):
        if not m.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        preds.append({"image_id": img["id"], "category_id": index_to_id[int(c)], "score": float(s),
                      "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                      "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
Path(results).write_text(json.dumps(preds))
'''


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import ultralytics"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "ultralytics"], check=True)
    return python


def teacher(root: Path, train_gt: Path, test_gt: Path) -> dict:
    from ovlabel.cli import main
    from ovlabel.datasets.shapes import CLASSES

    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    t0 = time.perf_counter()
    if main(["label", str(train_gt.parent / "images"), "--queries-file", str(root / "classes.txt"), "--out",
             str(root / "teacher-train"), "--model", "ovlabel-shapes", "--format", "yolo-seg", "--no-progress"]):
        raise SystemExit("labelling the training split failed")
    seconds = time.perf_counter() - t0
    if main(["label", "--coco-gt", str(test_gt), "--images-dir", str(test_gt.parent / "images"), "--out",
             str(root / "teacher-test"), "--model", "ovlabel-shapes", "--no-progress"]):
        raise SystemExit("labelling the test split failed")
    return {"label_seconds": seconds}


def ground_truth_dataset(root: Path, train_gt: Path) -> Path:
    """The exact ground truth in the same YOLO layout, written by the same exporter."""
    from ovlabel.export.formats import export

    gt = json.loads(train_gt.read_text())
    paths = {img["id"]: train_gt.parent / "images" / img["file_name"] for img in gt["images"]}
    export(["yolo-seg"], train_gt, root / "exact", paths, {"val_fraction": 0.1})
    return root / "exact" / "yolo-seg" / "data.yaml"


def gap(gt, results: list[dict]) -> dict:
    """Missed objects, false positives and boundaries of a model's confident detections (score ≥ 0.25)."""
    from ovlabel.evaluation.dataset import dataset_quality

    confident = [r for r in results if r["score"] >= 0.25]
    at50 = dataset_quality(gt, confident, iou=0.5)
    at75 = dataset_quality(gt, confident, iou=0.75)
    return {"recall@0.5": at50.recall, "precision@0.5": at50.precision,
            "missed": at50.instances - at50.true_positives, "false_positives": at50.annotations - at50.true_positives,
            "boundary": at50.true_positives - at75.true_positives}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=5150, help="training split (the test split uses seed + 1)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "ovlabel-distill-venv"))
    p.add_argument("--out", help="keep everything here (default: a temporary folder)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    in_folder(args.out, "distill-", lambda folder: run(args, folder))


def run(args, root: Path) -> None:
    from ovlabel.datasets.shapes import write_coco
    from ovlabel.evaluation.coco import evaluate
    from ovlabel.export.coco import load_coco

    python = ensure_venv(Path(args.venv))
    train_gt = write_coco(root / "train", args.train, args.seed)
    test_gt = write_coco(root / "test", args.test, args.seed + 1)
    gt = load_coco(test_gt)
    report = {"train_scenes": args.train, "test_scenes": args.test, "epochs": args.epochs, "imgsz": args.imgsz}
    report["teacher"] = teacher(root, train_gt, test_gt)
    datasets = {"ovlabel": root / "teacher-train" / "yolo-seg" / "data.yaml",
                "ground truth": ground_truth_dataset(root, train_gt)}
    rows = {}
    teacher_preds = json.loads((root / "teacher-test" / "predictions.json").read_text())
    rows["teacher (ovlabel-shapes)"] = (teacher_preds, None)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    for name, data in datasets.items():
        out = root / f"student-{name.replace(' ', '-')}"
        results = out / "predictions.json"
        t0 = time.perf_counter()
        subprocess.run([str(python), "-c", STUDENT, str(data), str(out), "train", str(args.epochs), str(args.imgsz),
                        str(args.batch), str(test_gt), str(test_gt.parent / "images"), str(results)],
                       check=True, env=env, cwd=root)
        rows[f"student on {name}"] = (json.loads(results.read_text()), time.perf_counter() - t0)
    print(f"\n{args.train} training scenes (seed {args.seed}), {args.test} test scenes (seed {args.seed + 1}); "
          f"student: yolo11n-seg from scratch, {args.epochs} epochs at {args.imgsz} px on the CPU\n")
    print("| model | segm AP | segm AP50 | bbox AP | bbox AP50 | missed | false positives | boundary | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (preds, seconds) in rows.items():
        m = evaluate(gt, preds) if preds else None
        s = m["segm"]["stats"] if m else {"AP": 0.0, "AP50": 0.0}
        b = m["bbox"]["stats"] if m else {"AP": 0.0, "AP50": 0.0}
        g = gap(gt, preds)
        report[name] = {"segm": s, "bbox": b, "gap": g, "seconds": seconds}
        print(f"| {name} | {100 * s['AP']:.1f} | {100 * s['AP50']:.1f} | {100 * b['AP']:.1f} | {100 * b['AP50']:.1f} | "
              f"{g['missed']} | {g['false_positives']} | {g['boundary']} | "
              f"{'' if seconds is None else f'{seconds / 60:.1f}'} |")
    ours, exact = report["student on ovlabel"]["segm"]["AP"], report["student on ground truth"]["segm"]["AP"]
    print(f"\nstudent on ovlabel's labels / student on the ground truth: segm AP {100 * ours / max(exact, 1e-9):.0f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
