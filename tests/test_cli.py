"""The two scripts as a user runs them, in subprocesses: train.py (a tiny sweep: the shell writes each
member's report and the summary) and evaluate.py on one member's checkpoint (the same report again)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["model.channels=(4, 8)", "train.epochs=1", "train.batch_size=128", "data.timesteps=3",
        "eval.epsilons=(0.0, 0.05)", "eval.bins=20", "eval.batch_size=2048"]


def script(name, *args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    args = ["--config", str(ROOT / "configs" / "ndigits.py"), "--workdir", "sweep", "--data-dir", "data",
            "--sweep", "reg.alpha=0,0.5"]
    for item in TINY:
        args += ["--set", item]
    proc = script("train.py", *args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_train_writes_reports_figures_and_summary(sweep):
    root, proc = sweep
    workdir = root / "sweep"
    for name in ("alpha=0.0", "alpha=0.5"):
        member = workdir / "members" / name
        report = json.loads((member / "report.json").read_text())
        assert len(report["accuracy_per_timestep"]) == 3 and report["anytime"]["agrees_with_apply_topk"]
        for fig in ("accuracy_per_timestep.png", "accuracy_vs_latency.png", "accuracy_vs_energy.png"):
            assert (member / fig).read_bytes()[:4] == b"\x89PNG"
        assert f"== {name}" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert [m["name"] for m in summary["members"]] == ["alpha=0.0", "alpha=0.5"]
    assert (workdir / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "epoch   1  alpha=0.5" in (workdir / "train.log").read_text()
    assert "anytime loop (Top-K, epsilon 0)" in proc.stdout


def test_evaluate_reproduces_the_members_report_and_serves(sweep):
    root, _ = sweep
    member = root / "sweep" / "members" / "alpha=0.5"
    proc = script("evaluate.py", "--workdir", str(member), "--out", "again", "--serve", "--slots", "8", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((member / "report.json").read_text())
    b = json.loads((root / "again" / "report.json").read_text())
    # same checkpoint, same calibration key: the whole report is reproduced
    assert a["accuracy_per_timestep"] == b["accuracy_per_timestep"]
    assert a["topk_beta"] == b["topk_beta"] and a["rules"] == b["rules"] and a["cost"] == b["cost"]
    # --serve: continuous batching on the test set for every rule at the table's epsilons (0 and 0.05 here)
    serve = b["serve"]
    assert serve["slots"] == 8 and serve["fixed_t"]["mean_timestep"] == 3 and serve["fixed_t"]["samples_per_s"] > 0
    assert set(serve["rules"]) == set(b["rules"])
    for rule, row in serve["rules"].items():                       # the served exits are the sweep's
        assert row["epsilons"] == [0.0, 0.05] and min(row["samples_per_s"]) > 0
        assert row["accuracy"] == pytest.approx(b["rules"][rule]["accuracy"], rel=1e-6)
        assert row["mean_timestep"] == pytest.approx(b["rules"][rule]["mean_timestep"], rel=1e-6)
    assert "samples/s: continuous batching with 8 slots" in proc.stdout


def test_evaluate_changes_evaluation_settings_only(sweep):
    root, _ = sweep
    member = root / "sweep" / "members" / "alpha=0.5"
    proc = script("evaluate.py", "--workdir", str(member), "--out", "other", "--set", "reg.alpha=1", cwd=root)
    assert proc.returncode != 0 and "changes evaluation settings (eval.*) only" in proc.stderr
    proc = script("evaluate.py", "--workdir", str(member), "--out", "nodrop", "--set", "eval.calib_dropout=0.0",
                  cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((root / "nodrop" / "report.json").read_text())["config"]["eval"]["calib_dropout"] == 0.0


def test_unsweepable_key_is_refused_before_any_work(tmp_path):
    proc = script("train.py", "--config", str(ROOT / "configs" / "ndigits.py"), "--workdir", "w",
                  "--sweep", "optim.lr=0.1,0.2", cwd=tmp_path)
    assert proc.returncode != 0 and "'optim.lr' cannot be swept" in proc.stderr
    assert not (tmp_path / "w").exists()
