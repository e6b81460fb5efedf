"""``ovlabel merge``: the records of a run's shards (in one folder or several) → one set of COCO files,
identical to a single-process run of the same images and config. This module does not import torch.

Only the shards of one run merge: every folder's manifest must describe the same settings, shard count
and image list (two runs over different folders number their images 1..N independently, so their ids
would collide), every shard ``0..N-1`` must be present and complete. Anything else is refused with a
message that names the folders and what differs.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..common.categories import Categories
from ..common.files import ensure_writable_dir, sha256_file, write_yaml
from ..config import parse_yaml, read_text_file
from ..errors import InputError
from ..export.coco import load_coco
from ..export.formats import write_dataset
from . import manifest as run_manifest
from .run import RunLayout


def _read_yaml(path: Path) -> dict:
    data = parse_yaml(read_text_file(path, "run file", error=InputError), str(path), error=InputError)
    if not isinstance(data, dict):
        raise InputError(f"{path} is not an ovlabel run file (a mapping), got {type(data).__name__}")
    return data


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Merge the records of the shards of one run into ``out_dir`` (see the module docstring)."""
    run_dirs = [Path(d) for d in run_dirs]
    manifests: list[tuple[Path, dict]] = []
    for d in run_dirs:
        if not RunLayout.run_files(d) or not RunLayout.record_files(d):
            raise InputError(f"{d} is not an ovlabel run folder (no run*.yaml and records/records*.jsonl)")
        mpath = RunLayout(d).manifest
        if not mpath.exists():
            raise InputError(f"{d} has no {run_manifest.NAME} (a run of an older ovlabel?); merge needs it to "
                             "check that the folders hold shards of one run")
        manifests.append((d, run_manifest.load(mpath)))

    # 1. one run: the same images (ids and names), inputs, settings and shard count everywhere
    first_dir, first = manifests[0]
    for d, m in manifests[1:]:
        if m["images_sha256"] != first["images_sha256"] or m["inputs"] != first["inputs"]:
            a = {int(r[0]): r[1] for r in first["images"]}
            b = {int(r[0]): r[1] for r in m["images"]}
            clash = sorted(i for i in a.keys() & b.keys() if a[i] != b[i])
            if clash:
                detail = f"image {clash[0]} is {a[clash[0]]!r} in {first_dir} but {b[clash[0]]!r} in {d}"
            elif a.keys() != b.keys():
                detail = f"{len(a.keys() ^ b.keys())} image ids are in one run only"
            else:
                detail = "; ".join(run_manifest.differences(first["inputs"], m["inputs"], "inputs")[:3])
            raise InputError(f"{first_dir} and {d} are not shards of one run: they label different inputs ({detail}). "
                             "Runs number their images independently, so their ids would collide; label all the "
                             "inputs in one run (ovlabel label A B … --out RUN, with --shard I/N to split it)")
        run_manifest.check_same_run(first, m, str(d), compare_inputs=False)

    # 2. every shard present and complete
    shards: dict[int, Path] = {}
    metas: list[tuple[Path, dict]] = []
    record_files: list[Path] = []
    for d in run_dirs:
        record_files += RunLayout.record_files(d)
        for y in RunLayout.run_files(d):
            meta = _read_yaml(y)
            if "shard" not in meta:
                continue  # the summary of an earlier merge of several shards into this folder
            try:
                i, n = (int(v) for v in str(meta["shard"]).split("/"))
            except ValueError:
                raise InputError(f"{y}: field 'shard' must be I/N, got {meta['shard']!r}") from None
            if meta.get("status") != "complete":
                raise InputError(f"{y}: shard {i}/{n} is not complete (resume it first: the same command with "
                                 "--resume)")
            if i in shards and shards[i].resolve() != y.resolve():
                raise InputError(f"shard {i}/{n} appears twice: {shards[i]} and {y}")
            shards[i] = y
            metas.append((y, meta))
    n = int(first["shards"])
    missing = sorted(set(range(n)) - set(shards))
    if missing:
        raise InputError(f"incomplete shard set: shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing from "
                         f"{', '.join(str(d) for d in run_dirs)}; run them (the same command with --shard I/{n}) "
                         "or pass the folders that hold them")
    extra = sorted(i for i in shards if i >= n)
    if extra:
        raise InputError(f"shards {extra} do not belong to a run of {n} shards")

    settings = first["settings"]
    cats = Categories(tuple(settings["queries"]["ids"]), tuple(settings["queries"]["names"]))
    layout = RunLayout(ensure_writable_dir(out_dir))
    out_dir = layout.out_dir
    inputs = first["inputs"]
    gt = None
    if "coco_gt" in inputs:
        if sha256_file(inputs["coco_gt"]) != inputs["coco_gt_sha256"]:
            raise InputError(f"the ground truth {inputs['coco_gt']} changed since the run started")
        gt = load_coco(inputs["coco_gt"])
    merged = write_dataset(record_files, out_dir, cats, export_cfg=settings["export"], gt=gt,
                           image_root=inputs.get("image_root"),
                           image_paths={it.id: it.path for it in run_manifest.items(first)})
    # the run's provenance (versions, command, model and weights, explainer, queries, config) is kept;
    # a single-process run merged into its own folder stays shard 0/1, so that merging again is the same
    meta = dict(sorted(metas, key=lambda m: str(m[1].get("shard")))[0][1])
    if n > 1:
        meta.pop("shard", None)
    summary = {**meta, "ovlabel": __version__, "status": "complete",
               "merged_from": sorted({str(y) for y, _ in metas}),
               "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "image_root": inputs.get("image_root"),
               "counts": {**((meta.get("counts") or {}) if n == 1 else {}), "images": merged["images"],
                          "annotations": merged["annotations"], "failed": len(merged["failures"])},
               "failures": merged["failures"],
               "outputs": {**layout.outputs(merged["formats"]), "annotations": merged["annotations"],
                           "images": merged["images"]}}
    write_yaml(layout.run_yaml, summary)
    return summary


__all__ = ["merge_runs"]
