"""CIFAR-10 and CIFAR-100 from the standard python-pickle batches, with the reference's augmentation.

Files, in ``data_dir`` (no download; numpy and pickle only)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch     keys b"data", b"labels"
    cifar-100-python/train, test                                     keys b"data", b"fine_labels"

Each batch is a pickled dict (bytes keys); ``b"data"`` is uint8 (n, 3072), each row the 1024 red, then
1024 green, then 1024 blue values of a 32x32 image in row-major order. CIFAR-100 uses its 100 fine labels.

The reference (``datasets/get_cifar10.py``, ``get_cifar100.py``) trains with RandomCrop(32, padding=4),
RandomHorizontalFlip, CIFAR10Policy (AutoAugment), ToTensor, Normalize, Cutout(1 hole, 16 px) and tests
with ToTensor and Normalize. Here images are normalised once at load time, and ``augment`` reproduces
the crop (padding with black, i.e. the normalised value of 0), the flip and Cutout (zeros after
normalisation) with an explicit ``np.random.Generator``. AutoAugment is left out.
"""

import pathlib
import pickle
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from aoi_jax.data import augment as augment_lib
from aoi_jax.data import static
from aoi_jax.data.events import FrameSet

class Spec(NamedTuple):
    folder: str  # inside data_dir
    train: tuple[str, ...]  # batch files of the training split
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]  # the reference's Normalize, RGB
    std: tuple[float, float, float]
    archive: str  # the official archive that unpacks into ``folder``


SPECS = {
    "cifar10": Spec("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                    b"labels", 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar-10-python.tar.gz"),
    "cifar100": Spec("cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                     tuple(n / 255.0 for n in (129.3, 124.1, 112.4)), tuple(n / 255.0 for n in (68.2, 65.4, 70.4)),
                     "cifar-100-python.tar.gz"),
}


def _spec(name) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR data set {name!r}; valid: {sorted(SPECS)}")
    return SPECS[name]


def read_batch(path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> (images uint8 (n, 32, 32, 3) channels-last, labels int32 (n,)).

    Raises:
      ValueError: the file lacks b"data" or the label key, or the shapes do not fit, naming the file.
    """
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}, found {keys}")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: b'data' must be (n, 3072) with n labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_raw(data_dir, name: str, *, progress: Callable[[int, int], None] | None = None
             ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)), images uint8 (N, 32, 32, 3), file order.

    ``progress(done, total)``, if given, is called after each batch file read (in files).

    Raises:
      FileNotFoundError: the folder or a batch file is missing; the message says what to put where.
      ValueError: unknown name, or a malformed batch.
    """
    spec = _spec(name)
    root = pathlib.Path(data_dir) / spec.folder
    missing = [str(root / f) for f in spec.train + spec.test if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {missing}. Put the python-pickle version of {name.upper()} into data_dir = "
            f"{str(data_dir)!r}: the folder {spec.folder}/ with {', '.join(spec.train + spec.test)} (the "
            f"archive {spec.archive} unpacked there); nothing is downloaded")

    files = spec.train + spec.test
    parts = []
    for f in files:
        parts.append(read_batch(root / f, spec.label_key))
        if progress is not None:
            progress(len(parts), len(files))

    def join(parts):
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return join(parts[:len(spec.train)]), join(parts[len(spec.train):])


def normalise(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 (..., 3) -> float32 ``(images / 255 - mean) / std`` per channel (the reference's Normalize)."""
    spec = _spec(name)
    return (images.astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def load_splits(data_cfg, *, progress: Callable[[int, int], None] | None = None) -> tuple[FrameSet, FrameSet]:
    """(train, test) of ``data_cfg.name`` ("cifar10" | "cifar100") from ``data_cfg.data_dir``.

    Frames are the normalised images repeated ``data_cfg.timesteps`` times, (N, T, 32, 32, 3) float32
    (a broadcast view: one copy per image in memory). ``progress`` as in ``load_raw``.

    Raises:
      FileNotFoundError: the batches are not in data_dir (see ``load_raw``).
      ValueError: data.size asks for a size other than 32x32.
    """
    if tuple(data_cfg.size) not in ((), (32, 32)):
        raise ValueError(f"CIFAR images are 32x32; data.size = {tuple(data_cfg.size)} is not supported")
    (x_tr, y_tr), (x_te, y_te) = load_raw(data_cfg.data_dir, data_cfg.name, progress=progress)
    k = _spec(data_cfg.name).num_classes
    return tuple(FrameSet(static.repeat(normalise(x, data_cfg.name), data_cfg.timesteps), y, k, (32, 32))
                 for x, y in ((x_tr, y_tr), (x_te, y_te)))


def augment(frames: np.ndarray, rng: np.random.Generator, data_cfg) -> np.ndarray:
    """The reference's CIFAR training augmentation on a normalised batch, the same for every time step.

    ``aoi_jax.data.augment.augment`` with black fill (the reference pads before Normalize), in its order::

        crop:   pad P = data.translate px of black, take the 32x32 window at top, left ~ U{0..2P}
        flip:   mirror left-right with probability 1/2                       (if data.hflip)
        cutout: a square of side S = data.cutout zeroed, cut at the border   (if S > 0)

    Args:
      frames: (T, B, H, W, C) normalised images (a batch of ``data.batches``).
      rng: the generator; the result is a function of its state.  data_cfg: a DataConfig of a CIFAR set.
    """
    black = normalise(np.zeros(3, np.uint8), data_cfg.name)
    return augment_lib.augment(frames, rng, data_cfg, frames.shape[2:4], fill=black)


__all__ = ["Spec", "SPECS", "read_batch", "load_raw", "normalise", "load_splits", "augment"]
