"""Event data sets read through tonic from tiny fake folders in the real on-disk formats (fake_event_data.py).

Oracle: ``expected_frames`` counts the written events one by one (bin = floor((t - t0) T / (t1 - t0)),
clipped to T - 1, over [t0, t1] = the recording's span or its window; coordinates floor(x W' / W)),
independently of aoi_jax's integrator, and gives the bin duration (t1 - t0) / T. Each bad-data case is
asserted with its message and the offending file; the cache is checked to be read (raw reader disabled),
rebuilt for other settings, and never trusted after an interrupted build.
"""

import json
import os
import pathlib
import sys

import numpy as np
import pytest
import tonic
import tonic.datasets.cifar10dvs
import tonic.datasets.nmnist

import fake_event_data as fake
from aoi_jax import config
from aoi_jax.data import cache, cifar10_dvs, dvs_gesture, ncaltech101, nmnist

pytestmark = pytest.mark.filterwarnings("ignore:.*incompletely extracted:UserWarning")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def cfg(root, **kw):
    return config.DataConfig(name="test", data_dir=str(root), **{"timesteps": 4, **kw})


def expected_frames(rec, T, native_hw, out_hw=None, shift=False, window=()):
    """(T, H', W', 2) counts of one Recording, event by event, and its bin duration in us (0 if no event
    lies in the window). ``window = (s, L)``: [t0, t1] = [first + s, min(first + s + L, last)]."""
    (H, W), (Ho, Wo) = native_hw, out_hw or native_hw
    x, y = rec.x.astype(int), rec.y.astype(int)
    if shift:  # tonic's N-Caltech101 reader moves the smallest x and y to 0
        x, y = x - x.min(), y - y.min()
    out = np.zeros((T, Ho, Wo, 2), np.int64)
    t0, t1 = int(rec.t.min()), int(rec.t.max())
    if window:
        t0, t1 = t0 + window[0], min(t0 + window[0] + window[1], t1)
    for xi, yi, ti, pi in zip(x, y, rec.t.astype(int), rec.p.astype(int)):
        if not t0 <= ti <= t1:
            continue
        b = 0 if t1 == t0 else min((ti - t0) * T // (t1 - t0), T - 1)
        out[b, yi * Ho // H, xi * Wo // W, pi] += 1
    return out, (t1 - t0) / T if out.any() else 0.0


def check_frames(frameset, recordings, T, native_hw, out_hw=None, shift=False, window=()):
    assert len(frameset) == len(recordings)
    np.testing.assert_array_equal(frameset.labels, [r.label for r in recordings])
    for i, r in enumerate(recordings):
        want, bin_us = expected_frames(r, T, native_hw, out_hw, shift, window)
        np.testing.assert_array_equal(frameset.frames[i], want, err_msg=str(r.path))
        assert frameset.bin_us[i] == bin_us, r.path
        if not window:
            assert frameset.frames[i].sum() == len(r.t)  # no event lost


def sorted_by_path(recs, split):
    return sorted((r for r in recs if r.split == split), key=lambda r: str(r.path))


# ------------------------------------------------------------------------------------------ the four sets

@pytest.mark.parametrize("size", [(), (17, 11)])
def test_nmnist_frames_match_events(tmp_path, size):
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=2, classes=(0, 3, 9))
    train, test = nmnist.load_splits(cfg(tmp_path, timesteps=5, size=size))
    out_hw = size or (34, 34)
    for fs, split in ((train, "train"), (test, "test")):
        assert isinstance(fs.frames, np.memmap) and fs.frames.dtype == np.uint8
        assert fs.frames.shape == (6, 5, *out_hw, 2) and fs.num_classes == 10 and fs.sensor_hw == (34, 34)
        check_frames(fs, sorted_by_path(recs, split), 5, (34, 34), out_hw)


def test_dvs_gesture_official_split_sorted_order(tmp_path):
    recs = fake.write_fake_dvs_gesture(tmp_path, users={"train": (2, 1), "test": (24, 25)}, n_events=100)
    train, test = dvs_gesture.load_splits(cfg(tmp_path, timesteps=3, size=(64, 32)))
    # order: user folder, then the label as a number (tonic lists files in file-system order; 10 after 9)
    def key(r):
        return r.path.parent.name, r.label
    want_train = sorted((r for r in recs if r.split == "train"), key=key)
    assert [r.path.parent.name for r in want_train[:11]] == ["user01_led"] * 11
    np.testing.assert_array_equal(train.labels[:11], np.arange(11))
    assert train.num_classes == 11 and train.sensor_hw == (128, 128) and train.frames.shape[1:] == (3, 64, 32, 2)
    check_frames(train, want_train, 3, (128, 128), (64, 32))
    check_frames(test, sorted((r for r in recs if r.split == "test"), key=key), 3, (128, 128), (64, 32))


def test_ncaltech101_canvas_class_map_and_seeded_split(tmp_path):
    classes = ("BACKGROUND_Google", "Faces_easy", "airplanes", "yin_yang")
    recs = fake.write_fake_ncaltech101(tmp_path, n_per_class=10, classes=classes)
    # the official archive's bounding boxes, also .bin files in class folders: not recordings
    fake.write_atis(tmp_path / "NCALTECH101" / "Caltech101_annotations" / "ant" / "annotation_0001.bin",
                    [1], [2], [3], [0])
    for r, c in zip(recs, np.repeat(classes, 10)):
        r.label = ncaltech101.CLASSES.index(c)  # explicit map: 0, 1, 5, 100
    assert sorted({r.label for r in recs}) == [0, 1, 5, 100]
    train, test = ncaltech101.load_splits(cfg(tmp_path, timesteps=2, seed=0))
    assert train.frames.shape[1:] == (2, 180, 240, 2) and train.num_classes == 101
    assert len(train) == 36 and len(test) == 4  # round(0.1 * 10) per class to test
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=101)[[0, 1, 5, 100]], [1, 1, 1, 1])
    by_frames = {}
    for fs in (train, test):  # each recording once, on the top-left-aligned 180x240 canvas
        for i in range(len(fs)):
            by_frames.setdefault(fs.frames[i].tobytes(), []).append(int(fs.labels[i]))
    for r in recs:
        want = expected_frames(r, 2, (180, 240), shift=True)[0].astype(np.uint8).tobytes()
        assert by_frames.pop(want) == [r.label], r.path
    assert not by_frames
    train1, test1 = ncaltech101.load_splits(cfg(tmp_path, timesteps=2, seed=1))
    assert not np.array_equal(test1.frames, test.frames)  # another seed, another split (and cache)
    assert len(list((tmp_path / "frame_cache" / "ncaltech101").iterdir())) == 4


