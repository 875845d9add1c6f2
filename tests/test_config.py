"""Config files, overrides and strict (de)serialisation."""

import logging
import pathlib

import pytest

from aoi_jax import config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_load_default_and_override():
    cfg = config.load(ROOT / "configs/ndigits.py", ["reg.alpha=0.004", "model.channels=(8, 16)",
                                                  "train.loss=tet", "seed=3", "data.hflip=True",
                                                  "data.window=(0, 1300000)"])
    assert cfg.reg.alpha == 0.004 and isinstance(cfg.reg.alpha, float) and cfg.data.window == (0, 1300000)
    assert cfg.model.channels == (8, 16) and cfg.train.loss == "tet" and cfg.seed == 3 and cfg.data.hflip


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(KeyError, match=r"reg\.alhpa.*valid keys:.*reg\.alpha"):
        config.apply_overrides(config.Config(), ["reg.alhpa=0.1"])
    with pytest.raises(KeyError, match="unknown config key 'nonsense'"):
        config.apply_overrides(config.Config(), ["nonsense=1"])
    with pytest.raises(KeyError, match="is a group"):
        config.apply_overrides(config.Config(), ["reg=1"])


@pytest.mark.parametrize("item,msg", [
    ("reg.alpha=abc", "expects a float"),
    ("train.epochs=2.5", "expects an int"),
    ("data.hflip=1", "expects a bool"),
    ("train.loss=focal", r"train\.loss must be one of \['mean', 'tet'\]"),
    ("model.neuron.reset=zero", "reset must be one of"),
    ("optim.name=rmsprop", "optim.name must be one of"),
    ("reg.alpha", "KEY=VALUE"),
    ("data.window=(-1, 1000)", r"data\.window = \(-1, 1000\) must be \(\) \(the whole recording\) or "
                               r"\(start_us, length_us\) with start_us >= 0 and length_us > 0"),
    ("data.window=(0, 0)", r"data\.window = \(0, 0\) must be \(\)"),
    ("data.window=1000", r"data\.window = \(1000,\) must be \(\)"),
    ("data.window=(0, 10, 20)", r"data\.window = \(0, 10, 20\) must be \(\)"),
    ("data.window=(0, 1.5)", r"config key 'data.window\[1\]' expects an int"),
    ("data.validation_fraction=1.0", r"data\.validation_fraction must be in \[0, 1\), got 1\.0"),
    ("data.validation_fraction=-0.1", r"data\.validation_fraction must be in \[0, 1\), got -0\.1"),
    ("eval.calibration=test", r"eval\.calibration must be one of \['train', 'validation'\], got 'test'"),
])
def test_bad_values(item, msg):
    with pytest.raises(ValueError, match=msg):
        config.apply_overrides(config.Config(), [item])


def test_roundtrip_and_strict_from_dict():
    cfg = config.load(ROOT / "configs/cifar10_dvs.py")
    assert config.from_dict(config.to_dict(cfg)) == cfg
    d = config.to_dict(cfg)
    d["reg"]["beta"] = 1
    with pytest.raises(KeyError, match=r"reg\.beta"):
        config.from_dict(d)
    d = config.to_dict(cfg)
    del d["train"]["epochs"]
    with pytest.raises(KeyError, match=r"train\.epochs"):
        config.from_dict(d)


