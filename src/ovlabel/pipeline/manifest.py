"""The run manifest: what a run is, frozen at its first start, so that a resume or a merge can never mix
runs. This module does not import torch.

``OUTDIR/manifest.json`` holds the input list as ``(image id, file name)`` pairs (with each file's path
and, for COCO ground truth, the size it must have), the number of shards, and every setting that changes
results (model and weights, explainer and layers, queries and prompts, preprocessing, post-processing,
export, batch size and image limits), each with a sha256. It is created once, exclusively: shards
sharing a folder, resumed runs and ``ovlabel merge`` compare themselves with it and refuse a mismatch,
naming what differs. Image ids come from the manifest on a resume, so they never shift when files are
added to an input folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..common.files import atomic_write, fsync_dir, json_text
from ..errors import ConfigError, InputError
from .images import ImageItem

NAME = "manifest.json"
VERSION = 1


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json_text(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def build(*, inputs: dict, items: list[ImageItem], settings: dict, shards: int) -> dict:
    images = [[it.id, it.file_name, str(it.path), *(it.expected_size or (None, None))] for it in items]
    return {
        "ovlabel_manifest": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "shards": int(shards),
        "settings": settings,
        "settings_sha256": digest(settings),
        "images_sha256": digest([img[:2] for img in images]),
        "images": images,
    }


def items(manifest: dict) -> list[ImageItem]:
    """The run's images, with the ids they were given at its first start."""
    out = []
    for i, name, path, h, w in manifest["images"]:
        out.append(ImageItem(int(i), Path(path), str(name), None if h is None else (int(h), int(w))))
    return out


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a readable run manifest ({e})") from None
    if not isinstance(data, dict) or data.get("ovlabel_manifest") != VERSION:
        raise InputError(f"{path} is not an ovlabel run manifest (version {VERSION})")
    return data


def create(path: str | Path, manifest: dict) -> dict:
    """Write ``manifest`` at ``path`` unless one is there already (atomically, exclusively: of two
    processes starting at once exactly one creates it). Returns the manifest now at ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    with atomic_write(tmp, "w", encoding="utf-8", durable=False) as f:
        f.write(json_text(manifest))
    try:
        os.link(tmp, path)  # fails if the manifest exists: the first process wins
        fsync_dir(path.parent)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system: exclusive create instead
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                out.write(tmp.read_bytes())
                out.flush()
                os.fsync(out.fileno())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return load(path)


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: a → b`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(f"{key}: (absent) → {_short(b[k])}")
            elif k not in b:
                out.append(f"{key}: {_short(a[k])} → (absent)")
            else:
                out += differences(a[k], b[k], key)
        return out
    return [] if a == b else [f"{prefix}: {_short(a)} → {_short(b)}"]


def _short(v: Any, limit: int = 120) -> str:
    text = json_text(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_same_run(stored: dict, current: dict, where: str, *, compare_inputs: bool = True) -> None:
    """Refuse (``ConfigError``) when ``current`` is not the run ``stored`` describes: other settings,
    another shard count, other inputs, or another image list."""
    lines = []
    if stored["settings_sha256"] != current["settings_sha256"]:
        lines += ["settings " + d for d in differences(stored["settings"], current["settings"])]
    if stored["shards"] != current["shards"]:
        lines.append(f"shards: {stored['shards']} → {current['shards']}")
    if compare_inputs and stored["inputs"] != current["inputs"]:
        lines += ["inputs " + d for d in differences(stored["inputs"], current["inputs"])] or ["inputs differ"]
    if lines:
        raise ConfigError(f"{where} was started with other settings or inputs than this command "
                          f"({len(lines)} difference{'s' * (len(lines) > 1)}, run → now):\n  " + "\n  ".join(lines[:20])
                          + ("\n  …" if len(lines) > 20 else "")
                          + "\nRun the original command (with --resume to continue it), or choose another --out.")