def test_ncaltech101_unknown_class_folder(tmp_path):
    fake.write_fake_ncaltech101(tmp_path, n_per_class=2, classes=("accordion", "Faces"))
    with pytest.raises(ValueError, match=r"Faces/image_0001.bin: folder 'Faces' is not an N-Caltech101 class"):
        ncaltech101.load_splits(cfg(tmp_path))


def test_cifar10dvs_reference_split_natural_order(tmp_path, monkeypatch):
    """Below the .aedat4 decoder (tonic's read_aedat4 replaced): tonic's indexing, labels and our split."""
    recs = fake.write_fake_cifar10dvs(tmp_path, n_per_class=11, classes=(0, 9), aedat=False)
    monkeypatch.setattr(tonic.datasets.cifar10dvs, "read_aedat4", fake.fake_read_aedat4(recs))
    train, test = cifar10_dvs.load_splits(cfg(tmp_path, timesteps=4))
    # int(0.9 * 11) = 9 per class to train: files _0 .. _8 (natural order: _9 and _10 are test)
    def idx(r):
        return int(r.path.stem.rsplit("_", 1)[1])
    def order(rs):
        return sorted(rs, key=lambda r: (r.label, idx(r)))
    check_frames(train, order(r for r in recs if idx(r) < 9), 4, (128, 128))
    check_frames(test, order(r for r in recs if idx(r) >= 9), 4, (128, 128))
    assert [idx(r) for r in order(r for r in recs if idx(r) >= 9)] == [9, 10, 9, 10]
    np.testing.assert_array_equal(test.labels, [0, 0, 9, 9])


def test_cifar10dvs_reads_real_aedat4(tmp_path):
    pytest.importorskip("aedat")
    pytest.importorskip("dv_processing")
    recs = fake.write_fake_cifar10dvs(tmp_path, n_per_class=2, classes=(1, 2), aedat=True)
    train, test = cifar10_dvs.load_splits(cfg(tmp_path, timesteps=3, size=(32, 32)))
    check_frames(train, [recs[0], recs[2]], 3, (128, 128), (32, 32))   # int(0.9 * 2) = 1 per class
    check_frames(test, [recs[1], recs[3]], 3, (128, 128), (32, 32))


