"""onnxruntime (CPU) against PyTorch (CPU): the image encoder and LeGrad's maps, in one process per size.

    python benchmarks/onnx_speed.py                  # ViT-B-16 random init, 224 and 448, K = 1 and 20
    python benchmarks/onnx_speed.py --sizes 224 --repeats 3

Each size is exported with ``ovlabel export-onnx`` (its default: dynamic size, batch and queries; with
``--static-size``, graphs of one square size; parity checked by the export) into a temporary folder;
then, in one process with the same threads for both, the median
of ``--repeats`` calls of: ``encode_image`` vs the ONNX image encoder, and ``compute_maps`` (LeGrad, last
two blocks) vs the ONNX explainer (maps and embeddings from one run), for one image. Target: the ONNX
maps at K = 20 take at most 0.8× the time of ``compute_maps``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import build_model, run_isolated, timeit


def worker(spec: dict) -> dict:
    import logging
    import time

    import torch
    import torch.nn.functional as F

    from ovlabel import compute_maps
    from ovlabel.apps.export_onnx import export_onnx
    from ovlabel.pipeline.onnx_backend import session

    logging.getLogger().setLevel(logging.ERROR)
    size, out = spec["size"], Path(spec["tmp"]) / f"vit-b-16-{spec['size']}"
    t0 = time.perf_counter()
    r = export_onnx("ViT-B-16", "none", out, size=size, dynamic_size=not spec.get("static", False))
    export_s = time.perf_counter() - t0
    model = build_model("ViT-B-16", size)  # PyTorch at its native size: encode_image works as is
    x = torch.randn(1, 3, size, size)
    enc = session(out / "image_encoder.onnx", "cpu")
    expl = session(out / "explainer-legrad.onnx", "cpu")
    rows = {"size": size, "threads": torch.get_num_threads(), "export_s": export_s,
            "parity_maps": max(v["max_abs_maps"] for v in r.parity["explainers"]["legrad"].values())}
    with torch.no_grad():
        rows["torch_encoder_s"] = timeit(lambda: model.encode_image(x), spec["repeats"])
    rows["onnx_encoder_s"] = timeit(lambda: enc.run(None, {"images": x.numpy()}), spec["repeats"])
    for k in (1, 20):
        text = F.normalize(torch.randn(k, 512), dim=-1)
        with torch.no_grad():
            rows[f"torch_maps_k{k}_s"] = timeit(lambda t=text: compute_maps(model, x, t), spec["repeats"])
        rows[f"onnx_maps_k{k}_s"] = timeit(lambda t=text: expl.run(None, {"images": x.numpy(), "text": t.numpy()}),
                                           spec["repeats"])
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--static-size", action="store_true", help="export graphs of one square size")
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    print(f"ViT-B-16 random init, CPU, one image, {'static' if args.static_size else 'dynamic'}-size graphs; "
          "seconds (median), ratio = onnxruntime / PyTorch")
    print("| input | part | PyTorch s | onnxruntime s | ratio |")
    print("|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            r = run_isolated(__file__, {"size": size, "tmp": tmp, "repeats": args.repeats, "static": args.static_size})
            rows.append(r)
            for part, a, b in (("encoder", "torch_encoder_s", "onnx_encoder_s"),
                               ("LeGrad maps, K = 1", "torch_maps_k1_s", "onnx_maps_k1_s"),
                               ("LeGrad maps, K = 20", "torch_maps_k20_s", "onnx_maps_k20_s")):
                print(f"| {size} | {part} | {r[a]:.3f} | {r[b]:.3f} | {r[b] / r[a]:.2f} |", flush=True)
            print(f"(export {r['export_s']:.0f} s, parity max |Δ| {r['parity_maps']:.1e}, {r['threads']} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
