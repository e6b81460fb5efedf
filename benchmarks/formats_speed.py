"""Time and memory of the dataset exporters on a crowded image.

    python benchmarks/formats_speed.py                       # 400 overlapping detections, 1500x1500
    python benchmarks/formats_speed.py --detections 1000 --side 2000

One ``dataset.json`` with one image of ``side``×``side`` pixels and ``detections`` overlapping discs
(the worst case of ``masks-instance``: most instances are partly hidden and need layer files). Each format
is written in a fresh process; printed: seconds, peak RSS above the process's RSS just before the export, and
what was written (images, layer files).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, run_isolated


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def worker(spec: dict) -> dict:
    import numpy as np
    from pycocotools import mask as mask_utils

    from ovlabel.export.formats import EXPORTERS, ExportContext

    H = W = spec["side"]
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:H, :W]
    anns = []
    for i in range(spec["detections"]):
        cy, cx = rng.integers(H // 5, 4 * H // 5), rng.integers(W // 5, 4 * W // 5)
        r = rng.integers(H // 10, H // 4)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1 + i % 3, "iscrowd": 0,
                     "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}, "area": int(m.sum()),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)], "score": float(rng.random())})
        del m
    out = Path(spec["out"])
    image = out / "x.png"
    image.write_bytes(b"")  # YOLO links it; its content is never read
    ds = {"images": [{"id": 1, "file_name": "x.png", "height": H, "width": W}], "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    before = current_rss_mb()
    t0 = time.perf_counter()
    summary = EXPORTERS[spec["format"]](ExportContext(ds, out, {1: image}))
    seconds = time.perf_counter() - t0
    layer_dir = out / "masks-instance" / "layers"
    layers = len(list(layer_dir.glob("*.png"))) if layer_dir.is_dir() else 0
    return {"format": spec["format"], "seconds": seconds, "peak_rss_added_mb": peak_rss_mb() - before,
            "images": summary.get("images"), "layer_files": layers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detections", type=int, default=400)
    p.add_argument("--side", type=int, default=1500)
    p.add_argument("--formats", nargs="+", default=["masks-instance", "masks-semantic", "yolo-seg"])
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"{args.detections} overlapping detections on a {args.side}x{args.side} image "
          f"({args.side * args.side / 1e6:.2f} MP)")
    for fmt in args.formats:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_isolated(__file__, {"format": fmt, "detections": args.detections, "side": args.side, "out": tmp})
        print(f"{fmt:<16} {r['seconds']:7.1f} s   peak RSS +{r['peak_rss_added_mb']:6.0f} MB   "
              f"layer files {r['layer_files']}")


if __name__ == "__main__":
    sys.exit(main())