def test_cifar10dvs_without_aedat_package(tmp_path, monkeypatch):
    fake.write_fake_cifar10dvs(tmp_path, n_per_class=1, classes=(0,), aedat=False)
    monkeypatch.setitem(sys.modules, "aedat", None)  # import aedat fails as if not installed
    with pytest.raises(ImportError, match=r"cifar10_airplane_0.aedat4: .*needs the 'aedat' package"):
        cifar10_dvs.load_splits(cfg(tmp_path))


# ------------------------------------------------------------------------------------------------ windows

def test_window_cuts_both_ends_event_by_event(tmp_path):
    """data.window = (50 ms, 200 ms) on N-MNIST files (integer us): events just outside and on both bounds."""
    window = (50_000, 200_000)
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=2, classes=(1, 2), t_max=300_000)
    assert all((r.t < r.t.min() + 50_000).any() and (r.t > r.t.min() + 250_000).any() for r in recs)
    r = sorted_by_path(recs, "train")[0]
    r.x, r.y, r.p = np.arange(6), np.arange(6), np.array([0, 1, 0, 1, 0, 1])
    r.t = np.array([1000, 50_999, 51_000, 151_000, 251_000, 251_001])
    fake.write_atis(r.path, r.x, r.y, r.t, r.p)
    train, test = nmnist.load_splits(cfg(tmp_path, window=window))
    # by hand: [51000, 251000] in 4 bins of 50 ms; 51000 -> bin 0, 151000 -> bin 2, the end 251000 -> bin 3
    f = train.frames[0]
    assert f.sum() == 3 and f[0, 2, 2, 0] == f[2, 3, 3, 1] == f[3, 4, 4, 0] == 1 and train.bin_us[0] == 50_000
    for fs, split in ((train, "train"), (test, "test")):
        check_frames(fs, sorted_by_path(recs, split), 4, (34, 34), window=window)
        assert np.all(fs.bin_us == 50_000)


@pytest.mark.parametrize("t_max", [2_000_000, 600_000])  # recordings longer / shorter than the window's end
def test_cifar10dvs_reference_window(tmp_path, monkeypatch, t_max):
    window = config.load(ROOT / "configs/cifar10_dvs.py").data.window
    assert window == (100_000, 1_100_000)
    recs = fake.write_fake_cifar10dvs(tmp_path, n_per_class=2, classes=(0, 9), n_events=300, t_max=t_max,
                                      aedat=False)
    monkeypatch.setattr(tonic.datasets.cifar10dvs, "read_aedat4", fake.fake_read_aedat4(recs))
    train, test = cifar10_dvs.load_splits(cfg(tmp_path, timesteps=10, window=window))
    check_frames(train, [recs[0], recs[2]], 10, (128, 128), window=window)   # int(0.9 * 2) = 1 per class
    check_frames(test, [recs[1], recs[3]], 10, (128, 128), window=window)
    bin_us = np.concatenate([train.bin_us, test.bin_us])
    ends = np.array([r.t.max() - r.t.min() for r in (recs[0], recs[2], recs[1], recs[3])])
    if t_max > 1_200_000:  # the window [0.1 s, 1.2 s] lies inside each recording: 110 ms bins
        assert np.all(ends > 1_200_000) and np.all(bin_us == 110_000)
    else:  # the part that exists: from 0.1 s to the last event
        np.testing.assert_array_equal(bin_us, (ends - 100_000) / 10)
        assert np.all(bin_us < 110_000)


def test_dvs_gesture_reference_window(tmp_path):
    window = config.load(ROOT / "configs/dvs_gesture.py").data.window
    assert window == (0, 1_300_000)
    recs = fake.write_fake_dvs_gesture(tmp_path, users={"train": (1,), "test": (24,)}, classes=(0, 10),
                                       n_events=150, t_max_ms=2000)
    train, test = dvs_gesture.load_splits(cfg(tmp_path, timesteps=16, size=(32, 32), window=window))
    for fs, split in ((train, "train"), (test, "test")):
        check_frames(fs, [r for r in recs if r.split == split], 16, (128, 128), (32, 32), window=window)
        assert np.all(fs.bin_us == 1_300_000 / 16)


