"""LeGrad speed and memory: ovlabel's one-forward engine against the plain forward and the published method.

Each measurement runs in a fresh subprocess so that its peak RSS (whole process, model included) is its
own; each subprocess also times the plain ``encode_image`` forward, so every ratio is measured within one
process on the same (noisy, shared) machine.

    python benchmarks/legrad_speed.py                       # ViT-B-16, 448x448, K = 1 5 20 80, CPU
    python benchmarks/legrad_speed.py --queries 1 5 20 --published-max-k 20

Rows: ``forward`` (``encode_image``), ``tower`` (ovlabel's own forward of the image tower, the pass every
explainer starts from), ``ovlabel`` (``compute_maps``) and ``published`` — a faithful re-implementation
of the published LeGrad wrapper (``compute_legrad_clip``): the image repeated once per query
(``image.repeat(num_prompts, 1, 1, 1)``), one forward of that batch with autograd recording (the wrapper
leaves the model's parameters trainable; here the input requires grad, which records the same graph
without touching the model), the attention maps materialised in the explained blocks only (the wrapper
hooks blocks from ``starting_depth`` on), then per explained block ``autograd.grad(Σ_k s_k, A,
retain_graph=True, create_graph=True)`` and ``mean_heads mean_rows relu(∂s/∂A)``. It runs on open_clip 3.x
through ovlabel's tower ops because the wrapper itself needs open_clip ≤ 2.23.
"""

from __future__ import annotations

import argparse
import json

from common import build_model, peak_rss_mb, run_isolated, timeit


def published_legrad(model, images, text, layers, batch: int | None = None):
    """The published wrapper's LeGrad (see the module docstring) → grid maps ``[K, n]`` (for timing).
    ``batch``: repeated images per forward (``None``: all K at once, as the wrapper does)."""
    import torch
    import torch.nn.functional as F

    from ovlabel.legrad.ops import run_forward
    from ovlabel.legrad.towers import block_forward, read_tower

    tower = read_tower(model)
    text = F.normalize(text, dim=-1)
    out = []
    for t in text.split(batch or text.shape[0]):
        x_img = images.repeat(t.shape[0], 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            x, _ = tower.embed(x_img)
            kept = []
            for i, blk in enumerate(tower.blocks):  # encode_image: every block, the explained ones hooked
                x, cache = block_forward(blk, x, keep_attn=i in layers)
                if i in layers:
                    kept.append((cache.attn, x))
            tower.embedding(x)
            total = 0
            for attn, z in kept:
                e = F.normalize(run_forward(tower.legrad_head, z)[0], dim=-1)
                s = (e * t).sum()  # Σ_k t_k · e_k: the wrapper's one-hot sum over the diagonal
                (g,) = torch.autograd.grad(s, attn, retain_graph=True, create_graph=True)
                total = total + g.clamp(min=0).mean(dim=(1, 2))[:, 1:]
        out.append(total.detach())
    return torch.cat(out)


def worker(spec: dict) -> dict:
    import torch

    from ovlabel import compute_maps
    from ovlabel.legrad.towers import read_tower

    torch.set_grad_enabled(False)
    model = build_model(spec["model"], spec["size"])
    images = torch.randn(1, 3, spec["size"], spec["size"])
    embed = model.encode_image(images).shape[-1]
    text = torch.randn(spec["k"], embed)
    forward = timeit(lambda: model.encode_image(images), spec["repeats"] + 1)
    n = len(model.visual.transformer.resblocks)
    if spec["what"] == "forward":
        t = forward
    elif spec["what"] == "tower":
        tower = read_tower(model)
        t = timeit(lambda: tower.encode(images), spec["repeats"] + 1)
        forward = timeit(lambda: model.encode_image(images), spec["repeats"] + 1)  # once more, after: noise
    elif spec["what"] == "published":
        layers = list(range(n - 2, n)) if spec["layers"] == "last2" else list(range(n))
        t = timeit(lambda: published_legrad(model, images, text, layers, spec["published_batch"]), 1)
        ours = timeit(lambda: compute_maps(model, images, text, layers=-2 if spec["layers"] == "last2" else "all"),
                      spec["repeats"])  # in the same process: the speed-up is one process's figure
        return dict(spec, seconds=t, forward_seconds=forward, ratio=t / forward, ovlabel_seconds=ours,
                    speedup=t / ours, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())
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
    p.add_argument("--published-max-k", type=int, default=20, help="largest K for the (slow) published method")
    p.add_argument("--published-batch", type=int, default=None,
                   help="repeated images per published forward (default: all K at once, as the wrapper does)")
    p.add_argument("--published-all-max-k", type=int, default=5,
                   help="largest K for the published method on all blocks (it keeps K·L attention maps with a "
                        "graph: K = 20 at 448 px needs more than 24 GB)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    base = dict(model=args.model, size=args.size, repeats=args.repeats, published_batch=args.published_batch)
    specs = [dict(base, what="forward", k=1, layers="-"), dict(base, what="tower", k=1, layers="-")]
    for k in args.queries:
        specs += [dict(base, what="ovlabel", k=k, layers="last2"), dict(base, what="ovlabel", k=k, layers="all")]
        if k <= args.published_max_k:
            specs.append(dict(base, what="published", k=k, layers="last2"))
            if k <= args.published_all_max_k:
                specs.append(dict(base, what="published", k=k, layers="all"))
    rows = []
    print(f"{args.model} random init, {args.size}x{args.size}, CPU; ratios are to encode_image timed "
          "in the same process; 'published ÷ ours' is timed in the published row's process", flush=True)
    print(f"{'method':<11}{'layers':<8}{'K':>4}{'seconds':>10}{'x forward':>11}{'published ÷ ours':>18}"
          f"{'peak RSS MB':>13}", flush=True)
    for spec in specs:
        try:
            row = run_isolated(__file__, spec)
        except RuntimeError as e:  # a worker killed (out of memory, say): the other rows still print
            print(f"{spec['what']:<11}{spec['layers']:<8}{spec['k']:>4}  failed: {str(e).splitlines()[-1][:90]}",
                  flush=True)
            continue
        rows.append(row)
        speedup = f"{row['speedup']:.2f}" if "speedup" in row else "-"
        print(f"{row['what']:<11}{row['layers']:<8}{row['k']:>4}{row['seconds']:>10.3f}{row['ratio']:>11.2f}"
              f"{speedup:>18}{row['peak_rss_mb']:>13.0f}", flush=True)

    def ratio(what, layers, k):
        return next((r["ratio"] for r in rows if (r["what"], r["layers"], r["k"]) == (what, layers, k)), None)

    ks = sorted(args.queries)
    if len(ks) > 1:
        lo, hi = ks[0], ks[-1]
        for layers in ("last2", "all"):
            a, b = ratio("ovlabel", layers, lo), ratio("ovlabel", layers, hi)
            print(f"extra query cost, {layers}: {(b - a) / (hi - lo):.3f}x forward (K {lo}->{hi})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
