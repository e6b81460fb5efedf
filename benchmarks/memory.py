"""Memory of long runs and of large images, and the time a large image costs.

    python benchmarks/memory.py                    # both parts (≈10 min on 2 CPU cores)
    python benchmarks/memory.py --skip-large       # only the long run
    python benchmarks/memory.py --images 2000 --large-k 80

1. Long run: ``ovlabel label`` with the shipped ``ovlabel-shapes`` model over generated scenes, in one
   process; a thread samples the process's resident memory (RSS) as records are written. Printed: RSS
   after 200 images and at the end, and the change (target: flat within 10 %).
2. One 12-megapixel photo (4000×3000 JPEG), K queries, ViT-B-16 at random init, input 448, heatmaps
   saved: peak RSS of the labelling process against a process that only loads the model, encodes the
   queries and runs ``compute_maps`` at 448 (target: within 1.5 GB), and the seconds of the run against
   ``compute_maps`` on the same input in the same process (target: within 1.5×). A random-init model's
   maps are noise: their foreground covers the whole image in dozens of pieces, the worst case for
   post-processing. The run is repeated with the real explainer's cost but its maps replaced by smooth
   single-object maps (as a trained model gives), to show the usual case.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from common import peak_rss_mb, run_isolated


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def long_run(spec: dict) -> dict:
    from ovlabel.datasets.shapes import write_coco
    from ovlabel.pipeline import Pipeline

    tmp = Path(spec["tmp"])
    n = spec["images"]
    gt = write_coco(tmp / "data", n, 11, sizes=((64, 96), (96, 64), (80, 80)))
    pipe = Pipeline.from_config("shapes", **{"run.progress": False, "run.workers": 2, "export.heatmaps": True})
    records = tmp / "out" / "records" / "records.jsonl"
    samples: list[tuple[int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            done = records.read_bytes().count(b"\n") if records.exists() else 0
            samples.append((done, rss_mb()))
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    pipe.run(coco_gt=gt, images_dir=tmp / "data" / "images", out_dir=tmp / "out")
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    after_200 = next(r for d, r in samples if d >= 200)
    last_labelling = [r for d, r in samples if d >= n - spec["batch"]]
    end = last_labelling[0] if last_labelling else samples[-1][1]
    return dict(spec, seconds=seconds, images_per_s=n / seconds, rss_after_200_mb=after_200, rss_at_end_mb=end,
                peak_rss_mb=peak_rss_mb(), change=end / after_200 - 1)


def _vit_pipeline(size: int):
    from ovlabel.pipeline import Pipeline

    return Pipeline.from_config(None, **{"model.name": "ViT-B-16", "model.pretrained": "none", "model.device": "cpu",
                                         "preprocess.size": size, "run.workers": 0, "run.progress": False,
                                         "export.heatmaps": True, "postprocess.min_area_fraction": 0.0005})


def model_only(spec: dict) -> dict:
    import torch

    from ovlabel.legrad.explain import explain

    pipe = _vit_pipeline(spec["size"])
    _, text, _ = pipe.queries([f"class {i}" for i in range(spec["k"])])
    x = torch.randn(1, 3, spec["size"] * 3 // 4, spec["size"])
    explain(pipe.model.model, x, text, embeddings=True)
    return dict(spec, peak_rss_mb=peak_rss_mb())


def large_image(spec: dict) -> dict:
    import numpy as np
    from PIL import Image

    from ovlabel.legrad.explain import explain
    from ovlabel.pipeline.images import read_image
    from ovlabel.pipeline.preprocess import to_input

    tmp = Path(spec["tmp"])
    (tmp / "in").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    small = (rng.random((300, 400, 3)) * 255).astype(np.uint8)  # smooth content, like a photo
    Image.fromarray(small).resize((4000, 3000), Image.BICUBIC).save(tmp / "in" / "photo.jpg", quality=92)
    pipe = _vit_pipeline(spec["size"])
    queries = [f"class {i}" for i in range(spec["k"])]
    _, text, _ = pipe.queries(queries)  # encoded once per run, not per image
    x, _ = to_input(read_image(tmp / "in" / "photo.jpg"), spec["size"], pipe.patch, pipe.normalization)
    explain(pipe.model.model, x[None], text, embeddings=True)  # warm-up
    t0 = time.perf_counter()
    explain(pipe.model.model, x[None], text, embeddings=True)
    maps_s = time.perf_counter() - t0
    base = peak_rss_mb()
    t0 = time.perf_counter()
    summary = pipe.run([tmp / "in"], tmp / "out", queries=queries)
    run_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    pipe._backend = SmoothMaps(pipe.backend, rng)
    t0 = time.perf_counter()
    smooth = pipe.run([tmp / "in"], tmp / "out-smooth", queries=queries)
    smooth_s = time.perf_counter() - t0
    return dict(spec, input=list(x.shape[1:]), compute_maps_s=maps_s, run_s=run_s, ratio=run_s / maps_s,
                peak_rss_mb=peak, peak_before_run_mb=base, detections=summary["counts"]["detections"],
                heatmap_file_mb=sum(p.stat().st_size for p in (tmp / "out" / "heatmaps").glob("*.npz")) / 2**20,
                smooth_run_s=smooth_s, smooth_ratio=smooth_s / maps_s,
                smooth_detections=smooth["counts"]["detections"])


class SmoothMaps:
    """The real backend (same cost), its maps replaced by one smooth blob per query and image."""

    def __init__(self, inner, rng) -> None:
        self.inner, self.rng = inner, rng

    def explain(self, images, text, **kw):
        import torch

        maps, emb = self.inner.explain(images, text, **kw)
        B, K, H, W = maps.shape
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                                indexing="ij")
        for b in range(B):
            for k in range(K):
                cy, cx = self.rng.uniform(0, H), self.rng.uniform(0, W)
                sigma = self.rng.uniform(0.05, 0.15) * max(H, W)
                maps[b, k] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        return maps, emb

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images of the long run")
    p.add_argument("--large-k", type=int, default=80, help="queries on the 12-megapixel image")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--skip-long", action="store_true")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps({"long": long_run, "model": model_only, "large": large_image}[spec["kind"]](spec)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_long:
            r = run_isolated(__file__, dict(kind="long", tmp=f"{tmp}/long", images=args.images, batch=16))
            rows.append(r)
            print(f"long run, ovlabel-shapes, {r['images']} generated scenes, heatmaps saved: {r['images_per_s']:.1f} "
                  f"images/s; RSS after 200 images {r['rss_after_200_mb']:.0f} MB, at image {r['images']} "
                  f"{r['rss_at_end_mb']:.0f} MB ({100 * r['change']:+.1f} %); peak {r['peak_rss_mb']:.0f} MB",
                  flush=True)
        if not args.skip_large:
            base = run_isolated(__file__, dict(kind="model", k=args.large_k, size=args.size))
            r = run_isolated(__file__, dict(kind="large", tmp=f"{tmp}/large", k=args.large_k, size=args.size))
            rows += [base, r]
            extra = r["peak_rss_mb"] - base["peak_rss_mb"]
            print(f"12 MP JPEG (4000x3000), K={args.large_k}, ViT-B-16 random init, input {r['input']}: "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB vs {base['peak_rss_mb']:.0f} MB for the model-only process "
                  f"(+{extra:.0f} MB; target <= 1536); run {r['run_s']:.1f} s vs compute_maps "
                  f"{r['compute_maps_s']:.1f} s "
                  f"= {r['ratio']:.2f}x (target <= 1.5); {r['detections']} detections; heatmap file "
                  f"{r['heatmap_file_mb']:.1f} MB", flush=True)
            print(f"  same run, smooth single-object maps instead of the random model's noise: "
                  f"{r['smooth_run_s']:.1f} s "
                  f"= {r['smooth_ratio']:.2f}x compute_maps ({r['smooth_detections']} detections)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
