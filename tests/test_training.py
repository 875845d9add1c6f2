"""``training.train_and_evaluate``: one run end to end (tiny N-Digits), resumption, a tonic-backed data set
through the same loop, and the reliability guarantees (README, "Reliability"), each with its fault injected
for real: a damaged or lost checkpoint, a lost metrics line, a poisoned batch, a second process holding the
workdir, a different config, more or fewer epochs, a batch larger than the data set, a deleted metrics file,
moved or other data; and the run's life around the science: validation metrics, the learning rate, best
checkpoints, early stopping, the per-epoch callback and TensorBoard events, the returned trained state and
the recorded XLA options (the run folder's bookkeeping is ``aoi_jax.rundir``)."""

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from aoi_jax import checkpoint, config, input_pipeline, neurons, rundir, training
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "ndigits.py")
TINY = ["model.channels=(4, 8)", "train.epochs=1", "train.batch_size=64", "data.timesteps=4",
        "eval.epsilons=(0.0, 0.05)", "eval.bins=20"]
SPE = 1438 // 64                                 # optimiser steps per epoch
LEARNT = ("epoch", "step", "train_loss", "train_task", "train_rcs", "train_accuracy", "test_accuracy")


def tiny(data_dir, *overrides):
    return config.load(CONFIG, TINY + [f"data.data_dir={data_dir}", *overrides])


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def learnt(workdir):
    """The learning metrics of each epoch (no timings): what a resumed run must reproduce bit for bit."""
    return [{k: r[k] for k in LEARNT} for r in metrics(workdir)]


def files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_state(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ndigits_dir):
    """``(root, result)``: one tiny run of two epochs, ``tiny(ndigits_dir, "train.epochs=2")`` (small_snn with
    channels (4, 8), T = 4, batch 64: SPE = 22 optimiser steps per epoch), trained and evaluated, in
    ``root / "run"``: config.json, metrics.jsonl (two lines), .lock and checkpoints/ with steps SPE and 2 SPE (no
    train.log or report.json: train.py writes those, the library returns the report). Read-only: tests that
    change, resume or damage it work on a copy."""
    root = tmp_path_factory.mktemp("tiny")
    (result,) = training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2"), root / "run")
    return root, result


@pytest.fixture(scope="module")
def two_epochs(run):
    """The workdir of ``run``: two epochs, checkpoints at steps SPE and 2 SPE. Tests work on copies."""
    return run[0] / "run"


def copy(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def test_a_run_writes_metrics_checkpoints_and_returns_its_report(run):
    root, result = run
    workdir = root / "run"
    assert result.member.name == "" and result.workdir == workdir
    lines = metrics(workdir)
    assert [r["epoch"] for r in lines] == [1, 2] and [r["step"] for r in lines] == [SPE, 2 * SPE]
    assert {"train_loss", "train_task", "train_rcs", "train_accuracy", "test_accuracy", "images_per_s"} <= set(lines[0])
    assert json.loads((workdir / "config.json").read_text())["model"]["channels"] == [4, 8]
    assert checkpoint.latest_step(workdir / "checkpoints") == 2 * SPE
    for line in lines:                                                             # kept with the state
        assert checkpoint.stored_meta(workdir / "checkpoints", line["step"])["record"] == line
    report = result.report
    assert len(report["accuracy_per_timestep"]) == 4
    assert report["accuracy_per_timestep"][-1] == pytest.approx(lines[-1]["test_accuracy"])   # same checkpoint
    assert report["oct"]["accuracy"] == pytest.approx(report["accuracy_per_timestep"][-1])
    assert set(report["rules"]) == {"topk", "confidence", "entropy", "spikecp"}
    assert report["anytime"]["agrees_with_apply_topk"] and report["anytime"]["spikes_agree_with_multistep"]
    assert report["warnings"] == []
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


def test_rerun_resumes_and_a_different_config_is_refused_naming_the_keys(run, ndigits_dir, tmp_path):
    workdir = copy(run[0] / "run", tmp_path)
    before = files(workdir)
    (again,) = training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2"), workdir, run_eval=False)  # done
    assert again.report is None
    assert len(metrics(workdir)) == 2
    with pytest.raises(ValueError) as e:
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2", "reg.alpha=0.01", "optim.momentum=0.8"),
                                    workdir)
    assert str(e.value) == (f"{workdir} holds checkpoints of a different config (reg.alpha: stored 0.002, "
                            "requested 0.01, optim.momentum: stored 0.9, requested 0.8); use another --workdir (a run "
                            "continues only with the same config; train.epochs may change)")
    assert files(workdir) == before                                # refused before touching anything


