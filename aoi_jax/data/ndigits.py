"""N-Digits: scikit-learn's handwritten digits turned into DVS events the way N-MNIST was recorded.

The 1797 digits of ``sklearn.datasets.load_digits`` (8x8, values 0..16, 10 classes; shipped with
scikit-learn, no network) are shown to an emulated 34x34 DVS sensor that moves along three saccades, like
the pan-tilt recording of N-MNIST (Orchard et al. 2015). All parameters live in ``NDigitsParams``:

Scene. The 8x8 digit (zero outside) is upscaled bilinearly to ``digit_px`` x ``digit_px`` and centred on
the ``sensor_px`` x ``sensor_px`` sensor; the sensor pixel (x, y) at time t sees the continuous bilinear
image at ``(x - x0 - dx(t), y - y0 - dy(t))`` (sub-pixel shifts, one 2-D interpolation per step, written as
two small interpolation matrices). Intensity ``I = background + (1 - background) * digit / 16``, log
intensity ``L = log(I)``.

Motion. ``(dx, dy)(t)`` runs around an equilateral triangle of side ``saccade_px`` centred on the origin,
three saccades of ``saccade_ms`` each (vertex 0 -> 1 -> 2 -> 0), each with a raised-cosine profile
``V_a + (V_b - V_a) (1 - cos(pi s)) / 2`` (at rest at the vertices, as a pan-tilt unit). Recording length
``duration_us = 3 * saccade_ms * 1000``.

Pixel array, simulated in steps of ``dt_us`` (step k covers (t_{k-1}, t_k]):

- per-pixel, per-polarity contrast thresholds ``C_on, C_off ~ N(threshold, threshold_sigma)`` clipped to
  ``>= threshold_min``: one sensor, so the same mismatch for every sample;
- each pixel keeps a reference level ``L_ref``, initialised to ``L(0) - u`` with ``u ~ U(-C_off, C_on)``
  per pixel and sample (an arbitrary phase of the pixel's last reset);
- ``n = floor((L - L_ref) / C_on)`` ON events when positive, ``n = floor((L_ref - L) / C_off)`` OFF events
  when negative; ``L_ref`` moves by ``n C``; the j-th event is timestamped where ``L`` crosses
  ``L_ref + j C``, interpolated linearly between ``L(t_{k-1})`` and ``L(t_k)`` (so several events per step
  are spread inside it);
- refractory period ``refractory_us``: an event less than that after the pixel's previous event is dropped
  (``L_ref`` still moves: the pixel is held in reset);
- background noise: per sample ``Poisson(noise_hz * sensor_px^2 * duration)`` events at uniform pixels,
  times and polarities, merged in (not subject to the refractory period).

Randomness: the thresholds come from ``default_rng([seed, 0])``; sample i's reference phases and noise from
``default_rng([seed, 1, i])``, so a sample's events do not depend on which other samples are generated.

Output per sample: a tonic structured array (``tonic.io.events_struct``: x, y int16, t int64 us, p bool),
sorted by t, with 0 <= t <= duration_us, inside the sensor; p = True is ON (frame channel 1).

On disk (``<data_dir>/ndigits/``), written atomically (temp file + ``os.replace``), named by a hash of the
parameters, the seed and ``FORMAT_VERSION`` so changed settings are never reused, each file with a size and
SHA-256 record ``<file>.sha256.json`` (``aoi_jax.integrity``) that every load checks (a mismatch warns naming
the file and rebuilds it):
``events_s<seed>_<key>.npz`` (compressed; x, y uint8, t uint32 us, p bool, concatenated; ``offsets``
(N + 1,), ``labels``) and ``frames_T<T>_<key>.npy`` ((N, T, H, W, 2) counts, uint8 if they fit, else
uint16). Frames come from ``events.integrate`` over ``[0, duration_us]``. A fixed stratified split
(``split_indices``: ``test_fraction`` of each class, seeded) gives train/test.

With the defaults: about 2400 events per sample (ON/OFF about 50/50), 15 MB of events and 42 MB of frames
at T = 10 on disk; a cached load reads each file once (its checksum).

``HARD`` is the harder variant (registry name ``ndigits_hard``): lower contrast, fewer events, more
background noise, slower saccades.
"""

