"""Size and SHA-256 records of the files aoi_jax writes (data caches, checkpoints), checked when they are read.

A record is ``{"size": bytes, "sha256": hex digest}`` per file. A file that no longer matches its record is
described in words (``problem``): missing, a different size (truncated or extended) or, at the same size,
different bytes (altered in place, e.g. flipped bits). The callers decide what a mismatch means: a data cache
is rebuilt, a checkpoint step is skipped. Every record is written atomically (``write_atomic``: a temporary
file in the same folder, flushed to disk, then ``os.replace``), so a record is either complete or absent.

Hashing reads each file once (hashlib, 1 MiB blocks). Every JSON file aoi_jax writes is strict JSON
(``to_json``, ``write_json_atomic``): a non-finite number is written as null.

A write that fails (no space, quota, file too large, read-only folder) raises ``StorageError``, an ``OSError``
whose message names the path, the bytes it tried to write and the OS error; ``write_atomic`` leaves no
temporary file behind. Files and folders are created with the permissions the umask gives
(``0o666 & ~umask``, ``0o777 & ~umask``), like ``open`` and ``mkdir``, also through ``mkstemp``/``mkdtemp``.
"""

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator

import numpy as np

BLOCK = 1 << 20
SIDECAR_SUFFIX = ".sha256.json"  # the record of a single file ``f`` is ``f.sha256.json`` beside it
_UMASK_LOCK = threading.Lock()

log = logging.getLogger("aoi_jax")


class StorageError(OSError):
    """A file or folder aoi_jax writes could not be written: no space, quota, file too large, read-only folder.

    ``errno``, ``strerror`` and ``filename`` as ``OSError``'s; ``nbytes`` the bytes it tried to write (None:
    unknown). ``str(e)`` is one line: ``cannot write '<path>' (<n> bytes): <OS error> [Errno <n>]``.
    """

    def __init__(self, path, nbytes: int | None, code: int | None, strerror: str):
        super().__init__(code, strerror, str(path))
        self.nbytes = None if nbytes is None else int(nbytes)

    def __str__(self):
        size = "size unknown" if self.nbytes is None else f"{self.nbytes} bytes"
        code = "" if self.errno is None else f" [Errno {self.errno}]"
        return f"cannot write {self.filename!r} ({size}): {self.strerror}{code}"

    def __reduce__(self):
        return type(self), (self.filename, self.nbytes, self.errno, self.strerror)


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})  # the storage is full or closed


def failure_message(error: OSError) -> str | None:
    """The short message a command prints (and exits 1 with) for a failure of the storage: a
    ``StorageError``, or any ``OSError`` whose errno is in ``STORAGE_ERRNOS`` (a write that did not go
    through ``write_atomic``); None for any other error.

    Two lines: what could not be written (path, bytes, OS error), then that the last good checkpoint is kept
    and how to continue.
    """
    if not isinstance(error, StorageError):
        if error.errno not in STORAGE_ERRNOS:
            return None
        error = StorageError(error.filename or "(a file)", None, error.errno, error.strerror)
    return (f"error: {error}\n"
            "The last good checkpoint is kept (no partial step is left); free space or raise the limit, then run "
            "the same command again to continue from it.")


def storage_error(path, nbytes: int | None, error: BaseException) -> StorageError | None:
    """The ``StorageError`` that ``error`` (raised while writing ``path``) amounts to, or None when it is no
    failure of the storage: an ``OSError`` with an errno anywhere in its chain of causes, or a message of
    tensorstore's (which orbax raises as ValueError) carrying ``os_error_code='<errno>'``."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        if isinstance(e, OSError) and e.errno is not None:
            return StorageError(path, nbytes, e.errno, e.strerror or os.strerror(e.errno))
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            return StorageError(path, nbytes, int(code.group(1)), os.strerror(int(code.group(1))))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def writing(path, nbytes: int | None = None) -> Iterator[None]:
    """Turns a failure of the storage inside the block (writing ``path``, ``nbytes`` bytes) into a
    ``StorageError`` (any other exception passes unchanged).

    Raises:
      StorageError: an ``OSError`` with an errno was raised in the block.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        err = storage_error(path, nbytes, e)
        if err is None:
            raise
        raise err from e


def umask() -> int:
    """The process's umask, read without changing it where the system tells it (``/proc/self/status``),
    else by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions a new file gets from ``open``: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The permissions a new folder gets from ``mkdir``: ``0o777 & ~umask``."""
    return 0o777 & ~umask()


def make_temp_folder(parent, prefix: str) -> pathlib.Path:
    """``tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{temp_tag()}.")`` with the umask's permissions
    (mkdtemp alone makes 0700).

    Raises:
      StorageError: the folder could not be created.
    """
    with writing(parent, 0):
        tmp = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{temp_tag()}."))
        os.chmod(tmp, folder_mode())
    return tmp


def temp_tag() -> str:
    """``<host>-<pid>`` of this process (dots in the host name as ``_``): part of every temporary name, so
    that a later run tells the leftovers of a killed writer from the files of a live one."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                       # exists, owned by someone else
        return True
    return True


def leftovers(folder, prefix: str, suffix: str = "") -> list[pathlib.Path]:
    """The temporary files or folders ``<prefix><host>-<pid>.<random><suffix>`` in ``folder`` whose writer
    is gone: written on this host by a process that no longer exists (a killed build). Those of live
    processes, and of other hosts, are in use (or cannot be told apart) and are not listed."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    host = socket.gethostname().replace(".", "_")
    pattern = re.compile(re.escape(prefix) + r"(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+" + re.escape(suffix) + "$")
    out = []
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            out.append(p)
    return out


