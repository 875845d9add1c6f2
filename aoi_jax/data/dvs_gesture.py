"""DVS128 Gesture (Amir et al. 2017): 128x128 DVS recordings, 11 classes, official split (users 1-23 train,
24-29 test).

Read through ``tonic.datasets.DVSGesture`` from ``<data_dir>/DVSGesture/`` (docs/data.md section 3.2): tonic's
preprocessed version (multi-gesture recordings already cut, timestamps in ms), never downloaded::

    <data_dir>/DVSGesture/ibmGestureTrain.tar.gz                   archive or empty placeholder
    <data_dir>/DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy   N x 4 float (x, y, p, t_ms); 1077 files
    <data_dir>/DVSGesture/ibmGestureTest.tar.gz, ibmGestureTest/...                                      264 files

tonic does not sort files within a folder; recordings here are in (folder, numeric label) order. Label =
the file stem (0..10). Frames: T equal time bins over each recording's ``data.window``, per-polarity counts,
optionally downsampled to ``data.size``, cached under ``<data_dir>/frame_cache/dvs_gesture/``.
"""

import os
import pathlib
from collections.abc import Callable

from aoi_jax.data import cache
from aoi_jax.data import events as events_lib

NAME = "dvs_gesture"
READER_VERSION = 1  # bump when the reading or framing below changes frames
NUM_CLASSES = 11
SENSOR_SIZE = (128, 128, 2)  # tonic's (W, H, P)
NATIVE_HW = (128, 128)
SPLITS = {"train": ("ibmGestureTrain", "ibmGestureTrain.tar.gz", 1077),
          "test": ("ibmGestureTest", "ibmGestureTest.tar.gz", 264)}
HOW_TO_GET = ("DVS128 Gesture: tonic's preprocessed archives ibmGestureTrain.tar.gz and ibmGestureTest.tar.gz "
              "(figshare files 38022171 and 38020584, derived from IBM's DvsGesture.tar.gz, Amir et al. 2017), "
              "extracted next to them; or run tonic.datasets.DVSGesture(save_to=<data_dir>, train=True/False) "
              "once on a machine with network.")


def _order_key(path: str) -> tuple:
    return os.path.basename(os.path.dirname(path)), cache.natural_key(os.path.basename(path))


def load_split(data_cfg, split: str, *, progress: Callable[[int, int], None] | None = None):
    """One split (``"train"`` or ``"test"``) as a FrameSet of (N, T, H, W, 2) cached counts.

    Raises:
      FileNotFoundError: the archive or the extracted files are missing (says what is expected where).
      ValueError naming the file: a label outside 0..10, a corrupt ``.npy`` or one not N x 4, an event
        outside the sensor, a negative or unsorted timestamp. An empty recording gives zero frames and a
        warning naming it.
    """
    root = pathlib.Path(data_cfg.data_dir).expanduser()
    folder, archive, official = SPLITS[split]
    cache.require_files(root / "DVSGesture", [archive], [(folder, "*/*.npy")], HOW_TO_GET)
    out_hw = cache.output_hw(NATIVE_HW, data_cfg.size)
    ds = cache.open_dataset(cache.offline("DVSGesture"), root, train=split == "train")
    order = sorted(range(len(ds.data)), key=lambda i: _order_key(ds.data[i]))
    sources = [ds.data[i] for i in order]
    cache.warn_if_incomplete(root / "DVSGesture" / folder, len(sources), official, f"DVS128 Gesture {split} split")
    labels = cache.check_labels([ds.targets[i] for i in order], sources, NUM_CLASSES)
    frames, labels, bin_us = cache.cached_frames(
        root, dataset=NAME, split=split, sources=sources, labels=labels,
        read=lambda i: cache.read_recording(ds, order[i]), sensor_size=SENSOR_SIZE,
        timesteps=data_cfg.timesteps, out_hw=out_hw, window=data_cfg.window, base=root / "DVSGesture",
        settings={"reader": f"{NAME}-{READER_VERSION}"}, progress=progress)
    return events_lib.FrameSet(frames, labels, NUM_CLASSES, NATIVE_HW, bin_us)


def load_splits(data_cfg, *, progress: Callable[[int, int], None] | None = None):
    """``(train, test)`` FrameSets of DVS128 Gesture for an ``aoi_jax.config.DataConfig`` (official split).

    Uses ``data_dir``, ``timesteps``, ``size`` (() = 128x128) and ``window`` (() = whole recordings). See
    ``load_split`` for the errors.
    """
    return (load_split(data_cfg, "train", progress=progress), load_split(data_cfg, "test", progress=progress))


__all__ = ["load_splits", "load_split", "NUM_CLASSES", "SENSOR_SIZE", "NATIVE_HW"]
