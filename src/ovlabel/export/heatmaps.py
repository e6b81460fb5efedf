"""The heatmap cache: one ``.npz`` per image, readable and writable by other tools.

Format version 2 keeps the maps at **model resolution** with what is needed to bring them back to the
image (a 12-megapixel photo with 80 queries costs ~25 MB instead of ~2 GB). Fields
(``numpy.savez_compressed``, no pickled objects):

==================  ======================  ============================================================
``format_version``  int64 scalar            ``2`` (files without it are version 1, see below)
``heatmaps``        float16 ``[K,h,w]``     one map per query over the whole image, in [0,1]
                    or ``[N,K,h,w]``        with ``tiles``: the maps of ``N`` tiles, each query scaled
                                            by one positive factor over all tiles (fusion is invariant)
``size``            int64 ``[2]``           the image's ``(height, width)``
``tiles``           int64 ``[N,4]``         optional: tile regions ``(y0, y1, x0, x1)`` on the image
``queries``         str ``[K]``             the query (category) names, in the order of the maps
``image_id``        int64 scalar            the image's id (COCO ``image_id``)
``file_name``       str scalar              the image path as given to the run (relative to its root)
``presence``        float32 ``[K]``         optional: image-level presence probability of each query
==================  ======================  ============================================================

A query's map on the image is ``heatmaps[k]`` resized bilinearly (pixel centres aligned,
``align_corners=False``) to ``size`` — then min-max normalised. Tiled maps are each resized to their
tile, weighted by a sine window (``ovlabel.postprocess.geometry.tile_weight``), averaged where tiles
overlap and min-max normalised (:class:`ovlabel.postprocess.geometry.ImageMaps`). Version 1 files hold
``heatmaps`` ``[K,H,W]`` at the image's resolution and no ``size``; they are read as they are.

Reading checks the declared array sizes in the file before anything is decompressed (a small file
cannot inflate into gigabytes), and never unpickles. Writing is atomic.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.files import atomic_write, file_kind
from ..config import MAX_PIXELS
from ..errors import InputError
from ..postprocess.geometry import ImageMaps

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
FIELDS = ("format_version", "heatmaps", "size", "tiles", "queries", "image_id", "file_name", "presence")
REQUIRED = ("heatmaps", "queries", "image_id", "file_name")
MAX_HEATMAP_BYTES = 2**31  # declared size of 'heatmaps' above which a file is refused unread
MAX_FIELD_BYTES = 2**26  # any other field
MAX_TILES = 4096  # tile maps in one file
MAX_TILE_COVERAGE = 100  # the tiles' total area over the image's: what any overlap < 0.9 can make


@dataclass(frozen=True)
class HeatmapRecord:
    heatmaps: np.ndarray  # float16 [K,h,w] or [N,K,h,w] with tiles
    queries: tuple[str, ...]
    image_id: int
    file_name: str
    presence: np.ndarray | None = None  # [K] float32
    image_size: tuple[int, int] | None = None  # (H, W); None: the maps' own size (version 1)
    tiles: tuple[tuple[int, int, int, int], ...] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The image's ``(height, width)``."""
        if self.image_size is not None:
            return self.image_size
        return int(self.heatmaps.shape[-2]), int(self.heatmaps.shape[-1])

    @property
    def maps(self) -> ImageMaps:
        """The maps with their geometry (float32), ready for :class:`ovlabel.postprocess.Postprocessor`."""
        return ImageMaps(self.heatmaps.astype(np.float32), self.size, self.tiles)


def _validate(heatmaps: np.ndarray, queries, presence, source: str, tiled: bool = False) -> None:
    want = 4 if tiled else 3
    if heatmaps.ndim != want:
        raise InputError(f"{source}: field 'heatmaps' must be {'[N,K,h,w]' if tiled else '[K,H,W]'}, got shape "
                         f"{heatmaps.shape}")
    K, H, W = heatmaps.shape[-3:]
    if H == 0 or W == 0:
        raise InputError(f"{source}: field 'heatmaps' has zero area ({W}x{H}); expected the image size")
    if len(queries) != K:
        raise InputError(f"{source}: field 'queries' has {len(queries)} names but 'heatmaps' has {K} maps")
    if K and not np.isfinite(heatmaps).all():
        bad = sorted({int(k) for k in np.argwhere(~np.isfinite(heatmaps))[:, -3]})
        raise InputError(f"{source}: field 'heatmaps' has NaN or infinite values in maps {bad}")
    if presence is not None:
        if presence.shape != (K,):
            raise InputError(f"{source}: field 'presence' has shape {presence.shape}, expected ({K},)")
        if not np.isfinite(presence).all():
            raise InputError(f"{source}: field 'presence' has NaN or infinite values")


