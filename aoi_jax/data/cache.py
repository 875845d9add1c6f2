"""Shared logic of the tonic-backed event data sets: offline tonic readers, recording -> frames, frame cache.

Reading (docs/data.md section 3.3). tonic has no download switch: a data set whose ``_check_exists()``
fails downloads in its constructor. ``require_files`` checks the expected archive and extracted files
first and raises ``FileNotFoundError`` saying what is expected where; ``offline(name)`` is a subclass of
tonic's data set class ``tonic.datasets.<name>``, of the same name (tonic derives the folder
``<save_to>/<ClassName>`` from it), that trusts that check and never downloads. ``read_recording``
re-raises any reader failure with the file path.

Frames. ``recording_frames`` turns one recording into ``(T, H', W', 2)`` counts: ``events.check_events``
against the native sensor, event-level spatial downsampling to ``size = (H', W')``::

    x' = floor(x * W' / W),   y' = floor(y * H' / H)          (every event kept, counts preserved)

then ``events.integrate`` over the span ``events.window_bounds`` gives for ``data.window``: T equal time bins
from the first to the last event by default (no event lost); for a window ``(s, L)`` relative to the first
event ``t_0``, the events in ``[t_0 + s, t_0 + s + L]`` in bins of ``L / T`` us, or, when the recording ends
at ``t_1`` inside the window, in bins of ``(t_1 - t_0 - s) / T`` us over ``[t_0 + s, t_1]``.

The reference's preprocessing (SNN-Regularisation-Cutoff ``preprocessing/cifar10dvs.py``, snncutoff
``snncutoff/preprocessing/cifar10dvs.py``, ``dvs128gesture.py``, ``np2dataset.py``) also re-zeroes time at
the first event, but keeps the events strictly inside ``(s, s + L)``, re-zeroes again at the first event
kept, and divides the span from the first to the last kept event into T half-open slots, so that the last
kept event falls in no slot. Ours differs only at the edges: events exactly on a bound are kept (with
``s = 0`` the reference drops every event at the recording's first timestamp), the bins divide the window
rather than the span of the events in it (on these dense recordings the two differ by the microseconds
before the first and after the last event kept), and the last event is counted.

Cache. ``cached_frames`` builds the frames of one split once and stores them under
``<data_dir>/frame_cache/<dataset>/<split>_T<T>_<H'>x<W'>_<key>/``:

- ``frames.npy``: (N, T, H', W', 2) counts in the smallest of uint8 / uint16 / uint32 that holds them,
  opened with ``mmap_mode='r'`` (an epoch reads no raw events and does not load the split into memory);
- ``labels.npy``: (N,) int32;  ``bin_us.npy``: (N,) float64, each recording's bin duration in us (the span
  binned / T; 0 without an event in the window);  ``meta.json``: the key, the settings it hashes, shape,
  dtype, empty recordings, and the size and SHA-256 of each of the three arrays (``aoi_jax.integrity``).

The key is 16 hex digits of the SHA-256 of every setting that changes the frames: ``CACHE_VERSION``, the
loader's reader version, data set, split, T, output size, window, native sensor, number of classes and a
digest of the split's recordings (path relative to the data set folder, size in bytes, label, in order). A
cache is used only if its ``meta.json`` repeats the key and settings and the three arrays have the recorded
sizes, checksums and shapes; otherwise it is rebuilt (with a warning naming the folder and the file). A build writes into a temporary sibling folder
``.tmp-<name>-<host>-<pid>.<random>`` (``integrity.make_temp_folder``: the umask's permissions) and publishes
it with one ``os.replace``, so an interrupted build never leaves a folder that a later load trusts; the next
build of that cache deletes the temporary folders of killed builds (``integrity.leftovers``), with a warning.
A failure to write (no space, quota, file too large) raises ``integrity.StorageError`` naming the temporary
folder and the frames' bytes.
"""

import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from aoi_jax import integrity
from aoi_jax.data import events as events_lib

