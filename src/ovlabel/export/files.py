"""Writing output files so that a crash, a kill or a full disk never leaves a partial or corrupt file.

Every output file of ovlabel is written through :func:`atomic_write`: into a temporary file in the same
folder, flushed and fsynced, given the permissions a plain ``open()`` would give it (``0666`` minus the
umask — temporary files are created ``0600``), then renamed over the target, and the folder fsynced so
that the new name survives a power loss. On any error the temporary file is removed, and an out-of-space
error becomes an :class:`~ovlabel.errors.OutputError` that says so.

Append-only record files use :func:`append_lines` instead (see :mod:`ovlabel.export.records`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError, OutputError

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _read_umask() -> int:
    try:  # Linux ≥ 4.7 reports it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0666`` minus the umask."""
    return 0o666 & ~UMASK


def output_stem(image_id: int, file_name: str) -> str:
    """The name of an image's per-image outputs, kept inside their folder: ``<id>_<sanitised stem>``."""
    stem = Path(file_name).stem
    stem = re.sub(r"[^\w.\-]+", "_", stem, flags=re.UNICODE).strip("._") or "image"
    return f"{int(image_id):06d}_{stem[:80]}"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check a file can be written there (before any work starts)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"output folder {path} is not writable ({e.strerror or e}); choose another --out") from None
    return path


def fsync_dir(directory: str | Path) -> None:
    """Make the entries of ``directory`` (a new or renamed file) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def output_error(e: OSError, path: str | Path) -> OutputError:
    """A typed error for a failed write, saying "disk full" when that is the cause."""
    if e.errno in SPACE_ERRNOS:
        return OutputError(f"disk full: could not write {path} ({e.strerror or e}); free some space (or raise "
                           "the file size limit) and run the same command again")
    return OutputError(f"could not write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, encoding: str | None = None,
                 durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    ``durable=False`` skips the folder fsync (the caller fsyncs the folder once for many files, see
    :func:`fsync_dir`); the file's own data is always fsynced before the rename.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise output_error(e, path) from e
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(e, path) from e
        raise


def write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    with atomic_write(path, "w", encoding="utf-8", durable=durable) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
    return Path(path)


def write_yaml(path: str | Path, data: Any) -> Path:
    import yaml

    with atomic_write(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
    return Path(path)


def remove_stale_temps(directory: str | Path, names: Iterable[str] | None = None, *, recursive: bool = False) -> int:
    """Remove temporary files that a killed writer left in ``directory`` (only those for the given
    target ``names``, so that other processes' files in flight are left alone; all with ``None``), and in
    its subfolders with ``recursive``. Returns the count."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    wanted = None if names is None else set(names)
    removed = 0
    for entry in os.scandir(directory):
        if recursive and entry.is_dir(follow_symlinks=False):
            removed += remove_stale_temps(entry.path, wanted, recursive=True)
            continue
        m = TEMP_PATTERN.match(entry.name)
        if m and (wanted is None or m["name"] in wanted) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


# ------------------------------------------------------------------------------------- append-only
def cut_torn_tail(fd: int) -> int:
    """Truncate an append-only line file back to its last complete line (a write cut short by a kill or
    a full disk leaves half a line). Returns the number of bytes removed."""
    size = os.fstat(fd).st_size
    end = size
    block = 1 << 16
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    else:
        keep = 0
    if keep < size:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    return size - keep


def append_lines(fd: int, lines: list[str], path: str | Path) -> None:
    """Append complete lines to an ``O_APPEND`` file and fsync it. If the write fails part-way (disk
    full), the file is cut back to where it was, so that no partial line stays behind."""
    data = "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode("utf-8")
    before = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
        raise output_error(e, path) from e
