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
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError, OutputError

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
FAULT_ENV = "OVLABEL_FAULT"  # "STAGE:N": SIGKILL this process at the N-th pass of a stage (crash tests)
_fault_counts: dict[str, int] = {}


def fault_point(stage: str, count: int = 1) -> None:
    """Fault injection for the crash tests: with ``OVLABEL_FAULT=STAGE:N`` in the environment, the process
    kills itself (SIGKILL, as a crash or an OOM kill would) once ``stage`` has been passed ``N`` times in
    it (``count`` passes per call), so that a test chooses exactly where a run dies — inside a batch, after
    an append, during the final merge — whatever the machine's load. Unset, it costs one lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(stage + ":"):
        return
    done = _fault_counts.get(stage, 0) + count
    _fault_counts[stage] = done
    if done >= int(spec.split(":", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
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


def file_kind(path: Path) -> str | None:
    """``None`` for a regular file (or a symlink to one); otherwise what the entry is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "missing"
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def relative_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a file name relative to a folder (``None`` when it can): not a non-empty
    string, absolute (``/x``, ``C:\\x``, ``\\\\server``), a NUL byte, or ``..`` parts that lead out."""
    if not isinstance(name, str) or not name:
        return f"file name {name!r} is not a non-empty string"
    if "\0" in name:
        return f"file name {name!r} holds a NUL byte"
    if os.path.isabs(name) or name.startswith(("\\", "/")) or re.match(r"^[A-Za-z]:[/\\]", name):
        return f"file name {name!r} is an absolute path; expected a name relative to the images folder"
    parts = [p for p in re.split(r"[/\\]+", name) if p not in ("", ".")]
    if not parts or parts[-1] == ".." or name.endswith(("/", "\\")):
        return f"file name {name!r} does not name a file"
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return f"file name {name!r} leads outside its folder"
        else:
            depth += 1
    return None


def contained(base: str | Path, name: str, *, for_writing: bool = False) -> Path:
    """``base / name`` when ``name`` is a relative name that stays inside ``base``; otherwise an
    :class:`InputError` naming the problem — a name read from a file never leads a read, write, link or
    unlink elsewhere. ``for_writing`` also resolves the folders on the way (a symbolic link to a folder
    elsewhere is refused) — for paths ovlabel writes, links or removes."""
    problem = relative_name_problem(name)
    if problem is not None:
        raise InputError(problem)
    base = Path(base)
    path = Path(os.path.normpath(os.path.join(os.path.abspath(base), name)))
    if for_writing:
        top = Path(os.path.abspath(base))
        parent = path.parent
        while not os.path.lexists(parent) and parent != top:
            parent = parent.parent
        if not os.path.lexists(parent):
            return path  # nothing on the way exists yet: no link to follow
        real_base, real_parent = os.path.realpath(top), os.path.realpath(parent)
        if os.path.commonpath([real_base, real_parent]) != real_base:
            raise InputError(f"file name {name!r} leads through a link to {real_parent}, outside {base}")
    return path


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


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that can always be written as UTF-8: non-ASCII text is kept as it is, unless the
    object holds a string that is not valid Unicode — a file name of undecodable bytes, which Python
    carries as lone surrogates — and then that text is ``\\u``-escaped (valid JSON that reads back as
    the same string, so the file can still be opened by its name)."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def write_json(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json_text(obj, indent=indent))
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
