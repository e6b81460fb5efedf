"""The ONNX export folder, as ``ovlabel export-onnx`` writes it and the onnx backend reads it.

* ``image_encoder.onnx``: ``images [B,3,H,W]`` → ``embeddings [B,E]`` (unit rows);
* ``explainer-<method>.onnx``: ``images [B,3,H,W]``, ``text [K,E]`` (unit rows) → ``maps [B,K,H,W]`` exactly
  as :func:`ovlabel.compute_maps` returns them (same blocks, bilinear upsampling, per-map min-max),
  ``embeddings [B,E]`` (unit rows) and ``grid_maps [B,K,gh,gw]`` (the unnormalised maps on the token grid,
  for tiling); B and K dynamic, H and W too with ``dynamic_size`` (positional embeddings resampled inside
  the graph, bicubic with antialiasing as in PyTorch);
* ``text_encoder.onnx``: ``tokens [N,C]`` (int64, the open_clip tokenizer's) → ``embeddings [N,E]`` (unit);
* ``model.json``: what a runtime needs (normalisation, patch and input size, methods and blocks, logit
  scale and bias, tokenizer), provenance (weights sha256, versions), the parity measured at export, the
  sha256 of every graph (``digests``) and of its own fields (``content_sha256``).

:func:`read_model_json` checks a folder before any graph is used (types, digests, names inside the
folder). The graphs are built in :mod:`ovlabel.legrad.graphs` and exported, checked against PyTorch, by
:mod:`ovlabel.apps.export_onnx`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..common.files import contained, sha256_file
from ..errors import InputError

FILES = {"image_encoder": "image_encoder.onnx", "text_encoder": "text_encoder.onnx"}


def explainer_file(method: str) -> str:
    return f"explainer-{method}.onnx"


def onnx_modules():
    """``(onnx, onnxruntime)``, or an error naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise InputError(f"ONNX export and the onnx backend need onnx and onnxruntime ({e.name} is missing): "
                         "pip install 'ovlabel[onnx]' (or 'ovlabel[gpu]' for onnxruntime-gpu)") from None
    return onnx, onnxruntime


def content_digest(model_json: dict) -> str:
    """sha256 of ``model.json``'s fields but ``content_sha256`` itself (canonical JSON)."""
    body = {k: v for k, v in model_json.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()



_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime) → sha256 of graphs already checked in this process


def _model_json_schema():
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Method(BaseModel):
        model_config = ConfigDict(extra="forbid")
        file: str
        layers: list[int] = Field(min_length=1)

    class Tokenizer(BaseModel):
        model_config = ConfigDict(extra="allow")
        open_clip: str
        context_length: int | None = Field(default=None, ge=1)

    class ModelJson(BaseModel):
        model_config = ConfigDict(extra="allow")
        format: Literal["ovlabel-onnx"]
        mean: list[float] = Field(min_length=3, max_length=3)
        std: list[float] = Field(min_length=3, max_length=3)
        patch_size: list[int] = Field(min_length=2, max_length=2)
        input_size: int = Field(ge=1)
        dynamic_size: bool = False
        embed_dim: int = Field(ge=1)
        precision: Literal["fp32", "fp16"] = "fp32"
        blocks: int = Field(ge=1)
        methods: dict[str, Method] = Field(min_length=1)
        files: dict[str, str]
        logit_scale: float | None = None
        logit_bias: float | None = None
        tokenizer: Tokenizer
        opset: int = Field(ge=1)
        digests: dict[str, str]
        content_sha256: str

        @field_validator("patch_size")
        @classmethod
        def _positive(cls, v):
            if min(v) < 1:
                raise ValueError(f"must be two positive sizes, got {v}")
            return v

        @field_validator("std")
        @classmethod
        def _std(cls, v):
            if min(v) <= 0:
                raise ValueError(f"must be positive, got {v}")
            return v

        @field_validator("logit_scale")
        @classmethod
        def _scale(cls, v):
            if v is not None and not (np.isfinite(v) and v > 0):
                raise ValueError(f"must be a positive finite number, got {v}")
            return v

    return ModelJson


def read_model_json(onnx_dir: str | Path) -> dict:
    """The ``model.json`` of an export folder, checked before any graph is used: its fields have the
    right types; its own digest (``content_sha256``) matches its fields, so that an edited normalisation,
    logit scale or block list is refused; and every graph it names is a file in the folder whose sha256 is
    the one recorded at export (a truncated graph, another export's or another model's is refused)."""
    from pydantic import ValidationError

    d = Path(onnx_dir)
    path = d / "model.json"
    if not d.is_dir():
        raise InputError(f"--onnx-dir {d} is not a folder")
    if not path.is_file():
        raise InputError(f"{d} has no model.json; it is not an ovlabel ONNX export (make one with ovlabel export-onnx)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != "ovlabel-onnx":
        raise InputError(f"{path} is not an ovlabel ONNX model.json")
    if "digests" not in info or "content_sha256" not in info:
        raise InputError(f"{path} records no digests of its graphs (an export of an older ovlabel); export the model "
                         "again with ovlabel export-onnx")
    try:
        checked = _model_json_schema().model_validate(info)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InputError(f"{path}: field {where!r}: {first['msg']} (got {first.get('input')!r})"
                         + (f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else "")) from None
    if content_digest(info) != info["content_sha256"]:
        raise InputError(f"{path} was edited after the export (its fields no longer match its content_sha256): "
                         "normalisation, logit scale, blocks or file names may not be the graphs'; export again")
    for m, spec in checked.methods.items():
        bad = [b for b in spec.layers if not 0 <= b < checked.blocks]
        if bad:
            raise InputError(f"{path}: method {m!r} lists blocks {bad} of a {checked.blocks}-block tower")
    names = [*checked.files.values(), *(spec.file for spec in checked.methods.values())]
    for name in names:
        try:
            contained(d, name)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        if os.sep in name or "/" in name:
            raise InputError(f"{path}: graph file {name!r} must be a file of the export folder itself")
    missing = [f for f in names if not (d / f).is_file()]
    if missing:
        raise InputError(f"{d}: model.json names {missing}, which are not there")
    for name in dict.fromkeys(names):
        want = info["digests"].get(name)
        if want is None:
            raise InputError(f"{path} records no digest for {name}; export again")
        st = (d / name).stat()
        key = (str((d / name).resolve()), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(key) != want:
            got = sha256_file(d / name)
            if got != want:
                raise InputError(f"{d / name} is not the graph this export wrote (sha256 {got[:12]}…, model.json "
                                 f"records {want[:12]}…): a truncated, replaced or foreign file; export again")
            _VERIFIED[key] = want
    return info