def test_no_event_in_the_window_is_zero_frames_and_a_warning(tmp_path):
    path = _nmnist_with(tmp_path, "00009.bin", fake.atis_bytes([1, 2], [3, 4], [10, 40_000], [0, 1]))
    msg = fr"{path}: no event in the window \[50010, 250010\] \(events span \[10, 40000\]\)"
    with pytest.warns(UserWarning, match=msg):
        train, _ = nmnist.load_splits(cfg(tmp_path, window=(50_000, 200_000)))
    assert train.frames.shape == (3, 4, 34, 34, 2) and not train.frames[-1].any() and train.bin_us[-1] == 0
    assert train.frames[0].any() and train.bin_us[0] > 0


# ----------------------------------------------------------------------------------------- missing data

@pytest.mark.parametrize("module, expect", [
    (nmnist, r"NMNIST/train.zip .*NMNIST/Train/\*/\*.bin .*Mendeley"),
    (dvs_gesture, r"DVSGesture/ibmGestureTrain.tar.gz .*ibmGestureTrain/\*/\*.npy .*figshare"),
    (ncaltech101, r"NCALTECH101/N-Caltech101-archive.zip .*Caltech101/\*/\*.bin .*Mendeley"),
    (cifar10_dvs, r"CIFAR10DVS/CIFAR10DVS.zip .*CIFAR10DVS/\*/\*.aedat4 .*figshare"),
])
def test_missing_data_is_a_clear_error(tmp_path, module, expect):
    with pytest.raises(FileNotFoundError, match=f"(?s){expect}.*placeholder.*never downloads"):
        module.load_splits(cfg(tmp_path))


def test_missing_archive_placeholder_alone(tmp_path):
    fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1,))
    os.remove(tmp_path / "NMNIST" / "test.zip")
    with pytest.raises(FileNotFoundError, match=r"NMNIST/test.zip  \(archive, or an empty placeholder"):
        nmnist.load_splits(cfg(tmp_path))


def test_incomplete_folder_warns(tmp_path):
    fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1,))
    msg = r"NMNIST/Train: found 1 recordings, the official N-MNIST train split has 60000"
    with pytest.warns(UserWarning, match=msg):
        nmnist.load_splits(cfg(tmp_path))


# -------------------------------------------------------------------------------------------- bad data

def _nmnist_with(tmp_path, name, data: bytes):
    fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    path = tmp_path / "NMNIST" / "Train" / "2" / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("events, message", [
    (([34], [3], [10], [1]), r"x = 34 outside the sensor: need 0 <= x < W = 34"),
    (([1, 2, 3], [1, 2, 3], [50, 40, 60], [0, 1, 0]), r"t is not sorted: t\[1\] = 40 < t\[0\] = 50"),
])
def test_nmnist_bad_events_name_the_file(tmp_path, events, message):
    path = _nmnist_with(tmp_path, "00009.bin", fake.atis_bytes(*events))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        nmnist.load_splits(cfg(tmp_path))


def test_truncated_atis_file(tmp_path):
    path = _nmnist_with(tmp_path, "00009.bin", fake.atis_bytes([1, 2], [3, 4], [5, 6], [0, 1])[:-2])
    with pytest.raises(ValueError, match=f"{path}: truncated or corrupt ATIS file: 8 bytes"):
        nmnist.load_splits(cfg(tmp_path))


def test_empty_recording_is_zero_frames_and_a_warning(tmp_path):
    path = _nmnist_with(tmp_path, "00009.bin", b"")
    with pytest.warns(UserWarning, match=f"{path}: empty recording"):
        train, _ = nmnist.load_splits(cfg(tmp_path))
    assert train.frames[-1].shape == (4, 34, 34, 2) and not train.frames[-1].any() and train.bin_us[-1] == 0
    assert train.frames[0].any() and train.bin_us[0] > 0


def test_ncaltech101_empty_and_off_canvas_recordings(tmp_path):
    fake.write_fake_ncaltech101(tmp_path, n_per_class=2, classes=("ant", "ibis"))
    empty = tmp_path / "NCALTECH101" / "Caltech101" / "ant" / "image_0003.bin"
    empty.write_bytes(b"")  # tonic's own reader fails on it (min of nothing); here: zeros and a warning
    with pytest.warns(UserWarning, match=f"{empty}: empty recording"):
        train, test = ncaltech101.load_splits(cfg(tmp_path, timesteps=2))
    assert sum(not f.any() for fs in (train, test) for f in fs.frames) == 1
    wide = fake.write_atis(empty, [5, 250], [0, 9], [0, 9], [0, 1])  # 246 px wide after the shift
    with pytest.raises(ValueError, match=f"{wide}: x = 245 outside the sensor: need 0 <= x < W = 240"):
        ncaltech101.load_splits(cfg(tmp_path, timesteps=2))


