"""Data sets as frames: event checks and integration, static images, frame sets and batching, a registry.

``DATASETS`` maps ``DataConfig.name`` to a ``load_splits(data_cfg, *, progress=None) -> (train, test)``
function returning two ``FrameSet``s (``progress(done, total)`` is called while a cache is built);
``load(data_cfg)`` resolves it and raises listing the valid names. ``data_root`` is the one place that turns
``DataConfig.data_dir`` into a folder (its default does not depend on the current directory).
"""

import dataclasses
import functools
import inspect
import os
import pathlib

from aoi_jax import progress as progress_lib
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


def data_root(data_dir: str) -> pathlib.Path:
    """The absolute folder of ``DataConfig.data_dir``: the given folder (``~`` expanded, relative to the
    current directory), or for "" the default location::

        $AOI_JAX_DATA  if set and not empty,  else  $XDG_CACHE_HOME/aoi_jax  (default ~/.cache/aoi_jax)
    """
    if data_dir:
        return pathlib.Path(data_dir).expanduser().absolute()
    if os.environ.get("AOI_JAX_DATA"):
        return pathlib.Path(os.environ["AOI_JAX_DATA"]).expanduser().absolute()
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache_home).expanduser().absolute() / "aoi_jax"


def load(data_cfg, *, progress=None) -> tuple[FrameSet, FrameSet]:
    """The (train, test) frame sets of ``data_cfg.name`` (an ``aoi_jax.config.DataConfig``), read from (and
    cached under) ``data_root(data_cfg.data_dir)``: the loaders see that absolute folder as ``data_dir``.

    Args:
      progress: ``progress(iterable, total=, desc=)`` reporting each cache build (e.g.
        ``aoi_jax.progress.progress``), as for training and evaluation passes; None reports nothing.
    Raises:
      ValueError: unknown data set name; the message lists the valid ones.
      integrity.StorageError: a cache could not be written.
    """
    if data_cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {data_cfg.name!r}; valid names: {sorted(DATASETS)}")
    loader = DATASETS[data_cfg.name]
    report = {}                                       # a loader registered without a progress argument gets none
    if progress is not None and "progress" in inspect.signature(loader).parameters:
        report["progress"] = progress_lib.as_callback(progress, f"building the {data_cfg.name} cache")
    return loader(dataclasses.replace(data_cfg, data_dir=str(data_root(data_cfg.data_dir))), **report)


def augment_batch(frames, rng, data_cfg, sensor_hw):
    """The training augmentation of data set ``data_cfg.name`` on a (T, B, H, W, C) batch: CIFAR's
    (``cifar.augment``: black fill, cutout) or the event frames' (``augment.augment``: zero fill)."""
    if data_cfg.name in cifar.SPECS:
        return cifar.augment(frames, rng, data_cfg)
    return augment.augment(frames, rng, data_cfg, sensor_hw)


__all__ = ["augment", "augment_batch", "cifar", "cifar10_dvs", "dvs_gesture", "events", "ncaltech101", "ndigits",
           "nmnist", "static", "FrameSet", "batches", "check_events", "integrate", "num_batches", "DATASETS", "data_root",
           "load"]