CACHE_VERSION = 2  # 2: the window in the key, bin_us.npy
CACHE_DIRNAME = "frame_cache"
CACHE_FILES = ("bin_us.npy", "frames.npy", "labels.npy")  # each with a size and SHA-256 record in meta.json
COUNT_DTYPES = (np.uint8, np.uint16, np.uint32)  # the cache's frame dtype grows along this list

log = logging.getLogger("aoi_jax")


# ----------------------------------------------------------------------------------------------- reading

def require_files(dataset_dir: pathlib.Path, archives: Sequence[str], folders: Sequence[tuple[str, str]],
                  how_to_get: str) -> None:
    """Checks that a tonic data set folder holds its archive(s) and extracted recordings.

    Args:
      dataset_dir: ``<data_dir>/<tonic ClassName>``.
      archives: file names that must exist in ``dataset_dir`` (the downloaded archive or an empty
        placeholder of that name: tonic itself only checks that it exists).
      folders: ``(folder, glob)`` pairs, relative to ``dataset_dir``; each glob must match at least one file.
      how_to_get: where the official files come from, quoted in the error.
    Raises:
      FileNotFoundError listing each missing item, the layout expected and how to obtain it.
    """
    missing = [f"  {dataset_dir / a}  (archive, or an empty placeholder file of that name)"
               for a in archives if not (dataset_dir / a).is_file()]
    for folder, pattern in folders:
        base = dataset_dir / folder
        if not base.is_dir() or next(base.glob(pattern), None) is None:
            missing.append(f"  {base / pattern}  (extracted recordings)")
    if missing:
        raise FileNotFoundError(
            f"{dataset_dir.name} data not found under {dataset_dir}; missing:\n" + "\n".join(missing)
            + f"\n{how_to_get}\nThe archive (or a zero-byte placeholder with its name) must sit next to the "
            "extracted folder, as tonic lays them out. aoi_jax never downloads.")


def _no_download(self):
    raise RuntimeError(f"{type(self).__name__}: aoi_jax reads local files only and never downloads; "
                       f"expected the data under {self.location_on_system}")


@functools.cache
def offline(name: str) -> type:
    """A subclass of tonic's data set class ``tonic.datasets.<name>``, of the same name, whose
    ``_check_exists`` is True (the caller ran ``require_files``) and whose ``download`` raises: reading only,
    through tonic's own code. tonic is imported here, at the first read of one of its data sets, so that a
    process that never reads one (N-Digits, CIFAR) does not import tonic at all."""
    import tonic.datasets

    cls = getattr(tonic.datasets, name)
    return type(name, (cls,), {"_check_exists": lambda self: True, "download": _no_download,
                               "__doc__": f"tonic's {name}, reading local files only."})


def open_dataset(cls: type, data_dir, **kwargs):
    """``cls(data_dir, **kwargs)`` (an ``offline`` class); an indexing failure is a ValueError naming the
    folder (e.g. a file or folder name tonic cannot parse into a label)."""
    try:
        return cls(str(data_dir), **kwargs)
    except Exception as e:
        where = pathlib.Path(data_dir).expanduser() / cls.__name__
        raise ValueError(f"{where}: tonic's {cls.__name__} could not index the files "
                         f"({type(e).__name__}: {e})") from e


def read_recording(dataset, index: int) -> np.ndarray:
    """Events of ``dataset[index]`` through tonic's reader; a failure is re-raised naming the file.

    Raises:
      ImportError: the reader needs the ``aedat`` package (CIFAR10-DVS ``.aedat4``) and it is missing.
      ValueError ``"<path>: could not read ..."``: any other reader failure (truncated or corrupt file).
    """
    path = dataset.data[index]
    try:
        events, _ = dataset[index]
    except ModuleNotFoundError as e:
        if e.name == "aedat":
            raise ImportError(f"{path}: reading .aedat4 files needs the 'aedat' package "
                              "(pip install 'aoi-jax[cifar10dvs]', or pip install aedat)") from e
        raise
    except Exception as e:
        raise ValueError(f"{path}: could not read the recording ({type(e).__name__}: {e})") from e
    return events


