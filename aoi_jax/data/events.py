"""Event arrays: validation, integration into count frames, and batching of frame sets (numpy only).

Events are tonic's representation (docs/data.md section 3.1): a 1-D numpy structured array with at least
the fields ``x``, ``y``, ``t``, ``p``, always indexed by name (field order and dtypes vary per data set),
``t`` in microseconds, sorted. ``sensor_size`` is tonic's ``(W, H, P)``.

Polarity: ``p`` is bool or an integer in ``{0, 1}`` (what tonic's readers produce); ``-1/+1`` polarities
are rejected, not guessed: convert them with ``p = p > 0`` in the reader. Frames have two polarity
channels, channel 0 = polarity 0 (OFF / False), channel 1 = polarity 1 (docs/semantics.md section 10);
a single-polarity sensor (``P == 1``) must give ``p == 0`` and fills channel 0 only.
"""

import dataclasses
import warnings
from collections.abc import Iterator

import numpy as np

REQUIRED_FIELDS = ("x", "y", "t", "p")


def _check_sensor_size(sensor_size, source) -> tuple[int, int, int]:
    try:
        W, H, P = (int(s) for s in sensor_size)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: sensor_size must be (W, H, P), got {sensor_size!r}") from None
    if W < 1 or H < 1 or P not in (1, 2):
        raise ValueError(f"{source}: sensor_size (W, H, P) = {sensor_size!r} needs W, H >= 1 and P in (1, 2)")
    return W, H, P


def check_events(events: np.ndarray, sensor_size, source: str) -> None:
    """Validates an event array against a sensor.

    Args:
      events: 1-D structured array with fields x, y, t, p (any integer dtypes; t may also be float), t in us.
      sensor_size: tonic's (W, H, P), P in (1, 2).
      source: the file path or sample name, quoted in every error message.
    Raises:
      ValueError naming ``source`` and the problem: not a 1-D structured array; a missing field; non-integer
        x, y or p; x outside [0, W) or y outside [0, H) (with the offending value and the sensor size);
        non-finite or negative t; t not sorted (with the first offending index); p outside {0, 1}
        (outside {0} for P == 1; -1/+1 polarities included).
    """
    W, H, P = _check_sensor_size(sensor_size, source)
    if not isinstance(events, np.ndarray) or events.dtype.names is None:
        raise ValueError(f"{source}: events must be a numpy structured array with fields {REQUIRED_FIELDS}, "
                         f"got {type(events).__name__} of dtype {getattr(events, 'dtype', None)}")
    if events.ndim != 1:
        raise ValueError(f"{source}: events must be a 1-D structured array, got shape {events.shape}")
    missing = [f for f in REQUIRED_FIELDS if f not in events.dtype.names]
    if missing:
        raise ValueError(f"{source}: events lack field(s) {missing}; found {list(events.dtype.names)}")
    for f in ("x", "y", "p"):
        kind = events.dtype[f].kind
        if kind not in "iub":
            raise ValueError(f"{source}: field {f!r} must be integer or bool, got dtype {events.dtype[f]}")
    if events.dtype["t"].kind not in "iuf":
        raise ValueError(f"{source}: field 't' must be numeric (microseconds), got dtype {events.dtype['t']}")
    if len(events) == 0:
        return
    for f, size, axis in (("x", W, "W"), ("y", H, "H")):
        v = events[f]
        lo, hi = v.min(), v.max()
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{source}: {f} = {bad} outside the sensor: need 0 <= {f} < {axis} = {size} "
                             f"(sensor_size (W, H, P) = {(W, H, P)})")
    t = events["t"]
    if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
        raise ValueError(f"{source}: t has non-finite values (first at index {int(np.argmin(np.isfinite(t)))})")
    if t.min() < 0:
        raise ValueError(f"{source}: negative timestamp t = {t.min()} (first at index {int(np.argmax(t < 0))})")
    if len(t) > 1:
        back = t[1:] < t[:-1]
        if back.any():
            i = int(np.argmax(back)) + 1
            raise ValueError(f"{source}: t is not sorted: t[{i}] = {t[i]} < t[{i - 1}] = {t[i - 1]}")
    p = events["p"]
    if p.dtype.kind != "b":
        valid = (0, 1) if P == 2 else (0,)
        lo, hi = p.min(), p.max()
        if lo < 0 or hi > valid[-1]:
            bad = lo if lo < 0 else hi
            hint = " (map -1/+1 polarities with p = p > 0)" if lo < 0 else ""
            raise ValueError(f"{source}: polarity p = {bad} outside {set(valid)}{hint}")
    elif P == 1 and p.any():
        raise ValueError(f"{source}: polarity p = True on a single-polarity sensor (P = 1)")


