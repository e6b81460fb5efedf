"""Proof by training: is a model trained on ovlabel's pseudo-labels any good? (autodistill's flow: label →
train a target model.)

    python benchmarks/distill.py                         # 1,000 training scenes, 200 test scenes, ~50 min
    python benchmarks/distill.py --attribute --out RUN   # + a student on ovlabel's masks with true classes
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
5. ``--attribute`` trains a third student on ovlabel's masks with their true classes (each annotation that
   matches a ground-truth object at mask IoU ≥ 0.5, whatever its class, takes that object's class; the rest
   are left as they are): the student's loss from the teacher's wrong classes is then its gap to the student
   on ovlabel's labels, and the loss from missed objects, false positives and boundaries its gap to the
   student on the ground truth.

A run kept with ``--out`` resumes: labelling picks up where it stopped and a student whose predictions are
written is not trained again; the folder's ``settings.json`` must then match the command's settings.
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
             str(root / "teacher-train"), "--model", "ovlabel-shapes", "--format", "yolo-seg", "--no-progress",
             "--resume"]):  # --resume: a kept --out picks up where it stopped (a new one starts afresh)
        raise SystemExit("labelling the training split failed")
    seconds = time.perf_counter() - t0
    if main(["label", "--coco-gt", str(test_gt), "--images-dir", str(test_gt.parent / "images"), "--out",
             str(root / "teacher-test"), "--model", "ovlabel-shapes", "--no-progress", "--resume"]):
        raise SystemExit("labelling the test split failed")
    return {"label_seconds": seconds}


def ground_truth_dataset(root: Path, train_gt: Path) -> Path:
    """The exact ground truth in the same YOLO layout, written by the same exporter."""
    from ovlabel.export.formats import export

    gt = json.loads(train_gt.read_text())
    paths = {img["id"]: train_gt.parent / "images" / img["file_name"] for img in gt["images"]}
    export(["yolo-seg"], train_gt, root / "exact", paths, {"val_fraction": 0.1})
    return root / "exact" / "yolo-seg" / "data.yaml"


def true_classes(root: Path, train_gt: Path) -> Path:
    """ovlabel's dataset with every mask that matches a ground-truth object (IoU ≥ 0.5, greedy by score,
    any class) given that object's class; the same masks, images and split."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from ovlabel.export.formats import export

    gt = json.loads(train_gt.read_text())
    ours = json.loads((root / "teacher-train" / "dataset.json").read_text())
    gt_id = {img["file_name"]: img["id"] for img in gt["images"]}
    truth: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        truth.setdefault(a["image_id"], []).append(a)
    by_image: dict[int, list[dict]] = {}
    for a in ours["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    changed = 0
    for img in ours["images"]:
        objects = truth.get(gt_id[img["file_name"]], [])
        anns = sorted(by_image.get(img["id"], []), key=lambda a: -a["score"])
        if not objects or not anns:
            continue
        h, w = img["height"], img["width"]
        rle = [mask_utils.merge(mask_utils.frPyObjects(o["segmentation"], h, w)) if isinstance(o["segmentation"], list)
               else o["segmentation"] for o in objects]
        ious = np.asarray(mask_utils.iou([a["segmentation"] for a in anns], rle, [0] * len(rle)))
        taken = np.zeros(len(objects), dtype=bool)
        for i, a in enumerate(anns):
            free = np.where(taken, -1.0, ious[i])
            j = int(free.argmax())
            if free[j] >= 0.5:
                taken[j] = True
                changed += a["category_id"] != objects[j]["category_id"]
                a["category_id"] = objects[j]["category_id"]
    path = root / "true-classes" / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ours))
    print(f"true classes: {changed} of {len(ours['annotations'])} annotations of ovlabel's dataset change class")
    paths = {img["id"]: train_gt.parent / "images" / img["file_name"] for img in ours["images"]}
    export(["yolo-seg"], path, path.parent, paths, {"val_fraction": 0.1})
    return path.parent / "yolo-seg" / "data.yaml"


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
    p.add_argument("--epochs", type=int, default=100, help="per student (100 at 96 px: ~23 min on 2 CPU cores)")
    p.add_argument("--imgsz", type=int, default=96, help="the scenes' longest side: their native scale")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "ovlabel-distill-venv"))
    p.add_argument("--out", help="keep everything here (default: a temporary folder)")
    p.add_argument("--attribute", action="store_true",
                   help="also train a student on ovlabel's masks with their true classes (see 5. above)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    in_folder(args.out, "distill-", lambda folder: run(args, folder))


def run(args, root: Path) -> None:
    from ovlabel.datasets.shapes import write_coco
    from ovlabel.evaluation.coco import evaluate
    from ovlabel.export.coco import load_coco

    settings = {k: getattr(args, k) for k in ("train", "test", "seed", "epochs", "imgsz", "batch")}
    root.mkdir(parents=True, exist_ok=True)
    kept = root / "settings.json"
    if kept.exists() and json.loads(kept.read_text()) != settings:
        raise SystemExit(f"{root} holds a run with other settings ({kept.read_text().strip()}); use another --out")
    kept.write_text(json.dumps(settings))
    python = ensure_venv(Path(args.venv))
    train_gt = write_coco(root / "train", args.train, args.seed)
    test_gt = write_coco(root / "test", args.test, args.seed + 1)
    gt = load_coco(test_gt)
    report = {"train_scenes": args.train, "test_scenes": args.test, "epochs": args.epochs, "imgsz": args.imgsz}
    report["teacher"] = teacher(root, train_gt, test_gt)
    datasets = {"ovlabel": root / "teacher-train" / "yolo-seg" / "data.yaml",
                "ground truth": ground_truth_dataset(root, train_gt)}
    if args.attribute:
        datasets["ovlabel's masks, true classes"] = true_classes(root, train_gt)
    rows = {}
    teacher_preds = json.loads((root / "teacher-test" / "predictions.json").read_text())
    rows["teacher (ovlabel-shapes)"] = (teacher_preds, None)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    for name, data in datasets.items():
        out = root / ("student-" + "".join(c if c.isalnum() else "-" for c in name))
        results, seconds = out / "predictions.json", out / "seconds.txt"
        if not results.exists():  # a student already trained in this --out is kept
            t0 = time.perf_counter()
            subprocess.run([str(python), "-c", STUDENT, str(data), str(out), "train", str(args.epochs),
                            str(args.imgsz), str(args.batch), str(test_gt), str(test_gt.parent / "images"),
                            str(results)], check=True, env=env, cwd=root)
            seconds.write_text(str(time.perf_counter() - t0))
        rows[f"student on {name}"] = (json.loads(results.read_text()),
                                      float(seconds.read_text()) if seconds.exists() else None)
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