def test_a_config_stored_before_a_key_existed_takes_its_default_and_says_so(caplog):
    """A checkpoint's config written before ``model.neuron`` gained kind / learn_vth / per_channel: stored
    configs fill those from the defaults and log their names; unknown keys are still refused."""
    cfg = config.load(ROOT / "configs/ndigits.py", ["model.neuron.tau=0.25"])
    d = config.to_dict(cfg)
    for k in ("kind", "learn_vth", "per_channel"):
        del d["model"]["neuron"][k]
    with pytest.raises(KeyError, match=r"model\.neuron\.kind"):
        config.from_dict(d)
    with caplog.at_level(logging.INFO, logger="aoi_jax"):
        assert config.from_stored(d, "the config of /r/checkpoints step 44") == cfg
    assert caplog.messages == ["the config of /r/checkpoints step 44 was stored before config key(s) "
                               "model.neuron.kind, model.neuron.learn_vth, model.neuron.per_channel existed: they "
                               "take their defaults"]
    del d["reg"]
    assert config.from_stored(d, "x").reg == config.RegConfig()
    d["reg"] = {"beta": 1}
    with pytest.raises(KeyError, match=r"reg\.beta"):
        config.from_stored(d, "x")


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config.load(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config.load(tmp_path / "bad.py")


def test_every_config_file_loads():
    for path in sorted((ROOT / "configs").glob("*.py")):
        assert isinstance(config.load(path), config.Config), path


@pytest.mark.parametrize("item,msg", [
    ("reg.alpha=-1", "reg.alpha must be >= 0, got -1.0"),
    ("reg.rcs_n=1.5", r"reg.rcs_n must be in \[0, 1\], got 1.5"),
    ("reg.window=-0.1", r"reg.window must be in \[0, 1\], got -0.1"),
    ("optim.lr=-0.1", "optim.lr must be > 0, got -0.1"),
    ("optim.lr=1e999", "optim.lr must be > 0, got inf"),
    ("optim.momentum=1", r"optim.momentum must be in \[0, 1\), got 1.0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0, got -0.0001"),
    ("eval.epsilons=(0.0, 1.0)", r"eval.epsilons\[1\] must be in \[0, 1\), got 1.0"),
    ("eval.epsilons=(-0.01,)", r"eval.epsilons\[0\] must be in \[0, 1\), got -0.01"),
    ("eval.epsilons=()", r"eval.epsilons must hold at least one value in \[0, 1\), got \(\)"),
    ("eval.calib_dropout=1", r"eval.calib_dropout must be in \[0, 1\), got 1.0"),
    ("eval.bins=0", "eval.bins must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("eval.min_support=-1", "eval.min_support must be >= 0, got -1"),
    ("model.neuron.vth=0", "model.neuron.vth must be > 0, got 0.0"),
    ("model.neuron.tau=0", r"model.neuron.tau must be in \(0, 1\], got 0.0"),
    ("model.neuron.width=-1", "model.neuron.width must be > 0, got -1.0"),
    ("model.neuron.v0=1e999", "model.neuron.v0 must be a finite number, got inf"),
    ("model.channels=(4, 0)", r"model.channels\[1\] must be >= 1, got 0"),
    ("model.num_classes=1", "model.num_classes must be >= 2, got 1"),
    ("data.translate=-1", "data.translate must be >= 0, got -1"),
    ("data.cutout=-2", "data.cutout must be >= 0, got -2"),
    ("data.timesteps=-3", "data.timesteps must be >= 1, got -3"),
    ("data.size=(0, 4)", r"data.size\[0\] must be >= 1, got 0"),
    ("data.size=(4,)", r"data.size must be \(\) or \(H, W\), got \(4,\)"),
    ("data.seed=-1", "data.seed must be >= 0, got -1"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.tet_lambda=2", r"train.tet_lambda must be in \[0, 1\], got 2.0"),
    ("seed=-1", "seed must be >= 0, got -1"),
])
def test_out_of_range_values_name_key_value_and_range(item, msg):
    with pytest.raises(ValueError, match=f"^{msg}$"):
        config.apply_overrides(config.Config(), [item])


def test_differences_name_each_key_in_order():
    a = config.Config()
    b = config.apply_overrides(a, ["train.epochs=3", "reg.alpha=0.01", "model.channels=(4,)"])
    assert config.differences(a, b) == [("model.channels", (16, 32, 64), (4,)), ("reg.alpha", 0.002, 0.01),
                                        ("train.epochs", 20, 3)]
    assert config.differences(b, b) == []


@pytest.mark.parametrize("items,msg", [
    (["train.checkpoint_keep=0"], r"^train.checkpoint_keep must be >= 1, got 0$"),
    (["train.early_stop_patience=-1"], r"^train.early_stop_patience must be >= 0, got -1$"),
    (["train.best_metric=test_accuracy"], r"^train.best_metric must be one of \['', 'val_accuracy', 'val_loss', "
                                          r"'train_accuracy', 'train_loss'\], got 'test_accuracy'$"),
])
def test_checkpoint_and_early_stop_keys_are_checked(items, msg):
    with pytest.raises(ValueError, match=msg):
        config.apply_overrides(config.Config(), items)
    ok = config.apply_overrides(config.Config(), ["data.validation_fraction=0.2", "train.best_metric=val_loss",
                                                  "train.early_stop_patience=3", "train.checkpoint_keep=5"])
    assert (ok.train.best_metric, ok.train.early_stop_patience, ok.train.checkpoint_keep) == ("val_loss", 3, 5)
    assert config.TrainConfig() == config.TrainConfig(checkpoint_keep=2, best_metric="", early_stop_patience=0)


def test_sweep_keys_are_the_seed_and_the_loss_weights():
    from aoi_jax import step

    assert config.SWEEP_KEYS == ("seed", *step.WEIGHT_KEYS)
    assert config.parse_sweep(["train.tet_lambda=0.1,0.2", "seed=3"]) == {"train.tet_lambda": (0.1, 0.2), "seed": (3,)}
