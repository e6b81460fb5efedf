"""Time of every explainer as a ratio to the plain forward pass, with peak memory.

    python benchmarks/explainers_speed.py            # ViT-B-16 random init, 448x448, K = 1 and 20, CPU
    python benchmarks/explainers_speed.py --queries 1 --methods legrad chefer_lrp

Each (method, K) runs in a fresh process (peak RSS is the whole process, model included) that also times
``encode_image``, so each ratio is measured within one process.
"""

from __future__ import annotations

import argparse
import json

from common import build_model, peak_rss_mb, run_isolated, timeit

METHODS = ["legrad", "raw_attention", "rollout", "gradcam", "chefercam", "chefer_lrp"]


def worker(spec: dict) -> dict:
    import torch

    from ovlabel import compute_maps

    torch.set_grad_enabled(False)
    model = build_model(spec["model"], spec["size"])
    images = torch.randn(1, 3, spec["size"], spec["size"])
    text = torch.randn(spec["k"], model.encode_image(images).shape[-1])
    forward = timeit(lambda: model.encode_image(images), spec["repeats"] + 1)
    t = timeit(lambda: compute_maps(model, images, text, method=spec["method"]), spec["repeats"])
    return dict(spec, seconds=t, forward_seconds=forward, ratio=t / forward, peak_rss_mb=peak_rss_mb())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 20])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"{args.model} random init, {args.size}x{args.size}, CPU, default layers of each method; ratios "
          "to encode_image timed in the same process", flush=True)
    print(f"| {'method':<14}| {'K':>3} | {'seconds':>8} | {'x forward':>9} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 15}|{'-' * 5}|{'-' * 10}|{'-' * 11}|{'-' * 13}|", flush=True)
    rows = []
    for method in args.methods:
        for k in args.queries:
            spec = dict(model=args.model, size=args.size, repeats=args.repeats, method=method, k=k)
            r = run_isolated(__file__, spec)
            rows.append(r)
            print(f"| {method:<14}| {k:>3} | {r['seconds']:>8.3f} | {r['ratio']:>9.2f} | {r['peak_rss_mb']:>11.0f} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