def check_atis_file(path) -> int:
    """Size in bytes of an N-MNIST / N-Caltech101 ``.bin`` file (5-byte ATIS records).

    Raises:
      ValueError naming the file: its size is not a multiple of 5 (truncated or not an ATIS file).
    """
    size = os.path.getsize(path)
    if size % 5:
        raise ValueError(f"{path}: truncated or corrupt ATIS file: {size} bytes is not a whole number of "
                         "5-byte events")
    return size


def natural_key(path: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``cat_9`` < ``cat_10`` (reproducible, file-system free)."""
    return tuple(int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path)))


def check_labels(labels: Sequence[int], sources: Sequence[str], num_classes: int) -> np.ndarray:
    """Labels as int32 (N,); raises ValueError naming the first file whose label is outside [0, K)."""
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{sources[i]}: label {labels[i]} outside the class range [0, {num_classes})")
    return labels.astype(np.int32)


def warn_if_incomplete(folder, found: int, expected: int, what: str) -> None:
    """Warns when a split has fewer recordings than the official data set (an incomplete extraction)."""
    if found < expected:
        warnings.warn(f"{folder}: found {found} recordings, the official {what} has {expected}; the folder "
                      "looks incompletely extracted (continuing with what is there)", stacklevel=3)


# ------------------------------------------------------------------------------------------------ frames

def output_hw(native_hw: tuple[int, int], size: Sequence[int]) -> tuple[int, int]:
    """The frame size (H', W'): ``size`` or, if empty, the native one.

    Raises:
      ValueError: ``size`` is not () or (H', W') with 1 <= H' <= H and 1 <= W' <= W (no upsampling).
    """
    size = tuple(int(s) for s in size)
    if size == ():
        return tuple(native_hw)
    if len(size) != 2 or not (1 <= size[0] <= native_hw[0] and 1 <= size[1] <= native_hw[1]):
        raise ValueError(f"data.size = {size} must be () or (H, W) with 1 <= H <= {native_hw[0]} and "
                         f"1 <= W <= {native_hw[1]} (the native sensor; only downsampling is supported)")
    return size


def downsample(events: np.ndarray, native_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Event coordinates scaled to ``out_hw``: ``x' = floor(x W'/W)``, ``y' = floor(y H'/H)``; a copy
    (or ``events`` itself when the sizes are equal). No event is dropped."""
    if tuple(out_hw) == tuple(native_hw):
        return events
    out = events.copy()
    (H, W), (Ho, Wo) = native_hw, out_hw
    out["x"] = (events["x"].astype(np.int64) * Wo // W).astype(events.dtype["x"])
    out["y"] = (events["y"].astype(np.int64) * Ho // H).astype(events.dtype["y"])
    return out


def recording_frames(events: np.ndarray, timesteps: int, sensor_size, out_hw: tuple[int, int], source: str,
                     window=()) -> tuple[np.ndarray, float]:
    """One recording's counts, (T, H', W', 2) float32, channels last (channel 0 = polarity 0), and its bin
    duration in us.

    Validates against the native ``sensor_size`` (W, H, P) (errors and warnings name ``source``),
    downsamples to ``out_hw`` and integrates over ``[t_start, t_end] = events.window_bounds(t, window)``
    (``window`` = ``DataConfig.window``; () = the recording's own span)::

        bin_us = (t_end - t_start) / T,   or 0 when no event lies in the window (an empty recording too)
    """
    events_lib.check_events(events, sensor_size, source)
    W, H, P = (int(s) for s in sensor_size)
    ev = downsample(events, (H, W), out_hw)
    t_start, t_end = events_lib.window_bounds(ev["t"], window) if len(ev) else (None, None)
    frames = events_lib.integrate(ev, timesteps, (out_hw[1], out_hw[0], P), t_start, t_end, source=source)
    bin_us = (t_end - t_start) / int(timesteps) if frames.any() else 0.0
    return frames.transpose(0, 2, 3, 1), float(bin_us)


# ------------------------------------------------------------------------------------------------- cache

def files_digest(sources: Sequence[str], labels: Sequence[int], base) -> str:
    """SHA-256 over (path relative to ``base``, size in bytes, label) of each recording, in order."""
    h = hashlib.sha256()
    for path, label in zip(sources, labels):
        h.update(f"{os.path.relpath(path, base)}\t{os.path.getsize(path)}\t{int(label)}\n".encode())
    return h.hexdigest()


def cache_key(settings: dict) -> str:
    """16 hex digits of the SHA-256 of the JSON of ``settings`` (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(data_dir, dataset: str, split: str, timesteps: int, out_hw, key: str) -> pathlib.Path:
    return (pathlib.Path(data_dir).expanduser() / CACHE_DIRNAME / dataset
            / f"{split}_T{int(timesteps)}_{out_hw[0]}x{out_hw[1]}_{key}")


def _open_valid(folder: pathlib.Path, key: str, settings: dict, n: int):
    """(frames memmap, labels, bin_us) of a complete cache matching ``key``/``settings``; None if absent;
    raises ValueError describing the mismatch if the folder exists but cannot be trusted."""
    meta_path = folder / "meta.json"
    if not folder.is_dir():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("settings") != settings:
            raise ValueError("meta.json holds other settings")
        records = meta.get("files")
        if not isinstance(records, dict) or sorted(records) != list(CACHE_FILES):
            raise ValueError(f"meta.json holds no size and checksum record of {', '.join(CACHE_FILES)}")
        damaged = integrity.folder_problems(folder, records)
        if damaged:
            raise ValueError("; ".join(damaged))
        frames = np.load(folder / "frames.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
        bin_us = np.load(folder / "bin_us.npy")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"frame cache {folder} cannot be trusted ({type(e).__name__}: {e})") from e
    if (list(frames.shape) != meta.get("shape") or str(frames.dtype) != meta.get("dtype") or labels.shape != (n,)
            or bin_us.shape != (n,) or bin_us.dtype != np.float64):
        raise ValueError(f"frame cache {folder} cannot be trusted: arrays {frames.shape} {frames.dtype}, "
                         f"labels {labels.shape}, bin_us {bin_us.shape} {bin_us.dtype} differ from meta.json "
                         f"{meta.get('shape')} {meta.get('dtype')}")
    return frames, labels, bin_us


def _build(tmp: pathlib.Path, frame_shape: tuple, read: Callable[[int], np.ndarray], sources: Sequence[str],
           sensor_size, window, progress) -> dict:
    """Writes ``frames.npy`` and ``bin_us.npy`` into ``tmp``, growing the frames' dtype along COUNT_DTYPES
    as counts require."""
    n, level, path = len(sources), 0, tmp / "frames_uint8.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=COUNT_DTYPES[0], shape=(n, *frame_shape))
    bin_us = np.zeros(n, np.float64)
    empty, top = [], 0
    T, H, W, _ = frame_shape
    for i in range(n):
        ev = read(i)
        if len(ev) == 0:
            empty.append(os.path.basename(sources[i]))
        f, bin_us[i] = recording_frames(ev, T, sensor_size, (H, W), sources[i], window)
        m = int(f.max(initial=0))
        while m > np.iinfo(COUNT_DTYPES[level]).max:
            if level + 1 == len(COUNT_DTYPES):
                raise ValueError(f"{sources[i]}: a frame count of {m} does not fit uint32")
            level += 1
            new_path = tmp / f"frames_{np.dtype(COUNT_DTYPES[level]).name}.npy"
            new = np.lib.format.open_memmap(new_path, mode="w+", dtype=COUNT_DTYPES[level], shape=out.shape)
            for a in range(0, i, 256):
                new[a:min(a + 256, i)] = out[a:min(a + 256, i)]
            del out
            os.unlink(path)
            out, path = new, new_path
        out[i] = f
        top = max(top, m)
        if progress is not None:
            progress(i + 1, n)
    out.flush()
    dtype = str(out.dtype)
    del out
    os.replace(path, tmp / "frames.npy")
    np.save(tmp / "bin_us.npy", bin_us)
    return {"dtype": dtype, "max_count": top, "empty_recordings": empty}


def cached_frames(data_dir, *, dataset: str, split: str, sources: Sequence[str], labels: np.ndarray,
                  read: Callable[[int], np.ndarray], sensor_size, timesteps: int, out_hw: tuple[int, int],
                  window, base, settings: dict, progress: Callable[[int, int], None] | None = None):
    """Frames (N, T, H', W', 2) of one split and their bin durations, read from the cache or built once
    and cached.

    Args:
      data_dir: root of the data (the cache goes to ``<data_dir>/frame_cache/``).
      dataset, split: names, part of the key and the folder name.
      sources: the N recordings' file paths, in the order of the frames.  labels: (N,) int32.
      read: ``read(i) -> events`` of recording i (structured array, native coordinates).
      sensor_size: native (W, H, P).  timesteps: T.  out_hw: frame size (H', W').
      window: ``DataConfig.window``, () or (start_us, length_us) relative to each recording's first event.
      base: folder the ``sources`` are keyed relative to (the tonic data set folder).
      settings: the loader's extra key entries (reader version, split rule, ...).
      progress: optional ``progress(done, total)`` called while building.
    Returns:
      ``(frames, labels, bin_us)``: a read-only ``np.memmap`` in the cache's count dtype, (N,) int32 and
      (N,) float64 microseconds per bin (``recording_frames``).
    """
    labels = np.asarray(labels, np.int32)
    T, (H, W) = int(timesteps), out_hw
    if T < 1:
        raise ValueError(f"data.timesteps must be >= 1, got {timesteps}")
    full = {"cache_version": CACHE_VERSION, "dataset": dataset, "split": split, "timesteps": T,
            "size": [int(H), int(W)], "window": [int(w) for w in window],
            "sensor_size": [int(s) for s in sensor_size], "recordings": len(sources),
            "files_sha256": files_digest(sources, labels, base), **settings}
    key = cache_key(full)
    folder = cache_dir(data_dir, dataset, split, T, out_hw, key)
    try:
        found = _open_valid(folder, key, full, len(sources))
    except ValueError as e:
        warnings.warn(f"{e}; rebuilding it", stacklevel=2)
        shutil.rmtree(folder)
        found = None
    if found is not None:
        if not np.array_equal(found[1], labels):
            raise ValueError(f"frame cache {folder}: labels differ from the data set's (hash collision?)")
        return found
    with integrity.writing(folder.parent, 0):
        folder.parent.mkdir(parents=True, exist_ok=True)
    gone = integrity.remove_leftovers(folder.parent, f".tmp-{folder.name}-")
    if gone:
        log.warning("removed the temporary folders of an interrupted build of %s: %s", folder,
                    ", ".join(p.name for p in gone))
    tmp = integrity.make_temp_folder(folder.parent, f".tmp-{folder.name}-")
    nbytes = len(sources) * T * int(H) * int(W) * 2
    try:
        with integrity.writing(tmp, nbytes):
            info = _build(tmp, (T, H, W, 2), read, sources, sensor_size, window, progress)
            np.save(tmp / "labels.npy", labels)
            meta = {"key": key, "settings": full, "shape": [len(sources), T, int(H), int(W), 2], **info,
                    "files": {name: integrity.digest(tmp / name) for name in CACHE_FILES}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process published the same cache first: use theirs
            if _open_valid(folder, key, full, len(sources)) is None:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open_valid(folder, key, full, len(sources))


__all__ = ["require_files", "offline", "open_dataset", "read_recording", "check_atis_file", "natural_key",
           "check_labels", "warn_if_incomplete", "output_hw", "downsample", "recording_frames", "files_digest",
           "cache_key", "cache_dir", "cached_frames", "CACHE_VERSION", "CACHE_DIRNAME"]
