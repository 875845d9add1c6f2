"""Config files, overrides and strict (de)serialisation."""

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


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config.load(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config.load(tmp_path / "bad.py")


def test_every_config_file_loads():
    for path in sorted((ROOT / "configs").glob("*.py")):
        assert isinstance(config.load(path), config.Config), path
