"""The two scripts as a user runs them, in subprocesses: train.py (a tiny sweep: the shell writes each
member's report and the summary) and evaluate.py on one member's checkpoint (the same report again); and
where a real process boundary is the point: the exit status of a diverging run and of nonsense settings,
evaluate.py on a damaged checkpoint, and a run killed with SIGKILL that resumes bit-identically."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from aoi_jax import checkpoint, reporting, xla_tuning
from conftest import TINY_SCRIPT, script_args, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", *TINY_SCRIPT]
LEARNT = ("epoch", "step", "train_loss", "train_task", "train_rcs", "train_accuracy", "test_accuracy")


def command(name, *args):
    return [sys.executable, str(ROOT / name), *args]


def script(name, *args, cwd):
    env = subprocess_env(JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    return subprocess.run(command(name, *args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def train_args(data_dir, workdir, *overrides):
    return script_args(data_dir, workdir, "train.epochs=1", *overrides)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ndigits_dir):
    root = tmp_path_factory.mktemp("cli")
    proc = script("train.py", *train_args(ndigits_dir, "sweep"), "--sweep", "reg.alpha=0,0.5",
                  *(["--tensorboard"] if importlib.util.find_spec("tensorboardX") else []), cwd=root)
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


def test_train_records_its_xla_options_and_writes_tensorboard_events_per_member(sweep):
    """train.py's default --xla-tuning auto: the measured CPU options, in each config.json and report.json;
    --tensorboard: one event folder per member, holding the epoch's scalars."""
    from aoi_jax import xla_tuning

    workdir = sweep[0] / "sweep"
    for name in ("alpha=0.0", "alpha=0.5"):
        member = workdir / "members" / name
        assert json.loads((member / "config.json").read_text())["xla_options"] == {
            "train": xla_tuning.CPU_OPTIONS, "evaluation": xla_tuning.CPU_OPTIONS}
        assert json.loads((member / "report.json").read_text())["xla_options"] == xla_tuning.CPU_OPTIONS
        if importlib.util.find_spec("tensorboardX") is not None:
            (events,) = (workdir / "tensorboard" / name).glob("events.out.tfevents.*")
            assert b"train_loss" in events.read_bytes() and b"test_accuracy" in events.read_bytes()


