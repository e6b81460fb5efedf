"""The heatmap cache: one ``.npz`` per image, readable and writable by other tools.

Fields (``numpy.savez_compressed``, no pickled objects):

==============  ==================  =================================================================
``heatmaps``    float16 ``[K,H,W]``  one map per query at the **original image resolution**, in [0,1]
``queries``     str ``[K]``          the query (category) names, in the order of the maps
``image_id``    int64 scalar         the image's id (COCO ``image_id``)
``file_name``   str scalar           the image path as given to the run (relative to its root)
``presence``    float32 ``[K]``      optional: image-level presence probability of each query
==============  ==================  =================================================================

Writing is atomic (a temporary file renamed into place), so a killed run never leaves a partial file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

FIELDS = ("heatmaps", "queries", "image_id", "file_name", "presence")


@dataclass(frozen=True)
class HeatmapRecord:
    heatmaps: np.ndarray  # [K,H,W] float16
    queries: tuple[str, ...]
    image_id: int
    file_name: str
    presence: np.ndarray | None = None  # [K] float32

    @property
    def size(self) -> tuple[int, int]:
        return int(self.heatmaps.shape[1]), int(self.heatmaps.shape[2])


def _validate(heatmaps: np.ndarray, queries, presence, source: str) -> None:
    if heatmaps.ndim != 3:
        raise InputError(f"{source}: field 'heatmaps' must be [K,H,W], got shape {heatmaps.shape}")
    K, H, W = heatmaps.shape
    if H == 0 or W == 0:
        raise InputError(f"{source}: field 'heatmaps' has zero area ({W}x{H}); expected the image size")
    if len(queries) != K:
        raise InputError(f"{source}: field 'queries' has {len(queries)} names but 'heatmaps' has {K} maps")
    if K and not np.isfinite(heatmaps).all():
        bad = sorted({int(k) for k in np.argwhere(~np.isfinite(heatmaps))[:, 0]})
        raise InputError(f"{source}: field 'heatmaps' has NaN or infinite values in maps {bad}")
    if presence is not None:
        if presence.shape != (K,):
            raise InputError(f"{source}: field 'presence' has shape {presence.shape}, expected ({K},)")
        if not np.isfinite(presence).all():
            raise InputError(f"{source}: field 'presence' has NaN or infinite values")


def save_heatmaps(path: str | Path, heatmaps: np.ndarray, queries, image_id: int, file_name: str,
                  presence: np.ndarray | None = None) -> Path:
    """Write one cache file atomically. ``heatmaps`` are stored as float16."""
    path = Path(path)
    heat = np.asarray(heatmaps, dtype=np.float32)
    pres = None if presence is None else np.asarray(presence, dtype=np.float32).reshape(-1)
    _validate(heat, list(queries), pres, str(path))
    arrays = {
        "heatmaps": heat.astype(np.float16),
        "queries": np.asarray([str(q) for q in queries], dtype=np.str_),
        "image_id": np.asarray(int(image_id), dtype=np.int64),
        "file_name": np.asarray(str(file_name), dtype=np.str_),
    }
    if pres is not None:
        arrays["presence"] = pres
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_heatmaps(path: str | Path) -> HeatmapRecord:
    """Read and validate one cache file; errors name the file and the field."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [f for f in ("heatmaps", "queries", "image_id", "file_name") if f not in data.files]
            if missing:
                raise InputError(f"{path}: missing field(s) {missing}; a heatmap file has {list(FIELDS)}")
            heat = np.asarray(data["heatmaps"])
            queries = tuple(str(q) for q in np.atleast_1d(data["queries"]))
            image_id = data["image_id"]
            file_name = str(data["file_name"])
            presence = np.asarray(data["presence"], dtype=np.float32) if "presence" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not a readable .npz heatmap file ({e})") from e
    if not np.issubdtype(heat.dtype, np.floating):
        raise InputError(f"{path}: field 'heatmaps' must be floating point, got {heat.dtype}")
    if image_id.shape != () or not np.issubdtype(image_id.dtype, np.integer):
        raise InputError(f"{path}: field 'image_id' must be one integer, got {image_id!r}")
    _validate(heat, queries, presence, str(path))
    return HeatmapRecord(heat, queries, int(image_id), file_name, presence)


def list_heatmap_files(directory: str | Path) -> list[Path]:
    """Cache files under ``directory`` (recursively), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"heatmap directory {directory} does not exist or is not a directory")
    return sorted(p for p in directory.rglob("*.npz") if not p.name.startswith(".tmp-"))
