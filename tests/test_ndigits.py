"""N-Digits: the generator (against a per-pixel reference), its cache, the fixed split, the registry; the
hard variant: seeded, cached, its event statistics."""

import dataclasses
import shutil
import warnings

import numpy as np
import pytest
import scipy.ndimage
import tonic

from aoi_jax import data
from aoi_jax.config import DataConfig
from aoi_jax.data import events, ndigits

P = ndigits.NDigitsParams()
H = ndigits.HARD


@pytest.fixture(scope="module")
def few():
    """Samples 0, 5 and 11 (labels 0, 5, 1) with the default parameters, seed 0."""
    return ndigits.generate([0, 5, 11], seed=0)


def test_events_are_valid_tonic_arrays(few):
    ev, offsets, labels = few
    assert ev.dtype == tonic.io.events_struct and offsets.tolist()[0] == 0 and offsets[-1] == len(ev)
    np.testing.assert_array_equal(labels, [0, 5, 1])
    for i, e in enumerate(ndigits.split_events(ev, offsets)):
        events.check_events(e, (34, 34, 2), f"sample {i}")          # inside 34x34, t >= 0 and sorted
        assert e["t"][-1] <= P.duration_us == 300_000
        assert 0.3 < e["p"].mean() < 0.7                             # both polarities, roughly balanced
        assert 1000 < len(e) < 5000


def test_generate_is_seeded_and_per_sample(few):
    ev, offsets, _ = few
    again = ndigits.generate([0, 5, 11], seed=0)[0]
    np.testing.assert_array_equal(again, ev)
    alone, off5, lab5 = ndigits.generate([5], seed=0)                 # independent of the other samples
    np.testing.assert_array_equal(alone, ev[offsets[1]:offsets[2]])
    assert lab5.tolist() == [5] and off5.tolist() == [0, len(alone)]
    other = ndigits.generate([5], seed=1)[0]
    assert len(other) != len(alone) or not np.array_equal(other, alone)
    with pytest.raises(ValueError, match=r"indices must be a 1-D sequence in \[0, 1797\)"):
        ndigits.generate([1797])


def test_progress_reaches_total():
    calls = []
    ndigits.generate([1, 2, 3], params=dataclasses.replace(P, saccade_ms=5.0), chunk=2,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (3, 3) and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))


def test_saccade_path_triangle_at_rest_on_vertices():
    path = ndigits.saccade_path(P)                                   # (301, 2) at 0, 1, ..., 300 ms
    assert path.shape == (301, 2)
    r = P.saccade_px / np.sqrt(3)
    verts = path[[0, 100, 200, 300]]
    np.testing.assert_allclose(np.linalg.norm(verts, axis=1), r)
    np.testing.assert_allclose(verts[0], verts[3], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(verts[1] - verts[0]), P.saccade_px)
    np.testing.assert_allclose(path[1] - path[0], 0, atol=2e-3)     # raised cosine: slow at the vertices
    assert np.linalg.norm(path, axis=1).max() <= r + 1e-12


@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.3, -1.7), (-1.5, 0.75)])
def test_render_is_bilinear_upscale_shifted(shift, rng):
    img = rng.uniform(0, 1, (2, 8, 8)).astype(np.float32)
    got = ndigits._render(img, P, shift)
    x0 = (34 - 28) / 2
    yy, xx = np.meshgrid(np.arange(34.0), np.arange(34.0), indexing="ij")
    coords = [((yy - x0 - shift[1]) + 0.5) * 8 / 28 - 0.5, ((xx - x0 - shift[0]) + 0.5) * 8 / 28 - 0.5]
    for b in range(2):
        digit = scipy.ndimage.map_coordinates(np.pad(img[b].astype(np.float64), 1), [c + 1 for c in coords],
                                              order=1, mode="constant", cval=0.0)
        want = np.log(P.background + (1 - P.background) * digit)
        np.testing.assert_allclose(got[b], want, atol=1e-5)


