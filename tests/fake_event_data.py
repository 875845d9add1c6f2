"""Writers of tiny fake event data sets in the exact on-disk layouts tonic 1.7 reads (docs/data.md 3.2, 3.4).

Each ``write_fake_<set>(root, ...)`` lays out ``root/<tonic ClassName>/...`` with the archive placeholder
(a zero-byte file of the archive's name) and returns the ``Recording``s written, so tests can compute the
expected frames independently. Events are random, with sorted timestamps, inside the sensor.

    write_fake_nmnist(root, n_per_class=2)        NMNIST/{train,test}.zip, {Train,Test}/<digit>/NNNNN.bin
    write_fake_dvs_gesture(root)                  DVSGesture/ibmGesture{Train,Test}.tar.gz,
                                                  DVSGesture/ibmGesture{Train,Test}/userNN_<light>/<label>.npy
    write_fake_ncaltech101(root, n_per_class=10)  NCALTECH101/N-Caltech101-archive.zip,
                                                  NCALTECH101/Caltech101/<class>/image_NNNN.bin
    write_fake_cifar10dvs(root, n_per_class=10)   CIFAR10DVS/CIFAR10DVS.zip,
                                                  CIFAR10DVS/<class>/cifar10_<class>_<i>.aedat4

``.bin`` files hold 5-byte ATIS records (the inverse of ``tonic.io.read_mnist_file``); DVS Gesture ``.npy`` files
an N x 4 float array (x, y, p, t in ms); ``.aedat4`` files are written with iniVation's ``dv_processing``
(``MonoCameraWriter``), or, with ``aedat=False``, left empty for a test that replaces tonic's reader
(``fake_read_aedat4``). Nothing here imports aoi_jax.
"""

import dataclasses
import pathlib

import numpy as np


@dataclasses.dataclass
class Recording:
    """One written recording: raw coordinates and timestamps in microseconds as written (before any shift
    tonic applies: N-Caltech101 moves the smallest x and y to 0)."""

    split: str  # "train" / "test" for sets with an official split, "all" otherwise
    path: pathlib.Path
    label: int
    x: np.ndarray
    y: np.ndarray
    t: np.ndarray  # microseconds
    p: np.ndarray  # 0 / 1


def random_events(rng, n, width, height, t_max, x0=0, y0=0):
    """n events with x in [x0, width), y in [y0, height), sorted integer t in [0, t_max], p in {0, 1}."""
    x = rng.integers(x0, width, n)
    y = rng.integers(y0, height, n)
    t = np.sort(rng.integers(0, t_max + 1, n))
    p = rng.integers(0, 2, n)
    return x, y, t, p