def test_the_checkpoint_config_decides_not_config_json(run, ndigits_dir, tmp_path):
    """config.json overwritten with another config (as two racing runs left it): the checkpoints' stored config
    is what a rerun is checked against, and config.json is rewritten to match it."""
    workdir = copy(run[0] / "run", tmp_path)
    (workdir / "config.json").write_text(config.to_json(tiny(ndigits_dir, "train.epochs=2", "reg.alpha=0.01")))
    with pytest.raises(ValueError, match=r"\(reg\.alpha: stored 0\.002, requested 0\.01\)"):
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2", "reg.alpha=0.01"), workdir, run_eval=False)
    training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2"), workdir, run_eval=False)
    stored = json.loads((workdir / "config.json").read_text())
    assert stored.pop("xla_options") == {"train": {}, "evaluation": {}}        # XLA's defaults, next to the config
    assert config.from_dict(stored) == tiny(ndigits_dir, "train.epochs=2")


def test_damaged_newest_checkpoint_is_set_aside_and_the_epoch_retrained_bit_identically(
        two_epochs, ndigits_dir, tmp_path, caplog):
    """Two bytes flipped in a data file of the newest step (same size): the run continues from the older
    step, moves the damaged one aside, drops the lost epoch's metrics line and ends where the undamaged run
    ended, bit for bit."""
    workdir = copy(two_epochs, tmp_path)
    ckpts = workdir / "checkpoints"
    victim = max((p for p in (ckpts / str(2 * SPE) / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    raw[len(raw) // 2 + 1] ^= 0x01
    victim.write_bytes(bytes(raw))
    name = victim.relative_to(ckpts / str(2 * SPE)).as_posix()
    with caplog.at_level(logging.WARNING, logger="aoi_jax"):
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2"), workdir, run_eval=False)
    assert (f"checkpoint step {2 * SPE} is damaged ({name}: different bytes than recorded, at the recorded size "
            f"(altered in place)): moved to {ckpts / f'{2 * SPE}.set-aside-1'}; continuing from step {SPE}"
            in caplog.messages)
    assert f"{workdir / 'metrics.jsonl'}: dropped the lines of epochs [2] (beyond step {SPE})" in caplog.messages
    assert learnt(workdir) == learnt(two_epochs)
    assert checkpoint.all_steps(ckpts) == [SPE, 2 * SPE]
    assert_same_state(checkpoint.restore(ckpts)[1], checkpoint.restore(two_epochs / "checkpoints")[1])


def test_metrics_line_lost_between_save_and_append_is_restored_from_the_checkpoint(two_epochs, ndigits_dir,
                                                                                   tmp_path, caplog):
    """A kill after the newest save but before its metrics line (here: the line cut short) loses nothing: the
    checkpoint keeps its record and the rerun puts it back."""
    workdir = copy(two_epochs, tmp_path)
    text = (workdir / "metrics.jsonl").read_text()
    (workdir / "metrics.jsonl").write_text(text[:text.rindex("{") + 10])
    with caplog.at_level(logging.WARNING, logger="aoi_jax"):
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2"), workdir, run_eval=False)
    assert (f"{workdir / 'metrics.jsonl'}: dropped a line cut short; restored the line of epoch 2 from its "
            "checkpoint" in caplog.messages)
    assert metrics(workdir) == metrics(two_epochs)


def test_poisoned_batch_stops_before_saving_and_keeps_the_good_checkpoints(two_epochs, ndigits_dir, tmp_path,
                                                                          monkeypatch, caplog):
    """More epochs continue a finished run (the schedule spans the new total); a NaN in batch 5 of epoch 3
    stops it at that optimiser step, before anything of epoch 3 is written: both good checkpoints and the
    metrics stay byte for byte."""
    workdir = copy(two_epochs, tmp_path)
    before = files(workdir)
    batches = input_pipeline.member_batches

    def poisoned(train_set, configs, epoch):
        for i, batch in enumerate(batches(train_set, configs, epoch)):
            if (epoch, i) == (2, 5):
                batch = {"frames": batch["frames"].astype(np.float32), "label": batch["label"]}
                batch["frames"][0, 1, 3] = np.nan
            yield batch

    monkeypatch.setattr(input_pipeline, "member_batches", poisoned)
    with caplog.at_level(logging.INFO, logger="aoi_jax"), pytest.raises(FloatingPointError) as e:
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=3"), workdir, run_eval=False)
    message = (f"loss became non-finite at epoch 3, step {2 * SPE + 6}; epoch 3 was not saved and the "
               f"checkpoints keep step {2 * SPE}. Lower optim.lr or check the data")
    assert str(e.value) == message and message in caplog.messages
    # 0.1 * (1 + cos(pi * 2/3)) / 2 = 0.025
    assert (f"resumed from step {2 * SPE} (epoch 2); train.epochs 2 -> 3: the learning-rate schedule now spans "
            f"{3 * SPE} steps, lr at step {2 * SPE} = 0.025" in caplog.messages)
    assert files(workdir) == {**before, ".lock": files(workdir)[".lock"], "config.json": files(workdir)["config.json"]}
    assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 3


def test_fewer_epochs_than_trained_are_refused(two_epochs, ndigits_dir):
    with pytest.raises(ValueError, match=rf"train.epochs = 1 but the checkpoints in {two_epochs} have trained 2 "
                                         r"epochs; ask for train.epochs >= 2 to continue this run"):
        training.train_and_evaluate(tiny(ndigits_dir), two_epochs, run_eval=False)


def test_batch_larger_than_the_training_set_is_refused_before_the_model(ndigits_dir, tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size = 1439 is larger than the training set of 'ndigits' "
                                         r"\(1438 samples\); it must be at most 1438"):
        training.train_and_evaluate(tiny(ndigits_dir, "train.batch_size=1439"), tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [".lock"]


def test_a_second_process_holding_the_workdir_is_refused(run, ndigits_dir, tmp_path):
    """Another process holds the lock: refused naming its PID, nothing written. Killed with SIGKILL, it leaves
    its lock file behind, yet the lock is free."""
    workdir = copy(run[0] / "run", tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom aoi_jax import rundir\n"
         "with rundir.workdir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n",
         str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=subprocess_env(JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline() == "locked\n"
        before = files(workdir)
        with pytest.raises(RuntimeError, match=rf"^workdir {workdir} in use by PID {holder.pid} \(it holds the "
                                               rf"lock {workdir / '.lock'}\)"):
            training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=3"), workdir)
        assert files(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    assert (workdir / ".lock").read_text() == str(holder.pid)             # stale file, free lock
    with rundir.workdir_lock(workdir):
        assert (workdir / ".lock").read_text() == str(os.getpid())


def test_non_finite_names_the_step_and_the_members():
    members = [type("M", (), {"name": n})() for n in ("alpha=0", "alpha=1")]
    losses = np.array([[1.0, 1.0], [1.0, np.inf], [np.nan, np.nan]])
    assert training.non_finite(losses, np.array([True, True]), members, 4, 100) == (
        "loss became non-finite at epoch 5, step 102 (member alpha=1); epoch 5 was not saved and the checkpoints "
        "keep step 100. Lower optim.lr or check the data")
    assert training.non_finite(np.ones((3, 2)), np.array([True, False]), members, 0, 0) == (
        "the state became non-finite at epoch 1 (every loss was finite) (member alpha=1); epoch 1 was not saved "
        "and no checkpoint was written. Lower optim.lr or check the data")
    assert training.non_finite(np.ones((3, 2)), np.array([True, True]), members, 0, 0) is None


def test_resume_step_is_the_newest_step_intact_in_every_member(tmp_path):
    """Sweep members whose newest steps differ in what survived: the run continues from the newest step all
    hold intact; none in common is an error listing each member's steps."""
    from flax import nnx

    from aoi_jax import models, step

    cfg = config.Config(model=config.ModelConfig(channels=(4,), num_classes=3))
    init = step.init_state(models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0)), step.make_optimizer(cfg.optim, 9))[1]
    members = [type("M", (), {"name": n})() for n in ("a", "b")]
    dirs = [tmp_path / "members" / m.name for m in members]
    assert rundir.resume_step(members, dirs) is None
    for d, steps in zip(dirs, ((1, 2), (1, 2))):
        for s in steps:
            checkpoint.save(d / "checkpoints", init._replace(step=jax.numpy.asarray(s)), cfg, (8, 8, 2))
    assert rundir.resume_step(members, dirs) == 2
    (dirs[1] / "checkpoints" / "2" / checkpoint.RECORD).unlink()       # b was killed before its record
    assert rundir.resume_step(members, dirs) == 1
    shutil.rmtree(dirs[0] / "checkpoints" / "1")
    with pytest.raises(ValueError, match=rf"^cannot resume in {tmp_path / 'members'}: no checkpoint step is intact "
                                         r"in every member \(a: step 2; b: step 1, step 2 damaged \(no readable "
                                         r"checksum record sha256.json \(its save did not finish\)\)\); train in a "
                                         r"new workdir"):
        rundir.resume_step(members, dirs)
    (dirs[1] / "checkpoints" / "1" / checkpoint.RECORD).unlink()
    with pytest.raises(ValueError, match=rf"^cannot resume in {dirs[1]}: no checkpoint step is intact \("
                                         rf"{dirs[1] / 'checkpoints'}: step 1 damaged \(no readable checksum record "
                                         r"sha256.json \(its save did not finish\)\), step 2 damaged"):
        rundir.resume_step([type("M", (), {"name": ""})()], dirs[1:])   # a single run (its member name is "")


def test_evaluation_warns_about_non_finite_parameters_and_logits(run):
    """A NaN in the head's bias (as a diverged run would leave): the report says so and each finding warns."""
    from aoi_jax import data, evaluation, parallel, step

    graphdef, state, cfg, _ = checkpoint.restore(run[0] / "run" / "checkpoints")
    few = [dataclasses.replace(fs, frames=fs.frames[:64], labels=fs.labels[:64], bin_us=fs.bin_us[:64])
           for fs in data.load(cfg.data)]
    bias = state.params["head"]["bias"]
    bias[...] = bias[...].at[0].set(np.nan)
    n_params = sum(x.size for x in jax.tree.leaves((state.params, state.batch_stats)))
    with pytest.warns(RuntimeWarning) as caught:
        report = evaluation.evaluate(graphdef, parallel.replicate(state, parallel.data_mesh()), cfg, *few,
                                     step.run_keys(cfg.seed).calibration)
    assert report["warnings"] == [f"the parameters and batch statistics hold 1 non-finite values (of {n_params})",
                                  "the calibration logits hold 256 non-finite values (of 2560)",
                                  "the test logits hold 256 non-finite values (of 2560)"]
    assert [str(w.message) for w in caught] == [f"{m}: this report's numbers are meaningless" for m in report["warnings"]]




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


# ----------------------------------------------------------------------------- the run's life (validation, best
# checkpoints, early stopping, the metric stream, the trained state, restoring metrics, moved data, XLA options)


def read_events(folder):
    """{tag: [(global step, value)]} of every scalar in the TensorBoard event files under ``folder`` (TFRecord
    framing: length u64, its CRC, the event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


VALIDATED = ("data.validation_fraction=0.2", "train.batch_size=128", "train.epochs=2", "train.checkpoint_keep=1",
             "train.best_metric=val_accuracy", "eval.calibration=validation", "eval.calib_dropout=0.0")


@pytest.fixture(scope="module")
def validated(tmp_path_factory, ndigits_dir):
    """Two epochs with a held-out validation split, the best checkpoint by val_accuracy kept beside the newest
    one, a callback collecting each record and the TensorBoard writer; evaluated with Top-K calibrated on the
    validation split."""
    from aoi_jax import tensorboard

    workdir = tmp_path_factory.mktemp("validated") / "run"
    seen = []
    callbacks = [lambda member, record: seen.append((member.name, record))]
    if importlib.util.find_spec("tensorboardX") is not None:
        callbacks.append(tensorboard.TensorBoard(workdir))
    (result,) = training.train_and_evaluate(tiny(ndigits_dir, *VALIDATED), workdir,
                                            callback=lambda m, r: [c(m, r) for c in callbacks])
    for c in callbacks[1:]:
        c.close()
    return workdir, result, seen


def test_held_out_validation_split_is_not_trained_on_and_calibrates(validated):
    """data.validation_fraction = 0.2 holds 287 of N-Digits' 1438 training samples out (round(0.2 n_c) of
    each class): training steps count the other 1151 (8 steps of 128 per epoch); Top-K calibrates on the 287
    (eval.calibration = validation)."""
    workdir, result, _ = validated
    assert checkpoint.latest_step(workdir / "checkpoints") == 2 * (1151 // 128)
    assert result.report["n_calibration"] == 287 and result.report["n_test"] == 359


def test_each_epoch_logs_validation_next_to_test_and_the_learning_rate(validated, ndigits_dir):
    """val_accuracy and val_loss of the held-out 287 samples, computed again here from the checkpoint (the loss
    by ``losses.mean_loss``); lr is the cosine schedule at each epoch's first step (8 steps per epoch)."""
    from aoi_jax import data, evaluation, losses, parallel, step

    workdir, result, _ = validated
    lines = metrics(workdir)
    spe = 1151 // 128
    assert [r["epoch"] for r in lines] == [1, 2] and [r["step"] for r in lines] == [spe, 2 * spe]
    assert [r["lr"] for r in lines] == pytest.approx([0.1, 0.1 * (1 + np.cos(np.pi * spe / (2 * spe))) / 2])
    graphdef, state, cfg, _ = checkpoint.restore(workdir / "checkpoints", 2 * spe)
    _, validation = input_pipeline.split_validation(data.load(cfg.data)[0], cfg.data)
    assert len(validation) == 287
    mesh = parallel.data_mesh()
    logits, labels, _ = evaluation.collect(step.make_eval_step(graphdef), parallel.replicate(state, mesh), validation,
                                           256, jax.random.key(0), mesh)
    assert lines[1]["val_accuracy"] == np.mean(logits.sum(0).argmax(-1) == labels)
    assert lines[1]["val_loss"] == pytest.approx(float(losses.mean_loss(logits, labels)), rel=1e-5)
    assert lines[1]["val_loss"] > 0 and 0 < lines[0]["val_accuracy"] <= 1
    best = max(lines, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    assert lines[1]["best_epoch"] == best["epoch"] and lines[1]["best_val_accuracy"] == best["val_accuracy"]
    assert lines[0]["best_epoch"] == 1
    assert {r["data_digest"] for r in lines} == {lines[0]["data_digest"]} and len(lines[0]["data_digest"]) == 16


def test_the_callback_sees_each_saved_record_and_tensorboard_the_same_scalars(validated):
    workdir, _, seen = validated
    assert seen == [("", r) for r in metrics(workdir)]
    if importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("the [tensorboard] extra (tensorboardX) is not installed")
    events = read_events(workdir / "tensorboard")
    numbers = [k for k, v in metrics(workdir)[0].items() if k not in ("epoch", "step") and not isinstance(v, str)]
    assert sorted(events) == sorted(numbers)
    for key in numbers:
        assert events[key] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in metrics(workdir)], key


def test_the_run_returns_its_trained_state(validated):
    """The state after the last epoch, equal to its checkpoint, and a model it builds answers (T, N, K)."""
    from flax import nnx

    workdir, result, _ = validated
    assert_same_state(result.state, checkpoint.restore(workdir / "checkpoints")[1])
    model = nnx.merge(result.graphdef, result.state.params, result.state.batch_stats)
    logits, _ = model(np.zeros((4, 3, *result.input_shape), np.float32), train=False)
    assert logits.shape == (4, 3, 10) and result.input_shape == (34, 34, 2)


def test_checkpoint_keep_and_the_best_step(validated):
    """train.checkpoint_keep = 1 keeps the newest step; train.best_metric keeps the best epoch's as well."""
    workdir, _, _ = validated
    lines = metrics(workdir)
    best = lines[-1]["best_epoch"]
    steps = checkpoint.all_steps(workdir / "checkpoints")
    assert steps == sorted({lines[-1]["step"], lines[best - 1]["step"]})
    assert checkpoint.resolve_step(workdir / "checkpoints", "best") == lines[best - 1]["step"]


def test_early_stop_says_why_and_a_resumed_run_trains_no_further(ndigits_dir, tmp_path, monkeypatch, caplog):
    """A validation accuracy that only falls (0.5, 0.4, ...; the metric replaced, the training real) with
    patience 1: training stops after epoch 2 of 4 saying why; the same command again trains nothing."""
    falling = iter([0.5, 0.4, 0.3, 0.2])
    monkeypatch.setattr(training, "split_metrics", lambda *a, **k: (next(falling), 1.0))
    cfg = tiny(ndigits_dir, *VALIDATED[:2], "train.epochs=4", "train.best_metric=val_accuracy",
               "train.early_stop_patience=1")
    with caplog.at_level(logging.INFO, logger="aoi_jax"):
        training.train_and_evaluate(cfg, tmp_path / "run", run_eval=False)
        assert [(r["epoch"], r["val_accuracy"], r["best_epoch"]) for r in metrics(tmp_path / "run")] == [
            (1, 0.5, 1), (2, 0.4, 1)]
        reason = ("val_accuracy has not improved for 1 epochs (train.early_stop_patience); the best was 0.5 at "
                  "epoch 1")
        assert f"early stop after epoch 2 of 4: {reason}" in caplog.messages
        caplog.clear()
        before = files(tmp_path / "run" / "checkpoints")
        training.train_and_evaluate(cfg, tmp_path / "run", run_eval=False)
    assert f"stopped early at epoch 2 ({reason}); not training further" in caplog.messages
    assert len(metrics(tmp_path / "run")) == 2 and files(tmp_path / "run" / "checkpoints") == before


def test_best_so_far_and_patience_by_hand():
    cfg = config.apply_overrides(config.Config(), ["train.best_metric=train_loss", "train.early_stop_patience=2"])
    first = {"epoch": 1, "train_loss": 2.0}
    first.update(training.best_so_far(first, None, "train_loss"))
    assert first == {"epoch": 1, "train_loss": 2.0, "best_epoch": 1, "best_train_loss": 2.0}
    worse = {"epoch": 2, "train_loss": 2.0}                                   # a tie is no improvement
    worse.update(training.best_so_far(worse, first, "train_loss"))
    assert (worse["best_epoch"], worse["best_train_loss"]) == (1, 2.0) and not training.patience_spent(worse, cfg)
    better = {"epoch": 3, "train_loss": 1.5}
    assert training.best_so_far(better, worse, "train_loss") == {"best_epoch": 3, "best_train_loss": 1.5}
    assert training.patience_spent({"epoch": 3, "best_epoch": 1}, cfg)
    assert not training.patience_spent({"epoch": 3}, cfg)                     # a record from before best tracking


def test_a_deleted_metrics_file_comes_back_from_every_checkpoint(two_epochs, ndigits_dir, tmp_path, caplog):
    """metrics.jsonl deleted from a finished 2-epoch run (both checkpoints kept), then continued to 3 epochs:
    it holds epochs 1, 2, 3, the first two as they were. Deleted again: the newest two checkpoints (steps 2 and
    3 SPE) give back epochs 2 and 3, and the log names epoch 1 as lost."""
    workdir = copy(two_epochs, tmp_path)
    (workdir / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="aoi_jax"):
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=3"), workdir, run_eval=False)
    assert f"{workdir / 'metrics.jsonl'}: restored the lines of epochs [1, 2] from their checkpoints" in caplog.messages
    assert [r["epoch"] for r in metrics(workdir)] == [1, 2, 3] and metrics(workdir)[:2] == metrics(two_epochs)
    (workdir / "metrics.jsonl").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aoi_jax"):
        training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=3"), workdir, run_eval=False)
    assert (f"{workdir / 'metrics.jsonl'}: restored the lines of epochs [2, 3] from their checkpoints; could not "
            "restore the line of epoch 1 (no checkpoint keeps it)" in caplog.messages)
    assert [r["epoch"] for r in metrics(workdir)] == [2, 3]


def test_moved_data_continue_and_other_data_are_refused(two_epochs, ndigits_dir, tmp_path, monkeypatch, caplog):
    """The data folder copied elsewhere: the run continues from the new data.data_dir with a log line (and
    config.json records the new folder). Other data (one test label changed; or another T) are refused, naming
    what differs, before anything is written."""
    from aoi_jax import data

    workdir = copy(two_epochs, tmp_path)
    moved = shutil.copytree(ndigits_dir, tmp_path / "moved")
    digest = metrics(two_epochs)[0]["data_digest"]
    with caplog.at_level(logging.INFO, logger="aoi_jax"):
        training.train_and_evaluate(tiny(moved, "train.epochs=2"), workdir, run_eval=False)
    assert (f"the data moved (data.data_dir: stored {str(ndigits_dir)!r}, requested {str(moved)!r}): the same data "
            f"(digest {digest}); continuing" in caplog.messages)
    assert json.loads((workdir / "config.json").read_text())["data"]["data_dir"] == str(moved)
    before = files(workdir)
    load = data.load

    def other(data_cfg, **kwargs):
        train, test = load(data_cfg, **kwargs)
        labels = test.labels.copy()
        labels[0] = (labels[0] + 1) % 10
        return train, dataclasses.replace(test, labels=labels)

    monkeypatch.setattr(data, "load", other)
    with pytest.raises(ValueError, match=rf"^{workdir} holds checkpoints trained on other data \(data digest: stored "
                                         rf"{digest}, now (?!{digest})[0-9a-f]{{16}}; data.data_dir: stored "):
        training.train_and_evaluate(tiny(moved, "train.epochs=2"), workdir, run_eval=False)
    monkeypatch.setattr(data, "load", load)
    with pytest.raises(ValueError, match=r"different config \(data.timesteps: stored 4, requested 5\)"):
        training.train_and_evaluate(tiny(moved, "train.epochs=2", "data.timesteps=5"), workdir, run_eval=False)
    assert files(workdir) == before


def test_xla_options_are_recorded_and_do_not_block_a_resume(run, two_epochs, ndigits_dir, tmp_path):
    """The library compiles with XLA's defaults and says so in config.json and the report; a rerun with the
    tuned options continues the same checkpoints and records those."""
    from aoi_jax import xla_tuning

    assert run[1].report["xla_options"] == {}
    workdir = copy(two_epochs, tmp_path)
    training.train_and_evaluate(tiny(ndigits_dir, "train.epochs=2"), workdir, run_eval=False, tuning="auto")
    assert json.loads((workdir / "config.json").read_text())["xla_options"] == {
        "train": xla_tuning.compiler_options("auto"), "evaluation": xla_tuning.compiler_options("auto")}


def test_early_stopping_needs_its_metric_before_any_work(tmp_path):
    for items, msg in ((["train.early_stop_patience=3"],
                        r"^train.early_stop_patience = 3 needs train.best_metric, the metric it watches \(one of "
                        r"\['val_accuracy', 'val_loss', 'train_accuracy', 'train_loss'\]\)$"),
                       (["train.best_metric=val_loss"], r"^train.best_metric = 'val_loss' needs a held-out validation "
                                                        r"split: set data.validation_fraction > 0 \(e.g. 0.2\)$")):
        with pytest.raises(ValueError, match=msg):
            training.train_and_evaluate(config.apply_overrides(config.Config(), items), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_data_digest_is_what_the_data_are_not_where(tmp_path):
    """The same frames in memory and memory-mapped from another folder give one digest; a changed count, label
    or bin duration another; a static set repeated over T (a broadcast view) is hashed once per sample."""
    from aoi_jax.data import FrameSet

    rng = np.random.default_rng(0)
    frames, labels, bin_us = rng.integers(0, 3, (5, 2, 4, 4, 2)).astype(np.uint8), np.arange(5) % 3, np.full(5, 1e3)
    np.save(tmp_path / "frames.npy", frames)
    digest = rundir.data_digest(FrameSet(frames, labels, 3, bin_us=bin_us))
    mapped = np.load(tmp_path / "frames.npy", mmap_mode="r")
    assert rundir.data_digest(FrameSet(mapped, labels, 3, bin_us=bin_us)) == digest
    changed = frames.copy()
    changed[4, 1, 3, 3, 1] += 1
    for other in (FrameSet(changed, labels, 3, bin_us=bin_us), FrameSet(frames, (labels + 1) % 3, 3, bin_us=bin_us),
                  FrameSet(frames, labels, 3, bin_us=bin_us * 2), FrameSet(frames, labels, 4, bin_us=bin_us)):
        assert rundir.data_digest(other) != digest
    static = np.broadcast_to(frames[:, :1], frames.shape)
    assert rundir.data_digest(FrameSet(static, labels, 3)) != rundir.data_digest(FrameSet(frames, labels, 3))
    assert len(digest) == 16


# ----------------------------------------------------------------------------- cells beyond LIF, end to end

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NEURON_MARKER = "<!-- new-neuron example: tests/test_training.py executes the next block -->"


def test_the_readme_neuron_trains_end_to_end(ndigits_dir, tmp_path, monkeypatch):
    """README.md's adaptive-threshold LIF, run as written (its registration into a copy of ``CELLS``), trains a
    small SNN on N-Digits: the loss falls, the run is evaluated, and its spikes differ from plain LIF's (the
    threshold adapts)."""
    text = README.read_text()
    assert text.count(NEURON_MARKER) == 1, "README.md must hold the new-neuron example once, after its marker"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(NEURON_MARKER)[1], re.S)
    monkeypatch.setattr(neurons, "CELLS", dict(neurons.CELLS))
    exec(block.group(1), {})
    cfg = tiny(ndigits_dir, "model.neuron.kind=alif", "train.epochs=2")
    (result,) = training.train_and_evaluate(cfg, tmp_path / "alif")
    lines = metrics(tmp_path / "alif")
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    assert result.report["neurons"][0] == {"tau": 0.5, "vth": 1.0}
    assert result.report["accuracy_per_timestep"][-1] > 0.2          # 10 classes: well above chance
    x = jax.random.uniform(jax.random.key(0), (6, 2, 4)) * 1.5
    alif = neurons.CELLS["alif"](cfg.model.neuron, 4, rngs=None)
    s_alif, _ = alif(x)
    s_lif, _ = neurons.lif(x)
    assert float(s_alif.sum()) < float(s_lif.sum())                # a raised threshold fires less


def test_plif_with_a_learnt_threshold_trains_and_reports_its_values(ndigits_dir, tmp_path):
    """kind=plif with learn_vth: every layer's leak and threshold are learnt (they leave their initial values
    0.5 and 1.0) and report.json's ``neurons`` holds them, equal to the cells of the trained state."""
    cfg = tiny(ndigits_dir, "model.neuron.kind=plif", "model.neuron.learn_vth=True")
    (result,) = training.train_and_evaluate(cfg, tmp_path / "plif")
    values = result.report["neurons"]
    assert len(values) == 2
    for v in values:
        assert v["tau"] != 0.5 and v["vth"] != 1.0 and 0.0 < v["tau"] < 1.0
    model = nnx.merge(result.graphdef, result.state.params, result.state.batch_stats)
    taus = [1.0 - float(jax.nn.sigmoid(layer.cell.w[...])) for layer in model.spiking_layers()]
    assert taus == pytest.approx([v["tau"] for v in values], rel=1e-6)
    assert [float(layer.cell.vth[...]) for layer in model.spiking_layers()] == \
        pytest.approx([v["vth"] for v in values], rel=1e-6)
