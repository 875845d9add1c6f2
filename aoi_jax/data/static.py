"""Static images as frame sets: one image per sample, shown at each of the T time steps.

reference-semantics.md section 1: static images are repeated T times at the model input. A static frame
set holds ``frames`` of shape (N, T, H, W, C) as a zero-copy broadcast view of the (N, H, W, C) images
(``repeat``), so ``data.batches`` and every evaluation path read it like event frames, at the memory cost
of one image per sample.

``ImageSet`` is ``FrameSet`` for any channel count: ``events.FrameSet`` checks for the two polarity
channels of event frames. Once it accepts any C, ``ImageSet`` becomes ``FrameSet`` (one line).
"""

import dataclasses

import numpy as np

from aoi_jax.data import ndigits


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Static images of a split repeated over time (the fields of ``events.FrameSet``).

    Attributes:
      frames: (N, T, H, W, C) float32, usually ``repeat(images, T)``.
      labels: (N,) class indices in [0, num_classes), stored as int32.
      num_classes: K >= 1.
      sensor_hw: (H, W) of the images.
    Raises (in ``__post_init__``):
      ValueError: frames not 5-D float32, labels not (N,) integers in range, num_classes < 1.
    """

    frames: np.ndarray
    labels: np.ndarray
    num_classes: int
    sensor_hw: tuple[int, int] | None = None

    def __post_init__(self):
        f = self.frames
        if not isinstance(f, np.ndarray) or f.ndim != 5 or f.dtype != np.float32:
            raise ValueError(f"ImageSet.frames must be a float32 (N, T, H, W, C) array, got "
                             f"{getattr(f, 'shape', None)} {getattr(f, 'dtype', None)}")
        labels = np.asarray(self.labels)
        if labels.shape != (f.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"ImageSet.labels must be ({f.shape[0]},) integers, got {labels.shape} {labels.dtype}")
        if int(self.num_classes) < 1 or (len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes)):
            raise ValueError(f"ImageSet labels must lie in [0, {self.num_classes}), num_classes >= 1")
        object.__setattr__(self, "labels", labels.astype(np.int32))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        hw = tuple(f.shape[2:4]) if self.sensor_hw is None else tuple(int(s) for s in self.sensor_hw)
        object.__setattr__(self, "sensor_hw", hw)

    def __len__(self) -> int:
        return len(self.labels)


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


def summed(frameset, timesteps: int) -> ImageSet:
    """Event count frames summed over time into one image per sample, repeated ``timesteps`` times::

        image[n] = sum_t frames[n, t]          (float32 counts, (H, W, C))
        out.frames[n, t] = image[n]            for t < timesteps
    """
    images = np.asarray(frameset.frames, np.float32).sum(axis=1)
    return ImageSet(repeat(images, timesteps), frameset.labels, frameset.num_classes, frameset.sensor_hw)


def ndigits_summed(data_cfg) -> tuple[ImageSet, ImageSet]:
    """N-Digits as static images: each recording's event counts summed over its whole duration (the QCFS
    ANN's input), shown at each of ``data_cfg.timesteps`` steps (the converted SNN's input).

    Reads data_dir, timesteps, seed and size as ``ndigits.load_splits`` does.
    """
    return tuple(summed(split, data_cfg.timesteps) for split in ndigits.load_splits(data_cfg))


__all__ = ["ImageSet", "repeat", "summed", "ndigits_summed"]
