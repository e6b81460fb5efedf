"""The ``ovlabel`` command line. Glue only: parse arguments, call the library, print.

Every command is ``main(argv)``-callable from tests. User errors (``OvlabelError``) are printed as one
``error:`` line and exit with status 2; anything else is a bug and keeps its traceback.

Each command imports the library's rooms it needs inside its function, on purpose: ``ovlabel --help``,
``ovlabel methods`` and ``ovlabel merge`` start without importing torch (~2 s), which
``tests/test_runs.py::test_decoding_and_records_do_not_import_torch`` checks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError, OvlabelError
from .legrad.catalog import EXPORTABLE  # torch-free


def _cmd_methods(args: argparse.Namespace) -> int:
    from .legrad.catalog import describe

    for name, summary in describe().items():
        print(f"{name:<15} {summary}")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from .export import formats

    for name in sorted(formats.EXPORTERS):
        print(name)
    print("\n" + (formats.__doc__ or "").split("Built in:")[-1].strip())
    return 0


def _config(source: str | None, overrides: list) -> Any:
    """The run's config, saying so when the model brought its preset."""
    from .config import load_config

    cfg = load_config(source, overrides)
    if cfg.model_preset:
        logging.getLogger("ovlabel").info(
            "model %s brings its preset '%s' (under --config, --set and the flags, which win)",
            cfg.model.name, cfg.model_preset)
    return cfg


