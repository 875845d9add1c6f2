"""``training.train_and_evaluate``: one run end to end (tiny N-Digits), resumption, a refused config, and a
tonic-backed data set through the same loop."""

import json
import pathlib

import pytest

from aoi_jax import checkpoint, config, training

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "ndigits.py")
TINY = ["model.channels=(4, 8)", "train.epochs=1", "train.batch_size=64", "data.timesteps=4",
        "eval.epsilons=(0.0, 0.05)", "eval.bins=20"]


def tiny(root, *overrides):
    return config.load(CONFIG, TINY + [f"data.data_dir={root / 'data'}", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    (result,) = training.train_and_evaluate(tiny(root), root / "run")
    return root, result


def test_a_run_writes_metrics_checkpoints_and_returns_its_report(run):
    root, result = run
    workdir = root / "run"
    assert result.member.name == "" and result.workdir == workdir
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1] and lines[0]["step"] == 1438 // 64
    assert {"train_loss", "train_task", "train_rcs", "train_accuracy", "test_accuracy", "images_per_s"} <= set(lines[0])
    assert json.loads((workdir / "config.json").read_text())["model"]["channels"] == [4, 8]
    assert checkpoint.latest_step(workdir / "checkpoints") == 1438 // 64
    report = result.report
    assert len(report["accuracy_per_timestep"]) == 4
    assert report["accuracy_per_timestep"][-1] == pytest.approx(lines[0]["test_accuracy"])   # same checkpoint
    assert report["oct"]["accuracy"] == pytest.approx(report["accuracy_per_timestep"][-1])
    assert set(report["rules"]) == {"topk", "confidence", "entropy", "spikecp"}
    assert report["anytime"]["agrees_with_apply_topk"]
    assert len(report["synops_per_sample"]) == 2
    assert not (workdir / "report.json").exists()                  # the library returns it; the shell writes


def test_rerun_resumes_and_other_config_is_refused(run):
    root, _ = run
    (again,) = training.train_and_evaluate(tiny(root), root / "run", run_eval=False)   # nothing left to train
    assert again.report is None
    assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="holds a run of a different config"):
        training.train_and_evaluate(tiny(root, "reg.alpha=0.01"), root / "run", run_eval=False)


def test_held_out_validation_split_is_not_trained_on_and_calibrates(tmp_path):
    """data.validation_fraction = 0.2 holds 287 of N-Digits' 1438 training samples out (round(0.2 n_c) of
    each class): training steps count the other 1151; Top-K calibrates on the 287 (eval.calibration)."""
    (result,) = training.train_and_evaluate(
        tiny(tmp_path, "data.validation_fraction=0.2", "eval.calibration=validation", "eval.calib_dropout=0.0"),
        tmp_path / "run")
    assert checkpoint.latest_step(tmp_path / "run" / "checkpoints") == 1151 // 64
    assert result.report["n_calibration"] == 287 and result.report["n_test"] == 359


def test_train_nmnist_on_fake_folder(tmp_path):
    """A tonic-backed data set (N-MNIST, a tiny fake folder) runs through the same loop end to end."""
    from fake_event_data import write_fake_nmnist

    write_fake_nmnist(tmp_path / "data", n_per_class=3)
    cfg = config.load(ROOT / "configs" / "nmnist.py",
                      [f"data.data_dir={tmp_path / 'data'}", "train.epochs=1", "train.batch_size=8",
                       "model.channels=(4,)", "eval.bins=10"])
    with pytest.warns(UserWarning, match="recordings"):          # the fake folder is far from complete
        (result,) = training.train_and_evaluate(cfg, tmp_path / "run")
    assert result.report["n_test"] == 30 and result.report["n_calibration"] == 30
    assert result.report["anytime"]["agrees_with_apply_topk"]