def save_heatmaps(path: str | Path, heatmaps: np.ndarray | ImageMaps, queries, image_id: int, file_name: str,
                  presence: np.ndarray | None = None, *, durable: bool = True) -> Path:
    """Write one cache file atomically. ``heatmaps``: ``[K,H,W]`` at the image's resolution, or the
    image's :class:`ImageMaps` (kept at model resolution). Maps are stored as float16."""
    path = Path(path)
    maps = heatmaps if isinstance(heatmaps, ImageMaps) else None
    if maps is None:
        heat = np.asarray(heatmaps, dtype=np.float32)
        size = heat.shape[1:] if heat.ndim == 3 else (0, 0)
        tiles = None
    else:
        heat, size, tiles = np.asarray(maps.maps, dtype=np.float32), maps.size, maps.tiles
    pres = None if presence is None else np.asarray(presence, dtype=np.float32).reshape(-1)
    _validate(heat, list(queries), pres, str(path), tiled=tiles is not None)
    if tiles is not None:  # raw tile maps: one positive factor per query keeps them in float16's range
        scale = np.abs(heat).max(axis=(0, 2, 3), keepdims=True)
        heat = heat / np.where(scale > 0, scale, 1)
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
        "heatmaps": _float16(heat),
        "size": np.asarray(size, dtype=np.int64),
        "queries": np.asarray([str(q) for q in queries], dtype=np.str_),
        "image_id": np.asarray(int(image_id), dtype=np.int64),
        "file_name": np.asarray(str(file_name), dtype=np.str_),
    }
    if tiles is not None:
        arrays["tiles"] = np.asarray(tiles, dtype=np.int64).reshape(-1, 4)
    if pres is not None:
        arrays["presence"] = pres
    with atomic_write(path, "wb", durable=durable) as f, \
            zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, arr in arrays.items():  # what numpy.savez_compressed writes, at a faster deflate level
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)
    return path


