"""The notebook path (aoi_jax/notebook.py): the README's example, run as it stands; its logits against the
evaluation's compiled step on the same checkpoint; a QCFS checkpoint loads as its IF SNN; logging in one call."""

import io
import json
import logging
import re

import jax
import numpy as np
import pytest
from flax import nnx

import aoi_jax
from aoi_jax import checkpoint, config, cutoff, evaluation, models, notebook, step

from test_cli import ROOT

MARKER = "<!-- notebook-example -->"


def readme_example() -> str:
    """The python block that follows the marker in README.md."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, "README.md must hold the notebook example marker once"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert match, "the marker must be followed by a ```python block"
    return match.group(1)


@pytest.fixture
def restore_logger():
    """enable_logging changes the global "aoi_jax" logger: put it back after the test."""
    log = logging.getLogger("aoi_jax")
    saved = log.level, log.propagate, list(log.handlers)
    yield log
    log.setLevel(saved[0])
    log.propagate = saved[1]
    log.handlers[:] = saved[2]


@pytest.fixture(scope="module")
def example(tmp_path_factory, ndigits_dir):
    """The README block executed in a fresh folder, with the session's N-Digits data as the default data folder."""
    folder = tmp_path_factory.mktemp("notebook")
    log = logging.getLogger("aoi_jax")
    saved = log.level, log.propagate, list(log.handlers)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(folder)
        m.setenv("AOI_JAX_DATA", str(ndigits_dir))
        namespace = {}
        exec(compile(readme_example(), "README.md (notebook example)", "exec"), namespace)
    log.setLevel(saved[0])
    log.propagate = saved[1]
    log.handlers[:] = saved[2]
    return folder, namespace


def test_readme_example_runs_and_gives_time_major_logits(example):
    folder, ns = example
    assert ns["logits"].shape == (3, 256, 10) and ns["logits"].dtype == np.float32
    assert ns["report"] is None                                     # run_eval=False: no report.json
    assert isinstance(ns["model"], nnx.Module) and ns["cfg"].train.epochs == 1
    acc = (np.cumsum(np.asarray(ns["logits"], np.float64), 0).argmax(-1) == ns["batch"]["label"]).mean(1)
    np.testing.assert_allclose(cutoff.accuracy_per_timestep(cutoff.cumulative(ns["logits"]), ns["batch"]["label"]),
                               acc, atol=1 / 256 + 1e-6)          # what the block prints: a tie may break apart
    assert (folder / "runs" / "notebook" / "checkpoints").is_dir()


def test_logits_equal_the_evaluation_step_on_the_same_checkpoint(example):
    folder, ns = example
    ckpt = folder / "runs" / "notebook" / "checkpoints"
    graphdef, state, cfg, input_shape = checkpoint.restore(ckpt)
    fns = evaluation.make_eval_functions(graphdef, cfg)
    frames = ns["batch"]["frames"]
    want, _ = fns.test_step(state.params, state.batch_stats, frames, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(ns["logits"]), np.asarray(want), rtol=1e-6, atol=1e-6)
    # the stored step by number, and the report once the folder has one
    (last,) = checkpoint.all_steps(ckpt)
    (folder / "runs" / "notebook" / "report.json").write_text(json.dumps({"accuracy_per_timestep": [0.5]}))
    model, cfg2, report = aoi_jax.load_run(folder / "runs" / "notebook", step=last)
    np.testing.assert_array_equal(np.asarray(aoi_jax.logits(model, frames)), np.asarray(ns["logits"]))
    assert cfg2 == cfg and report == {"accuracy_per_timestep": [0.5]}
    with pytest.raises(ValueError, match=r"frames must be \(T, N, H, W, C\), got shape \(256, 34, 34, 2\)"):
        aoi_jax.logits(model, frames[0])


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/ folder"):
        aoi_jax.load_run(tmp_path)
    (tmp_path / "members" / "alpha=0.5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"a sweep: load one member, e\.g\. '.*members/alpha=0\.5'"):
        aoi_jax.load_run(tmp_path)


def test_a_qcfs_run_loads_as_its_if_snn(tmp_path):
    """An (untrained) QCFS ANN checkpoint: load_run converts it (evaluation.spiking_run), so the network has IF
    cells, config activation "if", and its logits are those of the converted state."""
    cfg = config.load("ndigits_qcfs", ["model.channels=(4, 8)", "data.timesteps=3"])
    input_shape = (34, 34, 2)
    model = models.build(cfg.model, input_shape, rngs=nnx.Rngs(0))
    graphdef, state = step.init_state(model, step.make_optimizer(cfg.optim, 1))
    checkpoint.save(tmp_path / "checkpoints", state, cfg, input_shape)
    run = aoi_jax.load_run(tmp_path)
    assert cfg.model.activation == "qcfs" and run.config.model.activation == "if"
    graphdef, snn_state, snn_cfg = evaluation.spiking_run(graphdef, state, cfg, input_shape)
    assert snn_cfg == run.config
    frames = np.random.default_rng(0).poisson(0.3, (3, 4, *input_shape)).astype(np.float32)
    want, _ = step.make_eval_step(graphdef)(snn_state.params, snn_state.batch_stats, frames, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(aoi_jax.logits(run.model, frames)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_enable_logging_once_to_stderr(restore_logger, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    log = aoi_jax.enable_logging()
    assert aoi_jax.enable_logging(logging.DEBUG) is log and log.level == logging.DEBUG
    assert [h.get_name() for h in log.handlers].count(notebook.HANDLER) == 1 and not log.propagate
    logging.getLogger("aoi_jax").info("epoch %3d", 1)
    assert re.fullmatch(r"\d\d:\d\d:\d\d epoch   1\n", stream.getvalue())