def integrate(events: np.ndarray, timesteps: int, sensor_size, t_start=None, t_end=None, *,
              source: str = "events") -> np.ndarray:
    """Per-pixel, per-polarity event counts in ``T`` equal time bins of the window ``[t_start, t_end]``.

    docs/semantics.md section 10; with ``D = t_end - t_start``::

        bin(e) = floor((t_e - t_start) * T / D),  clipped to T - 1   # t_e == t_end lands in the last bin
        frames[bin(e), p_e, y_e, x_e] += 1          for every event with t_start <= t_e <= t_end

    Unlike tonic's ``ToFrame(n_time_bins=T)`` (docs/data.md section 3.6) no event of the window is dropped
    and a window shorter than T microseconds still counts its events. Edge cases:

    - ``t_start`` / ``t_end`` default to the first / last event, so by default every event is counted.
      Events outside an explicit window are excluded; ``window_bounds`` gives the window of a
      ``DataConfig.window``.
    - Zero-duration window (``D == 0``: one event, or all events at one time): every event goes to bin 0.
    - Empty recording, or no event inside the window: zeros, with a ``warnings.warn`` naming ``source``.

    Args:
      events: structured array (see ``check_events``), validated here.
      timesteps: T >= 1.  sensor_size: tonic's (W, H, P).  t_start, t_end: window in us, t_start <= t_end.
      source: file path or sample name for error and warning messages.
    Returns:
      float32 counts of shape (T, 2, H, W); channel 0 = polarity 0.
    Raises:
      ValueError: invalid events (``check_events``), timesteps < 1, or t_end < t_start.
    """
    check_events(events, sensor_size, source)
    W, H, _ = _check_sensor_size(sensor_size, source)
    T = int(timesteps)
    if T < 1:
        raise ValueError(f"{source}: timesteps must be >= 1, got {timesteps}")
    t = events["t"]
    t = t.astype(np.float64) if t.dtype.kind == "f" else t.astype(np.int64)
    if len(t):
        t_start = t[0] if t_start is None else t_start
        t_end = t[-1] if t_end is None else t_end
    if t_start is not None and t_end is not None and t_end < t_start:
        raise ValueError(f"{source}: window end t_end = {t_end} is before t_start = {t_start}")
    frames = np.zeros((T, 2, H, W), np.float32)
    if len(t) == 0:
        warnings.warn(f"{source}: empty recording, returning all-zero frames", stacklevel=2)
        return frames
    keep = (t >= t_start) & (t <= t_end)
    if not keep.any():
        warnings.warn(f"{source}: no event in the window [{t_start}, {t_end}] (events span [{t[0]}, {t[-1]}]), "
                      "returning all-zero frames", stacklevel=2)
        return frames
    ev = events[keep]
    t = t[keep]
    duration = t_end - t_start
    if duration > 0:
        if t.dtype.kind == "f" or isinstance(t_start, float) or isinstance(t_end, float):
            bins = np.floor((t - t_start) * T / duration).astype(np.int64)
        else:
            bins = (t - int(t_start)) * T // int(duration)  # exact integer arithmetic
        bins = np.minimum(bins, T - 1)
    else:
        bins = np.zeros(len(t), np.int64)
    HW = H * W
    flat = (bins * (2 * HW) + ev["p"].astype(np.int64) * HW + ev["y"].astype(np.int64) * W
            + ev["x"].astype(np.int64))
    frames[:] = np.bincount(flat, minlength=T * 2 * HW).reshape(T, 2, H, W)
    return frames


def window_bounds(t: np.ndarray, window=()) -> tuple:
    """The absolute span ``[t_start, t_end]`` that ``integrate`` bins for a window relative to the first event.

    With ``t_0``, ``t_1`` the recording's first and last timestamps::

        window == ()                      [t_0, t_1]                              the whole recording
        window == (s, L), t_1 >= t_0 + s  [t_0 + s, min(t_0 + s + L, t_1)]        cut at the last event
        window == (s, L), t_1 <  t_0 + s  [t_0 + s, t_0 + s + L]                  no event inside

    So the T bins divide the window itself, ``L / T`` us each, or, for a recording that ends inside the
    window, only the part that exists, ``(t_1 - t_0 - s) / T`` us each (never stretched to the events).

    Args:
      t: (E,) sorted timestamps in us (E >= 1).
      window: ``()`` or ``(start_us, length_us)``, start_us >= 0, length_us > 0 (``DataConfig.window``).
    Returns:
      ``(t_start, t_end)`` as Python numbers (int for integer timestamps), ``t_start <= t_end``.
    """
    cast = float if t.dtype.kind == "f" else int
    t0, t1 = cast(t[0]), cast(t[-1])
    if tuple(window) == ():
        return t0, t1
    start, length = (int(w) for w in window)
    t_start = t0 + start
    return t_start, (t_start + length if t1 < t_start else min(t_start + length, t1))


