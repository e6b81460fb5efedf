"""The models shipped with ovlabel (weights and open_clip configs in this folder) and their registry.

``MANIFEST.json`` maps a model name to its weights file, sha256 and preprocessing. The configs are made
known to open_clip on first use, through open_clip's own config registry.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
MANIFEST = SHIPPED_DIR / "MANIFEST.json"
_registered: set[str] = set()


def shipped_models() -> dict:
    """The manifest of models shipped in the package: name → weights file, sha256, preprocessing."""
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def register_shipped() -> None:
    """Make the shipped model configs known to open_clip (idempotent)."""
    import open_clip

    if "__shipped__" in _registered:
        return
    if any(SHIPPED_DIR.glob("*.json")):
        open_clip.add_model_config(SHIPPED_DIR)  # open_clip keeps the files that are model configs
    _registered.add("__shipped__")


def register_config(name: str, cfg: dict) -> None:
    """Register an open_clip model config under ``name`` (through open_clip's own config registry)."""
    import open_clip

    if name in open_clip.list_models():
        return
    tmp = Path(tempfile.mkdtemp(prefix="ovlabel-cfg-"))
    (tmp / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / f"{name}.json")
