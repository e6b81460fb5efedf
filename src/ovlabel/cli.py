"""The ``ovlabel`` command line. Glue only: parse arguments, call the library, print.

Every command is ``main(argv)``-callable from tests. User errors (``OvlabelError``) are printed as one
``error:`` line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import OvlabelError


def _cmd_methods(args: argparse.Namespace) -> int:
    from .legrad import describe_methods

    for name, summary in describe_methods().items():
        print(f"{name:<15} {summary}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline.offline import postprocess_heatmaps

    cfg = load_config(args.config, args.set)
    summary = postprocess_heatmaps(args.heatmaps, args.out, config=cfg, gt=args.coco_gt, categories=args.categories)
    print(f"{summary['images']} images, {summary['annotations']} detections -> "
          f"{Path(args.out) / 'predictions.json'}, {Path(args.out) / 'dataset.json'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.coco import evaluate, format_table
    from .export.coco import atomic_write_json, load_coco, read_json

    gt = load_coco(args.gt)
    results = read_json(args.pred, "predictions")
    metrics: dict = evaluate(gt, results, tuple(args.iou_type), source=str(args.pred))
    print(format_table(metrics))
    if args.semantic or args.heatmaps:
        from .evaluation.semantic import semantic_evaluation

        sem = semantic_evaluation(gt, results, heatmap_dir=args.heatmaps, score_threshold=args.mask_score_threshold)
        metrics["semantic"] = sem
        print(f"\nmask mIoU (score >= {args.mask_score_threshold}): {100 * sem['masks']['miou']:.2f}")
        if "maps" in sem:
            m = sem["maps"]
            print(f"maps: FG/BG mIoU {100 * m['mean_threshold']['miou']:.2f} (mean threshold), "
                  f"{100 * m['threshold_0.5']['miou']:.2f} (0.5); pixel acc "
                  f"{100 * m['mean_threshold']['pixel_accuracy']:.2f}; mAP {100 * m['mean_threshold']['map']:.2f}; "
                  f"pointing game {100 * m['pointing_game']:.2f} ({m['pairs']} maps)")
    if args.out:
        metrics["gt"], metrics["predictions"] = str(args.gt), str(args.pred)
        atomic_write_json(args.out, metrics, indent=2)
    return 0


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    return i, n


def _label_overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set)
    pairs = [("model.name", args.model), ("model.pretrained", args.pretrained), ("model.device", args.device),
             ("model.precision", args.precision), ("explainer.method", args.method), ("explainer.layers", args.layers),
             ("preprocess.size", args.size), ("run.batch_size", args.batch_size), ("run.workers", args.workers)]
    for key, value in pairs:
        if value is not None:
            sets.append(f"{key}={value}")
    for key, flag in (("export.heatmaps", args.save_heatmaps), ("export.overlays", args.overlays),
                      ("run.strict", args.strict)):
        if flag:
            sets.append(f"{key}=true")
    if args.masks:
        sets.append(f"export.masks={args.masks}")
    if args.no_progress:
        sets.append("run.progress=false")
    return sets


def _cmd_label(args: argparse.Namespace) -> int:
    import warnings

    from .config import load_config
    from .pipeline.runner import Pipeline

    cfg = load_config(args.config, _label_overrides(args))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        pipe = Pipeline(cfg)
        summary = pipe.run(args.inputs, args.out, queries=args.queries, queries_file=args.queries_file,
                           coco_gt=args.coco_gt, images_dir=args.images_dir, resume=args.resume, shard=args.shard,
                           retry_failed=args.retry_failed, command=shlex.join(["ovlabel", *(args.argv or [])]))
    c = summary["counts"]
    print(f"labelled {c['labelled']} images ({c['detections']} detections), {c['failed']} failed, "
          f"{c['resumed_skipped']} already done -> {args.out}")
    for f in summary["failures"][:10]:
        print(f"  skipped {f['file']}: {f['error']}")
    if len(summary["failures"]) > 10:
        print(f"  … {len(summary['failures']) - 10} more in run.yaml")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .pipeline.merge import merge_runs

    s = merge_runs(args.runs, args.out)
    print(f"merged {len(s['merged_from'])} runs: {s['counts']['images']} images, {s['counts']['annotations']} "
          f"annotations -> {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline.demo import run_demo

    r = run_demo(args.out, images=args.images, seed=args.seed, config=args.config, progress=not args.no_progress)
    print(f"segm AP {100 * r['segm']['AP']:.1f}  AP50 {100 * r['segm']['AP50']:.1f} | bbox AP "
          f"{100 * r['bbox']['AP']:.1f}  AP50 {100 * r['bbox']['AP50']:.1f} | mask mIoU {100 * r['mask_miou']:.1f} | "
          f"pointing game {100 * r['pointing_game']:.1f} % (random object {100 * r['random_object_baseline']:.1f} %)")
    print(f"{r['seconds']['total']:.0f} s. Report: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from .datasets.train_shapes import train

    summary = train(args.out, steps=args.steps, minutes=args.minutes, seed=args.seed, pool=args.pool,
                    batch=args.batch, lr=args.lr)
    if args.ship:
        from .datasets.train_shapes import ship

        ship(args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovlabel", description="Label images from text with CLIP "
                                     "explainability maps (LeGrad), no training.")
    parser.add_argument("--version", action="version", version=f"ovlabel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="list the explainer methods")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("show", help="print the resolved configuration")
    q.add_argument("--config", help="a YAML file or a shipped preset name (default: default)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. postprocess.threshold.method=otsu (repeatable)")
    q.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("postprocess", help="turn cached heatmaps into COCO predictions and a dataset (no model)")
    p.add_argument("--heatmaps", required=True, help="folder of .npz heatmap files")
    p.add_argument("--out", required=True, help="output folder for predictions.json and dataset.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--coco-gt", help="ground truth: categories and image ids come from it")
    g.add_argument("--categories", help="categories file (.json COCO categories or names; .txt one name per line)")
    p.add_argument("--config", help="a YAML file or a shipped preset name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_cmd_postprocess)

    p = sub.add_parser("eval", help="COCO evaluation with pycocotools (+ semantic metrics)")
    p.add_argument("--gt", required=True, help="COCO ground-truth JSON")
    p.add_argument("--pred", required=True, help="COCO results JSON (predictions.json)")
    p.add_argument("--iou-type", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--semantic", action="store_true", help="also class-wise mask mIoU")
    p.add_argument("--heatmaps", help="folder of cached heatmaps: FG/BG metrics and pointing game of the maps")
    p.add_argument("--mask-score-threshold", type=float, default=0.5,
                   help="predicted masks scoring at least this count for the mask mIoU (default 0.5)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("label", help="label images: COCO predictions, a pseudo-label dataset, pictures")
    p.add_argument("inputs", nargs="*", help="folders (recursive), image files, or .txt files listing paths")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="a YAML file or a shipped preset name (default: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--queries", nargs="+", help="the classes to label")
    q.add_argument("--queries-file", help="classes: .txt (one per line) or .json (COCO categories or names)")
    p.add_argument("--coco-gt", help="a COCO file: its images and categories (ids kept) are labelled")
    p.add_argument("--images-dir", help="the folder the --coco-gt file names are relative to")
    p.add_argument("--model", help="open_clip model name, a model-config .json, or ovlabel-shapes")
    p.add_argument("--pretrained", help="open_clip tag, checkpoint file (.pt/.bin/.safetensors), or none")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--method", help="explainer (see `ovlabel methods`)")
    p.add_argument("--layers", help="all | -n | [i,j]")
    p.add_argument("--size", type=int, help="input size (longest side)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="image-decoding worker processes")
    p.add_argument("--save-heatmaps", action="store_true", help="write heatmaps/*.npz")
    p.add_argument("--overlays", action="store_true", help="write overlays/*.jpg")
    p.add_argument("--masks", choices=["instance", "semantic"], help="write masks/*.png")
    p.add_argument("--resume", action="store_true", help="continue a run that was interrupted (the same command "
                   "plus --resume); images that failed stay failed unless --retry-failed")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: label again the images whose record is a failure")
    p.add_argument("--shard", type=_parse_shard, default=(0, 1), metavar="I/N",
                   help="process the I-th of N deterministic shares (merge with `ovlabel merge`)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("merge", help="merge shard runs into one set of files")
    p.add_argument("runs", nargs="+", help="run folders (each with records/ and run*.yaml)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("train-demo", help="train the tiny shapes CLIP that ships with ovlabel")
    p.add_argument("--out", required=True, help="output folder (weights, config, training log)")
    p.add_argument("--steps", type=int, default=8000, help="optimisation steps (default 8000, ~45 min on 2 cores)")
    p.add_argument("--minutes", type=float, help="stop on wall time instead (not reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=50000, help="generated training scenes")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ship", action="store_true", help="copy the result into the package (src/ovlabel/models)")
    p.set_defaults(func=_cmd_train_demo)

    p = sub.add_parser("demo", help="offline demo: label generated scenes with the shipped model, evaluate, report")
    p.add_argument("--out", default="ovlabel-demo", help="output folder (default ovlabel-demo)")
    p.add_argument("--images", type=int, default=40, help="held-out scenes to generate (default 40)")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--config", default="shapes", help="config preset or file (default: shapes)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except OvlabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())

