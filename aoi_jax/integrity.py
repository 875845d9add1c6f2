"""Size and SHA-256 records of the files aoi_jax writes (data caches, checkpoints), checked when they are read.

A record is ``{"size": bytes, "sha256": hex digest}`` per file. A file that no longer matches its record is
described in words (``problem``): missing, a different size (truncated or extended) or, at the same size,
different bytes (altered in place, e.g. flipped bits). The callers decide what a mismatch means: a data cache
is rebuilt, a checkpoint step is skipped. Every record is written atomically (``write_atomic``: a temporary
file in the same folder, flushed to disk, then ``os.replace``), so a record is either complete or absent.

Hashing reads each file once (hashlib, 1 MiB blocks). Every JSON file aoi_jax writes is strict JSON
(``to_json``, ``write_json_atomic``): a non-finite number is written as null.
"""

import hashlib
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable

import numpy as np

BLOCK = 1 << 20
SIDECAR_SUFFIX = ".sha256.json"  # the record of a single file ``f`` is ``f.sha256.json`` beside it


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


def write_atomic(path, write: Callable) -> None:
    """Writes ``path`` through ``write(binary file)`` into a temporary sibling, flushes it to disk and renames
    it over ``path`` (so readers see the old file or the whole new one, never a part)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    text = json.dumps(obj, indent=2, allow_nan=False).encode()
    write_atomic(path, lambda f: f.write(text))


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


__all__ = ["digest", "problem", "write_atomic", "write_json_atomic", "sidecar", "write_sidecar", "check_sidecar",
           "folder_records", "folder_problems", "SIDECAR_SUFFIX"]