def dvs_reference(params, seed, index):
    """Per pixel, per step, per crossing Python loop; greedy refractory filter, no noise."""
    images, _ = ndigits.digits()
    img = images[index:index + 1] / 16.0
    c_on, c_off = ndigits._thresholds(params, seed)
    path = ndigits.saccade_path(params)
    Ls = [ndigits._render(img, params, s)[0] for s in path]
    u = np.random.default_rng([seed, 1, index]).uniform(-1.0, 1.0, (34, 34)).astype(np.float32)
    ref = Ls[0] - np.where(u > 0, u * c_on, u * c_off)
    out = []
    dt = params.dt_us
    for y in range(34):
        for x in range(34):
            last, lref = -np.inf, ref[y, x]
            for k in range(1, len(path)):
                lp, lk = float(Ls[k - 1][y, x]), float(Ls[k][y, x])
                d = Ls[k][y, x] - lref
                on = d > 0
                C = c_on[y, x] if on else c_off[y, x]
                n = int(np.floor(abs(d) / C))
                sgn = 1.0 if on else -1.0
                for j in range(1, n + 1):
                    level = float(lref) + sgn * j * float(C)
                    t = (k - 1) * dt + min(max((level - lp) / (lk - lp), 0.0), 1.0) * dt
                    if t - last >= params.refractory_us:
                        out.append((int(np.floor(t)), x, y, on))
                        last = t
                lref = lref + np.float32(sgn * n * C)
    return sorted(out)


@pytest.mark.parametrize("refractory_us", [0.0, 2500.0])
def test_dvs_matches_per_pixel_reference(refractory_us):
    # 6 ms saccades: fast enough for several crossings per 1 ms step, so the refractory period bites
    params = dataclasses.replace(P, saccade_ms=6.0, noise_hz=0.0, refractory_us=refractory_us)
    ev = ndigits.generate([7], params=params, seed=3)[0]
    got = sorted(zip(ev["t"].tolist(), ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist()))
    want = dvs_reference(params, 3, 7)
    assert len(want) > 500
    assert got == want


def test_several_events_per_step_and_noise():
    fast = dataclasses.replace(P, saccade_ms=6.0, noise_hz=0.0, refractory_us=0.0)
    ev = ndigits.generate([7], params=fast)[0]
    pix_step = (ev["t"] // fast.dt_us) * 34 * 34 + ev["y"] * 34 + ev["x"]
    assert np.bincount(pix_step).max() >= 3
    quiet = dataclasses.replace(P, saccade_ms=6.0, saccade_px=0.0, noise_hz=1000.0)   # no motion: noise only
    ev = ndigits.generate([7], params=quiet)[0]
    expected = 1000.0 * 34 * 34 * quiet.duration_us * 1e-6
    assert abs(len(ev) - expected) < 5 * np.sqrt(expected) and 0.4 < ev["p"].mean() < 0.6


def first_60(monkeypatch):
    images, labels = ndigits.digits()
    monkeypatch.setattr(ndigits, "digits", lambda: (images[:60], labels[:60]))


@pytest.fixture
def small_digits(monkeypatch):
    """The first 60 digits only, so that whole-set loads stay fast."""
    first_60(monkeypatch)


@pytest.fixture(scope="module")
def built_60(tmp_path_factory):
    """``(root, train, test)``: a data folder holding the first 60 digits' N-Digits cache as a first load
    leaves it (events of seed 0 and frames at T = 4, default parameters, each with its checksum record), built
    once per module, and the splits that load returned. Tests copy ``root / "ndigits"`` (``copy_built``)."""
    root = tmp_path_factory.mktemp("ndigits_60")
    with pytest.MonkeyPatch.context() as m:
        first_60(m)
        train, test = ndigits.load_splits(DataConfig(data_dir=str(root), timesteps=4, seed=0))
    return root, train, test


def copy_built(built_60, tmp_path):
    """``tmp_path`` holding a copy of ``built_60``'s cache folder: as if ``tmp_path`` had been loaded once."""
    shutil.copytree(built_60[0] / "ndigits", tmp_path / "ndigits")
    return tmp_path


def forbid(monkeypatch, *names):
    def boom(*args, **kwargs):
        raise AssertionError("the cache should have been used")
    for name in names:
        monkeypatch.setattr(ndigits, name, boom)


def test_cache_reused_and_keyed(tmp_path, small_digits, monkeypatch):
    cfg = DataConfig(data_dir=str(tmp_path), timesteps=4, seed=0)
    train, test = ndigits.load_splits(cfg)
    files = sorted(p.name for p in (tmp_path / "ndigits").iterdir())
    key = ndigits.cache_key(P, 0)
    assert files == [f"events_s0_{key}.npz", f"events_s0_{key}.npz.sha256.json", f"frames_T4_{key}.npy",
                     f"frames_T4_{key}.npy.sha256.json"]
    assert len(train) + len(test) == 60 and train.frames.dtype == np.uint8
    assert train.frames.shape == (len(train), 4, 34, 34, 2) and test.frames.shape == (len(test), 4, 34, 34, 2)

    ev, offsets, labels = ndigits.generate(np.arange(60))               # the frames are integrate's
    want = np.stack([events.integrate(e, 4, (34, 34, 2), 0, P.duration_us)
                     for e in ndigits.split_events(ev, offsets)]).transpose(0, 1, 3, 4, 2)
    idx_train, _ = ndigits.split_indices(labels, 0.2, 0)
    np.testing.assert_array_equal(train.frames, want[idx_train])
    assert want.sum() == len(ev)                                        # every event counted

    with monkeypatch.context() as m:
        forbid(m, "generate", "load_events")
        train2, test2 = ndigits.load_splits(cfg)
    np.testing.assert_array_equal(train2.frames, train.frames)
    np.testing.assert_array_equal(test2.labels, test.labels)

    with monkeypatch.context() as m:                                    # new T: from cached events
        forbid(m, "generate")
        ndigits.load_splits(dataclasses.replace(cfg, timesteps=7))
    cached_ev, cached_off, _ = ndigits.load_events(tmp_path)
    np.testing.assert_array_equal(cached_ev, ev)
    np.testing.assert_array_equal(cached_off, offsets)

    ndigits.load_splits(dataclasses.replace(cfg, seed=1))
    ndigits.load_splits(cfg, params=dataclasses.replace(P, threshold=0.15))
    names = sorted(p.name for p in (tmp_path / "ndigits").iterdir())
    assert len([n for n in names if n.startswith("events_") and n.endswith(".npz")]) == 3
    assert not any(".tmp" in n for n in names)
    assert len({ndigits.cache_key(P, 0), ndigits.cache_key(P, 1),
                ndigits.cache_key(dataclasses.replace(P, threshold=0.15), 0)}) == 3


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])
    return r"\d+ bytes, recorded \d+ \(truncated or extended\)"


