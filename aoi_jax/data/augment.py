"""Training augmentation on time-major batches (numpy, seeded by an explicit ``np.random.Generator``).

The same spatial transform applies to every time step of a sample, independently per sample:

- translation: the reference's random integer shift of event frames (+-25 px at 128x128), scaled to the
  frame size, with zero fill (no events enter from outside);
- horizontal flip with probability 1/2;
- Cutout (CIFAR): a square of side S, centred uniformly on the image and cut at the border, set to 0.

``augment(frames, rng, data_cfg, sensor_hw)`` applies what the config asks for; ``translate``, ``hflip``
and ``cutout`` are the building blocks.
"""

import numpy as np


def translate(frames: np.ndarray, rng: np.random.Generator, max_shift: int, fill=0.0) -> np.ndarray:
    """Shifts each sample by integers, filling uncovered pixels: a random crop of the padded frame::

        pad P = max_shift px of fill on each side; top_b, left_b ~ U{0..2P} (drawn in that order)
        out[t, b] = padded[t, b, top_b : top_b + H, left_b : left_b + W]     (shift P - top_b, P - left_b)

    Args:
      frames: (T, B, H, W, C).  max_shift: >= 0 pixels.  fill: scalar or (C,) value for uncovered pixels.
    Returns:
      shifted frames, same shape, float32.
    """
    T, B, H, W, C = frames.shape
    P = int(max_shift)
    top, left = rng.integers(0, 2 * P + 1, B), rng.integers(0, 2 * P + 1, B)
    padded = np.broadcast_to(np.asarray(fill, np.float32), (T, B, H + 2 * P, W + 2 * P, C)).copy()
    padded[:, :, P:P + H, P:P + W] = frames
    rows = top[:, None] + np.arange(H)                                   # (B, H)
    cols = left[:, None] + np.arange(W)                                  # (B, W)
    b = np.arange(B)[:, None, None]
    return padded[:, b, rows[:, :, None], cols[:, None, :]]


def hflip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors each sample left-right with probability 1/2; (T, B, H, W, C) -> same."""
    out = np.array(frames, dtype=np.float32)
    flip = rng.random(out.shape[1]) < 0.5
    out[:, flip] = out[:, flip, :, ::-1]
    return out


def cutout(frames: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Zeroes a square per sample (the reference's Cutout, DeVries & Taylor 2017)::

        centre (y, x) ~ U{0..H-1} x U{0..W-1};  rows clip(y - S//2, 0, H) .. clip(y + S//2, 0, H), cols alike

    Args:
      frames: (T, B, H, W, C).  size: S >= 0 (0 = no change).
    """
    out = np.array(frames, dtype=np.float32)
    if size <= 0:
        return out
    T, B, H, W, C = out.shape
    cy, cx = rng.integers(0, H, B), rng.integers(0, W, B)
    ys, xs = np.arange(H), np.arange(W)
    y0, y1 = np.clip(cy - size // 2, 0, H), np.clip(cy + size // 2, 0, H)
    x0, x1 = np.clip(cx - size // 2, 0, W), np.clip(cx + size // 2, 0, W)
    inside = (((ys[None, :] >= y0[:, None]) & (ys[None, :] < y1[:, None]))[:, :, None]
              & ((xs[None, :] >= x0[:, None]) & (xs[None, :] < x1[:, None]))[:, None, :])   # (B, H, W)
    out[:, inside] = 0.0
    return out


def augment(frames: np.ndarray, rng: np.random.Generator, data_cfg, sensor_hw, fill=0.0) -> np.ndarray:
    """Applies the training augmentation ``data_cfg`` asks for, in the order translate, flip, cutout.

    ``data_cfg.translate`` is in pixels of the native sensor ``sensor_hw``; on frames of another size it
    scales to ``round(translate * H / H_native)``. With nothing enabled the frames come back unchanged.

    Args:
      frames: (T, B, H, W, C) float32.  rng: the generator (its state fixes the result).
      data_cfg: an ``aoi_jax.config.DataConfig``.  sensor_hw: (H, W) of the native sensor.
      fill: value of pixels shifted in (0 for events; the normalised black for images).
    """
    if data_cfg.translate > 0:
        shift = int(round(data_cfg.translate * frames.shape[2] / sensor_hw[0]))
        frames = translate(frames, rng, shift, fill)
    if data_cfg.hflip:
        frames = hflip(frames, rng)
    if data_cfg.cutout > 0:
        frames = cutout(frames, rng, data_cfg.cutout)
    return frames