def _float16(a: np.ndarray) -> np.ndarray:
    """float32 → float16, rounding to nearest even like ``astype`` (bit-identical), with the CPU's
    conversion instructions: numpy's own is ~10× slower on maps full of tiny values (subnormals)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).half().numpy()


def declared_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an ``.npz``, read from the ``.npy`` headers (nothing is
    decompressed beyond the headers)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"member {info.filename} has .npy format version {version}")
            out[name] = (tuple(int(v) for v in shape), np.dtype(dtype))
    return out


def _check_declared(path: Path, max_bytes: int) -> None:
    arrays = declared_arrays(path)
    missing = [f for f in REQUIRED if f not in arrays]
    if missing:
        raise InputError(f"{path}: missing field(s) {missing}; a heatmap file has {list(FIELDS)}")
    for name, (shape, dtype) in arrays.items():
        if dtype.hasobject:
            raise InputError(f"{path}: field {name!r} holds Python objects (pickles are never loaded)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        limit = max_bytes if name == "heatmaps" else MAX_FIELD_BYTES
        if nbytes > limit:
            raise InputError(f"{path}: field {name!r} declares {nbytes / 2**20:.0f} MiB ({list(shape)} {dtype}), "
                             f"more than the limit of {limit / 2**20:.0f} MiB; refused without reading it")


def load_heatmaps(path: str | Path, *, max_bytes: int = MAX_HEATMAP_BYTES,
                  max_pixels: int = MAX_PIXELS) -> HeatmapRecord:
    """Read and validate one cache file (version 1 or 2); errors name the file and the field. Work is
    bounded before anything is allocated: the declared array sizes (``max_bytes``), the image ``size``
    (``max_pixels``, as ``run.max_pixels`` bounds the images a run reads) and the tiles (at most
    :data:`MAX_TILES`, covering the image at most :data:`MAX_TILE_COVERAGE` times)."""
    path = Path(path)
    kind = file_kind(path)
    if kind is not None:
        raise InputError(f"{path}: not a regular file ({kind}); never opened")
    try:
        _check_declared(path, max_bytes)
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format_version"]) if "format_version" in data.files else 1
            heat = np.asarray(data["heatmaps"])
            queries = tuple(str(q) for q in np.atleast_1d(data["queries"]))
            image_id = data["image_id"]
            file_name = str(data["file_name"])
            presence = np.asarray(data["presence"], dtype=np.float32) if "presence" in data.files else None
            size = np.asarray(data["size"]) if "size" in data.files else None
            tiles = np.asarray(data["tiles"]) if "tiles" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not a readable .npz heatmap file ({e})") from e
    if version not in (1, FORMAT_VERSION):
        raise InputError(f"{path}: heatmap format version {version} is not known (this ovlabel reads 1 and 2)")
    if not np.issubdtype(heat.dtype, np.floating):
        raise InputError(f"{path}: field 'heatmaps' must be floating point, got {heat.dtype}")
    if image_id.shape != () or not np.issubdtype(image_id.dtype, np.integer):
        raise InputError(f"{path}: field 'image_id' must be one integer, got {image_id!r}")
    _validate(heat, queries, presence, str(path), tiled=tiles is not None)
    image_size = None
    if size is not None:
        if size.shape != (2,) or not np.issubdtype(size.dtype, np.integer) or (size < 1).any():
            raise InputError(f"{path}: field 'size' must be the image's (height, width), got {size!r}")
        image_size = (int(size[0]), int(size[1]))
    H, W = image_size if image_size is not None else heat.shape[-2:]
    if int(H) * int(W) > max_pixels:
        raise InputError(f"{path}: field 'size' says the image is {W}x{H} = {int(H) * int(W)} pixels, more than "
                         f"the limit of {max_pixels} (run.max_pixels); refused before allocating its maps")
    regions = None
    if tiles is not None:
        if image_size is None or tiles.ndim != 2 or tiles.shape != (heat.shape[0], 4) or \
                not np.issubdtype(tiles.dtype, np.integer):
            raise InputError(f"{path}: field 'tiles' must be [N,4] integers for the N tile maps, with 'size'")
        if tiles.shape[0] > MAX_TILES:
            raise InputError(f"{path}: field 'tiles' has {tiles.shape[0]} tiles, more than the limit of {MAX_TILES}")
        for y0, y1, x0, x1 in tiles.tolist():
            if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
                raise InputError(f"{path}: field 'tiles' has region {[y0, y1, x0, x1]} outside the {W}x{H} image")
        covered = int(((tiles[:, 1] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 2])).sum())
        if covered > MAX_TILE_COVERAGE * H * W:
            raise InputError(f"{path}: field 'tiles' covers the image {covered / (H * W):.0f} times; tiles of a run "
                             f"overlap at most {MAX_TILE_COVERAGE} times")
        regions = tuple(tuple(int(v) for v in t) for t in tiles.tolist())
    return HeatmapRecord(heat, queries, int(image_id), file_name, presence, image_size, regions)


def check_cache_against_gt(f: Path, rec: HeatmapRecord, gt_coco, gt) -> str:
    """A cache used with a ground truth must be of that ground truth's image: its id exists, its size is
    the image's, and its ``file_name`` is the image's (another run's caches can share ids and sizes).
    Returns the ground truth's file name."""
    img = gt_coco.imgs.get(rec.image_id)
    if img is None:
        raise InputError(f"{f}: field 'image_id' {rec.image_id} is not in {gt}")
    H, W = rec.size
    if (img.get("height"), img.get("width")) != (H, W):
        raise InputError(f"{f}: field 'heatmaps' is {W}x{H} but image {rec.image_id} of {gt} "
                              f"is {img.get('width')}x{img.get('height')}")
    name = img.get("file_name")
    if not isinstance(name, str) or os.path.normpath(rec.file_name) != os.path.normpath(name):
        raise InputError(f"{f}: field 'file_name' is {rec.file_name!r} but image {rec.image_id} of {gt} is "
                              f"{name!r}: these heatmaps are not of this ground truth's images")
    return name


def scan_heatmap_files(directory: str | Path) -> tuple[list[Path], list[dict]]:
    """Cache files under ``directory`` (recursively, symbolic links to folders not followed), sorted, and
    the ``*.npz`` entries skipped unopened with the reason (FIFOs, sockets, devices, broken links: opening
    a FIFO would block for ever)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"heatmap directory {directory} does not exist or is not a directory")
    files, skipped = [], []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or not name.endswith(".npz"):
                continue
            p = Path(root) / name
            kind = file_kind(p)
            if kind is None:
                files.append(p)
            else:
                skipped.append({"file": str(p), "error": f"not a regular file ({kind}); never opened"})
    return sorted(files), sorted(skipped, key=lambda d: d["file"])


def list_heatmap_files(directory: str | Path) -> list[Path]:
    """The readable cache files of :func:`scan_heatmap_files`; each entry skipped is logged with its reason."""
    files, skipped = scan_heatmap_files(directory)
    for s in skipped:
        log.warning("skipped %s: %s", s["file"], s["error"])
    return files