def _cmd_config_show(args: argparse.Namespace) -> int:
    from .config import dump_config

    cfg = _config(args.config, args.set)
    if cfg.model_preset:
        print(f"# model {cfg.model.name}: its preset '{cfg.model_preset}' applies under this config")
    print(dump_config(cfg), end="")
    return 0


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from .apps.postprocess import postprocess_heatmaps

    summary = postprocess_heatmaps(args.heatmaps, args.out, config=args.config,
                                   overrides=[*args.set, *_export_overrides(args)], gt=args.coco_gt,
                                   categories=args.categories, images=args.images,
                                   command=shlex.join(["ovlabel", *(args.argv or [])]),
                                   progress=not (args.no_progress or getattr(args, "quiet", False)))
    print(f"{summary['images']} images, {summary['annotations']} annotations in dataset.json -> {args.out}"
          + "".join(f"; {name} in {Path(args.out) / info['folder']}" for name, info in summary["formats"].items()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.coco import evaluate, format_table
    from .export.coco import atomic_write_json, load_coco, read_json

    gt = load_coco(args.gt)
    results = read_json(args.pred, "predictions")
    metrics: dict = evaluate(gt, results, tuple(args.iou_type), source=str(args.pred), unknown_images="warn")
    print(format_table({k: v for k, v in metrics.items() if k in ("bbox", "segm")}))
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


def _parse_shard(text: str) -> tuple[int, int] | str:
    if text == "auto":
        return text  # from the scheduler's environment, when the run starts
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    return i, n


FAILED_IMAGES = 3  # exit status of `label --fail-on-error` when an image failed (2: the run itself failed)
PRODUCT_ON_STDOUT = ("methods", "formats", "config")  # commands whose output is what was asked (kept by --quiet)
POSTPROCESS_FLAGS = {"postprocess.threshold.value": "--threshold", "postprocess.score_threshold": "--score",
                     "postprocess.presence_threshold": "--presence", "postprocess.nms_iou": "--nms-iou"}


def _export_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """Config overrides of the export flags, as ``(key, value)`` pairs: flag values are taken verbatim,
    never parsed as YAML (only ``--set`` is)."""
    sets: list[tuple[str, Any]] = []
    if args.masks:
        sets.append(("export.masks", args.masks))
    if args.formats:
        sets.append(("export.formats", list(args.formats)))
    if args.dataset_min_score is not None:
        sets.append(("export.dataset_min_score", args.dataset_min_score))
    for key, flag in POSTPROCESS_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            sets.append((key, value))
    if args.val_fraction is not None:
        sets.append(("export.val_fraction", args.val_fraction))
    if args.copy_images:
        sets.append(("export.copy_images", True))
    return sets


def _layers(text: str | None) -> Any:
    """``--layers``: ``all``, ``last``, ``-n`` or ``[i, j]`` (a YAML value)."""
    if text is None:
        return None
    from .config import parse_yaml

    return parse_yaml(text, "--layers")


def _queries(args: argparse.Namespace) -> list[str] | None:
    """``--queries a b`` and ``-q a -q b`` together; a query that is an existing path is refused (the
    greedy ``--queries`` list took an input)."""
    names = [*(args.queries or []), *(args.query or [])]
    greedy = set(args.queries or [])
    for name in names:
        p = Path(name)
        # a bare word is a path only in the greedy list (``--queries cat dog photos``); ``-q NAME`` is a class
        path_like = "/" in name or "\\" in name or p.suffix or (name in greedy and name not in (args.query or []))
        if path_like and os.path.lexists(p):
            kind = "a folder" if p.is_dir() else "a file"
            raise InputError(f"--queries took {name!r} as a class name, but it is {kind}: put INPUTS before "
                             "--queries, end the list with --, or give each class with -q NAME")
    if names and args.queries_file:
        raise InputError("pass classes with --queries/-q or with --queries-file, not both")
    return names or None


def _label_overrides(args: argparse.Namespace) -> list[str | tuple[str, Any]]:
    """``--set`` items (YAML values), then the flags as verbatim ``(key, value)`` pairs: a path such as
    ``--onnx-dir 'exports/E #2'`` stays that path."""
    sets: list[str | tuple[str, Any]] = list(args.set)
    pairs = [("model.name", args.model), ("model.pretrained", args.pretrained), ("model.device", args.device),
             ("model.backend", args.backend), ("model.onnx_dir", args.onnx_dir),
             ("model.precision", args.precision), ("explainer.method", args.method),
             ("explainer.layers", _layers(args.layers)),
             ("preprocess.size", args.size), ("run.batch_size", args.batch_size), ("run.workers", args.workers)]
    sets += [(key, value) for key, value in pairs if value is not None]
    for key, flag in (("export.heatmaps", args.save_heatmaps), ("export.overlays", args.overlays),
                      ("run.strict", args.strict)):
        if flag:
            sets.append((key, True))
    sets += _export_overrides(args)
    if args.no_progress or getattr(args, "quiet", False):
        sets.append(("run.progress", False))
    return sets


def _cmd_label(args: argparse.Namespace) -> int:
    queries = _queries(args)
    cfg = _config(args.config, _label_overrides(args))
    cfg = _onnx_size(cfg, args)
    shard, ray_options = args.shard, None
    if shard == "auto":
        from .pipeline.run import shard_from_environment

        shard = shard_from_environment()
        logging.getLogger("ovlabel").info("--shard auto: shard %d of %d", *shard)
    if args.engine == "ray":
        from .pipeline.engines.ray import RayOptions, parse_actors

        ray_options = RayOptions(address=args.ray_address, actors=parse_actors(args.actors) if args.actors else None,
                                 gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor)
    elif args.ray_address or args.actors or args.gpus_per_actor or args.cpus_per_actor:
        raise InputError("--ray-address, --actors, --gpus-per-actor and --cpus-per-actor need --engine ray")
    if args.threads is not None:
        _set_threads(args.threads)
    from .pipeline.runner import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if getattr(args, "quiet", False) else "default")
        pipe = Pipeline(cfg)
        if args.threads is not None:
            import dataclasses

            pipe.postprocessor = dataclasses.replace(pipe.postprocessor, threads=max(1, min(2, args.threads)))
        summary = pipe.run(args.inputs, args.out, queries=queries, queries_file=args.queries_file,
                           coco_gt=args.coco_gt, images_dir=args.images_dir, resume=args.resume, shard=shard,
                           retry_failed=args.retry_failed, command=shlex.join(["ovlabel", *(args.argv or [])]),
                           engine=args.engine, engine_options=ray_options)
    c = summary["counts"]
    print(f"labelled {c['labelled']} images ({c['detections']} detections), {c['failed']} failed, "
          f"{c['resumed_skipped']} already done -> {args.out}")
    for f in summary["failures"][:10]:
        print(f"  skipped {f['file']}: {f['error']}")
    if len(summary["failures"]) > 10:
        print(f"  … {len(summary['failures']) - 10} more in run.yaml")
    if c["labelled"] and not c["detections"]:
        print(_no_detections(c.get("postprocess", {}), cfg))
    if summary.get("image_root"):
        print(f"file names in dataset.json are relative to {summary['image_root']}")
    if shard[1] > 1:
        print(f"shard {shard[0]}/{shard[1]} done; when all {shard[1]} shards are: ovlabel merge "
              f"{shlex.quote(str(args.out))} --out {shlex.quote(str(args.out))}")
    if args.fail_on_error and c["failed"]:
        print(f"error: {c['failed']} image(s) failed (--fail-on-error); their reasons are in "
              f"{Path(args.out) / 'run.yaml'}", file=sys.stderr)
        return FAILED_IMAGES
    return 0


def _onnx_size(cfg, args: argparse.Namespace):
    """``--backend onnx`` without ``--size``: the size the graphs were exported (and checked) at."""
    if cfg.model.backend != "onnx" or args.size is not None or any(
            isinstance(s, str) and s.replace(" ", "").startswith("preprocess.size=") for s in args.set):
        return cfg
    from .export.onnx import read_model_json

    size = int(read_model_json(Path(cfg.model.onnx_dir))["input_size"])
    if size != cfg.preprocess.size:
        logging.getLogger("ovlabel").info("preprocess.size %d: the size of the graphs in %s (--size to choose)",
                                          size, cfg.model.onnx_dir)
        cfg = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"size": size})})
    return cfg


