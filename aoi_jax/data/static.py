"""Static images as frame sets: one image per sample, shown at each of the T time steps.

docs/semantics.md section 1: static images are repeated T times at the model input. A static frame
set holds ``frames`` of shape (N, T, H, W, C) as a zero-copy broadcast view of the (N, H, W, C) images
(``repeat``), so ``data.batches`` and every evaluation path read it like event frames, at the memory cost
of one image per sample.

"""

from collections.abc import Callable

import numpy as np

from aoi_jax.data import ndigits
from aoi_jax.data.events import FrameSet


def repeat(images: np.ndarray, timesteps: int) -> np.ndarray:
    """(N, H, W, C) images -> (N, T, H, W, C) read-only broadcast view, ``frames[:, t] = images``.

    Raises:
      ValueError: images not 4-D, or timesteps < 1.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {images.shape}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    return np.broadcast_to(images[:, None], (images.shape[0], timesteps, *images.shape[1:]))


def summed(frameset, timesteps: int) -> FrameSet:
    """Event count frames summed over time into one image per sample, repeated ``timesteps`` times::

        image[n] = sum_t frames[n, t]          (float32 counts, (H, W, C))
        out.frames[n, t] = image[n]            for t < timesteps
    """
    images = np.asarray(frameset.frames, np.float32).sum(axis=1)
    return FrameSet(repeat(images, timesteps), frameset.labels, frameset.num_classes, frameset.sensor_hw)


def ndigits_summed(data_cfg, *, progress: Callable[[int, int], None] | None = None) -> tuple[FrameSet, FrameSet]:
    """N-Digits as static images: each recording's event counts summed over its whole duration (the QCFS
    ANN's input), shown at each of ``data_cfg.timesteps`` steps (the converted SNN's input).

    Reads data_dir, timesteps, seed and size as ``ndigits.load_splits`` does (``progress`` as there).
    """
    return tuple(summed(split, data_cfg.timesteps) for split in ndigits.load_splits(data_cfg, progress=progress))


__all__ = ["repeat", "summed", "ndigits_summed"]