def test_corrupt_gesture_npy(tmp_path):
    fake.write_fake_dvs_gesture(tmp_path, users={"train": (1,), "test": (24,)}, classes=(0, 1), n_events=10)
    path = tmp_path / "DVSGesture" / "ibmGestureTrain" / "user01_led" / "1.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path}: could not read the recording"):
        dvs_gesture.load_splits(cfg(tmp_path))


def test_gesture_negative_timestamp_and_bad_label(tmp_path):
    fake.write_fake_dvs_gesture(tmp_path, users={"train": (1,), "test": (24,)}, classes=(0, 1), n_events=10)
    folder = tmp_path / "DVSGesture" / "ibmGestureTrain" / "user01_led"
    neg = fake.write_gesture_npy(folder / "1.npy", [1, 2], [3, 4], [0, 1], [-5, 7])
    with pytest.raises(ValueError, match=f"{neg}: negative timestamp t = -5000"):
        dvs_gesture.load_splits(cfg(tmp_path))
    os.remove(neg)
    bad = fake.write_gesture_npy(folder / "11.npy", [1], [3], [0], [5])
    with pytest.raises(ValueError, match=f"{bad}: label 11 outside the class range \\[0, 11\\)"):
        dvs_gesture.load_splits(cfg(tmp_path))


def test_size_must_downsample(tmp_path):
    fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1,))
    with pytest.raises(ValueError, match=r"data.size = \(40, 40\) must be \(\) or \(H, W\) with 1 <= H <= 34"):
        nmnist.load_splits(cfg(tmp_path, size=(40, 40)))


# ------------------------------------------------------------------------------------------------ cache

def counting_reader(monkeypatch, fail_on=None):
    """Replaces tonic's N-MNIST file reader by a counting wrapper (raising on call number ``fail_on``)."""
    calls = []
    real = tonic.io.read_mnist_file

    def read(path, dtype):
        calls.append(path)
        if len(calls) == fail_on:
            raise OSError("disk gone")
        return real(path, dtype=dtype)

    monkeypatch.setattr(tonic.datasets.nmnist, "read_mnist_file", read)
    return calls


def test_second_load_reads_the_cache_and_new_settings_rebuild(tmp_path, monkeypatch):
    fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2, 3))
    calls = counting_reader(monkeypatch)
    first = nmnist.load_splits(cfg(tmp_path))
    assert len(calls) == 6
    second = nmnist.load_splits(cfg(tmp_path))
    assert len(calls) == 6  # no raw read
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.frames, b.frames)
    nmnist.load_splits(cfg(tmp_path, timesteps=3))
    nmnist.load_splits(cfg(tmp_path, size=(17, 17)))
    windowed = nmnist.load_splits(cfg(tmp_path, window=(0, 100_000)))
    assert len(calls) == 24  # each new setting, the window included, read the raw files again
    names = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "frame_cache" / "nmnist").iterdir())
    assert names == ["test_T3_34x34", "test_T4_17x17", "test_T4_34x34", "test_T4_34x34",
                     "train_T3_34x34", "train_T4_17x17", "train_T4_34x34", "train_T4_34x34"]
    again = nmnist.load_splits(cfg(tmp_path, window=(0, 100_000)))
    assert len(calls) == 24
    for a, b, whole in zip(windowed, again, first):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.bin_us, b.bin_us)
        assert np.all(a.bin_us == 25_000) and a.frames.sum() < whole.frames.sum()


def test_cache_reads_no_raw_file(tmp_path, monkeypatch):
    fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    first, _ = nmnist.load_splits(cfg(tmp_path))

    def broken(*args, **kwargs):
        raise AssertionError("raw reader called")

    monkeypatch.setattr(tonic.datasets.nmnist, "read_mnist_file", broken)
    again, _ = nmnist.load_splits(cfg(tmp_path))
    np.testing.assert_array_equal(again.frames, first.frames)
    np.testing.assert_array_equal(again.bin_us, first.bin_us)


