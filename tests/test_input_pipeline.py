"""The input pipeline: each run's epoch is a function of its seed and the epoch; members stack their own
runs' batches; evaluation batches pad to the device count; a QCFS ANN sees the first frame; the held-out
validation split and the calibration split."""

import numpy as np
import pytest

from aoi_jax import config, data, input_pipeline, sweep


def tiny_cfg(*overrides):
    cfg = config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3))
    return config.apply_overrides(cfg, overrides)


def frameset(rng, n=40, T=3):
    frames = rng.poisson(0.5, (n, T, 10, 10, 2)).astype(np.uint8)
    return data.FrameSet(frames=frames, labels=rng.integers(0, 3, n).astype(np.int32), num_classes=3,
                         sensor_hw=(10, 10))


def test_train_batches_are_the_seeded_permutation(rng):
    """Without augmentation an epoch is the permutation ``default_rng([seed, epoch]).permutation(N)`` cut
    into full batches, time-major float32: computed here by hand."""
    fs = frameset(rng)
    cfg = tiny_cfg("train.batch_size=16", "seed=7")
    got = list(input_pipeline.train_batches(fs, cfg, epoch=3))
    order = np.random.default_rng([7, 3]).permutation(40)
    assert len(got) == 2 == input_pipeline.steps_per_epoch(40, cfg)            # the last partial batch dropped
    for b, batch in enumerate(got):
        idx = order[b * 16:(b + 1) * 16]
        np.testing.assert_array_equal(batch["frames"], fs.frames[idx].transpose(1, 0, 2, 3, 4).astype(np.float32))
        np.testing.assert_array_equal(batch["label"], fs.labels[idx])
        assert batch["frames"].dtype == np.float32
    again = list(input_pipeline.train_batches(fs, cfg, epoch=3))                # a resumed run replays it
    np.testing.assert_array_equal(again[1]["frames"], got[1]["frames"])
    other = list(input_pipeline.train_batches(fs, cfg, epoch=4))
    assert not np.array_equal(other[0]["label"], got[0]["label"])


def test_member_batches_follow_each_single_run(rng):
    train_set = frameset(rng)
    cfg = tiny_cfg("train.batch_size=16", "data.translate=3", "data.hflip=True")
    mem = sweep.members(cfg, config.parse_sweep(["seed=3,4", "reg.alpha=0,1"]))
    stacked = list(input_pipeline.member_batches(train_set, [m.cfg for m in mem], epoch=2))
    assert len(stacked) == 2 and stacked[0]["frames"].shape == (4, 3, 16, 10, 10, 2)
    for i, m in enumerate(mem):
        single = list(input_pipeline.train_batches(train_set, m.cfg, epoch=2))
        for got, want in zip(stacked, single, strict=True):
            np.testing.assert_array_equal(got["frames"][i], want["frames"])
            np.testing.assert_array_equal(got["label"][i], want["label"])
    assert not np.array_equal(stacked[0]["frames"][0], stacked[0]["frames"][2])   # seeds differ
    (one,) = list(input_pipeline.member_batches(train_set, [cfg], epoch=0))[:1]   # one run: a leading axis of 1
    np.testing.assert_array_equal(one["frames"][0], next(input_pipeline.train_batches(train_set, cfg, 0))["frames"])
    assert one["frames"].shape[0] == 1 and one["label"].shape == (1, 16)


def test_ann_trains_on_the_first_frame(rng):
    fs = frameset(rng, T=4)
    ann = tiny_cfg("train.batch_size=8", "model.activation=qcfs", "model.neuron.tau=1.0", "model.neuron.reset=soft")
    assert ann.model.is_ann and not tiny_cfg().model.is_ann
    batch = next(input_pipeline.train_batches(fs, ann, epoch=0))
    idx = np.random.default_rng([0, 0]).permutation(40)[:8]
    np.testing.assert_array_equal(batch["frames"], fs.frames[idx, :1].transpose(1, 0, 2, 3, 4))
    assert input_pipeline.model_input(fs, ann).frames.shape == (40, 1, 10, 10, 2)
    assert input_pipeline.model_input(fs, tiny_cfg()) is fs


@pytest.mark.parametrize("n_devices", [1, 4])
def test_eval_batches_pad_to_the_devices(rng, n_devices):
    fs = frameset(rng, n=11)
    got = list(input_pipeline.eval_batches(fs, 4, n_devices))
    assert [n for _, n in got] == [4, 4, 3]
    last, n = got[-1]
    assert last["label"].shape == ((4,) if n_devices == 4 else (3,))
    np.testing.assert_array_equal(last["label"][:3], fs.labels[8:])             # file order
    if n_devices == 4:                                                          # padding repeats the last sample
        assert last["label"][3] == fs.labels[10]
        np.testing.assert_array_equal(last["frames"][:, 3], fs.frames[10].astype(np.float32))


def test_split_validation_is_stratified_seeded_and_disjoint(rng):
    """Per class round(0.25 * n_c) samples held out, drawn with data.seed only (not the training seed); the
    two parts partition the training split in file order, frames, labels and bin_us row by row."""
    fs = frameset(rng, n=41)
    fs = data.FrameSet(fs.frames, fs.labels, 3, fs.sensor_hw, bin_us=np.arange(41.0))
    cfg = tiny_cfg("data.validation_fraction=0.25", "data.seed=3")
    fit, val = input_pipeline.split_validation(fs, cfg.data)
    counts = np.bincount(fs.labels, minlength=3)
    np.testing.assert_array_equal(np.bincount(val.labels, minlength=3), np.round(0.25 * counts))
    rows_fit, rows_val = fit.bin_us.astype(int), val.bin_us.astype(int)        # bin_us[i] = i: the row index
    assert np.all(np.diff(rows_fit) > 0) and np.all(np.diff(rows_val) > 0)      # file order
    np.testing.assert_array_equal(np.sort(np.concatenate([rows_fit, rows_val])), np.arange(41))
    for part, rows in ((fit, rows_fit), (val, rows_val)):
        np.testing.assert_array_equal(part.frames, fs.frames[rows])
        np.testing.assert_array_equal(part.labels, fs.labels[rows])
    _, again = input_pipeline.split_validation(fs, config.override(cfg, "seed", 9).data)
    np.testing.assert_array_equal(again.bin_us, val.bin_us)                     # the training seed plays no part
    _, other = input_pipeline.split_validation(fs, config.override(cfg, "data.seed", 4).data)
    assert not np.array_equal(other.bin_us, val.bin_us)
    same, none = input_pipeline.split_validation(fs, tiny_cfg().data)           # fraction 0: nothing held out
    assert same is fs and none is None


def test_calibration_set_selects_the_split(rng):
    fs = frameset(rng)
    cfg = tiny_cfg("data.validation_fraction=0.25")
    fit, val = input_pipeline.split_validation(fs, cfg.data)
    assert input_pipeline.calibration_set(fit, val, cfg) is fit
    assert input_pipeline.calibration_set(fit, val, config.override(cfg, "eval.calibration", "validation")) is val
    whole, none = input_pipeline.split_validation(fs, tiny_cfg().data)
    with pytest.raises(ValueError, match=r'eval.calibration = "validation" needs a held-out split: set '
                                         r"data.validation_fraction > 0"):
        input_pipeline.calibration_set(whole, none, tiny_cfg("eval.calibration=validation"))