def readme_exit_rule() -> str:
    """The code block of the README's "A new exit rule"."""
    text = (ROOT / "README.md").read_text()
    return text[text.index("**A new exit rule**"):].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def served(sweep):
    """``(out, proc)``: evaluate.py on member alpha=0.5's checkpoint with the README's new exit rule (saved as a
    module, passed with --rules) and --serve, the report written to ``out``. One subprocess for the two tests
    below: the four built-in rules' part of its report is what it would be without the added rule."""
    root, _ = sweep
    member = root / "sweep" / "members" / "alpha=0.5"
    (root / "my_rules.py").write_text(readme_exit_rule())
    proc = script("evaluate.py", "--workdir", str(member), "--out", "again", "--rules", "my_rules", "--serve",
                  "--slots", "8", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "again", proc


def test_evaluate_reproduces_the_members_report_and_serves(sweep, served):
    root, _ = sweep
    member = root / "sweep" / "members" / "alpha=0.5"
    out, proc = served
    a = json.loads((member / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    # same checkpoint, same calibration key: the whole report is reproduced (the added rule aside)
    assert a["accuracy_per_timestep"] == b["accuracy_per_timestep"]
    assert a["topk_beta"] == b["topk_beta"] and set(b["rules"]) == set(a["rules"]) | {"margin"}
    assert a["rules"] == {rule: b["rules"][rule] for rule in a["rules"]}
    assert set(b["cost"]) == set(a["cost"]) and b["cost"]["rules"].pop("margin")
    assert a["cost"] == b["cost"]
    # --serve: continuous batching on the test set for every rule at the table's epsilons (0 and 0.05 here)
    serve = b["serve"]
    assert serve["slots"] == 8 and serve["fixed_t"]["mean_timestep"] == 3 and serve["fixed_t"]["samples_per_s"] > 0
    assert set(serve["rules"]) == set(b["rules"])
    for rule, row in serve["rules"].items():                       # the served exits are the sweep's
        assert row["epsilons"] == [0.0, 0.05] and min(row["samples_per_s"]) > 0
        assert row["accuracy"] == pytest.approx(b["rules"][rule]["accuracy"], rel=1e-6)
        assert row["mean_timestep"] == pytest.approx(b["rules"][rule]["mean_timestep"], rel=1e-6)
    assert "samples/s: continuous batching with 8 slots" in proc.stdout
    # the step and the options that ran, as training recorded them; evaluate.py logs as train.py does
    (step_,) = checkpoint.all_steps(member / "checkpoints")
    assert b["checkpoint"] == a["checkpoint"] == {"step": step_, "path": str(member / "checkpoints" / str(step_))}
    assert b["xla_options"] == a["xla_options"] == xla_tuning.compiler_options("auto")
    assert f"restored {member / 'checkpoints'} step {step_} (" in proc.stdout


def test_evaluate_scores_the_readme_exit_rule(served):
    """The README's new exit rule, saved as a module and passed with --rules: that one registration puts it in
    report.json (with its cost), the printed table, the figures and --serve. At epsilon 0 it never fires
    (p1 - p2 > 1 is impossible): every sample exits at T with the accuracy at T; the served exits are the sweep's."""
    out, proc = served
    report = json.loads((out / "report.json").read_text())
    assert set(report["rules"]) == {"topk", "confidence", "entropy", "spikecp", "margin"}
    margin = report["rules"]["margin"]
    assert margin["mean_timestep"][0] == 3 and margin["accuracy"][0] == report["accuracy_per_timestep"][-1]
    assert len(report["cost"]["rules"]["margin"]["synops"]) == 2
    served_margin = report["serve"]["rules"]["margin"]
    assert served_margin["epsilons"] == [0.0, 0.05] and min(served_margin["samples_per_s"]) > 0
    assert served_margin["accuracy"] == pytest.approx(margin["accuracy"], rel=1e-6)
    assert served_margin["mean_timestep"] == pytest.approx(margin["mean_timestep"], rel=1e-6)
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("margin ")]
    assert [row[:4] for row in rows] == [["margin", f"{e:.2f}", f"{a:.4f}", f"{t:.3f}"] for e, a, t in
                                        zip(report["epsilons"], margin["accuracy"], margin["mean_timestep"])]
    for figure in (reporting.latency_figure(report), reporting.energy_figure(report)):
        assert "margin" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    for fig in ("accuracy_per_timestep.png", "accuracy_vs_latency.png", "accuracy_vs_energy.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_changes_evaluation_settings_only(sweep):
    """A setting outside eval.* is refused; an eval.* setting is taken (evaluate.py --set eval.calib_dropout=0.0
    in tests/test_storage_faults.py, whose report records it)."""
    root, _ = sweep
    member = root / "sweep" / "members" / "alpha=0.5"
    proc = script("evaluate.py", "--workdir", str(member), "--out", "other", "--set", "reg.alpha=1", cwd=root)
    assert proc.returncode != 0 and "changes evaluation settings (eval.*) only" in proc.stderr
    assert not (root / "other").exists()


def test_evaluate_on_a_damaged_step_is_a_short_error(sweep, tmp_path):
    """A truncated data file in the step asked for: exit status 1 and a short message naming the step and
    what to do (no orbax traceback); nothing written."""
    member = shutil.copytree(sweep[0] / "sweep" / "members" / "alpha=0.5", tmp_path / "member")
    (step_,) = checkpoint.all_steps(member / "checkpoints")
    victim = max((p for p in (member / "checkpoints" / str(step_)).rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    proc = script("evaluate.py", "--workdir", str(member), "--step", str(step_), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert (f"DamagedCheckpointError: checkpoint step {step_} in '{member / 'checkpoints'}' is damaged: "
            f"{victim.relative_to(member / 'checkpoints' / str(step_)).as_posix()}: 100 bytes, recorded "
            in proc.stderr)
    assert f"restore another step (intact: []) or delete '{member / 'checkpoints' / str(step_)}'" in proc.stderr
    assert len(proc.stderr.splitlines()) < 25 and not (tmp_path / "out").exists()


def test_unsweepable_key_is_refused_before_any_work(tmp_path):
    proc = script("train.py", "--config", str(ROOT / "configs" / "ndigits.py"), "--workdir", "w",
                  "--sweep", "optim.lr=0.1,0.2", cwd=tmp_path)
    assert proc.returncode != 0 and "'optim.lr' cannot be swept" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_nonsense_setting_is_refused_before_any_work(tmp_path):
    proc = script("train.py", *train_args(tmp_path / "data", "w", "data.timesteps=-3"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "ValueError: data.timesteps must be >= 1, got -3"
    assert list(tmp_path.iterdir()) == []


def test_divergence_stops_with_an_error_and_saves_nothing(ndigits_dir, tmp_path):
    """optim.lr=1e6: the loss goes NaN within the first epoch; exit status 1 naming the epoch and the optimiser
    step, nothing saved, nothing in metrics.jsonl, and the message in train.log."""
    proc = script("train.py", *train_args(ndigits_dir, "w", "optim.lr=1e6"), cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("FloatingPointError: loss became non-finite at epoch 1, step ")
    assert 1 <= int(last.split("step ")[1].split(";")[0]) <= 1438 // 128
    assert last.endswith("; epoch 1 was not saved and no checkpoint was written. Lower optim.lr or check the data")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [".lock", "config.json", "train.log"]
    assert last.removeprefix("FloatingPointError: ") in (tmp_path / "w" / "train.log").read_text()


def test_kill_9_mid_run_then_the_same_command_ends_bit_identical(ndigits_dir, tmp_path, request):
    """One run killed with SIGKILL once its first checkpoint exists (typically inside epoch 2), then started
    again with the same command, ends exactly as an uninterrupted run (the session's ``reference_run``,
    tests/conftest.py: the same command in another folder): parameters, batch statistics, optimiser state, step
    and every learning metric, bit for bit, with one metrics line per epoch. The reference is asked for only
    after the kill and the resumed run, so that neither waits while another worker builds it."""
    env = subprocess_env(JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    args = ["--no-eval", "--set", "train.epochs=2"]
    killed = subprocess.Popen(command("train.py", *train_args(ndigits_dir, "run"), *args), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "run" / "checkpoints" / str(1438 // 128) / checkpoint.RECORD
    try:
        deadline = time.time() + 300
        while not first.exists():
            assert time.time() < deadline and killed.poll() is None
            time.sleep(0.01)
        time.sleep(0.3)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.kill()
        assert killed.wait() == -signal.SIGKILL
    proc = script("train.py", *train_args(ndigits_dir, "run"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference_run = request.getfixturevalue("reference_run")
    lines = {name: [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
             for name, workdir in (("reference", reference_run), ("run", tmp_path / "run"))}
    assert [r["epoch"] for r in lines["run"]] == [1, 2]
    assert [{k: r[k] for k in LEARNT} for r in lines["run"]] == [{k: r[k] for k in LEARNT} for r in lines["reference"]]
    (_, want, _, _), (_, got, _, _) = (checkpoint.restore(w / "checkpoints") for w in (reference_run, tmp_path / "run"))
    assert int(got.step) == 2 * (1438 // 128)
    jax.tree.map(np.testing.assert_array_equal, got, want)
