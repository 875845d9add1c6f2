"""CIFAR10-DVS (Li et al. 2017): 128x128 DVS recordings of CIFAR-10 images, 10 classes, the reference's
9000/1000 split.

Read through ``tonic.datasets.CIFAR10DVS`` from ``<data_dir>/CIFAR10DVS/`` (docs/data.md section 3.2):
tonic's AEDAT4 version, never downloaded; reading ``.aedat4`` needs the ``aedat`` package (an ImportError
saying so is raised when a frame cache has to be built without it)::

    <data_dir>/CIFAR10DVS/CIFAR10DVS.zip                archive or empty placeholder
    <data_dir>/CIFAR10DVS/<class>/<name>.aedat4         class in airplane ... truck; 1000 files each

Labels: tonic's ``classes`` dict (airplane 0 ... truck 9). Split (docs/semantics.md section 10): within
each class, recordings in natural sorted file order (digit runs compared as numbers, so ``..._9`` comes
before ``..._10``); the first ``int(0.9 * n_c)`` are train, the rest test (900/100 per class on the full
set). Frames: T equal time bins over each recording's ``data.window``, per-polarity counts, optionally
downsampled, cached under ``<data_dir>/frame_cache/cifar10_dvs/``.
"""

import os
import pathlib
from collections.abc import Callable

import numpy as np

from aoi_jax.data import cache
from aoi_jax.data import events as events_lib

NAME = "cifar10_dvs"
READER_VERSION = 1  # bump when the reading or framing below changes frames
NUM_CLASSES = 10
SENSOR_SIZE = (128, 128, 2)  # tonic's (W, H, P)
NATIVE_HW = (128, 128)
TRAIN_FRACTION = 0.9
OFFICIAL_COUNT = 10000
HOW_TO_GET = ("CIFAR10-DVS: tonic's AEDAT4 conversion CIFAR10DVS.zip (figshare file 38023437, from Li et al. 2017, "
              "figshare 4724671) with its per-class archives airplane.zip ... truck.zip extracted to "
              "<class>/*.aedat4; or run tonic.datasets.CIFAR10DVS(save_to=<data_dir>) once on a machine with "
              "network. Reading needs the aedat package: pip install 'aoi-jax[cifar10dvs]'.")


def split_indices(sources: list[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's split: per class, the first ``int(0.9 n_c)`` recordings in natural file order are
    train, the rest test. Returns (train, test) index arrays into ``sources``, each in that order."""
    train, test = [], []
    for c in np.unique(labels):
        members = sorted(np.flatnonzero(labels == c), key=lambda i: cache.natural_key(os.path.basename(sources[i])))
        cut = int(TRAIN_FRACTION * len(members))
        train += members[:cut]
        test += members[cut:]
    return np.asarray(train, np.int64), np.asarray(test, np.int64)


def load_splits(data_cfg, *, progress: Callable[[int, int], None] | None = None):
    """``(train, test)`` FrameSets of CIFAR10-DVS for an ``aoi_jax.config.DataConfig``.

    Uses ``data_dir``, ``timesteps``, ``size`` (() = 128x128) and ``window`` (() = whole recordings).

    Raises:
      FileNotFoundError: the archive or the extracted files are missing (says what is expected where).
      ImportError: frames must be built and the ``aedat`` package is not installed.
      ValueError naming the file: an unknown class folder, a truncated or corrupt file, an event outside the
        sensor, a negative or unsorted timestamp. An empty recording gives zero frames and a warning.
    """
    root = pathlib.Path(data_cfg.data_dir).expanduser()
    base = root / "CIFAR10DVS"
    reader = cache.offline("CIFAR10DVS")
    cache.require_files(base, [reader.filename], [("", "*/*.aedat4")], HOW_TO_GET)
    out_hw = cache.output_hw(NATIVE_HW, data_cfg.size)
    ds = cache.open_dataset(reader, root)
    order = sorted(range(len(ds.data)), key=lambda i: cache.natural_key(ds.data[i]))
    sources = [ds.data[i] for i in order]
    cache.warn_if_incomplete(base, len(sources), OFFICIAL_COUNT, "CIFAR10-DVS")
    labels = cache.check_labels([ds.targets[i] for i in order], sources, NUM_CLASSES)
    out = []
    for split, idx in zip(("train", "test"), split_indices(sources, labels)):
        frames, lab, bin_us = cache.cached_frames(
            root, dataset=NAME, split=split, sources=[sources[i] for i in idx], labels=labels[idx],
            read=lambda j, idx=idx: cache.read_recording(ds, order[idx[j]]), sensor_size=SENSOR_SIZE,
            timesteps=data_cfg.timesteps, out_hw=out_hw, window=data_cfg.window, base=base,
            settings={"reader": f"{NAME}-{READER_VERSION}", "split_rule": "first_90_percent_per_class"},
            progress=progress)
        out.append(events_lib.FrameSet(frames, lab, NUM_CLASSES, NATIVE_HW, bin_us))
    return tuple(out)


__all__ = ["load_splits", "split_indices", "NUM_CLASSES", "SENSOR_SIZE", "NATIVE_HW"]
