"""The ``ovlabel`` command line. Glue only: parse arguments, call the library, print.

Every command is ``main(argv)``-callable from tests. User errors (``OvlabelError``) are printed as one
``error:`` line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except OvlabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

