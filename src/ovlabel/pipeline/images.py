"""Finding and decoding images — by content, never by extension. This module does not import torch.

``collect_inputs`` expands what a user passes (folders, recursively; image files; text files listing
paths) and ``coco_inputs`` a COCO ground truth with its images folder into a sorted, deterministic list
of ``ImageItem`` with ids (a run freezes them in its manifest, so they never shift). ``read_image``
decodes any format Pillow knows (JPEG, PNG 8/16-bit, palette, RGBA, WEBP, BMP, TIFF, GIF's first frame,
…) from a path or from bytes, applies the EXIF orientation and returns RGB ``uint8``; transparent pixels
are composited over white. ``decode_item`` is what a run calls per image: it also enforces the run's
limits and, for COCO ground truth, the ground truth's geometry. Every failure is an
:class:`~ovlabel.errors.ImageReadError` with the reason, which the runner records and skips (or raises
with ``--strict``).

Entries that are not regular files (FIFOs, sockets, devices, broken or looping symlinks) are never
opened — a FIFO would block the run — and are reported as failures.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..common.files import file_kind
from ..config import MAX_PIXELS
from ..errors import ImageReadError, InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".heic", ".avif"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}




@dataclass(frozen=True)
class ImageItem:
    id: int
    path: Path
    file_name: str  # as written in the outputs: relative to its input root
    expected_size: tuple[int, int] | None = None  # (height, width) a ground truth says the image has


@dataclass
class DecodedImage:
    """An item and its pixels (RGB ``uint8 [H,W,3]``), or the reason it could not be decoded."""

    item: ImageItem
    image: np.ndarray | None = None
    error: str | None = None


def _is_image(path: Path) -> bool:
    """Cheap content sniff (header only) of a regular file."""
    if file_kind(path) is not None:
        return False
    try:
        with _open(path, MAX_PIXELS):
            return True
    except Exception:
        return False


def _walk(folder: Path, skipped: list[dict] | None = None) -> list[Path]:
    """The files under ``folder``, sorted. Hidden files and folders and symbolic links to folders (which
    could lead in a loop or out of the tree) are not entered; each is reported in ``skipped``."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        keep = []
        for d in sorted(dirs):
            path = Path(root) / d
            if d.startswith("."):
                reason = "hidden folder: not searched (pass it as an input to label it)"
            elif path.is_symlink():
                reason = "symbolic link to a folder: not followed (pass it as an input to label it)"
            else:
                keep.append(d)
                continue
            if skipped is not None:
                skipped.append({"path": str(path), "reason": reason})
        dirs[:] = keep
        for f in sorted(files):
            if not f.startswith("."):
                out.append(Path(root) / f)
            elif skipped is not None:
                skipped.append({"path": str(Path(root) / f), "reason": "hidden file: not labelled (pass it as an "
                                "input to label it)"})
    return out


def _abs(p: Path) -> Path:
    """Absolute and normalised (``..`` resolved lexically), symlinks kept as the user named them."""
    return Path(os.path.normpath(os.path.abspath(p)))


def collect_inputs(inputs: list[str | Path], skipped: list[dict] | None = None) -> tuple[list[ImageItem], list[str]]:
    """Expand inputs into image items (ids 1..N in sorted order) and the non-image files ignored in
    folders. Files with an image extension are always attempted (a broken one is reported later);
    other files in folders are attempted when their content is an image.

    ``file_name`` is the path relative to the inputs' common root (:func:`input_root`): one folder gives
    names relative to it; several folders, files or lists give names that keep them apart
    (``a/img.png``, ``b/img.png``) — never absolute, never two images with one name. Entries of folders
    that are not searched (hidden ones, symbolic links to folders) are appended to ``skipped`` with the
    reason."""
    entries: list[tuple[Path, Path]] = []  # (root the name is relative to, file)
    ignored: list[str] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            for f in _walk(p, skipped):
                # non-regular entries are never opened; they are kept so the run reports them as failures
                if f.suffix.lower() in IMAGE_SUFFIXES or file_kind(f) is not None or _is_image(f):
                    entries.append((p, f))
                else:
                    ignored.append(str(f))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES and not _is_image(p):
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line).expanduser()
                entries.append((f.parent, f) if f.is_absolute() else (p.parent, p.parent / f))
        elif p.is_file() or os.path.lexists(p):
            entries.append((p.parent, p))  # an image file, or an entry that is not a regular file (reported)
        else:
            raise InputError(f"input {raw} does not exist (expected a folder, an image file or a .txt list of paths)")
    if not entries and not ignored:
        raise InputError(f"no files found in {', '.join(str(i) for i in inputs)}")
    if not entries:
        return [], ignored
    files = [_abs(f) for _, f in entries]
    root = Path(os.path.commonpath([str(_abs(r)) for r, _ in entries] + [str(f.parent) for f in files]))
    named = [(f.relative_to(root).as_posix(), orig) for f, (_, orig) in zip(files, entries)]
    seen: set[Path] = set()
    unique = []
    for name, f in sorted(named, key=lambda e: (e[0], str(e[1]))):
        try:
            key = f.resolve(strict=False)
        except (OSError, RuntimeError):  # a symlink loop
            key = f.absolute()
        if key not in seen:
            seen.add(key)
            unique.append((name, f))
    return [ImageItem(i + 1, f, name) for i, (name, f) in enumerate(unique)], ignored


def input_root(items: list[ImageItem]) -> Path | None:
    """The folder every ``file_name`` of ``items`` is relative to (``None`` without items)."""
    if not items:
        return None
    it = items[0]
    path = _abs(it.path)
    return path.parents[len(Path(it.file_name).parts) - 1]


