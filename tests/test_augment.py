"""Training augmentation: shifts, flips and cutout against hand-made copies; seeding; scaling."""

import numpy as np
import pytest

from aoi_jax import config
from aoi_jax.data import augment, augment_batch


def frames_of(rng, T=3, B=5, H=12, W=10, C=2):
    return (rng.random((T, B, H, W, C)) + 0.5).astype(np.float32)      # no zeros, so fills are visible


def test_translate_equals_hand_shift(rng):
    x = frames_of(rng)
    out = augment.translate(x, np.random.default_rng(7), 3)
    draws = np.random.default_rng(7)
    top, left = draws.integers(0, 7, 5), draws.integers(0, 7, 5)
    for b in range(5):
        dy, dx = 3 - top[b], 3 - left[b]
        want = np.zeros_like(x[:, b])
        for y in range(12):
            for xx in range(10):
                if 0 <= y - dy < 12 and 0 <= xx - dx < 10:
                    want[:, y, xx] = x[:, b, y - dy, xx - dx]
        np.testing.assert_array_equal(out[:, b], want)   # same shift at every time step
    assert out.shape == x.shape


def test_flip_and_cutout(rng):
    x = frames_of(rng, B=40)
    out = augment.hflip(x, np.random.default_rng(0))
    flip = np.random.default_rng(0).random(40) < 0.5
    assert 0 < flip.sum() < 40
    np.testing.assert_array_equal(out[:, flip], x[:, flip, :, ::-1])
    np.testing.assert_array_equal(out[:, ~flip], x[:, ~flip])
    cut = augment.cutout(x, np.random.default_rng(1), 4)
    draws = np.random.default_rng(1)
    cy, cx = draws.integers(0, 12, 40), draws.integers(0, 10, 40)
    for b in range(40):
        hole = np.zeros((12, 10), bool)
        hole[max(cy[b] - 2, 0):min(cy[b] + 2, 12), max(cx[b] - 2, 0):min(cx[b] + 2, 10)] = True
        np.testing.assert_array_equal(np.all(cut[:, b] == 0, axis=(0, -1)), hole)


def test_augment_scales_translation_and_is_seeded(rng):
    x = frames_of(rng, H=48, W=48)
    cfg = config.DataConfig(name="cifar10_dvs", translate=25, hflip=True)
    a = augment.augment(x, np.random.default_rng(3), cfg, (128, 128))
    b = augment.augment(x, np.random.default_rng(3), cfg, (128, 128))
    np.testing.assert_array_equal(a, b)
    # 25 px at 128 is round(25 * 48 / 128) = 9 px at 48: the draws are U{0..18}
    r = np.random.default_rng(3)
    shifted = augment.translate(x, r, 9)
    np.testing.assert_array_equal(a, augment.hflip(shifted, r))


def test_nothing_enabled_is_identity(rng):
    x = frames_of(rng)
    out = augment_batch(x, np.random.default_rng(0), config.DataConfig(), (12, 10))
    assert out is x


@pytest.mark.parametrize("name", ["ndigits", "cifar10"])
def test_augment_batch_dispatch(name, rng):
    x = frames_of(rng, H=32, W=32, C=3 if name == "cifar10" else 2)
    cfg = config.DataConfig(name=name, translate=4)
    out = augment_batch(x, np.random.default_rng(0), cfg, (32, 32))
    # events are zero-filled; CIFAR images get the normalised black
    fill = 0.0 if name == "ndigits" else None
    border = out[:, :, 0, :, :]
    if fill == 0.0:
        assert np.any(np.all(border == 0.0, axis=-1))
    else:
        assert not np.any(np.all(out == 0.0, axis=-1))