def atis_bytes(x, y, t, p) -> bytes:
    """5-byte ATIS records: x, y, p << 7 | t[22:16], t[15:8], t[7:0] (x, y < 256, y != 240, t < 2**23)."""
    x, y, t, p = (np.asarray(a, np.int64) for a in (x, y, t, p))
    if len(t) and (t.max() >= 2**23 or t.min() < 0 or x.max() > 255 or y.max() > 255 or np.any(y == 240)):
        raise ValueError("ATIS records need 0 <= t < 2**23, x, y < 256 and y != 240")
    b = np.zeros((len(t), 5), np.uint8)
    b[:, 0], b[:, 1] = x, y
    b[:, 2] = (p << 7) | ((t >> 16) & 0x7F)
    b[:, 3], b[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    return b.tobytes()


def write_atis(path, x, y, t, p) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(atis_bytes(x, y, t, p))
    return path


def _placeholder(path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def write_fake_nmnist(root, n_per_class=2, *, classes=range(10), n_events=60, t_max=300_000, seed=0):
    """N-MNIST: ``n_per_class`` recordings per digit and split (34x34 sensor, up to ``t_max`` us)."""
    rng = np.random.default_rng(seed)
    base, out = pathlib.Path(root) / "NMNIST", []
    for split, folder, archive in (("train", "Train", "train.zip"), ("test", "Test", "test.zip")):
        _placeholder(base / archive)
        for c in classes:
            for i in range(n_per_class):
                ev = random_events(rng, n_events, 34, 34, t_max)
                path = write_atis(base / folder / str(c) / f"{i + 1:05d}.bin", *ev)
                out.append(Recording(split, path, int(c), *ev))
    return out


def write_gesture_npy(path, x, y, p, t_ms) -> pathlib.Path:
    """DVS Gesture file: N x 4 float64 (x, y, p, t in ms), as in tonic's preprocessed version."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([x, y, p, t_ms], 1).astype(np.float64))
    return path


def write_fake_dvs_gesture(root, *, users=None, lighting="led", classes=range(11), n_events=200, t_max_ms=2000,
                           seed=0):
    """DVS128 Gesture: one recording per class for each user (default users 1, 2 train and 24 test)."""
    users = {"train": (1, 2), "test": (24,)} if users is None else users
    rng = np.random.default_rng(seed)
    base, out = pathlib.Path(root) / "DVSGesture", []
    for split, folder in (("train", "ibmGestureTrain"), ("test", "ibmGestureTest")):
        _placeholder(base / f"{folder}.tar.gz")
        for u in users[split]:
            for c in classes:
                x, y, t_ms, p = random_events(rng, n_events, 128, 128, t_max_ms)
                path = write_gesture_npy(base / folder / f"user{u:02d}_{lighting}" / f"{c}.npy", x, y, p, t_ms)
                out.append(Recording(split, path, int(c), x, y, t_ms * 1000, p))
    return out


def write_fake_ncaltech101(root, n_per_class=10, *, classes=("BACKGROUND_Google", "Faces_easy", "accordion"),
                           n_events=80, t_max=300_000, seed=0):
    """N-Caltech101: ``n_per_class`` recordings per class folder, at a random offset (tonic shifts it away)
    and of random extent up to 240 x 180 (W x H)."""
    rng = np.random.default_rng(seed)
    base, out = pathlib.Path(root) / "NCALTECH101", []
    _placeholder(base / "N-Caltech101-archive.zip")
    for label, c in enumerate(classes):
        for i in range(n_per_class):
            x0, y0 = rng.integers(0, 10, 2)
            w, h = rng.integers(100, 241), rng.integers(80, 181)
            ev = random_events(rng, n_events, x0 + w, y0 + h, t_max, x0, y0)
            path = write_atis(base / "Caltech101" / c / f"image_{i + 1:04d}.bin", *ev)
            out.append(Recording("all", path, label, *ev))
    return out


CIFAR10DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_aedat4(path, x, y, t, p) -> pathlib.Path:
    """An AEDAT4 file of one DVS128 event stream, written by iniVation's ``dv_processing``."""
    import dv_processing as dv

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = dv.EventStore()
    for ti, xi, yi, pi in zip(t.tolist(), x.tolist(), y.tolist(), p.tolist()):
        store.push_back(ti, xi, yi, bool(pi))
    writer = dv.io.MonoCameraWriter(str(path), dv.io.MonoCameraWriter.EventOnlyConfig("DVS128", (128, 128)))
    writer.writeEvents(store)
    del writer  # closes the file
    return path


def write_fake_cifar10dvs(root, n_per_class=10, *, classes=range(10), n_events=60, t_max=300_000, seed=0,
                          aedat=True):
    """CIFAR10-DVS: ``n_per_class`` recordings per class, named ``cifar10_<class>_<i>.aedat4`` (i from 0,
    not zero-padded, as in the real set). ``aedat=False`` writes empty ``.aedat4`` files instead (for tests
    that replace tonic's reader with ``fake_read_aedat4``); ``aedat=True`` needs ``dv_processing``."""
    rng = np.random.default_rng(seed)
    base, out = pathlib.Path(root) / "CIFAR10DVS", []
    _placeholder(base / "CIFAR10DVS.zip")
    for c in classes:
        name = CIFAR10DVS_CLASSES[c]
        for i in range(n_per_class):
            ev = random_events(rng, n_events, 128, 128, t_max)
            ev = (ev[0], ev[1], ev[2] + 1_000_000, ev[3])  # real recordings do not start at t = 0
            path = base / name / f"cifar10_{name}_{i}.aedat4"
            if aedat:
                write_aedat4(path, *ev)
            else:
                _placeholder(path)
            out.append(Recording("all", path, int(c), *ev))
    return out


def fake_read_aedat4(recordings):
    """A stand-in for ``tonic.io.read_aedat4`` returning the recordings' events in aedat's dtype."""
    by_path = {str(r.path): r for r in recordings}
    dtype = np.dtype([("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("p", "?")])

    def read(path):
        r = by_path[str(path)]
        ev = np.zeros(len(r.t), dtype)
        ev["t"], ev["x"], ev["y"], ev["p"] = r.t, r.x, r.y, r.p
        return ev

    return read


__all__ = ["Recording", "random_events", "atis_bytes", "write_atis", "write_gesture_npy", "write_aedat4",
           "write_fake_nmnist", "write_fake_dvs_gesture", "write_fake_ncaltech101", "write_fake_cifar10dvs",
           "fake_read_aedat4", "CIFAR10DVS_CLASSES"]
