"""Pipeline throughput and memory: images/s of ``ovlabel label``, its overhead over ``compute_maps`` alone
on the same batches, and peak RSS after 200 vs 1,000 images.

    python benchmarks/pipeline_speed.py                 # everything below (≈15 min on 2 CPU cores)
    python benchmarks/pipeline_speed.py --skip-vit      # only the tiny-model runs and the memory check

ViT-B-16 at random init on 640×480 JPEGs, input 224 and 448, 10 and 80 queries: pipeline seconds per image
(decode in DataLoader workers, preprocess, explain, postprocess, write) against the seconds per image of
``explain`` alone on the same preprocessed batches, in one process. Tiny model: the shipped
``ovlabel-shapes``; peak RSS of whole runs over 200 and 1,000 images, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, run_isolated


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.BILINEAR)
        img.save(folder / f"img_{i:05d}.jpg", quality=90)
    return folder


def vit_worker(spec: dict) -> dict:
    import torch

    from ovlabel.legrad.explain import explain
    from ovlabel.pipeline import Pipeline
    from ovlabel.pipeline.images import collect_inputs, read_image
    from ovlabel.pipeline.preprocess import Normalization, to_input

    tmp = Path(spec["tmp"])
    folder = make_images(tmp / "images", spec["images"], (640, 480))
    queries = [f"class {i}" for i in range(spec["k"])]
    pipe = Pipeline.from_config(None, **{"model.name": "ViT-B-16", "model.pretrained": "none", "model.device": "cpu",
                                         "preprocess.size": spec["size"], "run.batch_size": spec["batch"],
                                         "run.workers": 2, "run.progress": False})
    lm = pipe.model
    qs, text, _ = pipe.queries(queries)
    # compute_maps alone on the same preprocessed batches
    items, _ = collect_inputs([folder])
    tensors = [to_input(read_image(it.path), spec["size"], pipe.patch, Normalization(lm.mean, lm.std))[0]
               for it in items]
    batches = [torch.stack(tensors[i : i + spec["batch"]]) for i in range(0, len(tensors), spec["batch"])]
    explain(lm.model, batches[0][:1], text, embeddings=True)  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        explain(lm.model, b, text, embeddings=True)
    alone = (time.perf_counter() - t0) / len(tensors)
    t0 = time.perf_counter()
    pipe.run([folder], tmp / "out", queries=queries)
    total = (time.perf_counter() - t0) / len(tensors)
    return dict(spec, pipeline_s_per_image=total, compute_maps_s_per_image=alone, ratio=total / alone,
                images_per_s=1 / total)


def tiny_worker(spec: dict) -> dict:
    from ovlabel.datasets.shapes import write_coco
    from ovlabel.pipeline import Pipeline

    tmp = Path(spec["tmp"])
    gt = write_coco(tmp / "data", spec["images"], 11, sizes=((64, 96), (80, 80)))
    pipe = Pipeline.from_config("shapes", **{"run.progress": False, "run.workers": 2})
    t0 = time.perf_counter()
    pipe.run(coco_gt=gt, images_dir=tmp / "data" / "images", out_dir=tmp / "out")
    dt = time.perf_counter() - t0
    return dict(spec, seconds=dt, images_per_s=spec["images"] / dt, peak_rss_mb=peak_rss_mb())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="images per ViT-B-16 run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(vit_worker(spec) if spec["kind"] == "vit" else tiny_worker(spec)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_vit:
            print("ViT-B-16 random init, 640x480 JPEGs, CPU (pipeline vs explain alone on the same batches)")
            print("| input | K | pipeline s/img | compute_maps s/img | ratio | images/s |")
            print("|---|---|---|---|---|---|", flush=True)
            for size in (224, 448):
                for k in (10, 80):
                    spec = dict(kind="vit", tmp=f"{tmp}/vit-{size}-{k}", size=size, k=k, images=args.images,
                                batch=args.batch)
                    r = run_isolated(__file__, spec)
                    rows.append(r)
                    print(f"| {size} | {k} | {r['pipeline_s_per_image']:.3f} | {r['compute_maps_s_per_image']:.3f} | "
                          f"{r['ratio']:.2f} | {r['images_per_s']:.2f} |", flush=True)
        print("\novlabel-shapes (shipped), generated scenes, whole runs in fresh processes")
        print("| images | seconds | images/s | peak RSS MB |")
        print("|---|---|---|---|", flush=True)
        tiny = []
        for n in (200, 1000):
            r = run_isolated(__file__, dict(kind="tiny", tmp=f"{tmp}/tiny-{n}", images=n))
            tiny.append(r)
            rows.append(r)
            print(f"| {n} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)
        growth = tiny[1]["peak_rss_mb"] / tiny[0]["peak_rss_mb"] - 1
        print(f"peak RSS, 1,000 vs 200 images: {100 * growth:+.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
