"""``ovlabel export-onnx``: the image encoder, the explainers' map graphs (:mod:`ovlabel.legrad.graphs`) and
the text encoder exported to ONNX, checked against PyTorch before anything is written into the folder that
:mod:`ovlabel.export.onnx` describes.

Parity: the graphs run in onnxruntime on sample images (generated scenes, preprocessed as a run does)
and random unit text embeddings, at the export size and, for dynamic-size graphs (the default;
``dynamic_size=False`` makes graphs of one square size), at a second, non-square size; image embeddings
must agree with PyTorch to cosine ≥ 0.9999 and maps to max |Δ| ≤ 1e-4 (fp32). An
export that fails is not written; the error names the output and the drift. A Ctrl-C stops it, and the
temporary folder of an export that was killed is removed by the next export into the same place.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..common.files import sha256_file, write_json
from ..config import load_config
from ..datasets.shapes import generate
from ..errors import InputError, UnsupportedModelError
from ..export.onnx import FILES, content_digest, explainer_file, onnx_modules
from ..legrad import read_tower
from ..legrad.catalog import BUILTIN, EXPORTABLE
from ..legrad.graphs import ExplainerGraph, ImageEncoderGraph, TextEncoderGraph
from ..pipeline.models import default_weights, load_model
from ..pipeline.preprocess import Normalization, to_input

TOLERANCE = {"fp32": {"cosine": 0.9999, "maps": 1e-4}, "fp16": {"cosine": 0.999, "maps": 5e-2}}
TMP_PREFIX = ".onnx-export-"  # + the exporting process's id: a killed export's folder is found by the next


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    parity: dict
    model_json: dict


def _sample_inputs(size: tuple[int, int], patch: tuple[int, int], mean, std, n: int = 2) -> torch.Tensor:
    """Generated scenes preprocessed as a run does (resize, normalise, pad), at ``size`` (H, W)."""
    norm = Normalization(tuple(mean), tuple(std))
    out = []
    for scene in generate(n, seed=7, sizes=((size[0], size[1]),)):
        x, lb = to_input(scene.image, max(size), patch, norm)
        canvas = torch.zeros(3, *size)
        canvas[:, : x.shape[1], : x.shape[2]] = x[:, : size[0], : size[1]]
        out.append(canvas)
    return torch.stack(out)


def _session(path: Path):
    _, ort = onnx_modules()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict, opset: int) -> None:
    import contextlib
    import io
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _interrupts() as interrupted:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                                    external_data=False)
        if interrupted:  # torch.onnx's exporter catches the KeyboardInterrupt of a Ctrl-C and goes on
            raise KeyboardInterrupt
        program.save(str(path))


class _interrupts:
    """Notes a Ctrl-C (SIGINT) during a step that might swallow its ``KeyboardInterrupt``; the ``with``
    value is truthy once one came. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None

    def __bool__(self) -> bool:
        return self.hit

    def __enter__(self) -> _interrupts:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            def note(signum, frame):
                self.hit = True
                raise KeyboardInterrupt

            self._previous = signal.signal(signal.SIGINT, note)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.hit and exc[0] is None:
            raise KeyboardInterrupt


