"""CIFAR pickle reader on tiny files written in the real format; normalisation; augmentation; static sets."""

import pickle

import numpy as np
import pytest

from aoi_jax import config
from aoi_jax.data import batches, cifar, static


def write_batch(path, images, labels, label_key):
    """A batch as the official archives hold it: a protocol-2 pickle of a dict with bytes keys, b"data"
    uint8 (n, 3072) rows of R, G, B planes, labels a list of ints."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    d = {b"batch_label": b"tiny batch", b"data": data, label_key: [int(c) for c in labels],
         b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [int(c) // 5 for c in labels]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path, rng):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 12)
    for i in range(5):
        write_batch(root / f"data_batch_{i + 1}", images[2 * i:2 * i + 2], labels[2 * i:2 * i + 2], b"labels")
    write_batch(root / "test_batch", images[10:], labels[10:], b"labels")
    return tmp_path, images, labels


def test_read_batch_decodes_rgb_planes(tmp_path):
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 2, 5] = (10, 20, 30)                       # pixel at row 2, column 5
    write_batch(tmp_path / "b", img, [7], b"labels")
    raw = pickle.load(open(tmp_path / "b", "rb"), encoding="bytes")[b"data"][0]
    assert (raw[2 * 32 + 5], raw[1024 + 2 * 32 + 5], raw[2048 + 2 * 32 + 5]) == (10, 20, 30)   # the real layout
    images, labels = cifar.read_batch(tmp_path / "b", b"labels")
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0, 2, 5], (10, 20, 30))
    assert images.sum() == 60 and labels.tolist() == [7]
    with pytest.raises(ValueError, match="expected a dict with keys b'data' and b'fine_labels'"):
        cifar.read_batch(tmp_path / "b", b"fine_labels")


def test_load_splits_cifar10(cifar10_dir):
    data_dir, images, labels = cifar10_dir
    cfg = config.DataConfig(name="cifar10", data_dir=str(data_dir), timesteps=4)
    train, test = cifar.load_splits(cfg)
    assert train.frames.shape == (10, 4, 32, 32, 3) and test.frames.shape == (2, 4, 32, 32, 3)
    assert train.num_classes == 10 and train.labels.tolist() == labels[:10].tolist()
    want = (images[:10] / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array([0.2023, 0.1994, 0.2010])
    for t in range(4):                                                        # the image at every step
        np.testing.assert_allclose(train.frames[:, t], want, atol=1e-5)
    assert train.frames.strides[1] == 0                                       # a broadcast view, no copies
    batch = next(batches(test, 2))
    assert batch["frames"].shape == (4, 2, 32, 32, 3) and batch["label"].tolist() == labels[10:].tolist()


def test_load_splits_cifar100(tmp_path, rng):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_batch(root / "train", images[:3], [99, 0, 42], b"fine_labels")
    write_batch(root / "test", images[3:], [1, 2], b"fine_labels")
    train, test = cifar.load_splits(config.DataConfig(name="cifar100", data_dir=str(tmp_path), timesteps=1))
    assert train.num_classes == 100 and train.labels.tolist() == [99, 0, 42] and test.labels.tolist() == [1, 2]
    mean, std = np.array([129.3, 124.1, 112.4]) / 255, np.array([68.2, 65.4, 70.4]) / 255
    np.testing.assert_allclose(test.frames[:, 0], (images[3:] / 255.0 - mean) / std, atol=1e-5)


def test_missing_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/ with data_batch_1.*cifar-10-python.tar.gz"):
        cifar.load_splits(config.DataConfig(name="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/ with train, test"):
        cifar.load_splits(config.DataConfig(name="cifar100", data_dir=str(tmp_path)))


def augment_cfg(**kw):
    return config.DataConfig(name="cifar10", **kw)


def test_augment_crop_is_a_window_of_the_black_padded_image(rng):
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    frames = np.stack([cifar.normalise(images, "cifar10")] * 2)             # (T=2, B, 32, 32, 3)
    out = cifar.augment(frames, np.random.default_rng(3), augment_cfg(translate=4))
    draws = np.random.default_rng(3)
    tops, lefts = draws.integers(0, 9, 6), draws.integers(0, 9, 6)
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])              # black (0) before Normalize
    for b in range(6):
        window = padded[b, tops[b]:tops[b] + 32, lefts[b]:lefts[b] + 32]
        np.testing.assert_allclose(out[0, b], cifar.normalise(window, "cifar10"), atol=1e-5)
    np.testing.assert_array_equal(out[0], out[1])                           # the same for every time step


def test_augment_flip_and_cutout(rng):
    frames = rng.normal(size=(1, 40, 32, 32, 3)).astype(np.float32) + 5.0   # no zeros by chance
    flipped = cifar.augment(frames, np.random.default_rng(0), augment_cfg(hflip=True))
    flip = np.random.default_rng(0).random(40) < 0.5
    assert 0 < flip.sum() < 40
    np.testing.assert_array_equal(flipped[0, flip], frames[0, flip, :, ::-1])
    np.testing.assert_array_equal(flipped[0, ~flip], frames[0, ~flip])
    cut = cifar.augment(frames, np.random.default_rng(1), augment_cfg(cutout=16))
    holes = np.all(cut[0] == 0.0, axis=-1)                                  # (B, H, W)
    draws = np.random.default_rng(1)
    cy, cx = draws.integers(0, 32, 40), draws.integers(0, 32, 40)
    for b in range(40):
        rows = np.clip([cy[b] - 8, cy[b] + 8], 0, 32)
        cols = np.clip([cx[b] - 8, cx[b] + 8], 0, 32)
        want = np.zeros((32, 32), bool)
        want[rows[0]:rows[1], cols[0]:cols[1]] = True
        np.testing.assert_array_equal(holes[b], want)
    assert holes.sum(axis=(1, 2)).max() == 256                              # at most 16 x 16
    same = cifar.augment(frames, np.random.default_rng(1), augment_cfg(cutout=16))
    np.testing.assert_array_equal(cut, same)                                # seeded


def test_static_summed_and_repeat():
    from aoi_jax.data.events import FrameSet
    counts = np.arange(2 * 3 * 4 * 4 * 2, dtype=np.uint8).reshape(2, 3, 4, 4, 2) % 5
    summed = static.summed(FrameSet(counts, np.array([0, 1]), 2), 6)
    assert summed.frames.shape == (2, 6, 4, 4, 2) and summed.frames.dtype == np.float32
    np.testing.assert_array_equal(summed.frames[:, 5], counts.sum(1))
    with pytest.raises(ValueError, match="timesteps must be >= 1"):
        static.repeat(np.zeros((1, 2, 2, 3), np.float32), 0)