def garble(path):
    raw = bytearray(path.read_bytes())
    middle = slice(len(raw) // 2, len(raw) // 2 + 64)
    raw[middle] = bytes(b ^ 0x5A for b in raw[middle])
    path.write_bytes(bytes(raw))
    return r"different bytes than recorded, at the recorded size \(altered in place\)"


def unrecorded(path):
    (path.parent / (path.name + ".sha256.json")).unlink()
    return (rf"no checksum record {path.name}\.sha256\.json \(an interrupted write, or written by an older "
            r"version\)")


@pytest.mark.parametrize("damage", [truncate, garble, unrecorded])
@pytest.mark.parametrize("which", ["frames", "events"])
def test_damaged_cache_warns_naming_the_file_and_is_rebuilt(tmp_path, small_digits, built_60, monkeypatch, damage,
                                                           which):
    """A cache file truncated, garbled at the same size or without its record: the load warns naming the
    file and what is wrong, rebuilds it, and returns what the intact cache held (then reused silently)."""
    cfg = DataConfig(data_dir=str(copy_built(built_60, tmp_path)), timesteps=4, seed=0)
    _, train, test = built_60                                           # what the intact cache gave
    ev_path, fr_path = ndigits._paths(tmp_path, P, 0, 4)
    path = fr_path if which == "frames" else ev_path
    good = path.read_bytes() if which == "frames" else None
    what = damage(path)
    with pytest.warns(UserWarning, match=f"N-Digits cache {path} fails its check \\({what}\\); rebuilding it"):
        train2, test2 = ndigits.load_splits(cfg)
    np.testing.assert_array_equal(train2.frames, train.frames)
    np.testing.assert_array_equal(test2.labels, test.labels)
    if good is not None:
        assert fr_path.read_bytes() == good
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("error")
        forbid(m, "generate")
        ndigits.load_splits(cfg)                                        # intact again: no warning, no rebuild


def test_split_stratified_disjoint_fixed():
    _, labels = ndigits.digits()
    train, test = ndigits.split_indices(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels) == 1797
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()
    for c in range(10):
        assert (labels[test] == c).sum() == round(0.2 * (labels == c).sum())
    again = ndigits.split_indices(labels, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(ndigits.split_indices(labels, 0.2, seed=1)[1], test)


def test_registry_and_config_checks(tmp_path, small_digits, built_60):
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'; valid names: \[.*'ndigits'.*\]"):
        data.load(DataConfig(name="mnist"))
    with pytest.raises(ValueError, match=r"N-Digits frames are \(34, 34\); data.size = \(16, 16\)"):
        data.load(DataConfig(data_dir=str(tmp_path), size=(16, 16)))
    with pytest.raises(ValueError, match=r"N-Digits frames span the fixed window \[0, 300000\] us; "
                                         r"data.window = \(0, 1000\) is not supported \(use data.window=\(\) \)"):
        data.load(DataConfig(data_dir=str(tmp_path), window=(0, 1000)))
    train, test = data.load(DataConfig(data_dir=str(copy_built(built_60, tmp_path)), timesteps=3))
    assert train.num_classes == 10 and train.sensor_hw == (34, 34) and len(train) + len(test) == 60
    for fs in (train, test):  # 3 saccades of 100 ms in 3 bins
        np.testing.assert_array_equal(fs.bin_us, np.full(len(fs), 100_000.0))
    with pytest.raises(ValueError, match="not a multiple of dt_us"):
        ndigits.NDigitsParams(saccade_ms=0.3)


def test_default_data_dir_does_not_depend_on_the_current_directory(tmp_path, small_digits, monkeypatch):
    """data.data_dir = "" (the default): $AOI_JAX_DATA, else $XDG_CACHE_HOME/aoi_jax, else ~/.cache/aoi_jax,
    wherever the command runs; an explicit folder is taken as given (relative to the current directory)."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("AOI_JAX_DATA", str(tmp_path / "env"))
    assert data.data_root("") == tmp_path / "env"
    data.load(DataConfig(timesteps=3))
    assert (tmp_path / "env" / "ndigits").is_dir() and list((tmp_path / "elsewhere").iterdir()) == []
    monkeypatch.delenv("AOI_JAX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_root("") == tmp_path / "xdg" / "aoi_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root("") == tmp_path / "home" / ".cache" / "aoi_jax"
    assert data.data_root("~/mine") == tmp_path / "home" / "mine"
    assert data.data_root("rel") == tmp_path / "elsewhere" / "rel"


def test_full_set_split_sizes_and_learnable(ndigits_dir):
    """All 1797 samples (the session's shared cache): split sizes; logistic regression on summed frames (the
    sum over time counts every event whatever T is: T = 3, the frames the training tests build)."""
    import threadpoolctl
    from sklearn.linear_model import LogisticRegression

    train, test = ndigits.load_splits(DataConfig(data_dir=str(ndigits_dir), timesteps=3))
    assert (len(train), len(test)) == (1438, 359) and train.frames.shape[1:] == (3, 34, 34, 2)
    xtr = train.frames.sum(1).reshape(len(train), -1) / 10.0
    xte = test.frames.sum(1).reshape(len(test), -1) / 10.0
    with threadpoolctl.threadpool_limits(1):                          # 2 shared cores: no BLAS spin-waits
        acc = LogisticRegression(max_iter=1000).fit(xtr, train.labels).score(xte, test.labels)
    assert acc > 0.9


def test_default_cache_key_unchanged():
    """The default N-Digits keeps the cache key it had before the hard variant existed."""
    assert ndigits.cache_key(P, 0) == "7e79c40518eb"
    assert ndigits.cache_key(H, 0) != ndigits.cache_key(P, 0)


def test_hard_generate_is_seeded():
    ev, offsets, labels = ndigits.generate([0, 5, 11], params=H, seed=0)
    again, off_again, _ = ndigits.generate([0, 5, 11], params=H, seed=0)
    np.testing.assert_array_equal(again, ev)
    np.testing.assert_array_equal(off_again, offsets)
    other = ndigits.generate([0, 5, 11], params=H, seed=1)[0]
    assert len(other) != len(ev) or not np.array_equal(other, ev)
    for i, e in enumerate(ndigits.split_events(ev, offsets)):
        events.check_events(e, (34, 34, 2), f"sample {i}")
        assert e["t"][-1] <= H.duration_us == 450_000


def test_hard_registry_cache_reused_and_keyed(tmp_path, small_digits, monkeypatch):
    cfg = DataConfig(name="ndigits_hard", data_dir=str(tmp_path), timesteps=4, seed=0)
    train, test = data.load(cfg)
    key = ndigits.cache_key(H, 0)
    assert sorted(p.name for p in (tmp_path / "ndigits").iterdir()) == [
        f"events_s0_{key}.npz", f"events_s0_{key}.npz.sha256.json", f"frames_T4_{key}.npy",
        f"frames_T4_{key}.npy.sha256.json"]                                # each cache file with its record
    ev, offsets, labels = ndigits.generate(np.arange(60), params=H)
    want = np.stack([events.integrate(e, 4, (34, 34, 2), 0, H.duration_us)
                     for e in ndigits.split_events(ev, offsets)]).transpose(0, 1, 3, 4, 2)
    idx_train, idx_test = ndigits.split_indices(labels, 0.2, 0)
    np.testing.assert_array_equal(train.frames, want[idx_train])
    np.testing.assert_array_equal(test.labels, labels[idx_test])
    assert train.num_classes == 10 and train.sensor_hw == (34, 34)
    with monkeypatch.context() as m:
        forbid(m, "generate", "load_events")
        train2, test2 = data.load(cfg)
    np.testing.assert_array_equal(train2.frames, train.frames)
    np.testing.assert_array_equal(test2.frames, test.frames)


@pytest.fixture(scope="module")
def hard_and_default():
    """100 samples (every 18th) of HARD with and without its noise, and of the defaults without noise."""
    idx = np.arange(0, 1797, 18)
    return (ndigits.generate(idx, params=H), ndigits.generate(idx, params=dataclasses.replace(H, noise_hz=0.0)),
            ndigits.generate(idx, params=dataclasses.replace(P, noise_hz=0.0)))


def encode(ev):
    return ((ev["t"] * 34 + ev["y"]) * 34 + ev["x"]) * 2 + ev["p"]


def test_hard_event_statistics(hard_and_default):
    """Ranges around the README's figures: 1400-2000 events per sample, 70-85 % of them noise, 1/10-1/5 of the default's
    digit events; noise outnumbers the digit's events in each of T = 10 bins (in bin 1 by 2-5x), while the
    default's digit events outnumber its expected noise in each bin by over 5x."""
    (ev, off, _), (sig, sig_off, _), (dflt, dflt_off, _) = hard_and_default
    n, s, d = np.diff(off), np.diff(sig_off), np.diff(dflt_off)
    for e, q in zip(ndigits.split_events(ev, off), ndigits.split_events(sig, sig_off)):
        assert np.isin(encode(q), encode(e)).all()                  # noise is only added: signal = quiet run
    noise = n - s
    expected = H.noise_hz * 34 * 34 * H.duration_us * 1e-6          # Poisson mean per sample
    assert abs(noise.mean() - expected) < 5 * np.sqrt(expected / len(n))
    assert 1400 < n.min() and n.max() < 2000 and 1550 < n.mean() < 1800
    assert 0.7 < (noise / n).min() and (noise / n).max() < 0.85
    assert 0.1 < (s / d).min() and (s / d).max() < 0.2
    assert 0.4 < ev["p"].mean() < 0.6

    def per_bin(e, o, params):                                          # (T,) mean events per bin
        return ndigits.frames_from_events(e, o, 10, params).sum((0, 2, 3, 4)) / (len(o) - 1)

    signal_bins = per_bin(sig, sig_off, H)
    noise_bins = per_bin(ev, off, H) - signal_bins
    np.testing.assert_allclose(noise_bins, expected / 10, rtol=0.1)    # noise is uniform in time
    assert (signal_bins < noise_bins).all() and 0.2 < signal_bins[0] / noise_bins[0] < 0.5
    dflt_noise = P.noise_hz * 34 * 34 * P.duration_us * 1e-6 / 10
    assert (per_bin(dflt, dflt_off, P) > 5 * dflt_noise).all()           # the default: signal >> noise