def _no_detections(stats: dict, cfg) -> str:
    """Why a run found nothing, from the post-processing counts."""
    pp = cfg.postprocess
    q, absent = stats.get("queries", 0), stats.get("absent", 0)
    if q and absent == q:
        return (f"0 detections: every query was judged absent (presence below postprocess.presence_threshold = "
                f"{pp.presence_threshold}); lower it, or check the queries and the model")
    if stats.get("candidates", 0) == 0:
        return (f"0 detections: no region of any map passed the threshold ({pp.threshold.method} "
                f"{pp.threshold.value}) and the minimum area (postprocess.min_area = {pp.min_area} px, "
                f"min_area_fraction = {pp.min_area_fraction}); {absent} of {q} query-image pairs were absent")
    if stats.get("below_score", 0) == stats.get("candidates", 0):
        return (f"0 detections: all {stats['candidates']} candidate regions scored below "
                f"postprocess.score_threshold = {pp.score_threshold}")
    return "0 detections"


def _set_threads(n: int) -> None:
    """This process's CPU threads (the command line owns the process; the library never sets them)."""
    if n < 1:
        raise InputError(f"--threads must be at least 1, got {n}")
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .apps.export_onnx import export_onnx

    sets: list[str | tuple[str, Any]] = list(args.set)
    if args.model:
        sets.append(("model.name", args.model))
    if args.pretrained:
        sets.append(("model.pretrained", args.pretrained))
    if args.layers is not None:
        sets.append(("explainer.layers", _layers(args.layers)))
    cfg = _config(args.config, sets)
    if args.threads is not None:
        _set_threads(args.threads)
    layers = cfg.explainer.layers  # the config's blocks, as `label` with the same config asks for them
    r = export_onnx(cfg.model.name, cfg.model.pretrained, args.out, methods=args.method or None, layers=layers,
                    size=args.size, dynamic_size=not args.static_size, opset=args.opset, fp16=args.fp16, config=cfg,
                    progress=not (args.no_progress or getattr(args, "quiet", False)))
    print(f"exported {', '.join(r.files)} and model.json -> {args.out}")
    for key, vals in r.parity.get("explainers", {}).items():
        worst = max(v["max_abs_maps"] for v in vals.values())
        print(f"  parity {key}: maps max |Δ| {worst:.1e} (limit {r.parity['tolerance']['maps']:.0e}), embeddings "
              f"cosine >= {min(v['min_cosine'] for v in vals.values()):.6f}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .apps import benchmarks as b

    if args.threads is not None:
        _set_threads(args.threads)
    ex = b.Explainer.load(args.model, args.pretrained, args.methods, device=args.device, templates=args.templates)
    common = dict(size=args.size, max_images=args.max_images, resume=args.resume, progress=not args.no_progress,
                  command=shlex.join(["ovlabel", *(args.argv or [])]))
    if args.benchmark == "imagenet-seg":
        labels = None
        if args.labels:
            from .common.categories import load_categories

            labels = list(load_categories(args.labels).names)
        r = b.imagenet_segmentation(args.mat, args.out, ex, labels=labels, **common)
    elif args.benchmark == "openimages-points":
        r = b.openimages_points(args.points, args.classes, args.images, args.out, ex, **common)
    else:
        r = b.perturbation(args.imagenet_val, args.out, ex, devkit=args.devkit, target=args.target, **common)
    print(r["table"])
    print(f"\npublished: {r['published']}")
    if r["failures"]:
        print(f"{len(r['failures'])} sample(s) failed (listed in {Path(args.out) / 'results.json'})")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .apps.calibrate import calibrate

    r = calibrate(args.heatmaps, args.coco_gt, args.out, metric=args.metric, per_class=args.per_class,
                  folds=args.folds, config=args.config, images=args.images,
                  progress=not (args.no_progress or getattr(args, "quiet", False)))
    h = r["held_out"]
    print(f"{r['metric']} on held-out folds: {100 * h['start']:.1f} (start) -> {100 * h['tuned']:.1f} (calibrated), "
          f"{100 * h['gain']:+.1f} points over {len(r['folds'])} folds")
    c = r["chosen"]
    print(f"chosen: threshold {c['threshold'][0]} {c['threshold'][1]}, instances {c['instances']}, refine "
          f"{c['refine']}, min_area_fraction {c['min_area_fraction']}, presence_threshold {c['presence_threshold']}"
          + (f", {len(c['class_thresholds'])} class thresholds" if c["class_thresholds"] else "")
          + (f", dataset_min_score {c['dataset_min_score']}" if "dataset_min_score" in c else ""))
    print(f"{r['evaluations']} evaluations in {r['seconds']:.0f} s -> {args.out} (use it with --config)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .apps.report import write_report

    r = write_report(args.run, args.out, gt=args.gt, page_size=args.page_size, thumb=args.thumb,
                     progress=not (args.no_progress or getattr(args, "quiet", False)))
    print(f"report of {r['images']} images ({r['pages']} pages, {r['bytes'] / 2**20:.1f} MB) -> {r['index']} "
          "(open it in a browser: no server needed)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .pipeline.merge import merge_runs

    s = merge_runs(args.runs, args.out)
    print(f"merged {len(s['merged_from'])} runs: {s['counts']['images']} images, {s['counts']['annotations']} "
          f"annotations -> {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .apps.demo import run_demo

    r = run_demo(args.out, images=args.images, seed=args.seed, config=args.config, progress=not args.no_progress)
    print(f"segm AP {100 * r['segm']['AP']:.1f}  AP50 {100 * r['segm']['AP50']:.1f} | bbox AP "
          f"{100 * r['bbox']['AP']:.1f}  AP50 {100 * r['bbox']['AP50']:.1f} | mask mIoU {100 * r['mask_miou']:.1f} | "
          f"pointing game {100 * r['pointing_game']:.1f} % (random object {100 * r['random_object_baseline']:.1f} %)")
    print(f"{r['seconds']['total']:.0f} s. Report: {r['report']} (and {Path(args.out) / 'report.md'})")
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from .apps.train_shapes import train

    summary = train(args.out, steps=args.steps, minutes=args.minutes, seed=args.seed, pool=args.pool,
                    batch=args.batch, lr=args.lr)
    if args.ship:
        from .apps.train_shapes import ship

        ship(args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default: the value given to argparse, or the configuration's for options
    that set a config key (written in their help as ``{config: section.key}``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        m = _CONFIG_REF.search(text)
        if m:
            return _CONFIG_REF.sub(f"(default: {_config_default(m.group(1))}; config {m.group(1)})", text)
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


_CONFIG_REF = __import__("re").compile(r"\{config: ([\w.]+)\}")


def _config_default(key: str) -> str:
    from .config import Config

    value = Config().model_dump()
    for part in key.split("."):
        value = value[part]
    if value is None:
        return "the model's own" if key.startswith("preprocess.") else "the method's" if "layers" in key else "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    g.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only errors: no warnings, no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="ovlabel", description="Label images from text with CLIP "
                                     "explainability maps (LeGrad), no training.", parents=[common],
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"ovlabel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_Formatter)

    p = add("methods", "list the explainer methods")
    p.set_defaults(func=_cmd_methods)

    p = add("formats", "list the pseudo-label dataset formats (export.formats)")
    p.set_defaults(func=_cmd_formats)

    p = add("config", "configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("show", help="print the resolved configuration", parents=[common], formatter_class=_Formatter)
    q.add_argument("--config", help="a YAML file or a shipped preset name (default: default)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. postprocess.threshold.method=otsu (repeatable)")
    q.set_defaults(func=_cmd_config_show)

    p = add("postprocess", "turn cached heatmaps into COCO predictions, a dataset, formats and overlays (no model)")
    p.add_argument("--heatmaps", required=True, help="folder of .npz heatmap files")
    p.add_argument("--out", required=True, help="output folder for predictions.json and dataset.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--coco-gt", help="ground truth: categories and image ids come from it")
    g.add_argument("--categories", help="categories file (.json COCO categories or names; .txt one name per line) "
                   "(default: the ids of the run that wrote the heatmaps)")
    p.add_argument("--config", help="a YAML file or a shipped preset name (default: the configuration of the run "
                   "that wrote the heatmaps — its run.yaml beside the heatmaps folder —, else default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--images", help="the images folder, for overlays and YOLO datasets (default: where the run "
                   "read them)")
    _export_options(p)
    _postprocess_options(p.add_argument_group("post-processing"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_postprocess)

    p = add("calibrate", "search the post-processing settings on labelled images' cached heatmaps")
    p.add_argument("--heatmaps", required=True, help="cached heatmaps of the labelled images (a run's heatmaps/)")
    p.add_argument("--coco-gt", required=True, help="their COCO ground truth")
    p.add_argument("--out", required=True, help="the config file to write (YAML, use with --config)")
    p.add_argument("--metric", default="segm-ap", choices=["segm-ap", "segm-ap50", "bbox-ap", "miou", "dataset-f1"],
                   help="what to maximise: AP or mIoU of predictions.json, or dataset-f1: F1 (mask IoU 0.5) of "
                   "dataset.json, also tuning export.dataset_min_score")
    p.add_argument("--per-class", action="store_true", help="also a threshold per class with enough instances")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for the held-out gain")
    p.add_argument("--config", help="the starting configuration (default: the run's, else default)")
    p.add_argument("--images", help="the images folder, to search the map refinement too (default: where the run "
                   "read them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)

    p = add("eval", "COCO evaluation with pycocotools (+ semantic metrics)")
    p.add_argument("--gt", required=True, help="COCO ground-truth JSON")
    p.add_argument("--pred", required=True, help="COCO results JSON (predictions.json)")
    p.add_argument("--iou-type", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--semantic", action="store_true", help="also class-wise mask mIoU")
    p.add_argument("--heatmaps", help="folder of cached heatmaps: FG/BG metrics and pointing game of the maps")
    p.add_argument("--mask-score-threshold", type=float, default=0.5,
                   help="predicted masks scoring at least this count for the mask mIoU")
    p.set_defaults(func=_cmd_eval)

    p = add("label", "label images: COCO predictions, a pseudo-label dataset, pictures")
    p.add_argument("inputs", nargs="*", help="folders (recursive), image files, or .txt files listing paths")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="a YAML file or a shipped preset name (default: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    q = p.add_argument_group("queries (one of)")
    q.add_argument("--queries", nargs="+", metavar="NAME", help="the classes to label (put INPUTS before it, or end "
                   "the list with --)")
    q.add_argument("-q", "--query", action="append", metavar="NAME", help="one class to label (repeatable)")
    q.add_argument("--queries-file", help="classes: .txt (one per line) or .json (COCO categories or names)")
    p.add_argument("--coco-gt", help="a COCO file: its images and categories (ids kept) are labelled")
    p.add_argument("--images-dir", help="the folder the --coco-gt file names are relative to")
    m = p.add_argument_group("model and explainer")
    m.add_argument("--model", help="open_clip model name, a model-config .json, or ovlabel-shapes {config: model.name}")
    m.add_argument("--pretrained", help="open_clip tag, checkpoint file (.pt/.bin/.safetensors), or none; a model "
                   "shipped with ovlabel uses its own weights {config: model.pretrained}")
    m.add_argument("--device", help="auto | cpu | cuda | cuda:N {config: model.device}")
    m.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="{config: model.precision}")
    m.add_argument("--method", help="explainer, see `ovlabel methods` {config: explainer.method}")
    m.add_argument("--layers", help="all | -n | [i,j] {config: explainer.layers}")
    m.add_argument("--size", type=int, help="input size (longest side) {config: preprocess.size}")
    m.add_argument("--backend", choices=["torch", "onnx"], help="onnx: run the graphs of --onnx-dir in "
                   "onnxruntime {config: model.backend}")
    m.add_argument("--onnx-dir", help="a folder made by `ovlabel export-onnx` {config: model.onnx_dir}")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, help="{config: run.batch_size}")
    r.add_argument("--workers", type=int, help="image-decoding worker processes {config: run.workers}")
    r.add_argument("--threads", type=int, help="CPU threads of this process (torch, OpenCV, post-processing) "
                   "(default: all cores)")
    r.add_argument("--resume", action="store_true", help="continue a run that was interrupted (the same command "
                   "plus --resume); images that failed stay failed unless --retry-failed")
    r.add_argument("--retry-failed", action="store_true",
                   help="with --resume: label again the images whose record is a failure")
    r.add_argument("--shard", type=_parse_shard, default="0/1", metavar="I/N",
                   help="process the I-th of N deterministic shares (merge with `ovlabel merge`); `auto`: I and N "
                   "from a SLURM job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or torchrun (RANK, "
                   "WORLD_SIZE)")
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (and its decoding workers); ray: a Ray cluster (pip install "
                   "'ovlabel[ray]')")
    r.add_argument("--ray-address", help="with --engine ray: join this running cluster (e.g. auto, or "
                   "ray://head:10001); default: start a local cluster sized to this machine")
    r.add_argument("--actors", help="with --engine ray: model replicas, N or MIN:MAX (default: one per GPU with "
                   "--gpus-per-actor, else one per 4 CPUs)")
    r.add_argument("--gpus-per-actor", type=float, default=0.0, help="with --engine ray: GPUs of each actor")
    r.add_argument("--cpus-per-actor", type=float, help="with --engine ray: CPUs of each actor (default: the "
                   "cluster's CPUs shared among the actors; 1 with GPUs)")
    r.add_argument("--strict", action="store_true", help="stop at the first image that fails")
    r.add_argument("--fail-on-error", action="store_true", help="exit with status 3 when any image failed (the "
                   "run still labels the others and writes its files; failures are listed in run.yaml)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    o = p.add_argument_group("outputs")
    o.add_argument("--save-heatmaps", action="store_true", help="write heatmaps/*.npz")
    o.add_argument("--overlays", action="store_true", help="write overlays/*.jpg")
    _export_options(o)
    _postprocess_options(p.add_argument_group("post-processing"))
    p.set_defaults(func=_cmd_label)

    p = add("export-onnx", "export the image encoder, the explainers' map graphs and the text encoder to ONNX, "
            "checked against PyTorch")
    p.add_argument("--out", required=True, help="output folder (graphs and model.json)")
    p.add_argument("--model", help="open_clip model name, a model-config .json, or ovlabel-shapes {config: model.name}")
    p.add_argument("--pretrained", help="open_clip tag or checkpoint file {config: model.pretrained}")
    p.add_argument("--config", help="a YAML file or a shipped preset name (default: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--size", type=int, help="input size of the graphs {config: preprocess.size}")
    p.add_argument("--static-size", action="store_true", help="graphs of one square input size (--size): non-square "
                   "images are padded to it, so results differ from PyTorch's; the default takes any height and "
                   "width (a multiple of the patch size), positional embeddings resampled in the graph")
    p.add_argument("--dynamic-size", action="store_true", help=argparse.SUPPRESS)  # the default since 0.x: kept
    p.add_argument("--layers", help="blocks of the explainers: all | -n | [i,j] {config: explainer.layers}")
    p.add_argument("--method", action="append", help=f"explainer to export (repeatable): {', '.join(EXPORTABLE)} "
                   "{config: explainer.method}")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--fp16", action="store_true", help="half-precision graphs (for GPUs; parity checked with the "
                   "fp16 tolerances)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no stage messages")
    p.set_defaults(func=_cmd_export_onnx)

    p = add("benchmark", "the papers' benchmarks from their real files, for every explainer")
    bsub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def bench(name: str, help: str) -> argparse.ArgumentParser:
        q = bsub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_Formatter)
        q.add_argument("--out", required=True, help="output folder (records.jsonl, results.json)")
        q.add_argument("--model", default="ViT-B-16", help="open_clip model name or model-config .json")
        q.add_argument("--pretrained", default="laion2b_s34b_b88k", help="open_clip tag or checkpoint file")
        q.add_argument("--methods", nargs="+", default=["legrad", "chefercam", "gradcam", "rollout", "raw_attention"],
                       help="explainers to compare (see `ovlabel methods`)")
        q.add_argument("--size", type=int, default=224, help="input size")
        q.add_argument("--templates", choices=["imagenet", "single"], default="imagenet",
                       help="prompts per class name for the zero-shot classes: CLIP's 80, or 'a photo of a {}.'")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        q.add_argument("--max-images", type=int, help="stop after this many images (default: all)")
        q.add_argument("--resume", action="store_true", help="continue an interrupted run")
        q.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=_cmd_benchmark)
        return q

    q = bench("imagenet-seg", "ImageNet-Segmentation (gtsegs_ijcv.mat): pixel accuracy, FG/BG mIoU, mAP")
    q.add_argument("--mat", required=True, help="gtsegs_ijcv.mat (MATLAB v7.3 / HDF5)")
    q.add_argument("--labels", help="class names to choose the zero-shot class from (.txt or .json; default: "
                   "the ImageNet-1k classes)")
    q = bench("openimages-points", "OpenImages V7 point labels: p-mIoU")
    q.add_argument("--points", required=True, help="oidv7-*-annotations-point-labels.csv")
    q.add_argument("--classes", required=True, help="oidv7-class-descriptions.csv")
    q.add_argument("--images", required=True, help="the folder of <ImageId>.jpg")
    q = bench("perturbation", "ImageNet validation: positive and negative perturbation AUC")
    q.add_argument("--imagenet-val", required=True, help="class folders (n01440764/…) or ILSVRC2012_val_*.JPEG")
    q.add_argument("--devkit", help="ILSVRC2012_devkit_t12, for a flat validation folder")
    q.add_argument("--target", choices=["predicted", "true"], default="predicted", help="the class explained")

    p = add("report", "a self-contained HTML report of a run (gallery, filters, counts, evaluation, failures)")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--out", help="where to write it (default: RUN/report)")
    p.add_argument("--gt", help="a COCO ground truth for per-class AP, PR curves, false positives and misses "
                   "(default: the one the run was labelled from, if any)")
    p.add_argument("--page-size", type=int, default=200, help="images per gallery page")
    p.add_argument("--thumb", type=int, default=256, help="longest side of the thumbnails, in pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_report)

    p = add("merge", "merge the shards of a run into one set of files")
    p.add_argument("runs", nargs="+", help="run folders (each with records/ and run*.yaml)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_merge)

    p = add("train-demo", "train the tiny shapes CLIP that ships with ovlabel")
    p.add_argument("--out", required=True, help="output folder (weights, config, training log)")
    p.add_argument("--steps", type=int, default=8000, help="optimisation steps (~45 min on 2 cores for 8000)")
    p.add_argument("--minutes", type=float, help="stop on wall time instead (not reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=50000, help="generated training scenes")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ship", action="store_true", help="copy the result into the package (src/ovlabel/models)")
    p.set_defaults(func=_cmd_train_demo)

    p = add("demo", "offline demo: label generated scenes with the shipped model, evaluate, report")
    p.add_argument("--out", default="ovlabel-demo", help="output folder")
    p.add_argument("--images", type=int, default=40, help="held-out scenes to generate")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--config", default="shapes", help="config preset or file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def _export_options(p) -> None:
    p.add_argument("--masks", choices=["instance", "semantic"], help="write masks-KIND/*.png and their .json "
                   "(an alias of --format masks-KIND) {config: export.masks}")
    p.add_argument("--format", action="append", metavar="FORMAT", dest="formats",
                   help="also write the pseudo-label dataset as FORMAT (repeatable; `ovlabel formats`) "
                   "{config: export.formats}")
    p.add_argument("--dataset-min-score", type=float, help="dataset.json and the formats keep annotations scoring "
                   "at least this; predictions.json keeps all {config: export.dataset_min_score}")
    p.add_argument("--val-fraction", type=float, help="YOLO datasets: the share of images in val/, chosen by a "
                   "hash of the image id (0: val = train) {config: export.val_fraction}")
    p.add_argument("--copy-images", action="store_true", help="YOLO datasets: hard-link (or copy) the images into "
                   "the dataset instead of relative symbolic links {config: export.copy_images}")


def _postprocess_options(p) -> None:
    """First-class flags for what people tune (each sets the config key its help names)."""
    helps = {"--threshold": "the map threshold's value (its method: postprocess.threshold.method)",
             "--score": "detections scoring below this are dropped",
             "--presence": "queries whose presence is below this are judged absent in the image",
             "--nms-iou": "NMS overlap (with postprocess.nms: mask | box)"}
    for key, flag in POSTPROCESS_FLAGS.items():
        p.add_argument(flag, type=float, metavar="X", help=f"{helps[flag]} {{config: {key}}}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names of undecodable bytes print escaped, never crash
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    logging.getLogger("ovlabel").setLevel(level)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if quiet:  # errors only (they go to stderr): no warnings, and no summary unless it is the product
            with warnings.catch_warnings(), contextlib.ExitStack() as stack:
                warnings.simplefilter("ignore")
                if args.command not in PRODUCT_ON_STDOUT:
                    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                return int(args.func(args) or 0)
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