def test_changed_raw_file_rebuilds(tmp_path):
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    nmnist.load_splits(cfg(tmp_path))
    r = recs[0]
    r.x, r.y, r.t, r.p = np.array([3]), np.array([4]), np.array([7]), np.array([1])
    fake.write_atis(r.path, r.x, r.y, r.t, r.p)
    train, _ = nmnist.load_splits(cfg(tmp_path))
    check_frames(train, sorted_by_path(recs, "train"), 4, (34, 34))


def test_interrupted_build_leaves_nothing_trusted(tmp_path, monkeypatch):
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2, 3))
    counting_reader(monkeypatch, fail_on=2)
    with pytest.raises(ValueError, match=r"Train/2/00001.bin: could not read the recording \(OSError: disk gone\)"):
        nmnist.load_splits(cfg(tmp_path))
    assert list((tmp_path / "frame_cache" / "nmnist").iterdir()) == []  # no cache, no temporary folder
    monkeypatch.undo()
    train, _ = nmnist.load_splits(cfg(tmp_path))
    check_frames(train, sorted_by_path(recs, "train"), 4, (34, 34))


def test_tampered_cache_is_rebuilt(tmp_path):
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    nmnist.load_splits(cfg(tmp_path))
    folder = next((tmp_path / "frame_cache" / "nmnist").glob("train_*"))
    meta = json.loads((folder / "meta.json").read_text())
    meta["settings"]["timesteps"] = 5
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=f"frame cache {folder} cannot be trusted .*rebuilding"):
        train, _ = nmnist.load_splits(cfg(tmp_path))
    check_frames(train, sorted_by_path(recs, "train"), 4, (34, 34))


@pytest.mark.parametrize("name,damage,what", [
    ("frames.npy", lambda b: b[:-3], r"frames.npy: \d+ bytes, recorded \d+ \(truncated or extended\)"),
    ("frames.npy", lambda b: b[:-200] + bytes(x ^ 0xFF for x in b[-200:]),
     r"frames.npy: different bytes than recorded, at the recorded size \(altered in place\)"),
    ("labels.npy", lambda b: b[:-4] + bytes(4), r"labels.npy: different bytes than recorded"),
])
def test_damaged_cache_file_is_named_and_rebuilt(tmp_path, name, damage, what):
    """A cache array truncated or garbled at the same size (e.g. flipped bits): caught by its checksum, named,
    rebuilt; the frames are right again."""
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    nmnist.load_splits(cfg(tmp_path))
    folder = next((tmp_path / "frame_cache" / "nmnist").glob("train_*"))
    path = folder / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.warns(UserWarning, match=f"frame cache {folder} cannot be trusted \\(ValueError: {what}.*rebuilding"):
        train, _ = nmnist.load_splits(cfg(tmp_path))
    check_frames(train, sorted_by_path(recs, "train"), 4, (34, 34))


def test_cache_without_bin_us_is_rebuilt(tmp_path):
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    nmnist.load_splits(cfg(tmp_path))
    folder = next((tmp_path / "frame_cache" / "nmnist").glob("train_*"))
    os.remove(folder / "bin_us.npy")
    with pytest.warns(UserWarning, match=f"frame cache {folder} cannot be trusted .*bin_us.npy.*rebuilding"):
        train, _ = nmnist.load_splits(cfg(tmp_path))
    check_frames(train, sorted_by_path(recs, "train"), 4, (34, 34))


def test_counts_beyond_uint8_grow_the_cache_dtype(tmp_path):
    recs = fake.write_fake_nmnist(tmp_path, n_per_class=1, classes=(1, 2))
    r = next(r for r in recs if r.split == "train" and r.label == 2)  # the second train recording
    r.x, r.y, r.p = np.full(300, 5), np.full(300, 6), np.ones(300, int)
    r.t = np.arange(300)
    fake.write_atis(r.path, r.x, r.y, r.t, r.p)
    train, test = nmnist.load_splits(cfg(tmp_path, timesteps=1))
    assert train.frames.dtype == np.uint16 and test.frames.dtype == np.uint8
    assert train.frames[1, 0, 6, 5, 1] == 300
    check_frames(train, sorted_by_path(recs, "train"), 1, (34, 34))


def test_cache_key_covers_every_setting():
    base = {"dataset": "nmnist", "split": "train", "timesteps": 4, "size": [34, 34]}
    keys = {cache.cache_key(base)} | {cache.cache_key({**base, k: v}) for k, v in
                                      [("split", "test"), ("timesteps", 5), ("size", [17, 17]),
                                       ("window", [100_000, 1_100_000])]}
    assert len(keys) == 5
