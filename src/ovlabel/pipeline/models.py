"""Model loading: any open_clip name and pretrained tag, local checkpoints, and ovlabel's shipped model.

``--model NAME`` is an open_clip architecture (``open_clip.list_models()``), ``hf-hub:…``/``local-dir:…``,
a path to an open_clip model-config ``.json``, or a model shipped with ovlabel (``ovlabel-shapes``).
``--pretrained`` is an open_clip tag, a local checkpoint (``.pt``/``.pth``/``.bin`` loaded with
``torch.load(weights_only=True)``, or ``.safetensors``), or ``none`` for random init (with a warning).
Every path goes through ``open_clip.create_model``; nothing is ever unpickled in full.
"""

from __future__ import annotations

import difflib
import json
import logging
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.files import sha256_file
from ..config import ModelConfig
from ..errors import ModelLoadError
from ..models import SHIPPED_DIR, register_shipped, shipped_models

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    pretrained: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    provenance: dict = field(default_factory=dict)


class _DropOpenClipRecords(logging.Filter):
    """Drops the records open_clip itself logs on the root logger while it builds a model (ovlabel says
    what matters in its own words); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("open_clip") or "open_clip" in Path(record.pathname).parts)


def _cached_weights(arch: str, tag: str) -> str | None:
    """The local file of an open_clip pretrained tag if it is already downloaded, else ``None``."""
    import os

    import open_clip
    from open_clip import pretrained as oc_pretrained

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        for name in [*oc_pretrained._get_safe_alternatives(filename), filename]:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
        return None
    url = cfg.get("url", "")
    if url:
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return str(target) if target.is_file() else None
    return None


def _check_reachable(name: str, arch: str, tag: str, timeout: float = 3.0) -> None:
    """Fail in seconds, with what to do, when a tag's weights are not cached and cannot be downloaded
    (hub clients otherwise retry for about a minute on a machine without network)."""
    import os
    import socket
    from urllib.parse import urlparse

    import open_clip

    if _cached_weights(arch, tag):
        return
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else cfg.get("url", "")
    host = urlparse(endpoint).hostname or "huggingface.co"
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if reason is None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return
        except OSError as e:
            reason = f"{host} cannot be reached: {e.strerror or e}"
    raise ModelLoadError(
        f"the weights of {name} / {tag} are not in the local cache and cannot be downloaded ({reason}). "
        f"Download {weights_source(cfg)} elsewhere and pass the file: --pretrained /path/to/that/file")


def weights_source(cfg: dict) -> str:
    """Where open_clip's pretrained table says a tag's weights are: the hub repository and file, or the URL."""
    from open_clip import pretrained as oc_pretrained

    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = hub.rstrip("/"), oc_pretrained.HF_WEIGHTS_NAME
        if not hub.endswith("/"):  # "repo/file"
            repo, filename = hub.rsplit("/", 1)
        safe = [n for n in oc_pretrained._get_safe_alternatives(filename) if n != filename]
        names = " or ".join([*safe, filename])
        return f"{names} from https://huggingface.co/{repo}"
    return cfg.get("url") or "the checkpoint"


def default_weights(name: str, pretrained: str | None) -> str | None:
    """A model shipped with ovlabel loads its own weights unless others are chosen: the configuration's
    default tag (``laion2b_s34b_b88k``, meant for ``ViT-B-16``) does not count as a choice."""

    if pretrained == ModelConfig().pretrained and name in shipped_models():
        return "shipped"
    return pretrained


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for but CUDA is not available on this machine; "
                             "use --device cpu")
    return dev


def _resolve_name(name: str) -> str:
    import open_clip

    register_shipped()
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"model config {p} is not valid JSON: {e.msg}") from None
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ModelLoadError(f"model config {p} needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
        open_clip.add_model_config(p)
        return p.stem
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    known = open_clip.list_models()
    if name.replace("/", "-") not in known:
        near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ModelLoadError(f"unknown model {name!r}.{hint} See open_clip.list_models(), or pass a model-config "
                             ".json file.")
    return name


def load_model(name: str, pretrained: str | None, *, device: str = "auto", precision: str = "fp32") -> LoadedModel:
    """Build an open_clip model with its weights (see the module docstring), in eval mode."""
    import open_clip

    arch = _resolve_name(name)
    dev = resolve_device(device)
    shipped = shipped_models().get(arch)
    provenance: dict = {"model": name}
    weights: str | None
    if pretrained is None or str(pretrained).lower() in ("", "default", "shipped", "ovlabel"):
        if shipped is None:
            raise ModelLoadError(f"--pretrained is required for {name!r}: an open_clip tag "
                                 f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)[:6]) or 'none known'}), "
                                 "a checkpoint file, or 'none' for random init")
        weights = str(SHIPPED_DIR / shipped["weights"])
        digest = sha256_file(weights)
        if digest != shipped["sha256"]:
            raise ModelLoadError(f"shipped weights {weights} have sha256 {digest}, expected {shipped['sha256']}; "
                                 "the installation is corrupt — reinstall ovlabel")
        provenance.update(pretrained="shipped", checkpoint=weights, sha256=digest)
    elif str(pretrained).lower() == "none":
        weights = None
        warnings.warn(f"--pretrained none: {name} is built at random init (seed 0); its maps and labels are "
                      "meaningless (use this for tests and timing only)", stacklevel=2)
        provenance.update(pretrained="none")
    else:
        path = Path(pretrained).expanduser()
        looks_like_path = path.suffix.lower() in CHECKPOINT_SUFFIXES or "/" in str(pretrained) or \
            "\\" in str(pretrained)
        if path.is_file():
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise ModelLoadError(f"checkpoint {path} has an unknown extension; expected one of "
                                     f"{', '.join(CHECKPOINT_SUFFIXES)}")
            weights = str(path)
            provenance.update(pretrained=str(path), checkpoint=str(path), sha256=sha256_file(path))
        elif looks_like_path:
            raise ModelLoadError(f"checkpoint file {pretrained} does not exist")
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if pretrained not in tags:
                raise ModelLoadError(f"{pretrained!r} is not a pretrained tag of {name} (known: "
                                     f"{', '.join(tags) or 'none'}) nor an existing checkpoint file")
            _check_reachable(name, arch, pretrained)
            weights = pretrained
            provenance.update(pretrained=pretrained)
    precision_map = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
    if precision not in precision_map:
        raise ModelLoadError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    if precision != "fp32" and dev.type != "cuda":
        raise ModelLoadError(f"precision {precision} needs a CUDA device; use precision fp32 on the CPU")
    quiet = _DropOpenClipRecords()  # open_clip logs "no pretrained weights" etc. on the root logger
    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            # random init is seeded (without touching the caller's RNG) so that "none" runs are reproducible
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = open_clip.create_model(arch, pretrained=weights, device=dev,
                                               precision=precision_map[precision], weights_only=True)
    except RuntimeError as e:
        msg = str(e)
        if "Failed to download" in msg or "download" in msg.lower():
            raise ModelLoadError(
                f"could not fetch the weights of {name} / {pretrained} (no network access?): {msg.splitlines()[0]}. "
                f"Download them elsewhere and pass the file: --pretrained /path/to/open_clip_pytorch_model.bin "
                "(or .safetensors). On a machine without network, HF_HUB_OFFLINE=1 makes this fail fast.") from None
        raise ModelLoadError(f"could not build {name} with weights {pretrained}: {msg.splitlines()[0]}") from None
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"refused to load {pretrained}: it holds pickled objects other than tensors, and "
                             f"checkpoints are only read with torch.load(weights_only=True) ({str(e).splitlines()[-1]})"
                             ) from None
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the weights of {name} from {pretrained}: {e}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    model.eval()
    if shipped is not None and weights is not None and provenance.get("pretrained") == "shipped":
        mean, std = tuple(shipped["mean"]), tuple(shipped["std"])
    else:
        pcfg = getattr(model.visual, "preprocess_cfg", None) or {}
        mean = tuple(pcfg.get("mean", OPENAI_MEAN))
        std = tuple(pcfg.get("std", OPENAI_STD))
    size = getattr(model.visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    provenance.update(open_clip_arch=arch)
    dtype = next(model.parameters()).dtype
    return LoadedModel(model, name, pretrained, mean, std, size, dev, dtype, provenance)
