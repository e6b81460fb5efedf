"""Hostile inputs, round 3: no file outside the run is ever written, removed or read; no hangs; bounded work
from small files; every command answers malformed input with exit 2 and one ``error:`` line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ovlabel import InputError
from ovlabel.cli import main
from ovlabel.export.heatmaps import save_heatmaps
from ovlabel.postprocess.geometry import ImageMaps
from test_pipeline import BASE, TINY, label, scenes


def cache(path: Path, file_name: str, image_id: int = 1, size=(64, 64), queries=("a",), tiles=None) -> Path:
    """A version-2 heatmap cache as another tool would write it: 8x8 float16 maps for an image of ``size``."""
    rng = np.random.default_rng(image_id)
    if tiles is None:
        maps = ImageMaps(rng.random((len(queries), 8, 8)).astype(np.float32), size, None)
    else:
        maps = ImageMaps(rng.random((len(tiles), len(queries), 8, 8)).astype(np.float32), size, tuple(tiles))
    return save_heatmaps(path, maps, list(queries), image_id, file_name)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(err: str) -> str:
    """The one ``error:`` line of a refusal (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """A labelling run with cached heatmaps, category ids 7 and 9 (not 1..K), and its ground truth."""
    root = tmp_path_factory.mktemp("run")
    src = scenes(root / "in", 3)
    cats = root / "cats.json"
    cats.write_text(json.dumps([{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]))
    assert main(["label", str(src), *BASE, "--queries-file", str(cats), "--out", str(root / "run"),
                 "--save-heatmaps"]) == 0
    return root


def pred_ids(folder: Path) -> set[int]:
    return {p["category_id"] for p in json.loads((folder / "predictions.json").read_text())}


# ------------------------------------------------------------------------------------ 1. containment
@pytest.mark.parametrize("escape", ["../../../../victim.png", "absolute"])
def test_cache_names_never_lead_a_file_operation_outside_the_run(tmp_path, capsys, escape):
    victim = tmp_path / "victim.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(victim)
    before = victim.read_bytes()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(imgs / "ok.png")
    hm = tmp_path / "hm"
    name = str(victim) if escape == "absolute" else escape
    cache(hm / "bad.npz", name, image_id=1)
    cache(hm / "ok.npz", "ok.png", image_id=2)
    out = tmp_path / "out" / "deep"
    code, _, err = run_cli(["postprocess", "--heatmaps", str(hm), "--out", str(out), "--images", str(imgs),
                            "--format", "yolo-det", "--format", "yolo-seg", "--masks", "instance",
                            "--set", "export.overlays=true"], capsys)
    assert code == 0, err
    assert not victim.is_symlink() and victim.read_bytes() == before
    assert not (tmp_path / "victim.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hm", "imgs", "out", "victim.png"]
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["counts"]["failed"] == 1 and "outside its folder" in run["failures"][0]["error"] \
        or "absolute path" in run["failures"][0]["error"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert [i["file_name"] for i in dataset["images"]] == ["ok.png"]
    assert sorted(p.name for p in (out / "yolo-det" / "images").rglob("*") if not p.is_dir()) == ["ok.png"]


def test_the_yolo_exporter_refuses_names_that_escape(tmp_path):
    from ovlabel.export.formats import EXPORTERS, ExportContext

    (tmp_path / "img.png").write_bytes(b"x")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    dataset = {"images": [{"id": 1, "file_name": "../../outside.png", "height": 4, "width": 4},
                          {"id": 2, "file_name": "sub/ok.png", "height": 4, "width": 4}],
               "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    run = tmp_path / "run"
    r = EXPORTERS["yolo-det"](ExportContext(dataset, run, {1: tmp_path / "img.png", 2: tmp_path / "img.png"}))
    assert r["images"] == 1 and r["skipped"][0]["image_id"] == 1 and "outside" in r["skipped"][0]["error"]
    assert outside.read_text() == "keep"
    assert (run / "yolo-det" / "labels" / "train" / "sub" / "ok.txt").exists()
    # a link inside the dataset that points elsewhere is not followed for writing either
    (run / "yolo-det" / "images" / "train" / "evil").symlink_to(tmp_path)
    dataset["images"][1]["file_name"] = "evil/img.png"
    r = EXPORTERS["yolo-det"](ExportContext(dataset, run, {1: tmp_path / "img.png", 2: tmp_path / "img.png"}))
    assert r["images"] == 0 and (tmp_path / "img.png").read_bytes() == b"x"


@pytest.mark.parametrize("name,problem", [("a.png", None), ("sub/../a.png", None), ("../a.png", "outside"),
                                          ("/etc/passwd", "absolute"), ("C:\\x.png", "absolute"),
                                          ("a/..", "does not name a file"), ("", "non-empty"), (3, "non-empty")])
def test_relative_name_problems(name, problem):
    from ovlabel.common.files import relative_name_problem

    got = relative_name_problem(name)
    assert (got is None) if problem is None else (problem in got)


# ---------------------------------------------------------------------------- 2. no silent fallback
def test_postprocess_follows_the_manifest_or_shard_files_and_refuses_bad_run_files(coco_run, tmp_path, capsys,
                                                                                     caplog):
    run = tmp_path / "run"
    shutil.copytree(coco_run / "run", run)
    ref = tmp_path / "ref"
    assert run_cli(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(ref)], capsys)[0] == 0
    assert pred_ids(ref) <= {7, 9} and pred_ids(ref)
    (run / "run.yaml").unlink()  # deleted: the manifest still says what the run was
    code, _, err = run_cli(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and "following its manifest" in caplog.text
    assert (tmp_path / "m" / "predictions.json").read_bytes() == (ref / "predictions.json").read_bytes()
    for bad in ("- a list\n- of things\n", "config: [1, 2\n", b"\xff\xfe not utf-8"):
        (run / "run.yaml").write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        code, _, err = run_cli(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(tmp_path / "x")],
                               capsys)
        assert code == 2 and "run.yaml" in one_error(err)
    assert not (tmp_path / "x" / "predictions.json").exists()


def test_postprocess_of_a_sharded_run_before_merge_keeps_the_category_ids(tmp_path, capsys):
    src = scenes(tmp_path / "in", 4)
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps([{"id": 31, "name": "a"}, {"id": 40, "name": "b"}]))
    common = ["label", str(src), *BASE, "--queries-file", str(cats), "--out", str(tmp_path / "run"), "--save-heatmaps"]
    for shard in ("0/2", "1/2"):
        assert main([*common, "--shard", shard]) == 0
    assert not (tmp_path / "run" / "run.yaml").exists()
    code, _, err = run_cli(["postprocess", "--heatmaps", str(tmp_path / "run" / "heatmaps"), "--out",
                            str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert pred_ids(tmp_path / "p") and pred_ids(tmp_path / "p") <= {31, 40}


def test_a_foreign_cache_says_defaults_apply(tmp_path, capsys, caplog):
    cache(tmp_path / "hm" / "x.npz", "x.png", queries=("cat", "dog"))
    code, _, err = run_cli(["postprocess", "--heatmaps", str(tmp_path / "hm"), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "default configuration applies" in caplog.text
    assert "ids 1..2 follow the query order" in caplog.text


# ------------------------------------------------------------------------ 3. caches are what they claim
def test_caches_of_other_images_are_refused_against_a_ground_truth(coco_run, tmp_path, capsys):
    from ovlabel.apps.calibrate import calibrate

    hm = coco_run / "run" / "heatmaps"
    first = json.loads((coco_run / "run" / "dataset.json").read_text())["images"]
    gt = {"images": [{**img, "file_name": f"other_{img['file_name']}"} for img in first],
          "annotations": [{"id": 1, "image_id": first[0]["id"], "category_id": 7, "bbox": [0, 0, 4, 4], "area": 16,
                           "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}],
          "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    code, _, err = run_cli(["postprocess", "--heatmaps", str(hm), "--coco-gt", str(gt_path), "--out",
                            str(tmp_path / "p")], capsys)
    assert code == 2 and "not of this ground truth's images" in one_error(err)
    with pytest.raises(InputError, match="not of this ground truth's images"):
        calibrate(hm, gt_path, tmp_path / "c.yaml")
    code, _, err = run_cli(["eval", "--gt", str(gt_path), "--pred", str(coco_run / "run" / "predictions.json"),
                            "--heatmaps", str(hm)], capsys)
    assert code == 2 and "not of this ground truth's images" in one_error(err)


# ------------------------------------------------------------------------------------------ 4. hangs
def test_a_fifo_named_npz_is_skipped_not_opened(coco_run, tmp_path, capsys, caplog):
    from ovlabel.apps.calibrate import calibrate

    run = tmp_path / "run"
    shutil.copytree(coco_run / "run", run)
    os.mkfifo(run / "heatmaps" / "zz_fifo.npz")  # opening it for reading would block for ever
    code, _, err = run_cli(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(tmp_path / "p")], capsys)
    assert code == 0 and "FIFO" in caplog.text
    meta = yaml.safe_load((tmp_path / "p" / "run.yaml").read_text())
    assert meta["counts"]["skipped"] == 1 and "FIFO" in meta["skipped"][0]["error"]
    gt = json.loads((run / "dataset.json").read_text())
    gt["annotations"] = [{**a, "iscrowd": 0} for a in gt["annotations"]][:5]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    calibrate(run / "heatmaps", tmp_path / "gt.json", tmp_path / "c.yaml", folds=2)
    code, _, err = run_cli(["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(run / "predictions.json"),
                            "--heatmaps", str(run / "heatmaps")], capsys)
    assert code == 0 and caplog.text.count("FIFO") >= 3  # postprocess, calibrate, eval


def test_a_dead_ray_address_fails_in_seconds(tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = scenes(tmp_path / "in", 1)
    t0 = time.time()
    code, _, err = run_cli(["label", str(src), *BASE, "-q", "a", "--out", str(tmp_path / "o"), "--engine", "ray",
                            "--ray-address", f"127.0.0.1:{port}"], capsys)
    assert code == 2 and f"127.0.0.1:{port}" in one_error(err) and "nothing answers" in err
    assert time.time() - t0 < 30


# ----------------------------------------------------------------------------------- 5. bounded work
@pytest.mark.parametrize("kind", ["size", "tiles"])
def test_cache_sizes_and_tiles_are_bounded_before_allocating(tmp_path, capsys, kind):
    if kind == "size":
        cache(tmp_path / "hm" / "x.npz", "x.png", size=(200_000, 200_000))
        match = "more than the limit"
    else:
        cache(tmp_path / "hm" / "x.npz", "x.png", size=(64, 64), tiles=[(0, 64, 0, 64)] * 20_000)
        match = "tiles"
    assert (tmp_path / "hm" / "x.npz").stat().st_size < 3_000_000
    t0 = time.time()
    code, _, err = run_cli(["postprocess", "--heatmaps", str(tmp_path / "hm"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and match in one_error(err) and time.time() - t0 < 20


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bombs_and_devices_are_refused_with_bounded_memory(coco_run, tmp_path, capsys):
    import resource

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())  # 9^9 = 387 million strings, from 300 bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases = [["config", "show", "--config", str(bomb)],
             ["config", "show", "--config", "/dev/zero"],
             ["config", "show", "--set", "postprocess.class_thresholds=" + "{" + _alias_bomb().replace("\n", ", ")
              .rstrip(", ") + "}"],
             ["config", "show", "--set", "queries.names=&a [*a]"]]
    for argv in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert any(w in one_error(err) for w in ("alias", "not a regular file", "recursive")), err
    run = tmp_path / "run"
    shutil.copytree(coco_run / "run", run)
    (run / "run.yaml").write_text(_alias_bomb())
    code, _, err = run_cli(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "alias bomb" in one_error(err)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024  # KiB: < 200 MB more


# ------------------------------------------------------------------------------------------- 6. names
def test_a_non_utf8_name_is_labelled_and_resumed_and_skipped_entries_are_reported(tmp_path, capsys, caplog):
    src = scenes(tmp_path / "in", 2)
    bad = os.fsencode(src) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    shutil.copyfile(src / "img_000.png", bad)
    (src / ".hidden.png").write_bytes((src / "img_001.png").read_bytes())
    elsewhere = scenes(tmp_path / "elsewhere", 1)
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    common = [str(src), *BASE, "-q", "a", "--out", str(tmp_path / "o"), "--masks", "instance"]
    label(common, capsys)
    assert "not searched" in caplog.text
    dataset = json.loads((tmp_path / "o" / "dataset.json").read_text())
    names = sorted(i["file_name"] for i in dataset["images"])
    assert names == sorted(["img_000.png", "img_001.png", os.fsdecode(b"caf\xe9.png")])
    assert (tmp_path / "o" / "dataset.json").read_bytes().decode("utf-8")  # still valid UTF-8 JSON
    run = yaml.safe_load((tmp_path / "o" / "run.yaml").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in run["skipped_entries"]}
    assert "hidden" in reasons[".hidden.png"] and "symbolic link" in reasons["linked"]
    assert run["counts"]["labelled"] == 3
    label([*common, "--resume"], capsys)
    assert yaml.safe_load((tmp_path / "o" / "run.yaml").read_text())["counts"]["resumed_skipped"] == 3


def test_queries_longer_than_the_context_warn(tmp_path, capsys, caplog):
    src = scenes(tmp_path / "in", 1)
    long = "a very long description of a thing " * 4
    label([str(src), *BASE, "-q", long, "-q", "b", "--out", str(tmp_path / "o")], capsys)
    assert "tokens long" in caplog.text and long.strip()[:30] in caplog.text and "reads 16" in caplog.text
    assert caplog.text.count("tokens long") == 1  # the short query says nothing


# -------------------------------------------------------------------------------------------- 7. ONNX
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from ovlabel.apps.export_onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    last2 = export_onnx(TINY, "none", root / "last2", size=64)
    every = export_onnx(TINY, "none", root / "all", size=64, layers="all", text_encoder=False)
    return last2.out_dir, every.out_dir


@pytest.mark.parametrize("case", ["foreign_graph", "truncated", "mean_edited", "patch_zero", "methods_list",
                                  "escaping_file", "no_digests"])
def test_onnx_folders_are_verified_at_load(exports, tmp_path, capsys, case):
    from ovlabel.export.onnx import content_digest

    last2, every = exports
    d = tmp_path / "graphs"
    shutil.copytree(last2, d)
    info = json.loads((d / "model.json").read_text())
    resign = True
    if case == "foreign_graph":  # the explainer graph of an all-blocks export, swapped in
        shutil.copyfile(every / "explainer-legrad.onnx", d / "explainer-legrad.onnx")
        match, resign = "not the graph this export wrote", False
    elif case == "truncated":
        data = (d / "image_encoder.onnx").read_bytes()
        (d / "image_encoder.onnx").write_bytes(data[: len(data) // 2])
        match, resign = "not the graph this export wrote", False
    elif case == "mean_edited":
        info["mean"] = [0.1, 0.1, 0.1]
        match, resign = "edited after the export", False
    elif case == "patch_zero":
        info["patch_size"] = [0, 0]
        match = "patch_size"
    elif case == "methods_list":
        info["methods"] = ["legrad"]
        match = "methods"
    elif case == "escaping_file":
        info["methods"]["legrad"]["file"] = "../last2/explainer-legrad.onnx"
        match = "outside"
    else:
        del info["digests"]
        match, resign = "records no digests", False
    if resign:
        info["content_sha256"] = content_digest(info)
    (d / "model.json").write_text(json.dumps(info))
    src = scenes(tmp_path / "in", 1)
    code, _, err = run_cli(["label", str(src), *BASE, "-q", "a", "--out", str(tmp_path / "o"), "--backend", "onnx",
                            "--onnx-dir", str(d)], capsys)
    assert code == 2 and match in one_error(err), err
    assert not (tmp_path / "o" / "records").exists()


def test_a_graph_onnxruntime_cannot_load_is_one_error_line(exports, tmp_path):
    from ovlabel.pipeline.onnx_backend import session

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(InputError, match="cannot load this graph"):
        session(bad, "cpu")


def test_export_onnx_follows_the_configs_blocks(exports, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("explainer:\n  layers: [0, 2]\npreprocess:\n  size: 32\n")  # not the default, [1, 2]
    code, _, err = run_cli(["export-onnx", "--out", str(tmp_path / "e"), "--model", TINY, "--pretrained", "none",
                            "--config", str(cfg)], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "e" / "model.json").read_text())
    assert info["methods"]["legrad"]["layers"] == [0, 2]
    src = scenes(tmp_path / "in", 1)
    code, _, err = run_cli(["label", str(src), *BASE, "--size", "32", "-q", "a", "--config", str(cfg), "--out",
                            str(tmp_path / "o"), "--backend", "onnx", "--onnx-dir", str(tmp_path / "e")], capsys)
    assert code == 0, err


def test_ctrl_c_stops_an_export_even_when_the_exporter_swallows_it(tmp_path, capsys, monkeypatch):
    """torch.onnx's exporter catches the KeyboardInterrupt of a Ctrl-C and goes on; the export must stop."""
    pytest.importorskip("onnxruntime")
    import torch

    real = torch.onnx.export
    calls = []

    def swallowing_export(*args, **kwargs):
        calls.append(1)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the graph is traced…
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # …and swallowed, as the exporter does
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", swallowing_export)
    code, _, err = run_cli(["export-onnx", "--out", str(tmp_path / "e"), "--model", TINY, "--pretrained", "none",
                            "--size", "32"], capsys)
    assert code == 130 and "interrupted" in err and len(calls) == 1
    assert not (tmp_path / "e").exists() and not any(p.name.startswith(".onnx-export-") for p in tmp_path.iterdir())


def test_a_killed_exports_folder_is_removed_by_the_next(tmp_path):
    from ovlabel.apps.export_onnx import TMP_PREFIX, remove_dead_exports

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{TMP_PREFIX}{dead.pid}-abc").mkdir()
    (tmp_path / f"{TMP_PREFIX}{dead.pid}-abc" / "image_encoder.onnx").write_bytes(b"half")
    (tmp_path / f"{TMP_PREFIX}{os.getpid()}-live").mkdir()  # an export still running: left alone
    assert remove_dead_exports(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{TMP_PREFIX}{os.getpid()}-live"]


# ------------------------------------------------------------------------------------ 8. paths verbatim
@pytest.mark.parametrize("value", ["exports/E #2", "a: b", "line\nbreak", "[1, 2]", "null"])
def test_path_flags_are_taken_verbatim(value):
    from ovlabel.cli import _label_overrides, build_parser
    from ovlabel.config import load_config

    args = build_parser().parse_args(["label", "x", "--out", "o", "--onnx-dir", value, "--pretrained", value,
                                      "--model", value])
    cfg = load_config(None, _label_overrides(args))
    assert cfg.model.onnx_dir == value and cfg.model.pretrained == value and cfg.model.name == value


# -------------------------------------------------------------------------------------- 9. provenance
def test_postprocess_refuses_the_labelling_runs_own_folder(coco_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(coco_run / "run", run)
    before = (run / "run.yaml").read_bytes()
    code, _, err = run_cli(["postprocess", "--heatmaps", str(run / "heatmaps"), "--out", str(run)], capsys)
    assert code == 2 and "labelling run" in one_error(err)
    assert (run / "run.yaml").read_bytes() == before


def test_merge_into_the_runs_own_folder_keeps_every_key_and_is_idempotent(coco_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(coco_run / "run", run)
    before = yaml.safe_load((run / "run.yaml").read_text())
    preds = (run / "predictions.json").read_bytes()
    for _ in range(2):
        code, _, err = run_cli(["merge", str(run), "--out", str(run)], capsys)
        assert code == 0, err
        after = yaml.safe_load((run / "run.yaml").read_text())
        assert set(before) <= set(after), set(before) - set(after)
        for key in ("versions", "command", "start_time", "shard", "inputs", "model", "explainer", "queries", "config"):
            assert after[key] == before[key], key
        assert set(before["counts"]) <= set(after["counts"])
        assert (run / "predictions.json").read_bytes() == preds


# ------------------------------------------------------------------------------------ 10. no tracebacks
def _gt_and_results(tmp_path: Path) -> tuple[Path, dict, list[dict]]:
    from pycocotools import mask as mask_utils

    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                           "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}],
          "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    m = np.zeros((20, 30), np.uint8)
    m[2:12, 2:12] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    good = {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [2.0, 2.0, 10.0, 10.0],
            "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}}
    return path, good, [good]


def test_eval_refuses_results_with_broken_geometry(tmp_path, capsys):
    gt, good, _ = _gt_and_results(tmp_path)
    cases = {
        "wrong_size": {**good, "segmentation": {"size": [40, 30], "counts": good["segmentation"]["counts"]}},
        "garbage_rle": {**good, "segmentation": {"size": [20, 30], "counts": "garbage~~~"}},
        "short_rle": {**good, "segmentation": {"size": [20, 30], "counts": [5, 10]}},
        "negative_box": {**good, "bbox": [2.0, 2.0, -10.0, 10.0]},
        "nan_box": {**good, "bbox": [2.0, float("nan"), 10.0, 10.0]},
        "bad_polygon": {**good, "segmentation": [[1, 2, 3]]},
    }
    for name, res in cases.items():
        pred = tmp_path / f"{name}.json"
        pred.write_text(json.dumps([good, res]))
        for extra in ([], ["--semantic"]):
            code, _, err = run_cli(["eval", "--gt", str(gt), "--pred", str(pred), *extra], capsys)
            assert code == 2 and "results[1]" in one_error(err), (name, err)
    pred = tmp_path / "good.json"
    pred.write_text(json.dumps([good]))
    code, out, err = run_cli(["eval", "--gt", str(gt), "--pred", str(pred), "--semantic"], capsys)
    assert code == 0 and "AP" in out


def test_every_command_answers_malformed_input_with_one_error_line(coco_run, exports, tmp_path, capsys):
    """Exit 2 and exactly one ``error:`` line, never a traceback, for each kind of malformed input."""
    gt, good, _ = _gt_and_results(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(coco_run / "run", run)
    hm = run / "heatmaps"
    files = {
        "fifo": tmp_path / "fifo.json",
        "not_utf8": tmp_path / "latin1.json",
        "dict": tmp_path / "dict.json",
        "bomb": tmp_path / "bomb.yaml",
        "list_yaml": tmp_path / "list.yaml",
    }
    os.mkfifo(files["fifo"])
    files["not_utf8"].write_bytes(b"[\xff]")
    files["dict"].write_text(json.dumps({"image_id": 1}))
    files["bomb"].write_text(_alias_bomb())
    files["list_yaml"].write_text("- 1\n- 2\n")
    onnx_bad = tmp_path / "onnx_bad"
    shutil.copytree(exports[0], onnx_bad)
    info = json.loads((onnx_bad / "model.json").read_text())
    info["patch_size"] = "big"
    (onnx_bad / "model.json").write_text(json.dumps(info))
    out = str(tmp_path / "out")
    cases = [
        ["eval", "--gt", str(files["fifo"]), "--pred", str(files["dict"])],
        ["eval", "--gt", str(gt), "--pred", str(files["not_utf8"])],
        ["eval", "--gt", str(gt), "--pred", str(files["dict"])],
        ["eval", "--gt", str(gt), "--pred", str(files["fifo"])],
        ["eval", "--gt", str(files["not_utf8"]), "--pred", str(files["dict"])],
        ["calibrate", "--heatmaps", str(hm), "--coco-gt", str(files["not_utf8"]), "--out", str(tmp_path / "c.yaml")],
        ["calibrate", "--heatmaps", str(hm), "--coco-gt", str(gt), "--out", str(tmp_path / "c.yaml"),
         "--config", str(files["bomb"])],
        ["postprocess", "--heatmaps", str(hm), "--out", out, "--config", str(files["list_yaml"])],
        ["postprocess", "--heatmaps", str(hm), "--out", out, "--config", "/dev/zero"],
        ["postprocess", "--heatmaps", str(hm), "--out", out, "--coco-gt", str(files["fifo"])],
        ["postprocess", "--heatmaps", str(tmp_path / "nowhere"), "--out", out],
        ["label", str(tmp_path / "nowhere"), *BASE, "-q", "a", "--out", out],
        ["label", str(run), *BASE, "-q", "a", "--out", out, "--config", str(files["bomb"])],
        ["label", str(run), *BASE, "-q", "a", "--out", out, "--backend", "onnx", "--onnx-dir", str(onnx_bad)],
        ["label", str(run), *BASE, "-q", "a", "--out", out, "--set", "run.batch_size=&a [*a]"],
        ["label", "--coco-gt", str(files["not_utf8"]), "--images-dir", str(tmp_path), *BASE, "--out", out],
        ["merge", str(tmp_path / "nowhere"), "--out", out],
        ["export-onnx", "--out", out, "--model", TINY, "--pretrained", "none", "--config", str(files["bomb"])],
        ["export-onnx", "--out", out, "--model", TINY, "--pretrained", "none", "--opset", "99"],
        ["label", str(run), *BASE, "-q", "a", "--out", out, "--layers", "[0, 1"],
        ["config", "show", "--config", str(files["list_yaml"])],
    ]
    for argv in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        one_error(err)


def test_actor_pools_the_cluster_cannot_host_are_refused():
    from ovlabel.pipeline.engines.ray import RayOptions, size_actors

    for actors in ((64, 64), (1, 1000)):
        with pytest.raises(InputError, match="--actors|can host"):
            size_actors(RayOptions(actors=actors), [{"CPU": 2.0}])
    with pytest.raises(InputError, match="can host 2"):
        size_actors(RayOptions(actors=(1, 3), cpus_per_actor=1.0), [{"CPU": 2.0}])
    s = size_actors(RayOptions(actors=(1, 2)), [{"CPU": 2.0}])
    assert (s.min_actors, s.max_actors, s.cpus) == (1, 2, 1.0)


# --------------------------------------------------------------------------------- 11. bounded formats
def test_masks_instance_with_hundreds_of_overlapping_detections_is_bounded(tmp_path):
    """400 overlapping instances: the layers that keep every mask whole are found from the RLEs; every
    mask still reads back exactly from the file named in the JSON."""
    import resource

    from pycocotools import mask as mask_utils

    from ovlabel.export.formats import EXPORTERS, ExportContext

    H, W = 300, 400
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    anns, masks = [], {}
    for i in range(400):
        cy, cx, r = rng.integers(60, 240), rng.integers(60, 340), rng.integers(20, 80)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "score": float(rng.random()),
                     "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}, "area": int(m.sum()),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        masks[i + 1] = m.astype(bool)
    ds = {"images": [{"id": 1, "file_name": "x.png", "height": H, "width": W}], "annotations": anns,
          "categories": [{"id": 1, "name": "a"}]}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    EXPORTERS["masks-instance"](ExportContext(ds, tmp_path))
    assert time.time() - t0 < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 300 * 1024  # KiB
    meta = json.loads((tmp_path / "masks-instance" / "000001_x.json").read_text())
    for value, entry in meta["values"].items():
        img = np.asarray(Image.open(tmp_path / "masks-instance" / entry["complete_in"]))
        assert np.array_equal(img == int(value), masks[entry["annotation_id"]]), value
