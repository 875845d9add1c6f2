"""``training.train_and_evaluate``: one run end to end (tiny N-Digits), resumption, a refused config, and a
tonic-backed data set through the same loop."""

import json
import pathlib

import numpy as np
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
    assert report["anytime"]["agrees_with_apply_topk"] and report["anytime"]["spikes_agree_with_multistep"]
    assert len(report["synops_per_sample"]) == 2
    assert not (workdir / "report.json").exists()                  # the library returns it; the shell writes


def test_the_report_costs_each_exit(run):
    """Energy and decision time per rule: fixed T at T is the per-layer synaptic operations of the whole pass
    (``synops_per_sample``, summed another way); decision times are exits x 75 ms (N-Digits: 300 ms in T = 4
    bins); no rule costs more than fixed T; the continuous-batching check computes a fraction of N x T."""
    _, result = run
    report, costs = result.report, result.report["cost"]
    fixed = costs["fixed_t"]
    assert fixed["synops"][-1] == pytest.approx(sum(report["synops_per_sample"]), rel=1e-6)
    assert fixed["decision_ms"] == pytest.approx([75.0, 150.0, 225.0, 300.0])
    assert np.all(np.diff(fixed["energy_uj"]) > 0)
    for rule, res in report["rules"].items():
        c = costs["rules"][rule]
        assert np.all(np.asarray(c["energy_uj"]) <= fixed["energy_uj"][-1] * (1 + 1e-9))
        np.testing.assert_allclose(c["decision_ms"], 75.0 * np.asarray(res["mean_timestep"]), rtol=1e-6)
    assert costs["oct"]["decision_ms"] == pytest.approx(75.0 * report["oct"]["mean_timestep"], rel=1e-6)
    assert costs["ann_macs"] == sum(costs["macs_per_layer"]) and len(costs["macs_per_layer"]) == 3
    assert costs["ann_energy_uj"] == pytest.approx(4.6e-6 * costs["ann_macs"])
    anytime = report["anytime"]
    assert anytime["fraction_of_steps_computed"] >= anytime["mean_timestep"] / 4


def test_rerun_resumes_and_other_config_is_refused(run):
    root, _ = run
    (again,) = training.train_and_evaluate(tiny(root), root / "run", run_eval=False)   # nothing left to train
    assert again.report is None
    assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="holds a run of a different config"):
        training.train_and_evaluate(tiny(root, "reg.alpha=0.01"), root / "run", run_eval=False)


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