@dataclasses.dataclass(frozen=True)
class FrameSet:
    """Count frames of a split, one recording per row.

    Attributes:
      frames: (N, T, H, W, C) channels-last: event counts (C = 2 polarities) or static images repeated
        over T (C = 1 or 3); float32 or a compact integer count dtype (uint8, ...);
        may be a ``np.memmap``. ``batches`` converts to float32.
      labels: (N,) class indices in [0, num_classes), stored as int32.
      num_classes: K >= 1.
      sensor_hw: (H, W) of the native sensor the frames come from (differs from the frame size after
        spatial downsampling); defaults to the frames' (H, W).
      bin_us: (N,) float64 microseconds of sensor time per frame bin, per sample (event sets; 0 for a
        sample with no event in its window), or None (static images). A decision after k of the T frames
        is taken ``k * bin_us[n]`` us of sensor time after the start of sample n's window.
    Raises (in ``__post_init__``):
      ValueError naming the problem: frames not 5-D with channels last, non-numeric frames, labels not
        (N,) integers, a label outside [0, num_classes), num_classes < 1, bin_us not (N,) finite and >= 0.
    """

    frames: np.ndarray
    labels: np.ndarray
    num_classes: int
    sensor_hw: tuple[int, int] | None = None
    bin_us: np.ndarray | None = None

    def __post_init__(self):
        f = self.frames
        if not isinstance(f, np.ndarray) or f.ndim != 5 or f.shape[-1] < 1:
            raise ValueError(f"FrameSet.frames must be an (N, T, H, W, C) array, got shape "
                             f"{getattr(f, 'shape', None)}")
        if f.dtype != np.float32 and f.dtype.kind not in "iu":
            raise ValueError(f"FrameSet.frames must be float32 or integer counts, got dtype {f.dtype}")
        if int(self.num_classes) < 1:
            raise ValueError(f"FrameSet.num_classes must be >= 1, got {self.num_classes}")
        labels = np.asarray(self.labels)
        if labels.shape != (f.shape[0],):
            raise ValueError(f"FrameSet.labels must have shape ({f.shape[0]},) to match frames, got {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"FrameSet.labels must be integers, got dtype {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels.min() if labels.min() < 0 else labels.max()
            raise ValueError(f"FrameSet label {bad} out of range [0, {self.num_classes}) "
                             f"(first at index {int(np.argmax(labels == bad))})")
        object.__setattr__(self, "labels", labels.astype(np.int32))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        hw = tuple(f.shape[2:4]) if self.sensor_hw is None else tuple(int(s) for s in self.sensor_hw)
        if len(hw) != 2:
            raise ValueError(f"FrameSet.sensor_hw must be (H, W), got {self.sensor_hw!r}")
        object.__setattr__(self, "sensor_hw", hw)
        if self.bin_us is not None:
            bin_us = np.asarray(self.bin_us, np.float64)
            if bin_us.shape != (f.shape[0],) or not np.all(np.isfinite(bin_us) & (bin_us >= 0)):
                raise ValueError(f"FrameSet.bin_us must be None or ({f.shape[0]},) finite microseconds >= 0, "
                                 f"got shape {bin_us.shape}, range [{bin_us.min(initial=np.inf)}, "
                                 f"{bin_us.max(initial=-np.inf)}]")
            object.__setattr__(self, "bin_us", bin_us)

    def __len__(self) -> int:
        return len(self.labels)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches ``batches`` yields for ``n`` samples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(frameset: FrameSet, batch_size: int, *, rng: np.random.Generator | None = None,
            drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yields time-major batches of a frame set, each sample once per pass.

    Order: ``rng.permutation(N)`` when ``rng`` is given, file order otherwise. The last batch is smaller
    than ``batch_size`` unless ``drop_last``.

    Yields:
      ``{"frames": float32 (T, B, H, W, C), "label": int32 (B,)}``.
    """
    n = len(frameset.labels)
    nb = num_batches(n, batch_size, drop_last)
    order = np.arange(n) if rng is None else rng.permutation(n)
    for b in range(nb):
        idx = order[b * batch_size:(b + 1) * batch_size]
        frames = np.asarray(frameset.frames[idx], dtype=np.float32)
        yield {"frames": np.ascontiguousarray(frames.transpose(1, 0, 2, 3, 4)),
               "label": frameset.labels[idx]}


__all__ = ["check_events", "integrate", "window_bounds", "FrameSet", "batches", "num_batches", "REQUIRED_FIELDS"]
