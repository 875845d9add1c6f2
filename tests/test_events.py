"""Event checks, the frame integrator (against a per-event loop), FrameSet validation and batching."""

import warnings

import numpy as np
import pytest
import tonic

from aoi_jax.data import events

SENSOR = (7, 5, 2)  # (W, H, P): non-square, so a swapped x/y shows


def make_events(x, y, t, p, dtype=tonic.io.events_struct):
    """Fills the fields by name (tonic's make_structured_array assigns in dtype field order)."""
    ev = np.zeros(len(t), dtype)
    for name, v in zip("xytp", (x, y, t, p)):
        ev[name] = v
    return ev


def random_events(rng, n, sensor=SENSOR, t_max=10_000, dtype=tonic.io.events_struct):
    W, H, _ = sensor
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), np.sort(rng.integers(0, t_max, n)),
                       rng.integers(0, 2, n).astype(bool), dtype=dtype)


def integrate_reference(ev, T, sensor, t_start=None, t_end=None):
    """Per-event Python loop, straight from the formula in ``integrate``'s docstring."""
    W, H, _ = sensor
    out = np.zeros((T, 2, H, W))
    t_start = int(ev["t"][0]) if t_start is None else t_start
    t_end = int(ev["t"][-1]) if t_end is None else t_end
    for e in ev:
        t = int(e["t"])
        if not t_start <= t <= t_end:
            continue
        b = 0 if t_end == t_start else min((t - t_start) * T // (t_end - t_start), T - 1)
        out[b, int(e["p"]), int(e["y"]), int(e["x"])] += 1
    return out


@pytest.mark.parametrize("T", [1, 3, 10, 64])
def test_integrate_matches_loop_and_keeps_every_event(T, rng):
    ev = random_events(rng, 500)
    frames = events.integrate(ev, T, SENSOR)
    assert frames.shape == (T, 2, 5, 7) and frames.dtype == np.float32
    assert frames.sum() == len(ev)
    np.testing.assert_array_equal(frames, integrate_reference(ev, T, SENSOR))


@pytest.mark.parametrize("dtype", [
    np.dtype([("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("p", "?")]),         # CIFAR10-DVS order and types
    np.dtype([("x", "<i8"), ("y", "<i8"), ("t", "<i8"), ("p", "<i8")]),        # N-MNIST: all int
])
def test_integrate_indexes_fields_by_name(dtype, rng):
    ev = random_events(rng, 300, dtype=dtype)
    np.testing.assert_array_equal(events.integrate(ev, 4, SENSOR), integrate_reference(ev, 4, SENSOR))


def test_last_event_and_short_window_are_counted():
    # 5 events over 4 us into 10 bins: tonic's ToFrame returns all zeros here (tonic-notes 3.6)
    ev = make_events([0, 1, 2, 3, 4], [0, 0, 1, 1, 2], [0, 1, 2, 3, 4], [0, 1, 0, 1, 1])
    frames = events.integrate(ev, 10, SENSOR)
    assert frames.sum() == 5
    for e, b in zip(ev, [0, 2, 5, 7, 9]):          # floor(t * 10 / 4), t == t_end in the last bin
        assert frames[b, int(e["p"]), e["y"], e["x"]] == 1
    assert frames[9].sum() == 1


def test_single_event_and_zero_duration_go_to_bin_0():
    one = make_events([3], [2], [1234], [True])
    frames = events.integrate(one, 5, SENSOR)
    assert frames.sum() == 1 and frames[0, 1, 2, 3] == 1
    same_t = make_events([0, 1, 2], [0, 0, 0], [7, 7, 7], [0, 0, 1])
    frames = events.integrate(same_t, 3, SENSOR)
    assert frames[0].sum() == 3 and frames[1:].sum() == 0


def test_empty_recording_warns_and_returns_zeros():
    empty = make_events([], [], [], [])
    with pytest.warns(UserWarning, match="sample_17.*empty recording"):
        frames = events.integrate(empty, 4, SENSOR, source="sample_17")
    assert frames.shape == (4, 2, 5, 7) and not frames.any()


def test_explicit_window_excludes_outside_events(rng):
    ev = random_events(rng, 400, t_max=1000)
    frames = events.integrate(ev, 6, SENSOR, t_start=200, t_end=700)
    inside = (ev["t"] >= 200) & (ev["t"] <= 700)
    assert frames.sum() == inside.sum()
    np.testing.assert_array_equal(frames, integrate_reference(ev, 6, SENSOR, 200, 700))
    with pytest.warns(UserWarning, match="rec.bin.*no event in the window"):
        assert not events.integrate(ev, 6, SENSOR, t_start=5000, t_end=6000, source="rec.bin").any()
    with pytest.raises(ValueError, match="rec.bin.*before t_start"):
        events.integrate(ev, 6, SENSOR, t_start=700, t_end=200, source="rec.bin")


def test_window_longer_than_recording_keeps_relative_time():
    ev = make_events([0, 1], [0, 0], [0, 99], [1, 1])
    frames = events.integrate(ev, 4, SENSOR, t_start=0, t_end=400)
    assert frames[0].sum() == 2 and frames[1:].sum() == 0


def test_window_bounds_relative_to_first_event():
    t = np.array([1000, 1500, 4000, 9000], np.uint64)              # unsigned, as CIFAR10-DVS's reader gives
    assert events.window_bounds(t) == (1000, 9000)                   # whole recording
    assert events.window_bounds(t, (500, 3000)) == (1500, 4500)      # cuts both ends: L / T per bin
    assert events.window_bounds(t, (2000, 100_000)) == (3000, 9000)  # shorter than the window: cut at t_1
    assert events.window_bounds(t, (8000, 1000)) == (9000, 9000)     # only the last event, at the start
    assert events.window_bounds(t, (9000, 1000)) == (10000, 11000)   # after the last event: kept whole
    bounds = events.window_bounds(np.array([2.5, 7.0]), (1, 3))
    assert bounds == (3.5, 6.5) and all(type(b) is float for b in bounds)
    ev = make_events([0, 1, 2, 3], [0, 0, 0, 0], t, [0, 1, 0, 1])
    with pytest.warns(UserWarning, match=r"r.bin: no event in the window \[10000, 11000\] "
                                         r"\(events span \[1000, 9000\]\)"):
        events.integrate(ev, 2, SENSOR, *events.window_bounds(t, (9000, 1000)), source="r.bin")


@pytest.mark.parametrize("field,value,msg", [
    ("x", 7, r"x = 7 outside the sensor: need 0 <= x < W = 7 \(sensor_size \(W, H, P\) = \(7, 5, 2\)\)"),
    ("y", 5, r"y = 5 outside the sensor.*H = 5"),
    ("x", -1, r"x = -1 outside the sensor"),
    ("t", -5, r"negative timestamp t = -5"),
    ("p", -1, r"polarity p = -1 outside \{0, 1\} \(map -1/\+1"),
    ("p", 2, r"polarity p = 2 outside"),
])
def test_bad_events_raise_naming_the_source(field, value, msg):
    dtype = np.dtype([("x", "<i8"), ("y", "<i8"), ("t", "<i8"), ("p", "<i8")])
    ev = make_events([0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 0], dtype=dtype)
    ev[field][0] = value
    with pytest.raises(ValueError, match="user03/4.npy: " + msg):
        events.check_events(ev, SENSOR, "user03/4.npy")
    with pytest.raises(ValueError, match="user03/4.npy: " + msg):
        events.integrate(ev, 2, SENSOR, source="user03/4.npy")


def test_unsorted_missing_field_and_not_structured_raise():
    ev = make_events([0, 1, 2], [0, 1, 2], [5, 3, 9], [0, 1, 0])
    with pytest.raises(ValueError, match=r"a.bin: t is not sorted: t\[1\] = 3 < t\[0\] = 5"):
        events.check_events(ev, SENSOR, "a.bin")
    no_p = np.zeros(3, dtype=[("x", "<i2"), ("y", "<i2"), ("t", "<i8")])
    with pytest.raises(ValueError, match=r"b.bin: events lack field\(s\) \['p'\]"):
        events.check_events(no_p, SENSOR, "b.bin")
    with pytest.raises(ValueError, match="c.bin: events must be a numpy structured array"):
        events.check_events(np.zeros((3, 4)), SENSOR, "c.bin")
    with pytest.raises(ValueError, match=r"d.bin: events must be a 1-D structured array, got shape \(1, 3\)"):
        events.check_events(ev[None], SENSOR, "d.bin")
    with pytest.raises(ValueError, match=r"e.bin: polarity p = True on a single-polarity sensor"):
        events.check_events(make_events([0], [0], [0], [True]), (7, 5, 1), "e.bin")


def make_frameset(rng, n=10, T=3, dtype=np.uint8, num_classes=4):
    frames = rng.integers(0, 5, (n, T, 5, 7, 2)).astype(dtype)
    return events.FrameSet(frames, rng.integers(0, num_classes, n), num_classes)


def test_frameset_validation(rng):
    fs = make_frameset(rng)
    assert fs.labels.dtype == np.int32 and len(fs) == 10 and fs.sensor_hw == (5, 7)
    frames = np.zeros((4, 3, 5, 7, 2), np.float32)
    with pytest.raises(ValueError, match=r"label 10 out of range \[0, 10\) \(first at index 2\)"):
        events.FrameSet(frames, np.array([0, 1, 10, 3]), 10)
    with pytest.raises(ValueError, match="label -1 out of range"):
        events.FrameSet(frames, np.array([0, -1, 1, 3]), 10)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        events.FrameSet(frames, np.array([0, 1, 2]), 10)
    with pytest.raises(ValueError, match=r"\(N, T, H, W, C\) array, got shape \(4, 5, 7, 2\)"):
        events.FrameSet(frames[:, 0], np.arange(4), 10)
    with pytest.raises(ValueError, match="labels must be integers"):
        events.FrameSet(frames, np.zeros(4), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        events.FrameSet(frames, np.zeros(4, int), 0)
    assert fs.bin_us is None
    with_bins = events.FrameSet(frames, np.arange(4), 10, bin_us=[1000, 0, 2.5, 1000])
    assert with_bins.bin_us.dtype == np.float64 and with_bins.bin_us.tolist() == [1000, 0, 2.5, 1000]
    for bad, got in [(np.ones(3), r"\(3,\), range \[1.0, 1.0\]"), ([1, -1, 1, 1], r"\(4,\), range \[-1.0, 1.0\]"),
                     ([1, np.nan, 1, 1], r"\(4,\), range \[nan, nan\]")]:
        with pytest.raises(ValueError, match=r"bin_us must be None or \(4,\) finite microseconds >= 0, got shape "
                                             + got):
            events.FrameSet(frames, np.arange(4), 10, bin_us=bad)


def test_batches_time_major_and_cover_each_sample_once(rng):
    fs = make_frameset(rng, n=10)
    out = list(events.batches(fs, 4))
    assert [b["frames"].shape for b in out] == [(3, 4, 5, 7, 2)] * 2 + [(3, 2, 5, 7, 2)]
    assert events.num_batches(10, 4) == 3 and events.num_batches(10, 4, drop_last=True) == 2
    assert all(b["frames"].dtype == np.float32 and b["label"].dtype == np.int32 for b in out)
    frames = np.concatenate([b["frames"] for b in out], axis=1)     # file order without rng
    np.testing.assert_array_equal(frames, fs.frames.transpose(1, 0, 2, 3, 4))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in out]), fs.labels)

    dropped = list(events.batches(fs, 4, rng=np.random.default_rng(1), drop_last=True))
    assert len(dropped) == 2 and all(b["frames"].shape[1] == 4 for b in dropped)


def test_batches_shuffle_is_seeded(rng):
    fs = make_frameset(rng, n=12)
    fs = events.FrameSet(fs.frames, np.arange(12) % 4, 4)
    fs.frames[:, 0, 0, 0, 0] = np.arange(12)                         # tag each sample

    def order(seed):
        out = list(events.batches(fs, 5, rng=np.random.default_rng(seed)))
        return np.concatenate([b["frames"][0, :, 0, 0, 0] for b in out]).astype(int), out

    a, out = order(3)
    b, _ = order(3)
    c, _ = order(4)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(12)) and not np.array_equal(a, np.arange(12)) and not np.array_equal(a, c)
    for batch in out:                                                # labels travel with their frames
        np.testing.assert_array_equal(batch["label"], batch["frames"][0, :, 0, 0, 0].astype(int) % 4)


def test_batches_read_memmap(tmp_path, rng):
    fs = make_frameset(rng, n=6)
    np.save(tmp_path / "f.npy", fs.frames)
    mm = events.FrameSet(np.load(tmp_path / "f.npy", mmap_mode="r"), fs.labels, 4)
    got = np.concatenate([b["frames"] for b in events.batches(mm, 4, rng=np.random.default_rng(0))], axis=1)
    want = np.concatenate([b["frames"] for b in events.batches(fs, 4, rng=np.random.default_rng(0))], axis=1)
    np.testing.assert_array_equal(got, want)


def test_integrate_is_quiet_on_normal_input(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        events.integrate(random_events(rng, 50), 5, SENSOR)
