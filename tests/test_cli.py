"""End to end: train.py on N-Digits (tiny settings), then evaluate.py on its checkpoint."""

import json
import pathlib

import pytest

import evaluate
import train

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "ndigits.py")
TINY = ["model.channels=(4, 8)", "train.epochs=1", "train.batch_size=64", "data.timesteps=4",
        "eval.epsilons=(0.0, 0.05)", "eval.bins=20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    workdir = root / "run"
    args = ["--config", CONFIG, "--workdir", str(workdir), "--data-dir", str(root / "data")]
    for item in TINY:
        args += ["--set", item]
    train.main(args)
    return workdir, args


def test_train_writes_everything(run):
    workdir, _ = run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1]
    assert {"train_loss", "train_task", "train_rcs", "train_accuracy", "test_accuracy", "images_per_s"} <= set(lines[0])
    assert json.loads((workdir / "config.json").read_text())["model"]["channels"] == [4, 8]
    report = json.loads((workdir / "report.json").read_text())
    assert len(report["accuracy_per_timestep"]) == 4
    assert report["oct"]["accuracy"] == pytest.approx(report["accuracy_per_timestep"][-1])
    assert set(report["rules"]) == {"topk", "confidence", "entropy", "spikecp"}
    assert report["anytime"]["agrees_with_apply_topk"]
    assert len(report["synops_per_sample"]) == 2
    for name in ("accuracy_per_timestep.png", "accuracy_vs_latency.png", "train.log"):
        assert (workdir / name).stat().st_size > 0


def test_evaluate_reproduces_train_report(run, tmp_path):
    workdir, _ = run
    evaluate.main(["--workdir", str(workdir), "--out", str(tmp_path)])
    a = json.loads((workdir / "report.json").read_text())
    b = json.loads((tmp_path / "report.json").read_text())
    # same checkpoint, same calibration key: the whole report is reproduced
    assert a["accuracy_per_timestep"] == b["accuracy_per_timestep"]
    assert a["topk_beta"] == b["topk_beta"] and a["rules"] == b["rules"]


def test_rerun_resumes_and_other_config_is_refused(run, capsys):
    workdir, args = run
    train.main(args + ["--no-eval"])                 # already at its last epoch: nothing more to train
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="holds a run of a different config"):
        train.main(args + ["--set", "reg.alpha=0.01", "--no-eval"])


def test_train_nmnist_on_fake_folder(tmp_path):
    """issue 4: train.py --config configs/nmnist.py --data-dir <tiny fake folder> runs end to end."""
    from fake_event_data import write_fake_nmnist

    write_fake_nmnist(tmp_path / "data", n_per_class=3)
    workdir = tmp_path / "run"
    config = str(pathlib.Path(CONFIG).with_name("nmnist.py"))
    with pytest.warns(UserWarning, match="recordings"):          # the fake folder is far from complete
        train.main(["--config", config, "--data-dir", str(tmp_path / "data"), "--workdir", str(workdir),
                    "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "model.channels=(4,)",
                    "--set", "eval.bins=10"])
    report = json.loads((workdir / "report.json").read_text())
    assert report["n_test"] == 30 and report["n_calibration"] == 30
    assert report["anytime"]["agrees_with_apply_topk"]
