"""N-MNIST (Orchard et al. 2015): 34x34 ATIS recordings of MNIST digits, 10 classes, official split.

Read through ``tonic.datasets.NMNIST`` from ``<data_dir>/NMNIST/`` (docs/data.md section 3.2), never
downloaded::

    <data_dir>/NMNIST/train.zip                 archive or empty placeholder (tonic checks it exists)
    <data_dir>/NMNIST/Train/<digit>/NNNNN.bin   5-byte ATIS events (60000 files)
    <data_dir>/NMNIST/test.zip, Test/<digit>/NNNNN.bin                             (10000 files)

Recordings in sorted path order; label = the digit folder. Frames: T equal time bins over each
recording's span (or its ``data.window``), per-polarity counts, optionally downsampled to ``data.size``
(``cache.recording_frames``), cached per (split, T, size, window, files) under
``<data_dir>/frame_cache/nmnist/`` (``cache.cached_frames``).
"""

import pathlib
from collections.abc import Callable

import numpy as np

from aoi_jax.data import cache
from aoi_jax.data import events as events_lib

NAME = "nmnist"
READER_VERSION = 1  # bump when the reading or framing below changes frames
NUM_CLASSES = 10
SENSOR_SIZE = (34, 34, 2)  # tonic's (W, H, P)
NATIVE_HW = (34, 34)
SPLITS = {"train": ("Train", "train.zip", 60000), "test": ("Test", "test.zip", 10000)}
HOW_TO_GET = ("N-MNIST: train.zip and test.zip from Orchard et al., Mendeley Data doi 10.17632/468j46mzdv "
              "(linked from garrickorchard.com/datasets/n-mnist), extracted to Train/ and Test/; or run "
              "tonic.datasets.NMNIST(save_to=<data_dir>, train=True/False) once on a machine with network.")


def _read(ds, index: int) -> np.ndarray:
    """One recording; a truncated ``.bin`` file is a ValueError naming it."""
    cache.check_atis_file(ds.data[index])
    return cache.read_recording(ds, index)


def load_split(data_cfg, split: str, *, progress: Callable[[int, int], None] | None = None):
    """One split (``"train"`` or ``"test"``) as a FrameSet of (N, T, H, W, 2) cached counts.

    Raises:
      FileNotFoundError: the archive or the extracted files are missing (says what is expected where).
      ValueError naming the file: a truncated or corrupt file, an event outside the sensor, a negative or
        unsorted timestamp, a bad polarity. An empty recording gives zero frames and a warning naming it.
    """
    root = pathlib.Path(data_cfg.data_dir).expanduser()
    folder, archive, official = SPLITS[split]
    cache.require_files(root / "NMNIST", [archive], [(folder, "*/*.bin")], HOW_TO_GET)
    out_hw = cache.output_hw(NATIVE_HW, data_cfg.size)
    ds = cache.open_dataset(cache.offline("NMNIST"), root, train=split == "train")
    order = sorted(range(len(ds.data)), key=lambda i: ds.data[i])
    sources = [ds.data[i] for i in order]
    cache.warn_if_incomplete(root / "NMNIST" / folder, len(sources), official, f"N-MNIST {split} split")
    labels = cache.check_labels([ds.targets[i] for i in order], sources, NUM_CLASSES)
    frames, labels, bin_us = cache.cached_frames(
        root, dataset=NAME, split=split, sources=sources, labels=labels, read=lambda i: _read(ds, order[i]),
        sensor_size=SENSOR_SIZE, timesteps=data_cfg.timesteps, out_hw=out_hw, window=data_cfg.window,
        base=root / "NMNIST", settings={"reader": f"{NAME}-{READER_VERSION}"}, progress=progress)
    return events_lib.FrameSet(frames, labels, NUM_CLASSES, NATIVE_HW, bin_us)


def load_splits(data_cfg, *, progress: Callable[[int, int], None] | None = None):
    """``(train, test)`` FrameSets of N-MNIST for an ``aoi_jax.config.DataConfig`` (official split).

    Uses ``data_dir``, ``timesteps``, ``size`` (() = 34x34) and ``window`` (() = whole recordings). See
    ``load_split`` for the errors.
    """
    return (load_split(data_cfg, "train", progress=progress), load_split(data_cfg, "test", progress=progress))


__all__ = ["load_splits", "load_split", "NUM_CLASSES", "SENSOR_SIZE", "NATIVE_HW"]
