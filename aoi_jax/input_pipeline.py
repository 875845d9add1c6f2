"""The input pipeline: the batches the train and evaluation steps see (numpy, host side).

- Training: ``train_batches`` is one run's epoch, shuffled and augmented from a generator seeded with
  ``[cfg.seed, epoch]`` (a resumed run replays the same batches); ``member_batches`` stacks the epochs of a
  sweep's members, each exactly its single run's.
- Evaluation: ``eval_batches`` walks a split in file order, the last batch padded to a multiple of the
  device count.
- Calibration: ``split_validation`` holds ``data.validation_fraction`` of each class of the training split
  out (never trained on); ``calibration_set`` is the split Top-K and SpikeCP calibrate on
  (``eval.calibration``): the samples trained on, or the held-out ones.
- What the model trains on is the training method's (``aoi_jax.method``, ``model_input``): a QCFS ANN
  trains on the first time step of each recording; its converted SNN is evaluated on all T steps.

Batches are ``{"frames": (T, B, H, W, C) float32, "label": (B,) int32}`` (time-major).
"""

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from aoi_jax import data, method
from aoi_jax.config import Config, DataConfig
from aoi_jax.data import FrameSet
from aoi_jax.data.ndigits import split_indices


def steps_per_epoch(n_train: int, cfg: Config) -> int:
    """Optimiser steps per epoch: ``n_train // train.batch_size`` (the last partial batch is dropped)."""
    return data.num_batches(n_train, cfg.train.batch_size, drop_last=True)


def model_input(frameset: FrameSet, cfg: Config) -> FrameSet:
    """What the model of ``cfg`` trains on (``method.of(cfg).model_input``): a QCFS ANN's first frame, else
    the frame set itself."""
    return method.of(cfg).model_input(frameset)


def subset(frameset: FrameSet, index: np.ndarray) -> FrameSet:
    """The rows ``index`` of a frame set (frames copied into memory, also from a ``np.memmap``)."""
    return dataclasses.replace(frameset, frames=np.asarray(frameset.frames[index]), labels=frameset.labels[index],
                               bin_us=None if frameset.bin_us is None else frameset.bin_us[index])


def split_validation(train_set: FrameSet, data_cfg: DataConfig) -> tuple[FrameSet, FrameSet | None]:
    """Splits the data set's training split into (fit, validation); training sees only ``fit``.

    The validation split is ``round(data.validation_fraction * n_c)`` samples of each class c, drawn with
    ``data.seed`` (``ndigits.split_indices`` on the training labels), so it is the same for every training
    seed and every member of a sweep. Both parts keep file order.

    Returns:
      (fit, validation); ``(train_set, None)`` when ``data.validation_fraction`` is 0.
    """
    if data_cfg.validation_fraction == 0:
        return train_set, None
    fit, validation = split_indices(train_set.labels, data_cfg.validation_fraction, data_cfg.seed)
    return subset(train_set, fit), subset(train_set, validation)


def calibration_set(fit: FrameSet, validation: FrameSet | None, cfg: Config) -> FrameSet:
    """The split Top-K and SpikeCP calibrate on (``eval.calibration``), from ``split_validation``'s parts:
    "train": ``fit``, the samples trained on; "validation": ``validation``, the held-out ones.

    Raises:
      ValueError: "validation" without a held-out split (``data.validation_fraction`` 0).
    """
    if cfg.eval.calibration == "train":
        return fit
    if validation is None:
        raise ValueError('eval.calibration = "validation" needs a held-out split: set data.validation_fraction '
                         "> 0 (e.g. 0.2), which also removes those samples from training")
    return validation


def train_batches(train_set: FrameSet, cfg: Config, epoch: int) -> Iterator[dict]:
    """The training batches of epoch ``epoch`` (0-based) of one run of ``cfg``, augmented::

        rng = np.random.default_rng([cfg.seed, epoch])   # shuffles (data.batches), then augments
        for batch in data.batches(model_input(train_set, cfg), batch_size, rng=rng, drop_last=True):
            frames = data.augment_batch(frames, rng, cfg.data, sensor_hw)

    Yields:
      {"frames": (T, B, H, W, C) float32, "label": (B,) int32} (T = 1 for a QCFS ANN).
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    for batch in data.batches(model_input(train_set, cfg), cfg.train.batch_size, rng=rng, drop_last=True):
        yield {"frames": data.augment_batch(batch["frames"], rng, cfg.data, train_set.sensor_hw),
               "label": batch["label"]}


def member_batches(train_set: FrameSet, configs: Sequence[Config], epoch: int) -> Iterator[dict]:
    """One pass over the data for the M runs ``configs`` (a sweep's members): their ``train_batches``, stacked.

    Runs of the same seed share one stream (the same shuffle and augmentation, computed once). One run
    gets a leading axis of 1 without a copy.

    Yields:
      {"frames": (M, T, B, H, W, C), "label": (M, B)} numpy arrays.
    """
    seeds = list(dict.fromkeys(c.seed for c in configs))
    streams = [train_batches(train_set, next(c for c in configs if c.seed == s), epoch) for s in seeds]
    index = [seeds.index(c.seed) for c in configs]
    for per_seed in zip(*streams):
        if len(index) == 1:
            yield {k: v[None] for k, v in per_seed[0].items()}
        else:
            yield {k: np.stack([per_seed[i][k] for i in index]) for k in ("frames", "label")}


def eval_batches(frameset: FrameSet, batch_size: int, n_devices: int = 1) -> Iterator[tuple[dict, int]]:
    """A split in file order, each batch padded to a multiple of ``n_devices``.

    Padding repeats the last sample (so it exits an anytime loop with it).

    Yields:
      (batch, n_valid): the batch as ``data.batches`` gives it; its rows past ``n_valid`` are padding.
    """
    for batch in data.batches(frameset, batch_size):
        n = len(batch["label"])
        pad = -n % n_devices
        if pad:
            batch = {"frames": np.pad(batch["frames"], [(0, 0), (0, pad)] + [(0, 0)] * 3, mode="edge"),
                     "label": np.pad(batch["label"], (0, pad), mode="edge")}
        yield batch, n
