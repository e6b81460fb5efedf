"""Finding and decoding images — by content, never by extension.

``collect_inputs`` expands what a user passes (folders, recursively; image files; text files listing
paths; a COCO ground truth with its images folder) into a sorted, deterministic list of ``ImageItem``
with stable ids. ``read_image`` decodes any format Pillow knows (JPEG, PNG 8/16-bit, palette, RGBA, WEBP,
BMP, TIFF, GIF's first frame, …), applies the EXIF orientation and returns RGB ``uint8``; transparent
pixels are composited over white. Every failure is an :class:`~ovlabel.errors.ImageReadError` with the
reason, which the runner records and skips (or raises with ``--strict``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError, InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".heic", ".avif"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}


@dataclass(frozen=True)
class ImageItem:
    id: int
    path: Path
    file_name: str  # as written in the outputs: relative to its input root


def _is_image(path: Path) -> bool:
    """Cheap content sniff (header only)."""
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


def _walk(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                out.append(Path(root) / f)
    return out


def collect_inputs(inputs: list[str | Path]) -> tuple[list[ImageItem], list[str]]:
    """Expand inputs into image items (ids 1..N in sorted order) and the non-image files ignored in
    folders. Files with an image extension are always attempted (a broken one is reported later);
    other files in folders are attempted when their content is an image."""
    entries: list[tuple[str, Path]] = []
    ignored: list[str] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            for f in _walk(p):
                rel = f.relative_to(p).as_posix()
                if f.suffix.lower() in IMAGE_SUFFIXES or _is_image(f):
                    entries.append((rel, f))
                else:
                    ignored.append(str(f))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES and not _is_image(p):
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line).expanduser()
                f = f if f.is_absolute() else p.parent / f
                entries.append((line, f))
        elif p.is_file():
            entries.append((p.name, p))
        else:
            raise InputError(f"input {raw} does not exist (expected a folder, an image file or a .txt list of paths)")
    if not entries and not ignored:
        raise InputError(f"no files found in {', '.join(str(i) for i in inputs)}")
    seen: set[Path] = set()
    unique = []
    for name, f in sorted(entries, key=lambda e: (e[0], str(e[1]))):
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((name, f))
    return [ImageItem(i + 1, f, name) for i, (name, f) in enumerate(unique)], ignored


def coco_inputs(gt, images_dir: str | Path) -> list[ImageItem]:
    """Items of a COCO ground truth (``pycocotools.coco.COCO``), its image ids kept."""
    root = Path(images_dir)
    if not root.is_dir():
        raise InputError(f"--images-dir {images_dir} is not a folder")
    return [ImageItem(int(img["id"]), root / img["file_name"], img["file_name"])
            for img in sorted(gt.dataset["images"], key=lambda i: i["id"])]


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


def read_image(path: str | Path, max_pixels: int = 178_956_970) -> np.ndarray:
    """Decode an image file into RGB ``uint8 [H,W,3]`` (see the module docstring)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError("empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except OSError as e:
        raise ImageReadError(f"cannot read the file ({e.strerror or e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageReadError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                                         "(a decompression bomb?); raise run.max_pixels to allow it")
                if w == 0 or h == 0:
                    raise ImageReadError(f"image has zero area ({w}x{h})")
                im.seek(0)  # first frame of animations
                im = ImageOps.exif_transpose(im)
                return _rgb(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image (unrecognised file content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"cannot decode the image ({e}); the file may be truncated or corrupt") from None


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
