"""Data sets as frames: event checks and integration, static images, frame sets and batching, a registry.

``DATASETS`` maps ``DataConfig.name`` to a ``load_splits(data_cfg) -> (train, test)`` function returning two
``FrameSet``s; ``load(data_cfg)`` resolves it and raises listing the valid names.
"""

import functools

from aoi_jax.data import augment, cifar, cifar10_dvs, dvs_gesture, events, ncaltech101, ndigits, nmnist, static
from aoi_jax.data.events import FrameSet, batches, check_events, integrate, num_batches

DATASETS = {
    "ndigits": ndigits.load_splits,            # built-in event data set (34x34, 10 classes)
    "ndigits_hard": functools.partial(ndigits.load_splits, params=ndigits.HARD),  # N-Digits, worse conditions
    "ndigits_summed": static.ndigits_summed,   # N-Digits as static images, for QCFS conversion
    "cifar10": cifar.load_splits,              # python-pickle batches from data_dir
    "cifar100": cifar.load_splits,
    "nmnist": nmnist.load_splits,              # tonic's N-MNIST folder, 34x34, official split
    "dvs_gesture": dvs_gesture.load_splits,    # tonic's DVSGesture folder, 128x128, 11 classes
    "cifar10_dvs": cifar10_dvs.load_splits,    # tonic's CIFAR10DVS folder (.aedat4), 9000/1000 split
    "ncaltech101": ncaltech101.load_splits,    # tonic's NCALTECH101 folder, 180x240 canvas, 101 classes
}


def load(data_cfg) -> tuple[FrameSet, FrameSet]:
    """The (train, test) frame sets of ``data_cfg.name`` (an ``aoi_jax.config.DataConfig``).

    Raises:
      ValueError: unknown data set name; the message lists the valid ones.
    """
    if data_cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {data_cfg.name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[data_cfg.name](data_cfg)


def augment_batch(frames, rng, data_cfg, sensor_hw):
    """The training augmentation of data set ``data_cfg.name`` on a (T, B, H, W, C) batch: CIFAR's
    (``cifar.augment``: black fill, cutout) or the event frames' (``augment.augment``: zero fill)."""
    if data_cfg.name in cifar.SPECS:
        return cifar.augment(frames, rng, data_cfg)
    return augment.augment(frames, rng, data_cfg, sensor_hw)


__all__ = ["augment", "augment_batch", "cifar", "cifar10_dvs", "dvs_gesture", "events", "ncaltech101", "ndigits",
           "nmnist", "static", "FrameSet", "batches", "check_events", "integrate", "num_batches", "DATASETS", "load"]
