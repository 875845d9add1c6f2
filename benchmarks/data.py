"""Event data throughput: the frame integrator, a cache build through tonic, and epochs read from the cache.

1. integrator: ``cache.recording_frames`` (checks, integration into T bins, channels-last) on synthetic
   CIFAR10-DVS-sized recordings (128x128, ``--events`` events over 1.3 s), recordings/s and events/s;
2. build: ``nmnist.load_splits`` on a fake N-MNIST folder (``tests/fake_event_data.py``; tonic's reader,
   the integrator, the atomic cache write), recordings/s;
3. cached loader: ``events.batches`` (shuffled, float32 time-major batches) over a synthetic uint8 cache of
   CIFAR10-DVS size (N x T=10 x 128 x 128 x 2) opened with ``mmap_mode='r'``, optionally followed by the
   training augmentation (+-25 px translation). The full set is 10000 recordings (3.3 GB); ``--cached`` of
   them are written (default 1000, 328 MB) and the per-epoch time is extrapolated linearly to 10000.
   Reads come from the page cache after the write (warm); a cold disk read is slower.

    python -m benchmarks.data                     # defaults below
    python -m benchmarks.data --cached 10000      # the full 3.3 GB cache (needs that much free disk)
"""

import argparse
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

from aoi_jax import config
from aoi_jax.data import augment, cache, events, nmnist

CIFAR10_DVS = (10000, 10, 128, 128, 2)


def synthetic_recording(rng, n, width=128, height=128, duration_us=1_300_000):
    ev = np.zeros(n, [("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("p", "?")])  # aedat's dtype
    ev["t"] = np.sort(rng.integers(0, duration_us, n))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, width, n), rng.integers(0, height, n), rng.integers(0, 2, n)
    return ev


def bench_integrator(rng, n_events, repeats, timesteps):
    recs = [synthetic_recording(rng, n_events) for _ in range(repeats)]
    cache.recording_frames(recs[0], timesteps, (128, 128, 2), (128, 128), "warm-up")
    t0 = time.perf_counter()
    for i, ev in enumerate(recs):
        cache.recording_frames(ev, timesteps, (128, 128, 2), (128, 128), f"#{i}")
    dt = (time.perf_counter() - t0) / repeats
    print(f"integrator: {n_events} events -> ({timesteps}, 128, 128, 2): {dt * 1e3:.1f} ms per recording, "
          f"{1 / dt:.0f} recordings/s, {n_events / dt / 1e6:.1f} M events/s")


def bench_build(tmp, per_class, timesteps):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import fake_event_data as fake

    recs = fake.write_fake_nmnist(tmp / "nmnist", n_per_class=per_class, n_events=4000)
    cfg = config.DataConfig(name="nmnist", data_dir=str(tmp / "nmnist"), timesteps=timesteps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny folder is "incompletely extracted"
        t0 = time.perf_counter()
        nmnist.load_splits(cfg)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        nmnist.load_splits(cfg)
        reopen = time.perf_counter() - t0
    print(f"build (N-MNIST-like, 4000 events, tonic reader + frames + cache write): {len(recs)} recordings in "
          f"{build:.2f} s = {len(recs) / build:.0f} recordings/s; reopening the cache: {reopen * 1e3:.0f} ms")


def bench_cached(tmp, n, batch_size, rng, with_augment):
    shape = (n, *CIFAR10_DVS[1:])
    path = tmp / "frames.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    for a in range(0, n, 250):
        out[a:a + 250] = rng.integers(0, 4, (min(250, n - a), *shape[1:]), dtype=np.uint8)
    out.flush()
    del out
    frames = np.load(path, mmap_mode="r")
    fs = events.FrameSet(frames, rng.integers(0, 10, n).astype(np.int32), 10)
    cfg = config.DataConfig(name="cifar10_dvs", translate=25)
    t0 = time.perf_counter()
    seen = 0
    for batch in events.batches(fs, batch_size, rng=np.random.default_rng(0)):
        x = batch["frames"]
        if with_augment:
            x = augment.augment(x, rng, cfg, (128, 128))
        seen += x.shape[1]
    dt = time.perf_counter() - t0
    mb = n * np.prod(shape[1:]) / 2**20
    what = "batches + augment (translate 25)" if with_augment else "batches"
    print(f"cached loader, {what}: {n} x (10, 128, 128, 2) uint8 ({mb:.0f} MB) in {dt:.2f} s = {n / dt:.0f} "
          f"recordings/s ({n * 10 / dt:.0f} frames/s, {mb / dt:.0f} MB/s); 10000 recordings: "
          f"{dt * 10000 / n:.1f} s per epoch (extrapolated{'' if n == 10000 else ' linearly'})")
    assert seen == n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000, help="events per synthetic recording (integrator)")
    p.add_argument("--repeats", type=int, default=20, help="recordings timed (integrator)")
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--build-per-class", type=int, default=20, help="fake N-MNIST recordings per digit and split")
    p.add_argument("--cached", type=int, default=1000, help="recordings in the synthetic cache (10000 = full)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    bench_integrator(rng, args.events, args.repeats, args.timesteps)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        bench_build(tmp, args.build_per_class, args.timesteps)
        bench_cached(tmp, args.cached, args.batch_size, rng, with_augment=False)
        bench_cached(tmp, args.cached, args.batch_size, rng, with_augment=True)


if __name__ == "__main__":
    main()