def remove_leftovers(folder, prefix: str, suffix: str = "") -> list[pathlib.Path]:
    """Deletes ``leftovers(folder, prefix, suffix)`` and returns them (a file or folder that vanished
    meanwhile is skipped)."""
    gone = []
    for p in leftovers(folder, prefix, suffix):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(p)
    return gone


def digest(path) -> dict:
    """``{"size": int, "sha256": str}`` of the file ``path``."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def problem(path, record: dict) -> str | None:
    """What is wrong with ``path`` against its ``record`` (None: it matches).

    One of "missing", "<n> bytes, recorded <m> (truncated or extended)", "different bytes than recorded, at
    the recorded size (altered in place)".
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{size} bytes, recorded {record['size']} (truncated or extended)"
    if digest(path)["sha256"] != record["sha256"]:
        return "different bytes than recorded, at the recorded size (altered in place)"
    return None


class _Counting:
    """A binary file that counts the bytes handed to ``write`` (every other attribute is the file's)."""

    def __init__(self, f):
        self._f, self.handed = f, 0

    def write(self, data) -> int:
        self.handed += memoryview(data).nbytes
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_atomic(path, write: Callable | bytes, size: int | None = None) -> None:
    """Writes ``path`` through ``write(binary file)`` (or the bytes ``write``) into a temporary sibling
    ``<name>.<temp_tag()>.<random>.tmp``, flushes it to disk and renames it over ``path`` (so readers see the old file or
    the whole new one, never a part). The file gets the umask's permissions (``file_mode``). The temporary
    siblings of ``path`` that a killed writer left (``leftovers``) are deleted first, with a warning naming
    them.

    Args:
      size: the bytes ``write`` writes, for the error message (default: ``len`` of bytes, else the bytes
        handed to the file up to and including the write that failed).
    Raises:
      StorageError: the folder, the file or its rename could not be written; no temporary file is left.
    """
    path = pathlib.Path(path)
    if isinstance(write, (bytes, bytearray)):
        data, size = write, len(write)
        write = lambda f: f.write(data)  # noqa: E731
    tmp, f = None, None
    gone = remove_leftovers(path.parent, path.name + ".", ".tmp")
    if gone:
        log.warning("removed the temporary files of an interrupted write of %s: %s", path,
                    ", ".join(p.name for p in gone))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{temp_tag()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(fd, file_mode())
            f = _Counting(raw)
            write(f)
            raw.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        tried = size if size is not None else (f.handed if f is not None else 0)
        err = storage_error(path, tried, e) if isinstance(e, OSError) else None
        if err is None:
            raise
        raise err from e


def append_line(path, line: str) -> None:
    """Appends ``line`` and a newline to the text file ``path``, flushed to disk.

    Raises:
      StorageError: the line could not be written.
    """
    data = (line + "\n").encode()
    with writing(path, len(data)), open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def strict(obj):
    """``obj`` (dicts, lists, tuples, numbers, strings) with every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def to_json(obj, indent: int | None = None) -> str:
    """Strict JSON of ``obj``: ``json.dumps(strict(obj), allow_nan=False)`` (non-finite numbers as null)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json_atomic(path, obj) -> None:
    """``obj`` as strict JSON (a non-finite number is an error), indented by 2, into ``path``, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False).encode())


def sidecar(path) -> pathlib.Path:
    """The record file of ``path``: ``<path>.sha256.json``."""
    path = pathlib.Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path) -> None:
    """Writes the record of the file ``path`` into ``sidecar(path)``."""
    write_json_atomic(sidecar(path), digest(path))


def check_sidecar(path) -> str | None:
    """What is wrong with ``path`` against ``sidecar(path)`` (None: it matches); a missing or unreadable
    record is itself a problem (the file may be from an interrupted write or an older version)."""
    if not sidecar(path).is_file():
        return f"no checksum record {sidecar(path).name} (an interrupted write, or written by an older version)"
    try:
        record = json.loads(sidecar(path).read_text())
        record = {"size": int(record["size"]), "sha256": str(record["sha256"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable checksum record {sidecar(path).name} ({type(e).__name__}: {e})"
    return problem(path, record)


def folder_records(folder, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative posix path: digest}`` of every file under ``folder`` except the names in ``exclude``."""
    folder = pathlib.Path(folder)
    return {p.relative_to(folder).as_posix(): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in exclude}


def folder_problems(folder, records: dict[str, dict]) -> list[str]:
    """``"<relative path>: <problem>"`` for each recorded file of ``folder`` that no longer matches."""
    folder = pathlib.Path(folder)
    out = []
    for name, record in sorted(records.items()):
        p = problem(folder / name, record)
        if p is not None:
            out.append(f"{name}: {p}")
    return out


__all__ = ["StorageError", "STORAGE_ERRNOS", "failure_message", "storage_error", "writing", "umask", "file_mode", "folder_mode", "make_temp_folder",
           "append_line", "temp_tag", "leftovers", "remove_leftovers", "digest", "problem", "write_atomic", "write_json_atomic", "sidecar", "write_sidecar", "check_sidecar",
           "folder_records", "folder_problems", "SIDECAR_SUFFIX"]
