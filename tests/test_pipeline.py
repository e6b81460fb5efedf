"""The labelling pipeline end to end: inputs, formats, bad files, outputs, resume, shards, API, models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ovlabel import ImageReadError, Pipeline
from ovlabel.cli import main
from ovlabel.pipeline.images import collect_inputs, read_image
from test_coco import check_invariants
from tiny_models import CONFIG_DIR

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-images"
TINY = str(CONFIG_DIR / "ovl-test-vit.json")
BASE = ["--model", TINY, "--pretrained", "none", "--size", "64", "--workers", "0", "--no-progress"]


def label(argv, capsys=None, expect=0):
    code = main(["label", *argv])
    err = capsys.readouterr().err if capsys else ""
    assert code == expect, err
    return err


def scenes(directory: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(directory / f"img_{i:03d}.png")
    return directory


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.skipif(not REAL.is_dir() and not os.environ.get("CI"),
                    reason="../shared/data/real-images is not beside this checkout (in CI it must be)")
def test_end_to_end_on_real_images(tmp_path, capsys):
    assert REAL.is_dir(), f"CI runs with ../shared beside the checkout, but {REAL} is missing"
    out = tmp_path / "out"
    label([str(REAL), "--out", str(out), *BASE, "--queries", "cat", "dog", "remote control", "--overlays",
           "--save-heatmaps", "--masks", "instance"], capsys)
    images = sorted(p.name for p in REAL.iterdir() if p.name != "README.md")
    preds, data = check_invariants(out, {1, 2, 3})
    assert sorted(i["file_name"] for i in data["images"]) == images  # every readable file, whatever its name
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in data["images"]}
    assert sizes["astronaut.png"] == (509, 513) and sizes["dogcat2.png"] == (660, 371)  # JPEG behind .png
    assert len(list((out / "overlays").glob("*.jpg"))) == len(images)
    assert len(list((out / "heatmaps").glob("*.npz"))) == len(images)
    assert len(list((out / "masks-instance").glob("*.png"))) == len(images)
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["status"] == "complete" and run["counts"]["labelled"] == len(images) and run["failures"] == []
    assert run["ignored_non_images"] == [str(REAL / "README.md")]
    for key in ("versions", "command", "start_time", "end_time", "model", "explainer", "queries", "config"):
        assert key in run
    assert run["model"]["pretrained"] == "none" and run["explainer"]["layers"] == [1, 2]
    assert run["queries"]["templates"] == ["a photo of a {}."]
    assert "'remote control'" in run["command"]
    from ovlabel.export.heatmaps import load_heatmaps

    h = load_heatmaps(next((out / "heatmaps").glob("*astronaut*")))
    # cache format 2: maps kept at model resolution (64 px on the long side) with the image's size
    assert h.size == (513, 509) and h.heatmaps.shape == (3, 64, 64) and h.presence.shape == (3,)
    assert h.maps.full().shape == (3, 513, 509)


def test_bad_files_are_reported_and_skipped(tmp_path, capsys):
    src = scenes(tmp_path / "in", 3)
    good = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(good).save(src / "jpeg behind png name é.png", format="JPEG")
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("not an image at all")
    buf = (src / "img_000.png").read_bytes()
    (src / "truncated.png").write_bytes(buf[: len(buf) // 3])
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(src / "big.png")
    (src / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    label([str(src), "--out", str(out), *BASE, "--queries", "a", "--set", "run.max_pixels=10000"], capsys)
    run = yaml.safe_load((out / "run.yaml").read_text())
    reasons = {f["file"]: f["error"] for f in run["failures"]}
    assert set(reasons) == {"empty.jpg", "notes.jpg", "truncated.png", "big.png"}
    assert "0 bytes" in reasons["empty.jpg"] and "not an image" in reasons["notes.jpg"]
    assert "truncated" in reasons["truncated.png"] or "decode" in reasons["truncated.png"]
    assert "decompression bomb" in reasons["big.png"]
    data = json.loads((out / "dataset.json").read_text())
    assert {i["file_name"] for i in data["images"]} == {"img_000.png", "img_001.png", "img_002.png",
                                                         "jpeg behind png name é.png"}
    assert run["counts"]["failed"] == 4 and run["counts"]["labelled"] == 4
    # --strict: the first bad file stops the run with an error that names it
    err = label([str(src), "--out", str(tmp_path / "strict"), *BASE, "--queries", "a", "--strict"], capsys, 2)
    assert "empty.jpg" in err


@pytest.mark.parametrize("case", ["queries", "model", "checkpoint", "outdir", "config", "shard", "coco_and_queries"])
def test_preflight_errors_stop_before_any_work(tmp_path, capsys, case):
    src = scenes(tmp_path / "in", 2)
    out = tmp_path / "out"
    argv = [str(src), "--out", str(out), *BASE, "--queries", "a"]
    if case == "queries":
        argv = [str(src), "--out", str(out), *BASE]
        match = "no queries"
    elif case == "model":
        argv[argv.index(TINY)] = "ViT-B-61"
        match = "unknown model 'ViT-B-61'"
    elif case == "checkpoint":
        argv[argv.index("none")] = str(tmp_path / "missing.safetensors")
        match = "does not exist"
    elif case == "outdir":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        argv[argv.index(str(out))] = str(blocker / "sub")
        match = "not writable"
    elif case == "config":
        argv += ["--set", "postprocess.treshold.value=0.3"]
        match = "did you mean 'postprocess.threshold'"
    elif case == "shard":
        argv += ["--shard", "3/3"]
        match = "--shard must be I/N"
    else:
        gt = tmp_path / "gt.json"
        gt.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "x"}], "annotations": []}))
        argv = ["--coco-gt", str(gt), "--images-dir", str(src), "--out", str(out), *BASE, "--queries", "a"]
        match = "do not also pass --queries"
    err = label(argv, capsys, 2)
    assert match in err
    assert not (out / "records").exists() and not (out / "predictions.json").exists()


def test_existing_run_needs_resume(tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    out = tmp_path / "out"
    label([str(src), "--out", str(out), *BASE, "--queries", "a"], capsys)
    err = label([str(src), "--out", str(out), *BASE, "--queries", "a"], capsys, 2)
    assert "--resume" in err


# ------------------------------------------------------------------------------------------ formats
def _save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_formats_are_read_by_content(tmp_path):
    rgb = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    for name, kw in [("a.webp", {"format": "WEBP", "lossless": True}), ("a.bmp", {}), ("a.tif", {}),
                     ("a.png", {}), ("a.gif", {})]:
        out = read_image(_save(tmp_path, name, im, **kw))
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert np.array_equal(read_image(tmp_path / "a.webp"), rgb)
    # 16-bit grayscale PNG: rescaled, not clipped
    g16 = (np.linspace(0, 65535, 30 * 40).reshape(30, 40)).astype(np.uint16)
    out = read_image(_save(tmp_path, "g16.png", Image.fromarray(g16)))
    assert out[..., 0].max() == 255 and out[..., 0].min() == 0 and 100 < out[15, 20, 0] < 160
    # palette with transparency, RGBA (composited over white), grayscale, CMYK
    pal = im.convert("P", palette=Image.ADAPTIVE)
    assert read_image(_save(tmp_path, "p.png", pal)).shape == (30, 40, 3)
    rgba = np.dstack([rgb, np.zeros((30, 40), np.uint8)])
    assert (read_image(_save(tmp_path, "t.png", Image.fromarray(rgba, "RGBA"))) == 255).all()
    assert read_image(_save(tmp_path, "l.png", im.convert("L"))).shape == (30, 40, 3)
    assert read_image(_save(tmp_path, "c.jpg", im.convert("CMYK"))).shape == (30, 40, 3)
    # animated GIF: the first frame
    frames = [Image.fromarray(np.full((10, 12, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert read_image(tmp_path / "anim.gif")[0, 0, 0] < 50
    # EXIF orientation applied (6 = rotate 90° clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (40, 30, 3)
    with pytest.raises(ImageReadError, match="not an image"):
        (tmp_path / "x.png").write_text("hello")
        read_image(tmp_path / "x.png")


def test_inputs_folders_lists_and_ids(tmp_path):
    src = scenes(tmp_path / "in" / "sub dir", 2)
    (tmp_path / "in" / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / ".hidden" / "h.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "noext", format="PNG")  # an image without an extension
    lst = tmp_path / "list.txt"
    lst.write_text(f"# images\n{src / 'img_000.png'}\nin/noext\n")
    items, ignored = collect_inputs([tmp_path / "in"])
    assert [i.file_name for i in items] == ["noext", "sub dir/img_000.png", "sub dir/img_001.png"]
    assert [i.id for i in items] == [1, 2, 3]
    items2, _ = collect_inputs([lst])
    assert len(items2) == 2


# ---------------------------------------------------------------------------------- resume and shards
def _run_label_subprocess(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "ovlabel.cli", "label", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def test_resume_after_kill_gives_identical_files(tmp_path):
    src = scenes(tmp_path / "in", 40)
    common = [str(src), *BASE, "--queries", "a", "b", "--batch-size", "2", "--save-heatmaps"]
    full = tmp_path / "full"
    assert main(["label", *common, "--out", str(full)]) == 0
    out = tmp_path / "killed"
    proc = _run_label_subprocess([*common, "--out", str(out)])
    records = out / "records" / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if records.exists() and len(records.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(records.read_text().splitlines())
    assert 6 <= n_done < 40, "the run must be killed mid-way"
    assert not (out / "predictions.json").exists()
    assert main(["label", *common, "--out", str(out), "--resume"]) == 0
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["counts"]["resumed_skipped"] >= n_done - 2  # at most the batch in flight is redone
    for name in ("predictions.json", "dataset.json"):
        assert json.loads((out / name).read_text()) == json.loads((full / name).read_text()), name
    ids = [a["id"] for a in json.loads((out / "dataset.json").read_text())["annotations"]]
    assert ids == list(range(1, len(ids) + 1))


def test_three_shards_merged_equal_one_process(tmp_path, capsys):
    src = scenes(tmp_path / "in", 11)
    # one image per batch: shards (split by image) batch exactly as the single process does
    common = [str(src), *BASE, "--queries", "a", "b", "--batch-size", "1"]
    label([*common, "--out", str(tmp_path / "single")], capsys)
    shared = tmp_path / "shards"
    for i in range(3):
        label([*common, "--out", str(shared), "--shard", f"{i}/3"], capsys)
    assert not (shared / "predictions.json").exists()
    assert main(["merge", str(shared), "--out", str(tmp_path / "merged")]) == 0
    for name in ("predictions.json", "dataset.json"):
        assert json.loads((tmp_path / "merged" / name).read_text()) == \
            json.loads((tmp_path / "single" / name).read_text())
    # shards in separate folders merge the same way
    for i in range(3):
        label([*common, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/3"], capsys)
    assert main(["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "--out", str(tmp_path / "m2")]) == 0
    assert json.loads((tmp_path / "m2" / "dataset.json").read_text()) == \
        json.loads((tmp_path / "single" / "dataset.json").read_text())


def test_shards_split_by_image_and_say_what_to_run_next(tmp_path, capsys):
    src = scenes(tmp_path / "in", 20)
    common = [str(src), *BASE, "--queries", "a", "--batch-size", "16"]
    label([*common, "--out", str(tmp_path / "single")], capsys)
    counts = []
    for i in range(2):
        assert main(["label", *common, "--out", str(tmp_path / "shards"), "--shard", f"{i}/2"]) == 0
        out = capsys.readouterr().out
        assert f"ovlabel merge {tmp_path / 'shards'}" in out  # what to run once every shard is done
        counts.append(int(out.split("labelled ")[1].split()[0]))
    assert counts == [10, 10]  # by image, not 16/4 by batch
    assert main(["merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "predictions.json").read_text())
    single = json.loads((tmp_path / "single" / "predictions.json").read_text())
    assert len(merged) == len(single)
    for m, s in zip(merged, single):  # other batches: the same detections, scores to float rounding
        assert {k: v for k, v in m.items() if k != "score"} == {k: v for k, v in s.items() if k != "score"}
        assert m["score"] == pytest.approx(s["score"], rel=1e-5)


def test_coco_gt_input_keeps_ids_and_names_stay_inside(tmp_path, capsys):
    src = scenes(tmp_path / "imgs", 2)
    gt = {"images": [{"id": 41, "file_name": "img_000.png", "width": 0, "height": 0},
                     {"id": 7, "file_name": "../imgs/img_001.png", "width": 0, "height": 0}],
          "categories": [{"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}], "annotations": []}
    for img in gt["images"]:
        w, h = Image.open(src / Path(img["file_name"]).name).size
        img.update(width=w, height=h)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    label(["--coco-gt", str(tmp_path / "gt.json"), "--images-dir", str(src), "--out", str(out),
           *BASE, "--overlays"], capsys)
    preds, data = check_invariants(out, {18, 90})
    assert sorted(i["id"] for i in data["images"]) == [7, 41]
    assert {c["id"] for c in data["categories"]} == {18, 90}
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(out in p.parents for p in written)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["000007_img_001.jpg", "000041_img_000.jpg"]


# ------------------------------------------------------------------------------------------ Python API
def test_python_api(tmp_path):
    pipe = Pipeline.from_config(None, **{"model.name": TINY, "model.pretrained": "none", "preprocess.size": 64},
                                postprocess={"threshold": {"method": "otsu"}})
    assert pipe.cfg.postprocess.threshold.method == "otsu"
    rgb = (np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)
    res = pipe(rgb, ["cat", "dog"])
    assert res.heatmaps.shape == (2, 50, 80) and res.queries == ("cat", "dog")
    assert res.detections.image_size == (50, 80) and ((res.presence > 0) & (res.presence < 1)).all()
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    res2 = pipe(path, ["cat", "dog"])
    assert np.allclose(res2.heatmaps, res.heatmaps)
    res3 = pipe(Image.fromarray(rgb), ["cat", "dog"])
    assert np.allclose(res3.heatmaps, res.heatmaps)
    summary = pipe.run([path], tmp_path / "out", queries=["cat"])
    assert summary["counts"]["labelled"] == 1 and (tmp_path / "out" / "predictions.json").exists()


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_background_contrast_through_the_pipeline(mode):
    """explainer.contrast: the pipeline's maps are LeGrad's of t_k·e − agg(t_b·e) over its background prompts."""
    from ovlabel import ConfigError, compute_maps

    base = {"model.name": TINY, "model.pretrained": "none", "preprocess.size": 32,
            "queries.background": ["background", "texture"]}
    pipe = Pipeline.from_config(None, **base, **{"explainer.contrast": mode})
    plain = Pipeline.from_config(None, **base)
    x = torch.randn(3, 32, 32)
    _, text, bg = pipe.queries(["a", "b"])
    got, _ = pipe._explain([x], text)
    want = compute_maps(pipe.model.model, x[None], text, contrast=bg, contrast_mode=mode)
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert not torch.allclose(got[0], plain._explain([x], text)[0][0], atol=1e-3)
    with pytest.raises(ConfigError, match="set queries.background"):
        Pipeline.from_config(None, **{**base, "queries.background": []}, **{"explainer.contrast": mode}).queries(["a"])
    with pytest.raises(ConfigError, match="does not take it"):
        Pipeline.from_config(None, **base, **{"explainer.contrast": mode, "explainer.method": "gradcam"})


def test_shift_averaging():
    """explainer.shifts = 2: the maps are the mean of the maps at the four half-patch offsets."""
    from ovlabel.legrad.explain import explain

    base = {"model.name": TINY, "model.pretrained": "none", "preprocess.size": 32}
    plain = Pipeline.from_config(None, **base)
    shifted = Pipeline.from_config(None, **base, **{"explainer.shifts": 2})
    x = torch.randn(3, 32, 48)
    _, text, _ = plain.queries(["a", "b"])
    m1, e1 = plain._explain([x], text)
    m2, e2 = shifted._explain([x], text)
    assert m1[0].shape == m2[0].shape == (2, 32, 48) and torch.allclose(e1[0], e2[0])
    expected = 0
    for dy, dx in [(0, 0), (0, 4), (4, 0), (4, 4)]:
        inp = x[None] if (dy, dx) == (0, 0) else torch.zeros(1, 3, 40, 56)
        if (dy, dx) != (0, 0):
            inp[0, :, dy : dy + 32, dx : dx + 48] = x
        expected = expected + explain(plain.model.model, inp, text).maps[0, :, dy : dy + 32, dx : dx + 48]
    assert torch.allclose(m2[0], expected / 4, atol=1e-6)
    assert not torch.allclose(m1[0], m2[0])


def test_tiling_large_images(tmp_path):
    pipe = Pipeline.from_config(None, **{"model.name": TINY, "model.pretrained": "none", "preprocess.size": 32,
                                         "preprocess.tile.enabled": True, "preprocess.tile.min_scale": 2.0})
    rgb = (np.random.default_rng(0).random((70, 200, 3)) * 255).astype(np.uint8)
    res = pipe(rgb, ["a", "b"])
    assert res.heatmaps.shape == (2, 70, 200)
    assert np.isclose(res.heatmaps.max(), 1) and np.isclose(res.heatmaps.min(), 0)
    from ovlabel.pipeline.preprocess import tile_regions

    tiles = tile_regions(70, 200, 32, 2.0, 0.25)
    covered = np.zeros((70, 200), bool)
    for t in tiles:
        covered[t.y0 : t.y1, t.x0 : t.x1] = True
    assert covered.all() and len(tiles) > 1
    assert tile_regions(60, 60, 32, 2.0, 0.25) == []


# ------------------------------------------------------------------------------------------ models
def test_checkpoints_load_safely(tmp_path, capsys):
    import open_clip
    from safetensors.torch import save_file

    from ovlabel.errors import ModelLoadError
    from ovlabel.pipeline.models import load_model, sha256_file

    torch.manual_seed(3)
    ref = open_clip.create_model("ovl-test-vit", pretrained=None)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for f in ("w.pt", "w.safetensors"):
        lm = load_model(TINY, str(tmp_path / f), device="cpu")
        assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), sd.values()))
        assert lm.provenance["sha256"] == sha256_file(tmp_path / f)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError):
        load_model(TINY, str(tmp_path / "evil.pt"), device="cpu")
    with pytest.raises(ModelLoadError, match="not a pretrained tag"):
        load_model("ViT-B-16", "laion9000", device="cpu")
    with pytest.raises(ModelLoadError, match="--pretrained is required"):
        load_model(TINY, None, device="cpu")


def test_offline_tag_download_says_how_to_pass_a_file(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from ovlabel.errors import ModelLoadError
    from ovlabel.pipeline.models import load_model

    # offline, as on a machine without network (set at run time: the env var is read at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="--pretrained /path/to"):
        load_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu")


def test_config_show_and_overrides(capsys):
    assert main(["config", "show", "--set", "postprocess.threshold.method=otsu", "--set", "explainer.layers=all"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["postprocess"]["threshold"]["method"] == "otsu" and out["explainer"]["layers"] == "all"
    assert main(["config", "show", "--config", "nonexistent-preset"]) == 2
    assert "shipped presets" in capsys.readouterr().err


def test_default_preset_matches_schema_defaults():
    from ovlabel.config import Config, list_presets, load_config

    assert load_config("default") == Config()
    for name in list_presets():
        load_config(name)  # every shipped preset validates


def test_command_line_habits_quiet_fail_on_error_flags_and_swallowed_paths(tmp_path, capsys, monkeypatch):
    src = scenes(tmp_path / "in", 3)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    common = [str(src), *BASE, "-q", "a"]
    # the closing line counts failures; --fail-on-error turns them into exit status 3, files still written
    assert main(["label", *common, "--out", str(tmp_path / "r1")]) == 0
    assert "1 failed" in capsys.readouterr().out
    assert main(["label", *common, "--out", str(tmp_path / "r2"), "--fail-on-error"]) == 3
    assert "1 image(s) failed (--fail-on-error)" in capsys.readouterr().err
    assert (tmp_path / "r2" / "dataset.json").exists()
    # --quiet: errors only
    assert main(["label", *common, "--out", str(tmp_path / "r3"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    # first-class flags for what people tune, each setting its config key
    assert main(["label", *common, "--out", str(tmp_path / "r4"), "--threshold", "0.7", "--score", "0.01",
                 "--presence", "0.02", "--nms-iou", "0.3"]) == 0
    pp = yaml.safe_load((tmp_path / "r4" / "run.yaml").read_text())["config"]["postprocess"]
    assert (pp["threshold"]["value"], pp["score_threshold"], pp["presence_threshold"], pp["nms_iou"]) == \
        (0.7, 0.01, 0.02, 0.3)
    # postprocess shows its stages (stderr), --quiet nothing
    assert main(["label", *common, "--out", str(tmp_path / "r7"), "--save-heatmaps"]) == 0
    capsys.readouterr()
    assert main(["postprocess", "--heatmaps", str(tmp_path / "r7" / "heatmaps"), "--out", str(tmp_path / "p1")]) == 0
    err = capsys.readouterr().err
    assert "ovlabel postprocess: maps -> masks" in err and "writing predictions.json, dataset.json" in err
    assert main(["postprocess", "--heatmaps", str(tmp_path / "r7" / "heatmaps"), "--out", str(tmp_path / "p2"),
                 "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    # a folder swallowed by the greedy --queries list is refused; -q NAME is a class whatever the folder holds
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    capsys.readouterr()
    assert main(["label", "--queries", "cat", "dog", "photos", "--out", "r5", *BASE]) == 2
    assert "--queries took 'photos' as a class name, but it is a folder" in capsys.readouterr().err
    assert main(["label", str(src), "--out", "r6", *BASE, "-q", "photos"]) == 0
