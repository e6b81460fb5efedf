"""The onnxruntime backend: encoder, maps and text from an ``ovlabel export-onnx`` folder, no PyTorch model.

Sessions are created once per process and shared (``session()``): the CUDA execution provider when
onnxruntime-gpu and a GPU are there and the device allows it, else the CPU, with all graph optimisations
and onnxruntime's own thread pool (``intra_op`` threads = torch's thread count, so ``--threads`` applies).
Everything around the model — preprocessing, tiling, shift averaging, presence scores, post-processing,
resume, shards — is the runner's and works unchanged; the empty-prompt correction is applied to the
graph's normalised maps exactly as :mod:`ovlabel.legrad.methods` does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.files import sha256_file
from ..config import Config
from ..errors import InputError
from ..export.onnx import onnx_modules, read_model_json
from ..legrad.base import finalize_maps, resolve_layers
from ..legrad.catalog import BUILTIN
from ..legrad.methods import empty_prompt_correction
from ..postprocess.scoring import scaled_logits
from .queries import warn_long_prompts

_SESSIONS: dict[tuple, Any] = {}
# onnxruntime's CUDA provider runs float32 matrix products in TF32 unless told otherwise; PyTorch does not
# (torch.backends.cuda.matmul.allow_tf32 is off by default), so the maps would differ by ~1e-3 — full float32.
CUDA_OPTIONS = {"use_tf32": "0"}


def providers(device: str) -> list[str]:
    """CUDA when asked for (or ``auto``) and onnxruntime-gpu offers it, else the CPU."""
    _, ort = onnx_modules()
    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise InputError(f"--device {device} was asked for but onnxruntime offers {available}; install "
                         "onnxruntime-gpu (pip install 'ovlabel[gpu]') or use --device cpu")
    return ["CPUExecutionProvider"]


def session(path: str | Path, device: str = "auto"):
    """One onnxruntime session per file and device in this process, created on first use."""
    _, ort = onnx_modules()
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, device, torch.get_num_threads())
    if key not in _SESSIONS:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            chosen = [(n, CUDA_OPTIONS) if n == "CUDAExecutionProvider" else n for n in providers(device)]
            _SESSIONS[key] = ort.InferenceSession(str(path), opts, providers=chosen)
        except InputError:
            raise
        except Exception as e:  # onnxruntime's own error types (InvalidGraph, InvalidProtobuf, Fail…)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: onnxruntime {ort.__version__} cannot load this graph ({first}); export it "
                             "again with this version's opset") from None
    return _SESSIONS[key]


class OnnxBackend:
    """A :class:`~ovlabel.pipeline.backend.Backend` served by onnxruntime from an export folder."""

    name = "onnx"

    def __init__(self, onnx_dir: str | Path, cfg: Config) -> None:
        self.dir = Path(onnx_dir)
        self.info = read_model_json(self.dir)
        info, ex, pre = self.info, cfg.explainer, cfg.preprocess
        if ex.method not in info["methods"]:
            raise InputError(f"{self.dir} holds explainer graphs for {sorted(info['methods'])}, but the config asks "
                             f"for {ex.method!r}; export it (ovlabel export-onnx --method {ex.method}) or choose one "
                             "of those")
        self.layers = list(info["methods"][ex.method]["layers"])

        wanted = resolve_layers(ex.layers, int(info["blocks"]), BUILTIN[ex.method].default_layers)
        if wanted != self.layers:
            raise InputError(f"the {ex.method} graph in {self.dir} was exported for blocks {self.layers}, the config "
                             f"asks for {wanted} (explainer.layers = {ex.layers}); pass --layers to match, or export "
                             "again with the blocks you want")
        if not info.get("dynamic_size"):
            S = int(info["input_size"])
            problems = []
            if pre.size != S:
                problems.append(f"preprocess.size is {pre.size}, the graphs take {S}x{S}")
            if pre.resize != "longest":
                problems.append("preprocess.resize must be 'longest' (images are padded to the square input)")
            if ex.shifts > 1:
                problems.append("explainer.shifts > 1 pads inputs beyond the graph's size")
            if pre.tile.enabled:
                problems.append("tiling feeds tiles of the input size: export without --static-size")
            if problems:
                raise InputError(f"{self.dir} holds graphs for one input size ({S}x{S}, exported with "
                                 f"--static-size): " + "; ".join(problems))
        self.device = cfg.model.device
        self.patch_size: tuple[int, int] = tuple(info["patch_size"])
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.has_logit_bias = info.get("logit_bias") is not None
        self.static_size = None if info.get("dynamic_size") else int(info["input_size"])
        if ex.contrast == "max":
            raise InputError("explainer.contrast 'max' picks the closest background prompt per block inside the "
                             "explainer; the exported graphs take fixed text: use contrast 'mean' (or 'none') with "
                             "the onnx backend")
        self.method = ex.method
        self.dtype = np.float16 if info.get("precision") == "fp16" else np.float32  # what the graphs take
        self._check_graph()
        self._tokenizer = None
        self._warned_static = False

    def _check_graph(self) -> None:
        """The explainer graph's inputs and outputs are what model.json says (before any image is read)."""
        sess = session(self.dir / self.info["methods"][self.method]["file"], self.device)
        ins = {i.name: i.shape for i in sess.get_inputs()}
        outs = [o.name for o in sess.get_outputs()]
        E = int(self.info["embed_dim"])
        if set(ins) != {"images", "text"} or outs[:2] != ["maps", "embeddings"]:
            raise InputError(f"{self.dir}: the {self.method} graph takes {sorted(ins)} and gives {outs}; expected "
                             "images and text → maps, embeddings (is model.json from another export?)")
        if ins["text"][1] != E:
            raise InputError(f"{self.dir}: the {self.method} graph takes text embeddings of width {ins['text'][1]}, "
                             f"model.json says {E}")
        H, W = ins["images"][2:]
        S = self.info["input_size"]
        if not self.info.get("dynamic_size") and (H, W) != (S, S):
            raise InputError(f"{self.dir}: the {self.method} graph takes images of {H}x{W}, model.json says {S}x{S}")

    # ----------------------------------------------------------------------------------- the protocol
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        import open_clip

        if "text_encoder" not in self.info["files"]:
            raise InputError(f"{self.dir} has no text encoder ({self.info['tokenizer'].get('missing')}); export on a "
                             "machine where the model's tokenizer can be built")
        if self._tokenizer is None:
            tok = self.info["tokenizer"]
            self._tokenizer = open_clip.get_tokenizer(tok["open_clip"], context_length=tok["context_length"])

        warn_long_prompts(self._tokenizer, prompts, self.info["tokenizer"].get("context_length"))
        sess = session(self.dir / self.info["files"]["text_encoder"], self.device)
        out = []
        for i in range(0, len(prompts), 256):
            tokens = self._tokenizer(prompts[i : i + 256]).numpy().astype(np.int64)
            out.append(torch.from_numpy(sess.run(None, {"tokens": tokens})[0].astype(np.float32)))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = images.shape[-2:]
        if self.static_size is None or (H, W) == (self.static_size,) * 2:
            return images, (H, W)
        S = self.static_size
        if H > S or W > S:
            raise InputError(f"an input of {W}x{H} does not fit the graph's {S}x{S}")
        if not self._warned_static:
            self._warned_static = True
            warnings.warn(f"{self.dir} holds graphs of one size ({S}x{S}, exported with --static-size): a {W}x{H} "
                          "input is padded to it, so its maps and detections differ from PyTorch's on the same "
                          "weights; export without --static-size to reproduce PyTorch", stacklevel=2)
        out = images.new_zeros(*images.shape[:2], S, S)
        out[..., :H, :W] = images
        return out, (H, W)

    def explain(self, images: torch.Tensor, text: torch.Tensor, *, raw: bool = False,
                empty: torch.Tensor | None = None,
                contrast: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, (H, W) = self._pad(images.float())
        t = text.float()
        use_empty = empty is not None and not raw
        if use_empty:
            t = torch.cat([t, (empty / empty.norm()).float()[None]])
        if contrast is not None:  # mean contrast: LeGrad of t − mean(t_b), whose maps (min-max) equal
            c = torch.nn.functional.normalize(contrast.float(), dim=-1)  # those of its direction
            t = t - c.mean(0)
        sess = session(self.dir / self.info["methods"][self.method]["file"], self.device)
        maps, emb, grid = (a.astype(np.float32) for a in sess.run(None, {"images": x.numpy().astype(self.dtype),
                                                                           "text": t.numpy().astype(self.dtype)}))
        maps, emb = torch.from_numpy(maps), torch.from_numpy(emb)
        if raw:
            maps = finalize_maps(torch.from_numpy(grid), self.patch_size, t.shape[0], normalize=False)
        if use_empty:
            maps = empty_prompt_correction(maps)
        return maps[..., :H, :W].contiguous(), emb

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self._pad(images.float())
        sess = session(self.dir / self.info["files"]["image_encoder"], self.device)
        return torch.from_numpy(sess.run(None, {"images": x.numpy().astype(self.dtype)})[0].astype(np.float32))

    def logits(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, bias = self.info.get("logit_scale"), self.info.get("logit_bias")
        return scaled_logits(embeddings, text, None if scale is None else float(scale),
                             None if bias is None else float(bias))

    def describe(self) -> dict[str, Any]:
        info = self.info
        return {"backend": self.name, "model": info["model"], "pretrained": info.get("pretrained"),
                "sha256": info.get("sha256"), "open_clip_arch": info.get("open_clip_arch"),
                "onnx_dir": str(self.dir.absolute()),
                "graph_sha256": sha256_file(self.dir / info["methods"][self.method]["file"]),
                "precision": info.get("precision"), "device": "+".join(providers(self.device)),
                "mean": list(self.mean), "std": list(self.std)}
