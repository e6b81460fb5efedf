"""ONNX export (every exportable method, dynamic batch, queries and size), parity with PyTorch through the
library, the onnxruntime backend against the PyTorch backend, and bad input."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from ovlabel import UnsupportedModelError, compute_maps
from ovlabel.apps.export_onnx import export_onnx
from ovlabel.cli import main
from ovlabel.export.onnx import content_digest
from ovlabel.legrad.catalog import EXPORTABLE
from test_pipeline import BASE, REAL, TINY, label, scenes

onnx = pytest.importorskip("onnx", reason="the onnx extra is part of the README's install")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is part of the README's install")


def _model():  # the weights `--pretrained none` gives (random init, seed 0)
    from ovlabel.pipeline.models import load_model

    return load_model(TINY, "none", device="cpu").model


@pytest.fixture(scope="module")
def static_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "static"
    return export_onnx(TINY, "none", out, methods=list(EXPORTABLE), size=32, text_encoder=False, dynamic_size=False)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "dynamic"
    return export_onnx(TINY, "none", out, methods=["legrad"], size=32)  # the default: any height and width


def _run(path: Path, **feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {k: v.numpy() for k, v in feeds.items()})


def test_every_exportable_method_matches_compute_maps(static_all):
    d = static_all.out_dir
    info = json.loads((d / "model.json").read_text())
    assert sorted(info["methods"]) == sorted(EXPORTABLE) and info["dynamic_size"] is False
    for key in ("mean", "std", "patch_size", "input_size", "logit_scale", "opset", "versions", "parity", "sha256"):
        assert key in info
    for f in d.glob("*.onnx"):
        onnx.checker.check_model(str(f))
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)  # another batch and query count than at export
    text = F.normalize(torch.randn(7, 24, generator=g), dim=-1)
    with torch.no_grad():
        emb = F.normalize(model.encode_image(x), dim=-1)
    for m in EXPORTABLE:
        maps, oemb, grid = _run(d / info["methods"][m]["file"], images=x, text=text)
        ref = compute_maps(model, x, text, method=m)
        assert maps.shape == (3, 7, 32, 32) and grid.shape == (3, 7, 4, 4)
        assert np.abs(maps - ref.numpy()).max() <= 1e-4, m
        assert np.allclose(oemb, emb.numpy(), atol=1e-5), m
        assert info["parity"]["explainers"][m]["32x32"]["max_abs_maps"] <= 1e-4
    (enc,) = _run(d / "image_encoder.onnx", images=x)
    assert np.allclose(enc, emb.numpy(), atol=1e-5)


def test_dynamic_size_resamples_positions_in_the_graph(dynamic):
    d = dynamic.out_dir
    info = json.loads((d / "model.json").read_text())
    assert info["dynamic_size"] and len(info["parity"]["sizes"]) == 2
    h, w = info["parity"]["sizes"][1]
    assert h != w  # the second parity size is not square
    model = _model()
    x = torch.randn(2, 3, 40, 56)  # neither the export size nor the model's native grid
    text = F.normalize(torch.randn(4, 24), dim=-1)
    maps, emb, _ = _run(d / "explainer-legrad.onnx", images=x, text=text)
    assert np.abs(maps - compute_maps(model, x, text).numpy()).max() <= 1e-4
    import open_clip

    tokens = open_clip.get_tokenizer("ovl-test-vit")(["a photo of a cat.", "x"])
    (t,) = _run(d / "text_encoder.onnx", tokens=tokens)
    with torch.no_grad():
        assert np.allclose(t, F.normalize(model.encode_text(tokens), dim=-1).numpy(), atol=1e-5)


def _compare(a: Path, b: Path, box: float = 1, score: float = 1e-3) -> None:
    pa, pb = json.loads((a / "predictions.json").read_text()), json.loads((b / "predictions.json").read_text())
    assert len(pa) == len(pb) > 0
    ga, gb = defaultdict(list), defaultdict(list)
    for p in pa:
        ga[(p["image_id"], p["category_id"])].append(p)
    for p in pb:
        gb[(p["image_id"], p["category_id"])].append(p)
    assert ga.keys() == gb.keys()
    for k in ga:
        xs, ys = (sorted(g[k], key=lambda p: -p["score"]) for g in (ga, gb))
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert max(abs(u - v) for u, v in zip(x["bbox"], y["bbox"])) <= box
            assert abs(x["score"] - y["score"]) <= score


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real-images is not beside this checkout")
def test_onnx_backend_equals_torch_backend_on_real_images(dynamic, tmp_path, capsys):
    """The default export reproduces PyTorch on the (mostly non-square) real images, taking its size from
    model.json; a static graph says that it does not."""
    no_size = [a for i, a in enumerate(BASE) if a != "--size" and (i == 0 or BASE[i - 1] != "--size")]
    common = [str(REAL), *no_size, "-q", "cat", "-q", "dog", "-q", "remote control"]
    label([*common, "--size", "32", "--out", str(tmp_path / "torch")], capsys)
    label([*common, "--out", str(tmp_path / "onnx"), "--backend", "onnx", "--onnx-dir", str(dynamic.out_dir)], capsys)
    _compare(tmp_path / "torch", tmp_path / "onnx", box=0, score=1e-4)
    run = yaml.safe_load((tmp_path / "onnx" / "run.yaml").read_text())
    assert run["model"]["backend"] == "onnx" and run["model"]["graph_sha256"]
    assert run["config"]["preprocess"]["size"] == 32  # from model.json
    static = export_onnx(TINY, "none", tmp_path / "graphs", methods=["legrad"], size=32, dynamic_size=False)
    err = label([*common, "--out", str(tmp_path / "static"), "--backend", "onnx", "--onnx-dir",
                 str(static.out_dir)], capsys)
    assert "exported with --static-size" in err and "differ from PyTorch's" in err
    assert err.count("exported with --static-size") == 1  # once per run, not per image


def test_tiling_shifts_and_resume_work_on_the_onnx_backend(dynamic, tmp_path, capsys):
    src = scenes(tmp_path / "in", 5)
    extra = ["--set", "preprocess.size=32", "--set", "preprocess.tile.enabled=true", "--set", "explainer.shifts=2",
             "--batch-size", "2"]
    common = [str(src), *BASE, "-q", "a", "-q", "b", *extra]
    label([*common, "--out", str(tmp_path / "torch")], capsys)
    onnx_args = [*common, "--backend", "onnx", "--onnx-dir", str(dynamic.out_dir)]
    label([*onnx_args, "--out", str(tmp_path / "onnx")], capsys)
    _compare(tmp_path / "torch", tmp_path / "onnx")
    records = tmp_path / "onnx" / "records" / "records.jsonl"  # as if killed after the first batch
    records.write_bytes(b"".join(records.read_bytes().splitlines(keepends=True)[:2]))
    label([*onnx_args, "--out", str(tmp_path / "onnx"), "--resume"], capsys)
    _compare(tmp_path / "torch", tmp_path / "onnx")
    # a resume with the other backend is another run: refused
    err = label([*common, "--out", str(tmp_path / "onnx"), "--resume"], capsys, 2)
    assert "settings model.backend" in err


def test_background_contrast_on_the_onnx_backend(dynamic, tmp_path, capsys):
    src = scenes(tmp_path / "in", 3)
    common = [str(src), *BASE, "-q", "a", "-q", "b", "--set", "preprocess.size=32", "--set",
              "queries.background=[background, texture]", "--set", "explainer.contrast=mean"]
    label([*common, "--out", str(tmp_path / "torch")], capsys)
    onnx_args = [*common, "--backend", "onnx", "--onnx-dir", str(dynamic.out_dir)]
    label([*onnx_args, "--out", str(tmp_path / "onnx")], capsys)
    _compare(tmp_path / "torch", tmp_path / "onnx")
    err = label([*onnx_args, "--out", str(tmp_path / "max"), "--set", "explainer.contrast=max"], capsys, 2)
    assert "contrast 'max'" in err and "use contrast 'mean'" in err


def test_what_cannot_be_a_forward_graph_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="legrad, chefercam, gradcam, raw_attention, rollout"):
        export_onnx(TINY, "none", tmp_path / "x", methods=["chefer_lrp"], size=32)
    with pytest.raises(UnsupportedModelError, match="needs autograd"):
        export_onnx(TINY, "none", tmp_path / "x", methods=["chefercam"], layers="all", size=32)
    assert not (tmp_path / "x").exists()


def test_attention_pool_tower_exports(tmp_path):
    from ovlabel.pipeline.models import load_model

    r = export_onnx("ovl-test-siglip", "none", tmp_path / "siglip", methods=["legrad"], size=32)

    model = load_model("ovl-test-siglip", "none", device="cpu").model
    E = json.loads((r.out_dir / "model.json").read_text())["embed_dim"]
    x, text = torch.randn(2, 3, 32, 32), F.normalize(torch.randn(3, E), dim=-1)
    maps, _, _ = _run(r.out_dir / "explainer-legrad.onnx", images=x, text=text)
    assert np.abs(maps - compute_maps(model, x, text).numpy()).max() <= 1e-4
    assert json.loads((r.out_dir / "model.json").read_text())["logit_bias"] is not None


@pytest.mark.parametrize("case", ["no_model_json", "bad_model_json", "other_method", "static_size", "no_onnxruntime"])
def test_bad_onnx_folders_fail_before_any_image(static_all, dynamic, tmp_path, capsys, monkeypatch, case):
    src = scenes(tmp_path / "in", 2)
    d = tmp_path / "graphs"
    shutil.copytree(dynamic.out_dir, d)
    extra: list[str] = []
    if case == "no_model_json":
        (d / "model.json").unlink()
        match = "has no model.json"
    elif case == "bad_model_json":
        info = json.loads((d / "model.json").read_text())
        info["embed_dim"] = 99
        info["content_sha256"] = content_digest(info)  # edited consistently: the graphs themselves disagree
        (d / "model.json").write_text(json.dumps(info))
        match = "model.json says 99"
    elif case == "other_method":
        extra = ["--method", "gradcam"]
        match = "holds explainer graphs for ['legrad']"
    elif case == "static_size":
        d = static_all.out_dir  # exported at 32x32; the run asks for 64
        match = "exported with --static-size"
    else:
        import builtins

        real_import = builtins.__import__

        def no_ort(name, *args, **kwargs):
            if name == "onnxruntime" or name.startswith("onnxruntime."):
                raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_ort)
        match = "pip install 'ovlabel[onnx]'"
    out = tmp_path / "out"
    err = label([str(src), "--out", str(out), *BASE, "-q", "a", "--backend", "onnx", "--onnx-dir", str(d), *extra],
                capsys, 2)
    assert match in err, err
    assert len(err.strip().splitlines()) == 1 or "random init" in err  # one error line
    assert not (out / "records").exists()


def test_export_onnx_names_its_stages_and_quiet_silences_them(tmp_path, capsys):
    args = ["export-onnx", "--model", TINY, "--pretrained", "none", "--size", "32"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    for stage in ("exporting the image encoder", "exporting the legrad explainer", "checking the graphs"):
        assert f"ovlabel export-onnx: {stage}" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_cuda_sessions_multiply_in_full_float32(monkeypatch, tmp_path):
    """onnxruntime's CUDA provider defaults to TF32 products (maps 6.7e-4 away from PyTorch's on an H200);
    ovlabel asks it for full float32, as PyTorch computes. Without a GPU: the options the session gets."""
    from ovlabel.pipeline import onnx_backend

    seen = {}

    class Session:
        def __init__(self, path, opts, providers):
            seen["providers"] = providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"graph")
    onnx_backend.session(graph, "cuda")
    assert seen["providers"] == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    onnx_backend.session(graph, "cpu")
    assert seen["providers"] == ["CPUExecutionProvider"]
