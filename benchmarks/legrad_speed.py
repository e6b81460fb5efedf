"""LeGrad speed and memory: ovlabel's one-forward engine against the plain forward and the naive method.

Each measurement runs in a fresh subprocess so that its peak RSS (whole process, model included) is its
own; each subprocess also times the plain ``encode_image`` forward, so every ratio is measured within one
process on the same (noisy, shared) machine.

    python benchmarks/legrad_speed.py                       # ViT-B-16, 448x448, K = 1 5 20 80, CPU
    python benchmarks/legrad_speed.py --queries 1 20 --naive-max-k 5

The naive method is the published LeGrad recipe: the image repeated once per query and autograd through
the full graph for every query (here: batches of ``--naive-batch`` repeated images, one forward with
autograd and one ``autograd.grad`` per selected layer per batch).
"""

from __future__ import annotations

import argparse
import json

from common import build_model, peak_rss_mb, run_isolated, timeit


def naive_legrad(model, images, text, layers, batch: int = 1):
    """Published-style LeGrad: image repeated per query, a full forward with autograd per batch of
    queries, one autograd.grad per layer. Returns grid maps [K, n] (for the timing only)."""
    import torch
    import torch.nn.functional as F

    from ovlabel.legrad.ops import run_forward
    from ovlabel.legrad.towers import block_forward, read_tower

    tower = read_tower(model)
    text = F.normalize(text, dim=-1)
    out = []
    for t in text.split(batch):
        x_img = images.expand(t.shape[0], -1, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            x, _ = tower.embed(x_img)
            total = 0
            for i, blk in enumerate(tower.blocks[: max(layers) + 1]):
                z, cache = block_forward(blk, x, keep_attn=True)
                if i in layers:
                    e = F.normalize(run_forward(tower.legrad_head, z)[0], dim=-1)
                    s = (e * t).sum()
                    (g,) = torch.autograd.grad(s, cache.attn, retain_graph=True)
                    total = total + g.clamp(min=0).mean(dim=(1, 2))[:, 1:]
                x = z
        out.append(total.detach())
    return torch.cat(out)


def worker(spec: dict) -> dict:
    import torch

    from ovlabel import compute_maps

    torch.set_grad_enabled(False)
    model = build_model(spec["model"], spec["size"])
    images = torch.randn(1, 3, spec["size"], spec["size"])
    embed = model.encode_image(images).shape[-1]
    text = torch.randn(spec["k"], embed)
    forward = timeit(lambda: model.encode_image(images), spec["repeats"] + 1)
    n = len(model.visual.transformer.resblocks)
    if spec["what"] == "forward":
        t = forward
    elif spec["what"] == "naive":
        layers = list(range(n - 2, n)) if spec["layers"] == "last2" else list(range(n))
        t = timeit(lambda: naive_legrad(model, images, text, layers, spec["naive_batch"]), 1)
    else:
        layers = -2 if spec["layers"] == "last2" else "all"
        t = timeit(lambda: compute_maps(model, images, text, layers=layers), spec["repeats"])
    return dict(spec, seconds=t, forward_seconds=forward, ratio=t / forward, peak_rss_mb=peak_rss_mb(),
                threads=torch.get_num_threads())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 5, 20, 80])
    p.add_argument("--naive-max-k", type=int, default=20, help="largest K for the (slow) naive method")
    p.add_argument("--naive-batch", type=int, default=1, help="repeated images per naive forward")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    base = dict(model=args.model, size=args.size, repeats=args.repeats, naive_batch=args.naive_batch)
    specs = [dict(base, what="forward", k=1, layers="-")]
    for k in args.queries:
        specs += [dict(base, what="ovlabel", k=k, layers="last2"), dict(base, what="ovlabel", k=k, layers="all")]
        if k <= args.naive_max_k:
            specs.append(dict(base, what="naive", k=k, layers="last2"))
    rows = []
    print(f"{args.model} random init, {args.size}x{args.size}, CPU; ratios are to encode_image timed "
          "in the same process", flush=True)
    print(f"{'method':<10}{'layers':<8}{'K':>4}{'seconds':>10}{'x forward':>11}{'peak RSS MB':>13}", flush=True)
    for spec in specs:
        row = run_isolated(__file__, spec)
        rows.append(row)
        print(f"{row['what']:<10}{row['layers']:<8}{row['k']:>4}{row['seconds']:>10.3f}{row['ratio']:>11.2f}"
              f"{row['peak_rss_mb']:>13.0f}", flush=True)

    def ratio(what, layers, k):
        return next((r["ratio"] for r in rows if (r["what"], r["layers"], r["k"]) == (what, layers, k)), None)

    ks = sorted(args.queries)
    if len(ks) > 1:
        lo, hi = ks[0], ks[-1]
        for layers in ("last2", "all"):
            a, b = ratio("ovlabel", layers, lo), ratio("ovlabel", layers, hi)
            print(f"extra query cost, {layers}: {(b - a) / (hi - lo):.3f}x forward (K {lo}->{hi})")
    for k in ks:
        ours, naive = ratio("ovlabel", "last2", k), ratio("naive", "last2", k)
        if ours and naive:
            print(f"speed-up over naive at K={k} (last 2 layers): {naive / ours:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