def remove_dead_exports(parent: Path) -> int:
    """Remove the temporary folders of exports into ``parent`` whose process is gone (killed); those of
    exports still running are left alone. Returns the count."""
    import re

    removed = 0
    for entry in os.scandir(parent):
        m = re.match(rf"^{re.escape(TMP_PREFIX)}(\d+)-", entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    return removed


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def export_onnx(model_name: str, pretrained: str | None, out_dir: str | Path, *, methods: list[str] | None = None,
                layers: Any = None, size: int | None = None, dynamic_size: bool = True, opset: int = 18,
                fp16: bool = False, config: Any = None, queries_for_parity: int = 5,
                text_encoder: bool = True, progress: bool = False) -> ExportResult:
    """Export, check parity, and only then write ``out_dir`` (see the module docstring)."""
    onnx, _ = onnx_modules()
    if not 7 <= int(opset) <= onnx.defs.onnx_opset_version():
        raise InputError(f"--opset {opset}: this onnx ({onnx.__version__}) knows opsets up to "
                         f"{onnx.defs.onnx_opset_version()}; ovlabel's graphs are tested at 17-23 (default 18)")

    cfg = load_config(config) if not hasattr(config, "model_dump") else config
    methods = list(methods or [cfg.explainer.method])
    if layers is None:  # the config's blocks: what `ovlabel label` with the same config asks the graphs for
        layers = cfg.explainer.layers
    bad = [m for m in methods if m not in EXPORTABLE]
    if bad:
        what = "cannot be a plain forward graph (it needs autograd)" if all(m in BUILTIN for m in bad) else \
            "is not a method"
        raise UnsupportedModelError(f"{', '.join(bad)} {what}; the methods ONNX export takes: {', '.join(EXPORTABLE)}")
    lm = load_model(model_name, default_weights(model_name, pretrained), device="cpu", precision="fp32")
    model = lm.model
    tower = read_tower(model)
    patch = tuple(tower.patch_size)
    S = int(size or cfg.preprocess.size)
    if S % patch[0] or S % patch[1]:
        raise InputError(f"--size {S} is not a multiple of the patch size {patch}")
    mean = cfg.preprocess.mean or lm.mean
    std = cfg.preprocess.std or lm.std
    graphs = {m: ExplainerGraph(model, m, layers).eval() for m in methods}  # refuses what cannot export
    dtype = torch.float16 if fp16 else torch.float32
    precision = "fp16" if fp16 else "fp32"
    tol = TOLERANCE[precision]

    x = _sample_inputs((S, S), patch, mean, std)
    E = int(model.text_projection.shape[1]) if isinstance(getattr(model, "text_projection", None), torch.Tensor) \
        else None
    with torch.no_grad():
        E = E or int(ImageEncoderGraph(model)(x[:1]).shape[1])
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(queries_for_parity, E, generator=g), dim=-1)
    sizes = [(S, S)]
    if dynamic_size:  # a second, non-square size, a whole number of patches
        sizes.append((max(patch[0], (S * 3 // 4) // patch[0] * patch[0]), S + 2 * patch[1]))

    B = torch.export.Dim("batch", min=1, max=1024)
    K = torch.export.Dim("queries", min=1, max=65536)
    img_dyn: dict[int, Any] = {0: B}
    if dynamic_size:
        img_dyn.update({2: patch[0] * torch.export.Dim("grid_h", min=1, max=512),
                        3: patch[1] * torch.export.Dim("grid_w", min=1, max=512)})
    reference = {m: gr for m, gr in graphs.items()}  # PyTorch fp32: what every export is checked against
    ref_enc = ImageEncoderGraph(model).eval()
    if fp16:
        import copy

        half = copy.deepcopy(model).half()
        graphs = {m: ExplainerGraph(half, m, layers).eval() for m in methods}
        model = half
    parent = Path(out_dir).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_exports(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=parent))
    parity: dict = {"precision": precision, "tolerance": tol, "sizes": [list(s) for s in sizes]}
    def stage(text: str) -> None:  # the export is silent for minutes otherwise
        if progress:
            print(f"ovlabel export-onnx: {text}", file=sys.stderr, flush=True)

    try:
        files = []
        # image encoder
        stage("exporting the image encoder")
        enc = ImageEncoderGraph(model).eval()
        _export(enc, (x.to(dtype),), tmp / FILES["image_encoder"], ["images"], ["embeddings"],
                {"images": img_dyn}, opset)
        files.append(FILES["image_encoder"])
        # explainers
        example = x.to(dtype)
        if dynamic_size:  # an example off the native grid: the graph keeps the resampling branch general
            example = _sample_inputs(sizes[1], patch, mean, std).to(dtype)
        for m, gr in graphs.items():
            stage(f"exporting the {m} explainer (blocks {gr.layers})")
            _export(gr, (example, text.to(dtype)), tmp / explainer_file(m), ["images", "text"],
                    ["maps", "embeddings", "grid_maps"], {"images": img_dyn, "text": {0: K}}, opset)
            files.append(explainer_file(m))
        # text encoder (when this machine can build the model's tokenizer); always fp32: it runs once per
        # run, and onnxruntime 1.32 crashes creating a session for the fp16 text graph
        tokens = _tokens(lm, ["a photo of a cat.", "a diagram", "two dogs"]) if text_encoder else None
        if tokens is not None:
            stage("exporting the text encoder")
            _export(TextEncoderGraph(lm.model).eval(), (tokens,), tmp / FILES["text_encoder"], ["tokens"],
                    ["embeddings"], {"tokens": {0: torch.export.Dim("prompts", min=1, max=65536)}}, opset)
            files.append(FILES["text_encoder"])
        for f in files:
            try:
                onnx.checker.check_model(str(tmp / f))
            except onnx.checker.ValidationError as e:
                first = str(e).strip().splitlines()[0]
                raise UnsupportedModelError(f"the {f} graph exported at opset {opset} is not valid ONNX ({first}); "
                                            "ovlabel's graphs are tested at opsets 17-23 (default 18)") from None
        text_note = None if tokens is not None else ("not exported" if not text_encoder else
                                                      "the tokenizer could not be built at export")
        stage(f"checking the graphs against PyTorch in onnxruntime at {', '.join(f'{h}x{w}' for h, w in sizes)}")
        parity.update(_parity(tmp, ref_enc, reference, TextEncoderGraph(lm.model).eval(), sizes, patch, mean, std,
                              text, tokens, dtype, tol))
        model_json = {
            "format": "ovlabel-onnx", "version": 1,
            "model": model_name, "open_clip_arch": lm.provenance.get("open_clip_arch", model_name),
            "pretrained": lm.provenance.get("pretrained"), "sha256": lm.provenance.get("sha256"),
            "mean": list(mean), "std": list(std), "patch_size": list(patch), "input_size": S,
            "dynamic_size": bool(dynamic_size), "embed_dim": E, "precision": precision,
            "blocks": len(tower.blocks),
            "methods": {m: {"file": explainer_file(m), "layers": gr.layers} for m, gr in graphs.items()},
            "files": {k: v for k, v in FILES.items() if v in files},
            "logit_scale": _scalar(getattr(lm.model, "logit_scale", None), exp=True),
            "logit_bias": _scalar(getattr(lm.model, "logit_bias", None)),
            "tokenizer": {"open_clip": lm.provenance.get("open_clip_arch", model_name),
                          "context_length": int(tokens.shape[1]) if tokens is not None else None,
                          "missing": text_note},
            "opset": opset,
            "versions": {"ovlabel": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": _ort_version(), "python": platform.python_version()},
            "parity": parity,
        }
        # what a load verifies: each graph's bytes, and model.json's own fields (normalisation, logit scale…)
        model_json["digests"] = {f: sha256_file(tmp / f) for f in files}
        model_json["content_sha256"] = content_digest(model_json)
        write_json(tmp / "model.json", model_json, indent=1)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in [*files, "model.json"]:
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, files, parity, model_json)


def _ort_version() -> str:
    _, ort = onnx_modules()
    return ort.__version__


def _scalar(t: Any, exp: bool = False) -> float | None:
    if not isinstance(t, torch.Tensor):
        return None
    v = t.detach().float()
    return float(v.exp() if exp else v)


def _tokens(lm, prompts: list[str]) -> torch.Tensor | None:
    """Tokens of ``prompts`` with the model's tokenizer, or ``None`` when it cannot be built here (an HF
    tokenizer without ``transformers`` or without its files): the export then has no text encoder."""
    import logging

    import open_clip

    try:
        tok = open_clip.get_tokenizer(lm.provenance.get("open_clip_arch", lm.name))
        return tok(prompts)
    except (ImportError, OSError, ValueError) as e:
        logging.getLogger(__name__).warning("no text encoder exported: the model's tokenizer cannot be built here "
                                            "(%s); the run will need a PyTorch or another export for text", e)
        return None


def _parity(tmp: Path, enc, graphs, text_graph, sizes, patch, mean, std, text, tokens, dtype, tol) -> dict:
    """Run every graph in onnxruntime and in PyTorch; raise (nothing written) when one drifts."""
    out: dict = {"image_encoder": {}, "explainers": {}, "text_encoder": {}}
    failures = []
    for size in sizes:
        x32 = _sample_inputs(size, patch, mean, std)
        x = x32.to(dtype)
        key = f"{size[0]}x{size[1]}"
        with torch.no_grad():
            ref = enc(x32).float().numpy()
        got = _session(tmp / FILES["image_encoder"]).run(None, {"images": x.numpy()})[0].astype(np.float32)
        cos = _cosine(ref, got)
        out["image_encoder"][key] = {"min_cosine": cos}
        if cos < tol["cosine"]:
            failures.append(f"image_encoder embeddings at {key}: cosine {cos:.6f} < {tol['cosine']}")
        for m, gr in graphs.items():
            with torch.no_grad():
                rmaps, remb, rgrid = (t.float().numpy() for t in gr(x32, text))
            omaps, oemb, ogrid = _session(tmp / explainer_file(m)).run(None, {"images": x.numpy(),
                                                                              "text": text.to(dtype).numpy()})
            dmaps = float(np.abs(omaps.astype(np.float32) - rmaps).max())
            cos = _cosine(remb, oemb.astype(np.float32))
            rel = float(np.abs(ogrid.astype(np.float32) - rgrid).max() / (np.abs(rgrid).max() + 1e-30))
            out["explainers"].setdefault(m, {})[key] = {"max_abs_maps": dmaps, "min_cosine": cos,
                                                        "max_rel_grid": rel}
            if dmaps > tol["maps"]:
                failures.append(f"explainer-{m} maps at {key}: max |Δ| {dmaps:.2e} > {tol['maps']:.0e}")
            if cos < tol["cosine"]:
                failures.append(f"explainer-{m} embeddings at {key}: cosine {cos:.6f} < {tol['cosine']}")
    if tokens is None:
        out["text_encoder"] = None
    else:
        with torch.no_grad():
            ref = text_graph(tokens).float().numpy()
        got = _session(tmp / FILES["text_encoder"]).run(None, {"tokens": tokens.numpy()})[0].astype(np.float32)
        out["text_encoder"] = {"min_cosine": _cosine(ref, got)}
    if out["text_encoder"] is not None and out["text_encoder"]["min_cosine"] < tol["cosine"]:
        failures.append(f"text_encoder embeddings: cosine {out['text_encoder']['min_cosine']:.6f} < {tol['cosine']}")
    if failures:
        raise InputError("ONNX export failed its parity check against PyTorch; nothing was written:\n  "
                         + "\n  ".join(failures))
    return out


