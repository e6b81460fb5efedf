"""Trustworthy runs: kills at any moment, torn records, full disks, resumes and merges that refuse to mix
runs, failing images, ground-truth geometry, hostile inputs."""

from __future__ import annotations

import json
import logging
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

from ovlabel.cli import main
from test_coco import check_invariants
from test_pipeline import BASE, TINY, label, scenes

HARNESS = Path(__file__).with_name("kill_harness.py")


# ------------------------------------------------------------------------------------------ helpers
class Zygote:
    """Runs ``ovlabel`` commands in forked children of one pre-imported process (tests/kill_harness.py)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HARNESS.parent)}
        self.proc = subprocess.Popen([sys.executable, str(HARNESS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def start(self, argv: list[str], log: Path, fsize: int | None = None, env: dict | None = None) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "fsize": fsize, "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("pid "), line
        return int(line.split()[1])

    def wait(self) -> int:
        line = self.proc.stdout.readline()
        assert line.startswith("exit "), line
        return int(line.split()[1])

    def run(self, argv: list[str], log: Path, fsize: int | None = None, env: dict | None = None) -> int:
        self.start(argv, log, fsize, env)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def record_lines(out: Path) -> int:
    f = out / "records" / "records.jsonl"
    return f.read_bytes().count(b"\n") if f.exists() else 0


def result_files(out: Path) -> dict[str, bytes]:
    """Every output a user keeps, by relative path (run.yaml, records and the manifest hold times)."""
    skip = {"run.yaml", "manifest.json"}
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in skip and not rel.startswith("records/"):
            files[rel] = p.read_bytes()
    return files


def npz_arrays(data: bytes) -> dict:
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same_outputs(a: Path, b: Path) -> None:
    fa, fb = result_files(a), result_files(b)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)  # no missing file, no temporary file left behind
    for name in fa:
        if name.endswith(".npz"):  # zip entries carry their write time: compare the arrays
            za, zb = npz_arrays(fa[name]), npz_arrays(fb[name])
            assert sorted(za) == sorted(zb) and all(np.array_equal(za[k], zb[k]) for k in za), name
        else:
            assert fa[name] == fb[name], name


# ------------------------------------------------------------------------------- item 1: kills, tears
def test_sigkill_at_many_points_then_resume_is_byte_identical(tmp_path, zygote):
    """A real process killed with SIGKILL at 11 points spread over the run and once during the final merge;
    each time the same command with --resume continues; the files are those of an uninterrupted run. The
    test chooses each point (fault injection: ``OVLABEL_FAULT=STAGE:N``), so that no timing decides where a
    kill lands and a busy machine cannot make it miss: ``image:N`` dies inside a batch (the N-th image's
    heatmap and mask files written, its record not), ``record:N`` right after the batch append that reaches
    N records in that attempt, ``finalize:1`` with predictions.json and dataset.json written but not renamed
    into place."""
    src = scenes(tmp_path / "in", 40)
    common = ["label", str(src), *BASE, "--queries", "a", "b", "--batch-size", "2", "--save-heatmaps", "--masks",
              "instance"]
    full = tmp_path / "full"
    assert zygote.run([*common, "--out", str(full)], tmp_path / "full.log") == 0
    out = tmp_path / "killed"
    points = [("image", 1), ("record", 2), ("image", 3), ("record", 4), ("image", 2), ("record", 6), ("image", 5),
              ("image", 6), ("image", 4), ("record", 8), ("image", 7)]  # 38 of 40 records by the last kill
    resume: list[str] = []
    seen_progress = []
    for stage, n in points:
        done_before = record_lines(out)
        code = zygote.run([*common, "--out", str(out), *resume], tmp_path / "killed.log",
                          env={"OVLABEL_FAULT": f"{stage}:{n}"})
        assert code == -signal.SIGKILL, (stage, n, code, (tmp_path / "killed.log").read_text()[-2000:])
        assert not (out / "predictions.json").exists()
        resume = ["--resume"]
        # a resumed attempt never redoes a finished batch: at most the batch in flight is lost
        expected = done_before + (n if stage == "record" else 2 * ((n - 1) // 2))
        assert record_lines(out) == expected, (stage, n)
        seen_progress.append(record_lines(out))
    assert seen_progress[-1] == 38 and len(set(points)) == len(points) == 11
    code = zygote.run([*common, "--out", str(out), "--resume"], tmp_path / "killed.log",
                      env={"OVLABEL_FAULT": "finalize:1"})
    assert code == -signal.SIGKILL and record_lines(out) == 40
    assert not (out / "predictions.json").exists() and not (out / "dataset.json").exists()
    assert any(n.startswith((".predictions.json.", ".dataset.json.")) for n in os.listdir(out))  # killed mid-merge
    assert zygote.run([*common, "--out", str(out), "--resume"], tmp_path / "killed.log") == 0
    assert_same_outputs(out, full)
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["counts"]["resumed_skipped"] == 40 and run["status"] == "complete"
    lines = [json.loads(x) for x in (out / "records" / "records.jsonl").read_text().splitlines()]
    assert len({r["image"]["id"] for r in lines}) == 40 and len(lines) == 40


def test_torn_last_record_is_cut_on_resume(tmp_path, capsys):
    src = scenes(tmp_path / "in", 9)
    common = [str(src), *BASE, "--queries", "a", "b", "--batch-size", "2"]
    label([*common, "--out", str(tmp_path / "full")], capsys)
    out = tmp_path / "torn"
    label([*common, "--out", str(out)], capsys)
    records = out / "records" / "records.jsonl"
    lines = records.read_bytes().splitlines(keepends=True)
    # as a kill leaves it: the first 4 records, then half of the 5th (the start of a new batch)
    records.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    for f in ("predictions.json", "dataset.json"):
        (out / f).unlink()
    label([*common, "--out", str(out), "--resume"], capsys)
    assert (out / "predictions.json").read_bytes() == (tmp_path / "full" / "predictions.json").read_bytes()
    assert (out / "dataset.json").read_bytes() == (tmp_path / "full" / "dataset.json").read_bytes()
    assert all(json.loads(x) for x in records.read_text().splitlines())  # every line complete again


def test_record_writer_cuts_a_torn_tail_and_appends_complete_lines(tmp_path):
    from ovlabel.export.records import RecordWriter, read_records

    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"image": {"id": 1}, "error": "x"}\n{"image": {"id": 2}, "err')
    with RecordWriter(path) as w:
        assert w.torn_bytes == len(b'{"image": {"id": 2}, "err')
        w.append([{"image": {"id": 3}, "error": "y"}])
    assert [r["image"]["id"] for r in read_records([path])] == [1, 3]
    assert path.read_bytes().endswith(b"\n")
    path.write_bytes(b'{"image": {"id": 7}, "error": "no newline at all')  # nothing complete
    with RecordWriter(path) as w:
        w.append([{"image": {"id": 8}, "error": "z"}])
    assert [r["image"]["id"] for r in read_records([path])] == [8]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_mid_run_says_so_and_resume_succeeds(tmp_path, zygote):
    """A run on a disk that fills up stops with "disk full", keeps every finished batch with no partial
    line, and the same command with --resume finishes once there is space — with the files of an
    uninterrupted run. Uses a real full file system (a 1 MiB tmpfs) where this machine lets tests mount
    one, else the kernel's per-process file size limit (EFBIG), both real write errors."""
    src = scenes(tmp_path / "in", 24)
    common = ["label", str(src), *BASE, "--queries", "a", "b", "c", "--batch-size", "2", "--save-heatmaps"]
    full = tmp_path / "full"
    assert zygote.run([*common, "--out", str(full)], tmp_path / "full.log") == 0
    total = sum(len(v) for v in result_files(full).values())
    mnt = tmp_path / "small"
    mounted = _mount_tmpfs(mnt, "48k")
    try:
        out = mnt / "run"
        log = tmp_path / "full-disk.log"
        code = zygote.run([*common, "--out", str(out)], log, fsize=None if mounted else 6000)
        err = log.read_text()
        assert code == 2 and "disk full" in err, err
        assert "--resume" in err
        records = out / "records" / "records.jsonl"
        kept = records.read_bytes()
        assert kept == b"" or kept.endswith(b"\n")  # no partial line
        n_kept = kept.count(b"\n")
        assert n_kept < 24
        assert not list(out.rglob("*.tmp"))  # no temporary file left behind
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={4 * total + (1 << 20)}", str(mnt)], check=True)
        assert zygote.run([*common, "--out", str(out), "--resume"], log) == 0, log.read_text()
        assert_same_outputs(out, full)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_outputs_get_the_permissions_of_a_normal_write(tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        label([str(src), "--out", str(out), *BASE, "--queries", "a", "--save-heatmaps", "--overlays", "--masks",
               "instance"], capsys)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 10
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    from ovlabel.common.files import atomic_write

    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# --------------------------------------------------------------------- item 2: refuse to mix runs
@pytest.mark.parametrize("change,match", [
    (["--queries", "car", "tree"], "queries.names"),
    (["--queries", "a", "b", "--set", "postprocess.threshold.value=0.3"], "postprocess.threshold.value"),
    (["--queries", "a", "b", "--method", "gradcam"], "explainer.method"),
    (["--queries", "a", "b", "--batch-size", "3"], "run.batch_size"),
    (["--queries", "a", "b", "OTHER"], "inputs"),
])
def test_resume_with_other_settings_or_inputs_is_refused(tmp_path, capsys, change, match):
    src = scenes(tmp_path / "in", 4)
    out = tmp_path / "out"
    label([str(src), "--out", str(out), *BASE, "--queries", "a", "b", "--batch-size", "2"], capsys)
    before = (out / "dataset.json").read_bytes()
    argv = [str(src), "--out", str(out), *BASE, "--batch-size", "2", *change, "--resume"]
    if "OTHER" in argv:
        argv.remove("OTHER")
        argv[0] = str(scenes(tmp_path / "other", 4, seed=5))
    err = label(argv, capsys, 2)
    assert match in err and "other settings or inputs" in err, err
    assert (out / "dataset.json").read_bytes() == before


def test_image_ids_do_not_shift_when_a_file_is_added_before_the_resume(tmp_path, capsys, caplog):
    src = scenes(tmp_path / "in", 6)
    common = [str(src), *BASE, "--queries", "a", "--batch-size", "2"]
    label([*common, "--out", str(tmp_path / "full")], capsys)
    out = tmp_path / "out"
    label([*common, "--out", str(out)], capsys)
    records = out / "records" / "records.jsonl"
    records.write_bytes(b"".join(records.read_bytes().splitlines(keepends=True)[:2]))  # killed after batch 1
    for f in ("predictions.json", "dataset.json"):
        (out / f).unlink()
    shutil.copy(src / "img_003.png", src / "img_000b.png")  # sorts second: would shift every later id
    with caplog.at_level(logging.WARNING, logger="ovlabel"):
        label([*common, "--out", str(out), "--resume"], capsys)
    assert "img_000b.png" in caplog.text and "not part of it" in caplog.text
    assert (out / "dataset.json").read_bytes() == (tmp_path / "full" / "dataset.json").read_bytes()


def test_merge_refuses_runs_over_different_inputs_and_incomplete_shards(tmp_path, capsys):
    a, b = scenes(tmp_path / "a", 3), scenes(tmp_path / "b", 3, seed=9)
    common = [*BASE, "--queries", "x", "--batch-size", "1"]
    label([str(a), "--out", str(tmp_path / "ra"), *common], capsys)
    label([str(b), "--out", str(tmp_path / "rb"), *common], capsys)
    assert main(["merge", str(tmp_path / "ra"), str(tmp_path / "rb"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err  # the same file names in two folders: told apart by the inputs
    assert "not shards of one run" in err and "inputs.paths" in err
    for f in b.iterdir():
        f.rename(b / f"b_{f.name}")
    label([str(b), "--out", str(tmp_path / "rc"), *common], capsys)
    assert main(["merge", str(tmp_path / "ra"), str(tmp_path / "rc"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "not shards of one run" in err and "image 1 is 'img_000.png'" in err and "'b_img_000.png'" in err
    assert not (tmp_path / "m" / "dataset.json").exists()
    # shards of one run, one missing
    for i in (0, 2):
        label([str(a), "--out", str(tmp_path / f"s{i}"), *common, "--shard", f"{i}/3"], capsys)
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s2"), "--out", str(tmp_path / "m2")]) == 2
    assert "shard(s) 1/3 missing" in capsys.readouterr().err
    # shards of runs with different settings
    label([str(a), "--out", str(tmp_path / "s1"), *common, "--shard", "1/3", "--set",
           "postprocess.min_area=3"], capsys)
    assert main(["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "--out", str(tmp_path / "m3")]) == 2
    assert "postprocess.min_area" in capsys.readouterr().err
    assert not (tmp_path / "m3" / "dataset.json").exists()
    # a shard joining a shared folder with other settings is refused before it writes anything
    err = label([str(a), "--out", str(tmp_path / "s0"), *common, "--shard", "1/3", "--set",
                 "postprocess.min_area=3"], capsys, 2)
    assert "postprocess.min_area" in err and not (tmp_path / "s0" / "records" / "records.shard-1-of-3.jsonl").exists()


# ----------------------------------------------------------------- item 3: a failing image
class FlakyBackend:
    """The real backend, except that inputs of one width fail (as an out-of-memory would)."""

    def __init__(self, inner, bad_width: int | None, nan_width: int | None = None) -> None:
        self.inner, self.bad_width, self.nan_width = inner, bad_width, nan_width
        self.name, self.patch_size, self.mean, self.std = inner.name, inner.patch_size, inner.mean, inner.std
        self.has_logit_bias, self.layers = inner.has_logit_bias, inner.layers

    def explain(self, images, text, **kw):
        if self.bad_width is not None and images.shape[-1] == self.bad_width:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        maps, emb = self.inner.explain(images, text, **kw)
        if self.nan_width is not None and images.shape[-1] == self.nan_width:
            maps = maps * float("nan")
        return maps, emb

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _pipeline(**overrides):
    from ovlabel import Pipeline

    return Pipeline.from_config(None, **{"model.name": TINY, "model.pretrained": "none", "preprocess.size": 64,
                                         "run.workers": 0, "run.progress": False, "run.batch_size": 3, **overrides})


def test_one_failing_image_is_recorded_and_the_run_goes_on(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    # input widths at size 64 (patch 8): 64, 64, 48, 64, 40, 32
    for i, (h, w) in enumerate([(60, 80), (40, 64), (64, 48), (50, 70), (64, 40), (70, 30)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(src / f"img_{i}.png")
    good = _pipeline()
    ref = good.run([src], tmp_path / "ref", queries=["a", "b"])
    flaky = _pipeline()
    flaky._backend = FlakyBackend(good.backend, bad_width=48, nan_width=40)  # img_2 fails, img_4 gives NaN maps
    out = tmp_path / "out"
    summary = flaky.run([src], out, queries=["a", "b"])
    failures = {f["file"]: f["error"] for f in summary["failures"]}
    assert set(failures) == {"img_2.png", "img_4.png"}
    assert "out of memory" in failures["img_2.png"] and "NaN" in failures["img_4.png"]
    assert summary["counts"]["labelled"] == 4 and summary["counts"]["failed"] == 2
    data = json.loads((out / "dataset.json").read_text())
    ref_data = json.loads((tmp_path / "ref" / "dataset.json").read_text())
    ok = {i["id"] for i in data["images"]}
    assert ok == {1, 2, 4, 6}  # the other images of the failing batches were labelled alone
    def strip(anns):
        return [{k: v for k, v in a.items() if k != "id"} for a in anns]

    assert strip(data["annotations"]) == strip(a for a in ref_data["annotations"] if a["image_id"] in ok)
    # --resume does not retry failures; --retry-failed does
    again = flaky.run([src], out, queries=["a", "b"], resume=True)
    assert again["counts"]["resumed_skipped"] == 6 and len(again["failures"]) == 2
    fixed = _pipeline()
    fixed._backend = good.backend
    retried = fixed.run([src], out, queries=["a", "b"], resume=True, retry_failed=True)
    # the batches holding a failure are redone whole (a batch is the unit that makes results reproducible)
    assert retried["failures"] == [] and retried["counts"]["labelled"] == 6
    assert retried["counts"]["resumed_skipped"] == 0
    assert (out / "dataset.json").read_bytes() == (tmp_path / "ref" / "dataset.json").read_bytes()
    assert ref["counts"]["failed"] == 0


# ------------------------------------------------------------------- item 4: ground-truth geometry
def test_coco_gt_geometry_is_followed_or_the_image_fails(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rgb = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: decoded 30 wide, 40 high
    Image.fromarray(rgb).save(imgs / "rotated.jpg", exif=exif)
    Image.fromarray(rgb).save(imgs / "upright.png")
    Image.fromarray(rgb).save(imgs / "resized.png")
    gt = {"images": [{"id": 1, "file_name": "rotated.jpg", "width": 40, "height": 30},  # annotated unrotated
                     {"id": 2, "file_name": "upright.png", "width": 40, "height": 30},
                     {"id": 3, "file_name": "resized.png", "width": 80, "height": 60}],  # another size
          "categories": [{"id": 5, "name": "thing"}], "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    label(["--coco-gt", str(tmp_path / "gt.json"), "--images-dir", str(imgs), "--out", str(out), *BASE], capsys)
    preds, data = check_invariants(out, {5})
    sizes = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    assert sizes == {1: (40, 30), 2: (40, 30)}  # the dataset never contradicts the ground truth
    assert all(p["segmentation"]["size"] == [30, 40] for p in preds)
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert [f["file"] for f in run["failures"]] == ["resized.png"]
    assert "40x30" in run["failures"][0]["error"] and "80x60" in run["failures"][0]["error"]


@pytest.mark.parametrize("case,match", [
    ("duplicate_ids", "image ids are not unique"),
    ("escape", "leads outside --images-dir"),
    ("absolute", "is an absolute path"),
])
def test_bad_ground_truth_is_refused_before_any_work(tmp_path, capsys, case, match):
    imgs = scenes(tmp_path / "root" / "imgs", 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "secret.png")
    images = [{"id": 1, "file_name": "img_000.png", "width": 1, "height": 1},
              {"id": 2, "file_name": "img_001.png", "width": 1, "height": 1}]
    if case == "duplicate_ids":
        images[1]["id"] = 1
    elif case == "escape":
        images[1]["file_name"] = "../secret.png"
    else:
        images[1]["file_name"] = str(tmp_path / "root" / "secret.png")
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "x"}],
                                                  "annotations": []}))
    out = tmp_path / "out"
    err = label(["--coco-gt", str(tmp_path / "gt.json"), "--images-dir", str(imgs), "--out", str(out), *BASE],
                capsys, 2)
    assert match in err, err
    assert not (out / "records").exists()


# --------------------------------------------------------------------------- item 5: polygons
def _ring(size=40, outer=15, inner=6):
    import cv2

    m = np.zeros((size, size), np.uint8)
    cv2.circle(m, (size // 2, size // 2), outer, 1, -1)
    cv2.circle(m, (size // 2, size // 2), inner, 0, -1)
    return m.astype(bool)


def test_polygon_segmentation_is_faithful_to_the_mask():
    import cv2
    from pycocotools import mask as mask_utils

    from ovlabel.export.coco import segmentation_for_dataset
    from ovlabel.postprocess.rle import encode_full

    square = np.zeros((30, 30), bool)
    square[5:15, 5:15] = True
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(20):
        m = np.zeros((50, 60), np.uint8)
        for _ in range(3):
            cv2.ellipse(m, (int(rng.integers(10, 50)), int(rng.integers(10, 40))),
                        (int(rng.integers(3, 12)), int(rng.integers(3, 12))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        blobs.append(m.astype(bool))
    for mask, kind in [(square, "polygon"), (_ring(), "rle"), *((b, None) for b in blobs)]:
        rle = encode_full(mask)
        seg, decoded = segmentation_for_dataset({"size": rle["size"], "counts": rle["counts"].decode()}, "polygon")
        h, w = mask.shape
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
                                 else {"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        iou = (back & mask).sum() / (back | mask).sum()
        assert iou >= 0.98 and mask_utils.area(decoded) == back.sum()
        if kind == "polygon":
            assert isinstance(seg, list) and np.array_equal(back, mask)  # 10x10 stays 10x10, not shifted
        elif kind == "rle":
            assert isinstance(seg, dict) and np.array_equal(back, mask)  # the ring keeps its hole
    assert sum(isinstance(segmentation_for_dataset(
        {"size": r["size"], "counts": r["counts"].decode()}, "polygon")[0], list)
        for r in (encode_full(b) for b in blobs)) >= 15  # most blobs are written as polygons


def test_polygon_dataset_matches_predictions(tmp_path):
    from pycocotools import mask as mask_utils

    from ovlabel.common.categories import Categories
    from ovlabel.export.records import RecordWriter, finalize
    from ovlabel.postprocess import Detections

    masks = np.zeros((3, 40, 40), bool)
    masks[0] = _ring()
    masks[1, 2:12, 2:12] = True
    masks[2, 30:33, 20:38] = True
    with RecordWriter(tmp_path / "r.jsonl") as w:
        w.write({"id": 1, "file_name": "a.png", "width": 40, "height": 40},
                Detections(masks, [0.9, 0.8, 0.7], [1, 1, 1], ("x", "x", "x")))
    finalize([tmp_path / "r.jsonl"], tmp_path / "o", Categories.from_names(["x"]), segmentation="polygon")
    preds = json.loads((tmp_path / "o" / "predictions.json").read_text())
    data = json.loads((tmp_path / "o" / "dataset.json").read_text())
    for p, a in zip(preds, data["annotations"]):
        rle = {"size": p["segmentation"]["size"], "counts": p["segmentation"]["counts"].encode()}
        seg = a["segmentation"]
        other = mask_utils.merge(mask_utils.frPyObjects(seg, 40, 40)) if isinstance(seg, list) else \
            {"size": seg["size"], "counts": seg["counts"].encode()}
        assert mask_utils.iou([other], [rle], [0])[0, 0] == 1.0
        assert a["area"] == p["area"] and a["bbox"] == p["bbox"]
    assert [isinstance(a["segmentation"], list) for a in data["annotations"]] == [False, True, True]


# -------------------------------------------------------------------------- item 6: bounded memory
def test_postprocessing_memory_does_not_grow_with_the_number_of_queries():
    """K maps of a 6-megapixel image: peak memory stays at a few full-resolution maps (the old code held
    all K at full resolution: 64 × 24 MB here) and candidates are never dense masks."""
    code = r"""
import resource, numpy as np
from ovlabel.postprocess import ImageMaps, Postprocessor, ThresholdSpec
rng = np.random.default_rng(0)
low = rng.random((64, 48, 64)).astype(np.float32)  # 64 queries at model resolution
maps = ImageMaps(low, (2250, 3000))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
post = Postprocessor(threshold=ThresholdSpec("max_fraction", 0.9), min_area_fraction=0)
dets = post(maps, [f"q{k}" for k in range(64)], list(range(1, 65)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(dets), (peak - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    n, grown_mb = int(out[0]), float(out[1])
    assert n == 100  # max_detections of many candidates
    assert grown_mb < 400, f"post-processing grew the process by {grown_mb:.0f} MB"


# ------------------------------------------------------------------------- item 7: config keys
def test_preprocess_mean_and_std_are_used():
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    a = _pipeline()(rgb, ["x", "y"])
    b = _pipeline(**{"preprocess.mean": [0.9, 0.1, 0.5], "preprocess.std": [0.05, 2.0, 1.0]})(rgb, ["x", "y"])
    assert not np.array_equal(a.maps.maps, b.maps.maps)
    with pytest.raises(Exception, match="3 values"):
        _pipeline(**{"preprocess.mean": [0.5, 0.5]})


def test_max_pixels_can_allow_images_above_pillows_own_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from ovlabel import ImageReadError
    from ovlabel.pipeline.images import read_image

    path = tmp_path / "big.png"
    PILImage.new("RGB", (60, 50)).save(path)  # 3000 pixels
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow now refuses anything above 2000
    assert read_image(path, max_pixels=5000).shape == (50, 60, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ImageReadError, match="more than the limit of 2500"):
        read_image(path, max_pixels=2500)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 2000)  # between Pillow's warning and error: allowed
    assert read_image(path, max_pixels=5000).shape == (50, 60, 3)


@pytest.mark.parametrize("method", ["gradcam", "raw_attention"])
def test_layers_on_attention_pool_towers_are_refused_not_ignored(method):
    import torch

    from conftest import make_model
    from ovlabel import InputError, compute_maps
    from ovlabel.legrad import read_tower
    from ovlabel.legrad.explain import embed_dim

    model = make_model("ovl-test-siglip")
    images, text = torch.randn(1, 3, 32, 32), torch.randn(2, embed_dim(read_tower(model)))
    compute_maps(model, images, text, method=method)  # the default works
    with pytest.raises(InputError, match="pooler's attention"):
        compute_maps(model, images, text, method=method, layers=[0])


@pytest.mark.parametrize("method", ["legrad", "gradcam", "chefercam", "chefer_lrp"])
@pytest.mark.parametrize("chunk", [-1, 0, 1.5, True])
def test_bad_chunk_size_is_refused_by_every_method(method, chunk):
    import torch

    from conftest import make_model
    from ovlabel import InputError, compute_maps

    model = make_model("ovl-test-vit")
    with pytest.raises(InputError, match="chunk_size must be a positive number"):
        compute_maps(model, torch.randn(1, 3, 32, 32), torch.randn(2, 24), method=method, chunk_size=chunk)


def test_library_leaves_logging_and_matplotlib_alone(tmp_path):
    import logging

    import matplotlib

    from ovlabel.evaluation.report import per_class_ap_chart
    from ovlabel.pipeline.models import load_model

    root = logging.getLogger()
    root.disabled = True  # the caller's choice
    try:
        load_model(TINY, "none", device="cpu")
        assert root.disabled
    finally:
        root.disabled = False
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    root.addHandler(h)
    try:
        load_model(TINY, "none", device="cpu")
        logging.getLogger("someone.else").error("still heard")  # (conftest sets the root level to ERROR)
    finally:
        root.removeHandler(h)
    assert "still heard" in seen
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        per_class_ap_chart({"a": 0.5, "b": 0.25}, tmp_path / "c.png", "t")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "c.png").stat().st_size > 0
    finally:
        matplotlib.use(before)


def test_pillow_floor_supports_the_overlay_font_call():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    req = next(Requirement(r) for r in requires("ovlabel") if Requirement(r).name.lower() == "pillow")
    assert "10.0.0" not in req.specifier and "10.1.0" in req.specifier  # ImageFont.load_default(size=) is 10.1


# ------------------------------------------------------------------------- item 8: hostile inputs
def test_fifo_and_symlink_loop_are_failures_not_hangs(tmp_path, zygote):
    src = scenes(tmp_path / "in", 2)
    os.mkfifo(src / "pipe.png")
    os.mkfifo(src / "pipe-no-extension")
    (src / "loop.png").symlink_to(src / "loop.png")
    (src / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    pid = zygote.start(["label", str(src), "--out", str(out), *BASE, "--queries", "a"], tmp_path / "log")
    deadline = time.time() + 120
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    assert zygote.wait() == 0, (tmp_path / "log").read_text()
    run = yaml.safe_load((out / "run.yaml").read_text())
    reasons = {f["file"]: f["error"] for f in run["failures"]}
    assert "FIFO" in reasons["pipe.png"] and "FIFO" in reasons["pipe-no-extension"]
    assert "symlink loop" in reasons["loop.png"] and "broken symlink" in reasons["dangling.jpg"]
    assert run["counts"]["labelled"] == 2


def test_degenerate_aspect_ratio_is_refused_with_a_failure_record(tmp_path, capsys):
    src = scenes(tmp_path / "in", 1)
    Image.new("RGB", (2000, 1), (200, 10, 10)).save(src / "line.png")
    out = tmp_path / "out"
    t0 = time.time()
    label([str(src), "--out", str(out), *BASE, "--queries", "a", "--set", "preprocess.resize=shortest",
           "--set", "preprocess.tile.enabled=true"], capsys)
    assert time.time() - t0 < 60
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert [f["file"] for f in run["failures"]] == ["line.png"]
    assert "aspect ratio 2000:1" in run["failures"][0]["error"]


@pytest.mark.parametrize("ids", [[0, 3], [-2, 3], [70000, 3]])
def test_semantic_masks_refuse_category_ids_a_png_cannot_hold(tmp_path, capsys, ids):
    src = scenes(tmp_path / "in", 1)
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps([{"id": ids[0], "name": "a"}, {"id": ids[1], "name": "b"}]))
    out = tmp_path / "out"
    err = label([str(src), "--out", str(out), *BASE, "--queries-file", str(cats), "--masks", "semantic"], capsys, 2)
    assert str(ids[0]) in err and "1..65535" in err
    assert not (out / "records").exists()


def test_heatmap_file_declaring_a_huge_array_is_refused_unread(tmp_path):
    import io
    import zipfile

    from ovlabel import InputError
    from ovlabel.export.heatmaps import load_heatmaps

    def member(arr_header: dict, payload: bytes) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, arr_header)
        return buf.getvalue() + payload

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("heatmaps.npy", member({"descr": "<f2", "fortran_order": False, "shape": (80, 60000, 60000)},
                                          b"\0" * 4096))
        for name, arr in (("queries", np.array(["a"] * 80)), ("image_id", np.array(1)),
                          ("file_name", np.array("x.png"))):
            buf = io.BytesIO()
            np.save(buf, arr)
            z.writestr(f"{name}.npy", buf.getvalue())
    with pytest.raises(InputError, match="field 'heatmaps' declares .* MiB .*refused without reading it"):
        load_heatmaps(path)
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("heatmaps.npy", buf.getvalue())
        for name in ("queries", "image_id", "file_name"):
            z.writestr(f"{name}.npy", buf.getvalue())
    with pytest.raises(InputError, match="pickles are never loaded"):
        load_heatmaps(path)


def test_heatmap_cache_v2_tiles_and_v1_files_round_trip(tmp_path):
    from ovlabel.export.heatmaps import load_heatmaps, save_heatmaps
    from ovlabel.postprocess import ImageMaps

    rng = np.random.default_rng(0)
    tiles = ((0, 40, 0, 40), (0, 40, 30, 70))
    maps = ImageMaps(rng.random((2, 3, 16, 16)).astype(np.float32) * 1e-6, (40, 70), tiles)  # raw, tiny values
    rec = load_heatmaps(save_heatmaps(tmp_path / "t.npz", maps, ["a", "b", "c"], 3, "x.png"))
    assert rec.size == (40, 70) and rec.tiles == tiles and rec.heatmaps.shape == (2, 3, 16, 16)
    assert np.abs(rec.maps.full() - maps.full()).max() < 2e-3  # float16, scaled out of its underflow range
    v1 = tmp_path / "v1.npz"
    full = rng.random((2, 9, 11)).astype(np.float16)
    np.savez_compressed(v1, heatmaps=full, queries=np.array(["a", "b"]), image_id=np.array(4),
                        file_name=np.array("y.png"))
    old = load_heatmaps(v1)
    assert old.size == (9, 11) and np.array_equal(old.maps.full(), full.astype(np.float32))


# ---------------------------------------------------------------------------------- item 9: seams
def test_decoding_and_records_do_not_import_torch():
    code = ("import sys, ovlabel, ovlabel.pipeline.images, ovlabel.export.records, ovlabel.pipeline.manifest, "
            "ovlabel.pipeline.merge, ovlabel.cli; "
            "from ovlabel.pipeline.images import decode_item, read_image; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_label_batch_is_the_engine_neutral_step_of_a_run(tmp_path):
    from ovlabel.pipeline.images import collect_inputs, decode_item

    src = scenes(tmp_path / "in", 5)
    pipe = _pipeline(**{"export.heatmaps": True})
    pipe.run([src], tmp_path / "run", queries=["a", "b"])
    written = [json.loads(x) for x in (tmp_path / "run" / "records" / "records.jsonl").read_text().splitlines()]
    items, _ = collect_inputs([src])
    data = {it.id: it.path.read_bytes() for it in items}
    records = []
    for k in range(0, len(items), 3):  # the same batches, decoded from bytes as a remote worker would
        decoded = [decode_item(it, data=data[it.id]) for it in items[k : k + 3]]
        records += pipe.label_batch(decoded, tmp_path / "other", queries=["a", "b"])
    assert records == written
    assert len(list((tmp_path / "other" / "heatmaps").glob("*.npz"))) == 5
