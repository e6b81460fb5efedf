"""Big towers on the CPU: peak memory and time of ``compute_maps`` against the plain forward pass.

    python benchmarks/big_towers.py                                   # bigG-14 @224, L-14 and H-14 @448
    python benchmarks/big_towers.py --towers ViT-L-14:448 --no-bf16

Each tower runs in a fresh process (random init; the text tower is dropped, so the weights in memory are
the image tower's). In that process, after the model is built: the forward pass (``model.visual(x)``, one
image), then ``compute_maps`` at K = 1 and 20 on the last two and on all blocks, each step the median of
``--repeats`` calls after a warm-up. Before each step the process's peak resident memory (VmHWM) is reset
(``/proc/self/clear_refs``), so each step's peak is its own and includes the weights. Target: peak ≤ the
weights + 3 GB. Unless ``--no-bf16``, the tower is then cast to bfloat16 in place and the same steps run
again; the bf16 maps are compared with the fp32 ones (maps in [0, 1]: max and mean |Δ|).
"""

from __future__ import annotations

import argparse
import json
import time

from common import run_isolated

STEPS = [(1, "last2"), (1, "all"), (20, "last2"), (20, "all")]


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds of ``repeats`` calls, peak RSS MB over them, the last result)."""
    import statistics

    reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), _status("VmHWM"), out


def worker(spec: dict) -> dict:
    import gc
    import logging
    import warnings

    import open_clip
    import torch
    import torch.nn.functional as F

    from ovlabel import compute_maps

    torch.set_grad_enabled(False)
    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(spec["model"], pretrained=None, force_image_size=spec["size"])
    visual = model.visual.eval()
    dim = model.text_projection.shape[1] if model.text_projection is not None else visual.output_dim
    del model
    gc.collect()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, spec["size"], spec["size"], generator=g)
    texts = {k: F.normalize(torch.randn(k, dim, generator=g), dim=-1) for k in (1, 20)}
    rows = []
    reference = {}
    for dtype in ([torch.float32, torch.bfloat16] if spec["bf16"] else [torch.float32]):
        visual.to(dtype)
        gc.collect()
        weights = sum(p.numel() * p.element_size() for p in visual.parameters()) / 2**20
        x = images.to(dtype)
        visual(x)  # warm-ups: one forward, one compute_maps
        compute_maps(visual, x, texts[1].to(dtype))
        forward, peak, _ = measure(lambda x=x: visual(x), spec["repeats"])
        name = str(dtype).split(".")[-1]
        rows.append(dict(spec, dtype=name, step="forward", k=0, layers="-", seconds=forward, peak_rss_mb=peak,
                         weights_mb=weights, ratio=1.0))
        print(json.dumps(rows[-1]), flush=True)
        for k, layers in STEPS:
            t = texts[k].to(dtype)
            which = -2 if layers == "last2" else "all"
            seconds, peak, maps = measure(lambda x=x, t=t, w=which: compute_maps(visual, x, t, layers=w),
                                          spec["repeats"])
            row = dict(spec, dtype=name, step="compute_maps", k=k, layers=layers, seconds=seconds, peak_rss_mb=peak,
                       weights_mb=weights, ratio=seconds / forward)
            if dtype == torch.float32:
                reference[(k, layers)] = maps
            else:
                diff = (maps.float() - reference[(k, layers)]).abs()
                row.update(max_abs_vs_fp32=float(diff.max()), mean_abs_vs_fp32=float(diff.mean()))
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "build_seconds": build_s, "peak_reset": reset_peak()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", nargs="+", default=["ViT-bigG-14:224", "ViT-L-14:448", "ViT-H-14:448"],
                   help="MODEL:SIZE, each in its own process")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 pass")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per step (the median is printed)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    print("random init, image tower only, 1 image, CPU; peak RSS of each step (VmHWM reset before it)", flush=True)
    print(f"{'tower':<14}{'size':>5}{'dtype':>10}{'step':>14}{'K':>4}{'layers':>7}{'seconds':>9}{'x fwd':>7}"
          f"{'peak GB':>9}{'weights GB':>11}{'margin GB':>10}{'max|d|':>9}", flush=True)
    for tower in args.towers:
        model, size = tower.rsplit(":", 1)
        out = run_isolated(__file__, {"model": model, "size": int(size), "bf16": args.bf16,
                                              "repeats": args.repeats})
        if not out["peak_reset"]:
            print("warning: /proc/self/clear_refs refused: peaks include the model's build", flush=True)
        for r in out["rows"]:
            rows.append(r)
            margin = (r["weights_mb"] + 3 * 1024 - r["peak_rss_mb"]) / 1024
            d = f"{r['max_abs_vs_fp32']:.1e}" if "max_abs_vs_fp32" in r else "-"
            print(f"{model:<14}{size:>5}{r['dtype']:>10}{r['step']:>14}{r['k']:>4}{r['layers']:>7}"
                  f"{r['seconds']:>9.2f}{r['ratio']:>7.2f}{r['peak_rss_mb'] / 1024:>9.2f}"
                  f"{r['weights_mb'] / 1024:>11.2f}{margin:>10.2f}{d:>9}", flush=True)
        print(f"  (built in {out['build_seconds']:.0f} s)", flush=True)
    over = [r for r in rows if r["peak_rss_mb"] > r["weights_mb"] + 3 * 1024]
    print(f"peak <= weights + 3 GB: {'every step' if not over else f'{len(over)} steps over'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