def coco_inputs(gt, images_dir: str | Path) -> list[ImageItem]:
    """Items of a COCO ground truth (``pycocotools.coco.COCO``), its image ids kept, with the size the
    ground truth gives each image. A ``file_name`` that is absolute or leads out of ``images_dir`` is
    refused (``..`` that stays inside is fine)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise InputError(f"--images-dir {images_dir} is not a folder")
    base = os.path.normpath(os.path.abspath(root))
    items = []
    for img in sorted(gt.dataset["images"], key=lambda i: i["id"]):
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise InputError(f"ground-truth image {img['id']} has no 'file_name'")
        if os.path.isabs(name) or Path(name).drive:
            raise InputError(f"ground-truth image {img['id']}: file_name {name!r} is an absolute path; COCO file "
                             "names are relative to --images-dir")
        full = os.path.normpath(os.path.join(base, name))
        if os.path.commonpath([base, full]) != base:
            raise InputError(f"ground-truth image {img['id']}: file_name {name!r} leads outside --images-dir "
                             f"{images_dir}; refused")
        size = None
        h, w = img.get("height"), img.get("width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            size = (h, w)
        items.append(ImageItem(int(img["id"]), root / name, name, size))
    return items


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in (np.uint16, np.int32, np.uint32, np.int64) or np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    raise ImageReadError(f"unsupported pixel type {arr.dtype}")


_PIL_LIMIT = threading.Lock()


def _open(source, max_pixels: int) -> Image.Image:
    """``Image.open`` with our own pixel limit in place of Pillow's: Pillow refuses images above twice
    its ``MAX_IMAGE_PIXELS`` whatever the caller allows, so when ``max_pixels`` is above that, Pillow's
    check is lifted for this call only (under a lock; the setting is restored at once)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= 2 * limit:
        return Image.open(source)
    with _PIL_LIMIT:
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS, *,
               max_aspect: float | None = None, exif: bool = True) -> np.ndarray:
    """Decode an image file (a path) or its content (``bytes``) into RGB ``uint8 [H,W,3]`` (see the
    module docstring). The size is checked from the header, before the pixels are decoded: more than
    ``max_pixels`` pixels, or a longer side more than ``max_aspect`` times the shorter one, is refused.
    ``exif=False`` keeps the stored orientation."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageReadError("empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        kind = file_kind(path)
        if kind == "missing":
            raise ImageReadError("file not found")
        if kind is not None:
            raise ImageReadError(f"not a regular file: {kind}")
        try:
            if path.stat().st_size == 0:
                raise ImageReadError("empty file (0 bytes)")
        except OSError as e:
            raise ImageReadError(f"cannot read the file ({e.strerror or e})") from None
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with _open(fp, max_pixels) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageReadError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                                         "(a decompression bomb?); raise run.max_pixels to allow it")
                if w == 0 or h == 0:
                    raise ImageReadError(f"image has zero area ({w}x{h})")
                if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
                    raise ImageReadError(f"image is {w}x{h}: its aspect ratio {max(w, h) / min(w, h):.0f}:1 is beyond "
                                         f"the limit of {max_aspect:g}:1 (run.max_aspect_ratio)")
                im.seek(0)  # first frame of animations
                if exif:
                    im = ImageOps.exif_transpose(im)
                return _rgb(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image (unrecognised file content)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"cannot decode the image ({e}); the file may be truncated or corrupt") from None


def decode_item(item: ImageItem, max_pixels: int = MAX_PIXELS, max_aspect: float | None = None,
                data: bytes | None = None) -> DecodedImage:
    """Decode one item of a run (from ``data`` when given, else from its path), never raising for a bad
    image: the error is returned instead.

    With a ground-truth size (``item.expected_size``) the pixels must have that size: when they only do
    without the EXIF rotation (the ground truth was made on the stored pixels), the stored orientation is
    kept; otherwise the image fails with both sizes in the reason — masks of another size are never made.
    """
    source = data if data is not None else item.path
    try:
        image = read_image(source, max_pixels, max_aspect=max_aspect)
        want = item.expected_size
        if want is not None and tuple(image.shape[:2]) != tuple(want):
            raw = read_image(source, max_pixels, max_aspect=max_aspect, exif=False)
            if tuple(raw.shape[:2]) != tuple(want):
                raise ImageReadError(f"the image is {image.shape[1]}x{image.shape[0]} but the ground truth says "
                                     f"{want[1]}x{want[0]} (width x height); its masks would not match the "
                                     "ground truth")
            image = raw
    except ImageReadError as e:
        return DecodedImage(item, error=str(e))
    return DecodedImage(item, image)


def _rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB",):
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grayscale: rescale, don't clip
        arr = _to_uint8(np.asarray(im))
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return np.clip(np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)), 0, 255).astype(np.uint8)
    if mode.startswith("I;16") or mode in ("RGB;16", "RGBA;16"):
        arr = _to_uint8(np.asarray(im))
        return arr[..., :3] if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    # L, 1, CMYK, YCbCr, LAB, HSV…: Pillow's own conversions
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def as_rgb(image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB ``uint8 [H,W,3]`` of a path (decoded by :func:`read_image`), a PIL image or an array
    (``[H,W]``, ``[H,W,3]`` or ``[H,W,4]``, any numeric type)."""
    if isinstance(image, (str, Path)):
        return read_image(image, max_pixels)
    if isinstance(image, Image.Image):
        return _rgb(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"an image array must be [H,W,3] (RGB) or [H,W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr)
    return np.ascontiguousarray(arr[..., :3])