import dataclasses
import hashlib
import json
import pathlib
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from aoi_jax import integrity
from aoi_jax.data import events as events_lib

FORMAT_VERSION = 1
NUM_CLASSES = 10
NUM_SAMPLES = 1797
EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])  # == tonic.io.events_struct


@dataclasses.dataclass(frozen=True)
class NDigitsParams:
    """Generator settings; every field enters the cache key."""

    sensor_px: int = 34  # sensor width = height (N-MNIST: 34)
    digit_px: float = 28.0  # side of the upscaled digit, centred on the sensor (N-MNIST: 28)
    background: float = 0.25  # intensity of digit value 0 (value 16 -> 1.0); sets the log contrast
    saccade_px: float = 3.0  # side of the equilateral saccade triangle, in sensor pixels
    saccade_ms: float = 100.0  # duration of each of the 3 saccades
    dt_us: int = 1000  # simulation step
    threshold: float = 0.2  # mean contrast threshold (log intensity), both polarities
    threshold_sigma: float = 0.03  # per-pixel, per-polarity threshold mismatch (std)
    threshold_min: float = 0.05  # thresholds are clipped below at this value
    refractory_us: float = 500.0  # per-pixel refractory period
    noise_hz: float = 0.2  # background noise events per pixel per second (random polarity)
    test_fraction: float = 0.2  # fraction of each class in the test split

    @property
    def duration_us(self) -> int:
        return int(round(3 * self.saccade_ms * 1000))

    @property
    def sensor_size(self) -> tuple[int, int, int]:
        return (self.sensor_px, self.sensor_px, 2)

    def __post_init__(self):
        if self.duration_us % self.dt_us:
            raise ValueError(f"NDigitsParams: 3 * saccade_ms = {3 * self.saccade_ms} ms is not a multiple of "
                             f"dt_us = {self.dt_us}")
        if not 0 < self.duration_us < 2**32:
            raise ValueError(f"NDigitsParams: recording of {self.duration_us} us must be in (0, 2**32) us")
        if not 0.0 < self.background < 1.0:
            raise ValueError(f"NDigitsParams.background must be in (0, 1), got {self.background}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"NDigitsParams.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.digit_px + self.saccade_px > self.sensor_px:
            raise ValueError(f"NDigitsParams: digit_px + saccade_px = {self.digit_px + self.saccade_px} exceeds "
                             f"sensor_px = {self.sensor_px}")


HARD = NDigitsParams(background=0.5, saccade_ms=150.0, threshold=0.3, threshold_sigma=0.06, noise_hz=2.5)
"""N-Digits Hard (``data.name = "ndigits_hard"``): the same digits, sensor model and saccade triangle under
the worse conditions of a dim scene, so that the evidence for a class accumulates over the recording
instead of being complete after the first time bins. Differences from the defaults, each physical:

- ``background = 0.5`` (0.25): lower contrast, a log step of ``log 2`` instead of ``log 4`` between a
  full stroke and the background;
- ``threshold = 0.3``, ``threshold_sigma = 0.06`` (0.2, 0.03): a less sensitive, more mismatched pixel
  array. With the lower contrast a full edge crosses ``log 2 / 0.3 ~ 2.3`` levels instead of
  ``log 4 / 0.2 ~ 6.9``, so a sample holds several times fewer events from the digit;
- ``saccade_ms = 150`` (100): slower saccades, a 450 ms recording, so the digit's events are spread
  thinner against the constant noise rate;
- ``noise_hz = 2.5`` (0.2): the background activity of a dim scene,
  ``2.5 * 34^2 * 0.45 s ~ 1300`` noise events per sample, uniform over the time bins.

Noise then outnumbers the digit's events in every time bin. Cached under its own key
(``cache_key(HARD, seed)``) next to the default's; the README lists its event statistics.
"""


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float in [0, 16] and labels (1797,) int32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int32)


def saccade_path(params: NDigitsParams) -> np.ndarray:
    """Digit displacement (dx, dy) in pixels at the step boundaries t_k = k dt, k = 0..K: shape (K + 1, 2)."""
    r = params.saccade_px / np.sqrt(3.0)  # circumradius of the triangle
    ang = np.deg2rad([90.0, 210.0, 330.0])
    verts = r * np.stack([np.cos(ang), np.sin(ang)], 1)
    t = np.arange(params.duration_us // params.dt_us + 1) * params.dt_us
    sac_us = params.saccade_ms * 1000
    i = np.minimum((t // sac_us).astype(int), 2)
    s = (t - i * sac_us) / sac_us
    a, b = verts[i], verts[(i + 1) % 3]
    return a + (b - a) * ((1 - np.cos(np.pi * s)) / 2)[:, None]


def _interp_matrix(params: NDigitsParams, shift: float) -> np.ndarray:
    """(sensor_px, 8) bilinear weights: sensor pixel -> source digit pixels, zero outside the digit."""
    n = params.sensor_px
    x0 = (n - params.digit_px) / 2
    u = np.arange(n) - x0 - shift  # coordinate in the upscaled digit (pixel units, left edge 0)
    src = (u + 0.5) * 8.0 / params.digit_px - 0.5  # align-corners=False
    i0 = np.floor(src).astype(int)
    w1 = src - i0
    m = np.zeros((n, 10))  # columns -1..8: one zero pixel of padding each side
    rows = np.arange(n)
    ok = (i0 >= -1) & (i0 <= 8)
    m[rows[ok], i0[ok] + 1] += 1 - w1[ok]
    ok1 = (i0 + 1 >= -1) & (i0 + 1 <= 8)
    m[rows[ok1], i0[ok1] + 2] += w1[ok1]
    return m[:, 1:9].astype(np.float32)


def _render(img: np.ndarray, params: NDigitsParams, shift) -> np.ndarray:
    """Log intensity (B, H, W) float32 of digits (B, 8, 8) scaled to [0, 1], displaced by (dx, dy)."""
    wx = _interp_matrix(params, shift[0])
    wy = _interp_matrix(params, shift[1])
    rows = img @ wx.T  # (B, 8, W)
    out = np.matmul(wy, rows)  # (B, H, W)
    out *= 1.0 - params.background
    out += params.background
    return np.log(out, out=out)


def _thresholds(params: NDigitsParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    c = rng.normal(params.threshold, params.threshold_sigma, (2, params.sensor_px, params.sensor_px))
    c = np.maximum(c, params.threshold_min).astype(np.float32)
    return c[0], c[1]  # C_on, C_off


def _simulate_chunk(img, rngs, params, c_on, c_off, path, progress, done, total):
    """Events of one chunk of samples: arrays (sample-in-chunk, x, y, t [us float], on) over all steps.

    Pixels are addressed by their flat index ``(b * n + y) * n + x`` into the (B, n, n) arrays (one gather per
    array instead of three index arrays)."""
    B, n = len(img), params.sensor_px
    dt = float(params.dt_us)
    L_prev = _render(img, params, path[0])
    u = np.stack([r.uniform(-1.0, 1.0, (n, n)) for r in rngs]).astype(np.float32)
    L_ref = L_prev - np.where(u > 0, u * c_on, u * c_off)  # u ~ U(-C_off, C_on)
    last = np.full((B, n, n), -np.inf)
    c_min = np.minimum(c_on, c_off)
    c_on_flat, c_off_flat = c_on.ravel(), c_off.ravel()
    ref_flat, last_flat = L_ref.reshape(-1), last.reshape(-1)  # views: writes land in L_ref and last
    out = []
    for k in range(1, len(path)):
        L = _render(img, params, path[k])
        d = L - L_ref
        flat = np.flatnonzero(np.abs(d) >= c_min)
        if len(flat):
            dd = d.reshape(-1)[flat]
            pix = flat % (n * n)
            on = dd > 0
            C = np.where(on, c_on_flat[pix], c_off_flat[pix])
            cnt = np.floor(np.abs(dd) / C).astype(np.int64)
            fire = cnt > 0
            flat, dd, on, C, cnt = (a[fire] for a in (flat, dd, on, C, cnt))
            sgn = np.where(on, 1.0, -1.0)
            lp, lr = L_prev.reshape(-1)[flat].astype(np.float64), ref_flat[flat].astype(np.float64)
            dl = np.maximum(np.abs(L.reshape(-1)[flat] - lp), 1e-12)  # L crossed at least one level since t_{k-1}
            C64 = C.astype(np.float64)
            frac1 = np.clip(sgn * (lr + sgn * C64 - lp) / dl, 0.0, 1.0)  # first crossing within the step
            t1 = (k - 1) * dt + frac1 * dt
            s = C64 / dl * dt  # spacing of successive crossings (linear L within the step)
            lt = last_flat[flat]
            j0 = np.maximum(0.0, np.ceil((lt + params.refractory_us - t1) / s))  # first event past refractory
            m = np.maximum(1.0, np.ceil(params.refractory_us / s - 1e-9))  # keep every m-th crossing
            kept = np.maximum(0, (cnt - j0 + m - 1) // m).astype(np.int64)
            ref_flat[flat] += (sgn * cnt * C).astype(np.float32)
            has = kept > 0
            last_flat[flat[has]] = t1[has] + (j0[has] + (kept[has] - 1) * m[has]) * s[has]
            rep = np.repeat(np.arange(len(flat)), kept)
            q = np.arange(len(rep)) - np.repeat(np.cumsum(kept) - kept, kept)
            ts = t1[rep] + (j0[rep] + q * m[rep]) * s[rep]
            b, yx = np.divmod(flat[rep], n * n)
            y, x = np.divmod(yx, n)
            out.append((b, x, y, np.minimum(ts, k * dt), on[rep]))
        L_prev = L
        if progress is not None:
            progress(done + k * B // (len(path) - 1), total)
    if not out:
        return [np.zeros(0, int)] * 4 + [np.zeros(0, bool)]
    return [np.concatenate(a) for a in zip(*out)]


def generate(indices: Sequence[int] | None = None, *, params: NDigitsParams = NDigitsParams(), seed: int = 0,
             chunk: int = 256, progress: Callable[[int, int], None] | None = None):
    """Generates N-Digits events for the given sample indices (default: all 1797).

    Args:
      indices: positions in scikit-learn's digit order; a sample's events do not depend on the others.
      params: generator settings.  seed: generator seed.  chunk: samples simulated together (memory only).
      progress: optional ``progress(done, total)`` callback, in samples.
    Returns:
      ``(events, offsets, labels)``: one structured array (``EVENT_DTYPE``) holding every sample's events,
      sample i's at ``events[offsets[i]:offsets[i + 1]]`` sorted by t; ``offsets`` (N + 1,) int64;
      ``labels`` (N,) int32.
    """
    images, labels = digits()
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(labels))):
        raise ValueError(f"N-Digits indices must be a 1-D sequence in [0, {len(labels)}), got {indices!r}")
    images = images[idx] / 16.0
    c_on, c_off = _thresholds(params, seed)
    path = saccade_path(params)
    n, dur = params.sensor_px, params.duration_us
    parts = []
    for start in range(0, len(idx), chunk):
        sl = slice(start, start + chunk)
        rngs = [np.random.default_rng([seed, 1, int(i)]) for i in idx[sl]]
        b, x, y, t, on = _simulate_chunk(images[sl], rngs, params, c_on, c_off, path, progress, start, len(idx))
        parts.append((b + start, x, y, np.floor(t).astype(np.int64), on))
        for j, r in enumerate(rngs):  # background noise, after the simulation's draws
            m = r.poisson(params.noise_hz * n * n * dur * 1e-6)
            parts.append((np.full(m, start + j), r.integers(0, n, m), r.integers(0, n, m),
                          r.integers(0, dur + 1, m), r.integers(0, 2, m).astype(bool)))
    b, x, y, t, p = (np.concatenate(a) for a in zip(*parts)) if parts else [np.zeros(0, int)] * 5
    order = np.argsort(b.astype(np.int64) * (dur + 1) + t, kind="stable")
    ev = np.zeros(len(order), EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x[order], y[order], t[order], p[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=len(idx)))]).astype(np.int64)
    return ev, offsets, labels[idx]


def split_events(events: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Per-sample views ``events[offsets[i]:offsets[i + 1]]``."""
    return [events[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def cache_key(params: NDigitsParams, seed: int) -> str:
    """12 hex digits of a hash of the parameters, the seed and ``FORMAT_VERSION``."""
    blob = json.dumps({"params": dataclasses.asdict(params), "seed": int(seed), "version": FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _paths(data_dir, params, seed, timesteps=None) -> tuple[pathlib.Path, pathlib.Path | None]:
    root = pathlib.Path(data_dir) / "ndigits"
    key = cache_key(params, seed)
    frames = None if timesteps is None else root / f"frames_T{int(timesteps)}_{key}.npy"
    return root / f"events_s{int(seed)}_{key}.npz", frames


def _write_atomic(path: pathlib.Path, write: Callable) -> None:
    """Writes a cache file atomically, then its size and checksum record (``integrity.write_sidecar``)."""
    integrity.write_atomic(path, write)
    integrity.write_sidecar(path)


def _intact(path: pathlib.Path) -> bool:
    """Whether the cache file ``path`` exists and matches its record; a damaged one warns, naming the file."""
    if not path.is_file():
        return False
    problem = integrity.check_sidecar(path)
    if problem is not None:
        warnings.warn(f"N-Digits cache {path} fails its check ({problem}); rebuilding it", stacklevel=3)
    return problem is None


def load_events(data_dir, *, params: NDigitsParams = NDigitsParams(), seed: int = 0,
                progress: Callable[[int, int], None] | None = None):
    """All 1797 samples' ``(events, offsets, labels)`` as ``generate`` returns them, cached under
    ``<data_dir>/ndigits/events_s<seed>_<key>.npz`` (generated and written on the first call)."""
    path, _ = _paths(data_dir, params, seed)
    if _intact(path):
        with np.load(path) as z:
            fields = {f: z[f] for f in "xytp"}
            ev = np.zeros(len(fields["t"]), EVENT_DTYPE)
            for f, v in fields.items():
                ev[f] = v
            return ev, z["offsets"], z["labels"]
    ev, offsets, labels = generate(params=params, seed=seed, progress=progress)
    xy = np.min_scalar_type(params.sensor_px - 1)
    compact = {"x": ev["x"].astype(xy), "y": ev["y"].astype(xy), "t": ev["t"].astype(np.uint32), "p": ev["p"]}
    _write_atomic(path, lambda f: np.savez_compressed(f, **compact, offsets=offsets, labels=labels))
    return ev, offsets, labels


def frames_from_events(events: np.ndarray, offsets: np.ndarray, timesteps: int, params: NDigitsParams):
    """(N, T, H, W, 2) counts over the window [0, duration_us], in the smallest of uint8/uint16 that fits."""
    H, W, _ = params.sensor_size
    frames = np.zeros((len(offsets) - 1, timesteps, H, W, 2), np.uint16)
    for i, e in enumerate(split_events(events, offsets)):
        f = events_lib.integrate(e, timesteps, params.sensor_size, 0, params.duration_us, source=f"N-Digits #{i}")
        if f.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"N-Digits #{i}: frame counts up to {f.max()} do not fit uint16")
        frames[i] = f.transpose(0, 2, 3, 1)  # (T, 2, H, W) -> (T, H, W, 2)
    return frames.astype(np.uint8) if frames.max(initial=0) <= np.iinfo(np.uint8).max else frames


def load_frames(data_dir, timesteps: int, *, params: NDigitsParams = NDigitsParams(), seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All samples' frames (N, T, H, W, 2) and labels (N,), cached as ``frames_T<T>_<key>.npy``.

    A cached frame file is memory-mapped and the labels read alone from the events file: no regeneration.
    Both files are checked against their records first; a damaged one is rebuilt (``load_events`` warns
    about the events file).
    """
    ev_path, fr_path = _paths(data_dir, params, seed, timesteps)
    if _intact(fr_path) and integrity.check_sidecar(ev_path) is None:
        with np.load(ev_path) as z:
            labels = z["labels"]
        return np.load(fr_path, mmap_mode="r"), labels
    ev, offsets, labels = load_events(data_dir, params=params, seed=seed, progress=progress)
    frames = frames_from_events(ev, offsets, timesteps, params)
    _write_atomic(fr_path, lambda f: np.save(f, frames))
    return frames, labels


def split_indices(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: per class, ``round(test_fraction * n_c)`` samples drawn (seeded) for test.

    Returns sorted, disjoint (train, test) index arrays covering ``range(len(labels))``.
    """
    rng = np.random.default_rng([seed, 2])
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[:int(round(test_fraction * len(members)))])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_splits(data_cfg, *, params: NDigitsParams = NDigitsParams(),
                progress: Callable[[int, int], None] | None = None):
    """``(train, test)`` FrameSets of N-Digits for an ``aoi_jax.config.DataConfig``.

    Uses ``data_cfg.data_dir`` (cache root), ``data_cfg.timesteps`` (T) and ``data_cfg.seed`` (generator
    and split seed). Frames are (N, T, 34, 34, 2) counts (uint8/uint16; ``batches`` gives float32) over
    the fixed window [0, duration_us], so every sample's ``bin_us`` is ``duration_us / T``.

    Raises:
      ValueError: ``data_cfg.size`` asks for a frame size other than the native 34x34, or ``data_cfg.window``
        is not () (N-Digits has its own fixed window).
    """
    native = (params.sensor_px, params.sensor_px)
    if tuple(data_cfg.size) not in ((), native):
        raise ValueError(f"N-Digits frames are {native}; data.size = {tuple(data_cfg.size)} is not supported "
                         "(use data.size=() )")
    if tuple(data_cfg.window) != ():
        raise ValueError(f"N-Digits frames span the fixed window [0, {params.duration_us}] us; data.window = "
                         f"{tuple(data_cfg.window)} is not supported (use data.window=() )")
    frames, labels = load_frames(data_cfg.data_dir, data_cfg.timesteps, params=params, seed=data_cfg.seed,
                                 progress=progress)
    train, test = split_indices(labels, params.test_fraction, data_cfg.seed)
    bin_us = np.full(len(labels), params.duration_us / data_cfg.timesteps)
    return (events_lib.FrameSet(frames[train], labels[train], NUM_CLASSES, native, bin_us[train]),
            events_lib.FrameSet(frames[test], labels[test], NUM_CLASSES, native, bin_us[test]))


__all__ = ["NDigitsParams", "HARD", "generate", "split_events", "load_events", "load_frames", "frames_from_events",
           "split_indices", "load_splits", "cache_key", "saccade_path", "digits", "EVENT_DTYPE", "NUM_CLASSES"]
