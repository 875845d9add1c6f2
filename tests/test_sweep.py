"""Sweeps in one program: members, the multi-member step against single steps, and a sweep through
``training.train_and_evaluate`` against separate single runs."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from aoi_jax import checkpoint, config, models, step, training
from aoi_jax import sweep as sweep_lib

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "ndigits.py")
TINY = ["model.channels=(4, 8)", "train.epochs=1", "train.batch_size=128", "data.timesteps=3",
        "data.translate=2", "eval.epsilons=(0.0, 0.05)", "eval.bins=20", "eval.batch_size=2048"]


def tiny_cfg():
    return config.Config(model=config.ModelConfig(channels=(4, 8), num_classes=3),
                         optim=config.OptimConfig(lr=0.05, schedule="constant"))


def member_batch(rng, M, T=4, N=12):
    """Seeded batches (M, T, N, 8, 8, 2) with a class-dependent hot pixel, one per member."""
    labels = rng.integers(0, 3, (M, N))
    frames = rng.poisson(0.2, (M, T, N, 8, 8, 2)).astype(np.float32)
    for m in range(M):
        frames[m, :, np.arange(N), labels[m] * 2, labels[m] * 2, 0] += 3.0
    return {"frames": frames, "label": labels.astype(np.int32)}


def test_parse_sweep_and_members():
    sweep = config.parse_sweep(["reg.alpha=0,0.001,0.004", "seed=0,1"])
    assert sweep == {"reg.alpha": (0, 0.001, 0.004), "seed": (0, 1)}
    mem = sweep_lib.members(tiny_cfg(), sweep)
    assert [m.name for m in mem] == ["alpha=0.0_seed=0", "alpha=0.0_seed=1", "alpha=0.001_seed=0",
                                     "alpha=0.001_seed=1", "alpha=0.004_seed=0", "alpha=0.004_seed=1"]
    assert [(m.cfg.reg.alpha, m.cfg.seed) for m in mem] == [(a, s) for a in (0.0, 0.001, 0.004) for s in (0, 1)]
    assert sweep_lib.shared_config(mem).model == tiny_cfg().model
    np.testing.assert_array_equal(sweep_lib.loss_weights(mem).alpha, np.float32([0, 0, 1e-3, 1e-3, 4e-3, 4e-3]))
    (single,) = sweep_lib.members(tiny_cfg(), {})                           # a single run: one member
    assert single.name == "" and single.overrides == {} and single.cfg == tiny_cfg()


def test_sweep_errors_name_the_key():
    with pytest.raises(KeyError, match=r"'model.channels'.*supported sweep keys: seed, reg.alpha, train.tet_lambda"):
        config.parse_sweep(["model.channels=4,8"])
    with pytest.raises(KeyError, match="'reg.alhpa'"):
        config.parse_sweep(["reg.alhpa=0,1"])
    with pytest.raises(ValueError, match="not of the form"):
        config.parse_sweep(["reg.alpha"])
    with pytest.raises(ValueError, match="given twice"):
        config.parse_sweep(["seed=0", "seed=1"])
    with pytest.raises(ValueError, match="repeats a value"):
        config.parse_sweep(["seed=0,0"])
    with pytest.raises(ValueError, match="expects an int"):
        sweep_lib.members(tiny_cfg(), config.parse_sweep(["seed=0.5"]))
    with pytest.raises(ValueError, match="read only by the TET loss"):
        sweep_lib.members(tiny_cfg(), config.parse_sweep(["train.tet_lambda=0.001,0.01"]))
    tet = sweep_lib.members(config.override(tiny_cfg(), "train.loss", "tet"),
                           config.parse_sweep(["train.tet_lambda=0.001,0.01"]))
    assert [m.name for m in tet] == ["tet_lambda=0.001", "tet_lambda=0.01"]
    np.testing.assert_array_equal(sweep_lib.loss_weights(tet).tet_lambda, np.float32([0.001, 0.01]))


@pytest.mark.parametrize("strategy,loss,sweep", [("loop", "mean", "reg.alpha=0,0.5"),
                                                  ("vmap", "tet", "train.tet_lambda=0.001,0.5")])
def test_multi_step_equals_single_steps(strategy, loss, sweep, rng):
    """Each member of the one program follows its own single train step (3 SGD steps; each member's loss
    weights are its slice of the stacked ``LossWeights``).

    Tolerance 1e-6 absolute on losses and parameters (of size ~0.3): float32 rounding only. loop runs
    the same ops as the single steps, but XLA may fuse them differently in the larger program (seen: one
    ulp, 7e-9); vmap batches the members' convolutions into grouped ones that sum in another order (seen:
    1e-7). A flipped spike would show as a difference of order 1e-2."""
    atol = 1e-6
    cfg = config.override(tiny_cfg(), "train.loss", loss)
    mem = sweep_lib.members(cfg, config.parse_sweep([sweep, "seed=1"]))
    opt = step.make_optimizer(cfg.optim, 100)
    graphdef, states = sweep_lib.init_members(mem, (8, 8, 2), opt)
    singles = sweep_lib.unstack(states, len(mem))
    single_steps = [step.make_train_step(graphdef, m.cfg, opt) for m in mem]
    multi = sweep_lib.make_multi_step(graphdef, cfg, opt, strategy=strategy)
    weights = sweep_lib.loss_weights(mem)
    for _ in range(3):
        batch = member_batch(rng, len(mem))
        states, metrics = multi(states, batch, weights)
        for i in range(len(mem)):
            singles[i], single_metrics = single_steps[i](singles[i], {k: v[i] for k, v in batch.items()},
                                                         step.loss_weights(mem[i].cfg))
            np.testing.assert_allclose(metrics["loss"][i], single_metrics["loss"], atol=atol, rtol=0)
    for got, want in zip(sweep_lib.unstack(states, len(mem)), singles):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=0), got, want)
    assert multi._cache_size() == 1
    assert metrics["loss"][0] != metrics["loss"][1]                          # the swept weight acts


def test_init_members_matches_single_init():
    cfg = tiny_cfg()
    mem = sweep_lib.members(cfg, config.parse_sweep(["seed=0,5"]))
    opt = step.make_optimizer(cfg.optim, 10)
    graphdef, states = sweep_lib.init_members(mem, (8, 8, 2), opt)
    for i, seed in enumerate((0, 5)):
        init_key, _ = jax.random.split(jax.random.key(seed))              # step.run_keys, by hand
        _, want = step.init_state(models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(init_key)), opt)
        jax.tree.map(np.testing.assert_array_equal, sweep_lib.unstack(states, 2)[i], want)
    # shapes_only (a resumed run): the same structure, shapes and dtypes, nothing computed
    graphdef_only, shapes = sweep_lib.init_members(mem, (8, 8, 2), opt, shapes_only=True)
    assert graphdef_only == graphdef
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(lambda x: (x.shape, x.dtype), states)


def test_member_mesh_size_divides_the_members():
    assert [sweep_lib.mesh_size(m, 2) for m in (1, 2, 3, 4, 12)] == [1, 2, 1, 2, 2]
    assert [sweep_lib.mesh_size(m, 8) for m in (4, 6, 12, 7, 16)] == [4, 6, 6, 7, 8]
    assert sweep_lib.member_mesh(4).devices.size == sweep_lib.mesh_size(4, len(jax.devices()))
    with pytest.raises(ValueError, match="strategy must be one of"):
        sweep_lib.make_multi_step(None, tiny_cfg(), None, strategy="pmap")


def tiny_config(data_dir, *overrides):
    return config.load(CONFIG, TINY + [f"data.data_dir={data_dir}", *overrides])


SWEEP = {"reg.alpha": (0.5,), "seed": (0, 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ndigits_dir):
    """A sweep of two seeds at alpha 0.5 (evaluated), and its member seed=1 as a separate single run (not
    evaluated), both through ``training.train_and_evaluate``. Members of different alphas in one program are
    checked against single steps above."""
    root = tmp_path_factory.mktemp("sweep")
    results = training.train_and_evaluate(tiny_config(ndigits_dir), root / "sweep", sweep=SWEEP)
    training.train_and_evaluate(tiny_config(ndigits_dir, "reg.alpha=0.5", "seed=1"), root / "single",
                                run_eval=False)
    return root, results


def test_sweep_member_matches_its_single_run(runs):
    """A whole epoch (11 SGD steps, translation augmentation): the member's metrics and checkpoint equal its
    single run's. Tolerance 1e-5 absolute: float32 rounding of the same ops in a larger program; a single
    flipped spike would show as a difference of order 1e-2."""
    root, _ = runs
    sweep_dir, single_dir = root / "sweep", root / "single"
    assert sorted(p.name for p in (sweep_dir / "members").iterdir()) == ["alpha=0.5_seed=0", "alpha=0.5_seed=1"]
    member_dir = sweep_dir / "members" / "alpha=0.5_seed=1"
    got = json.loads((member_dir / "metrics.jsonl").read_text())
    want = json.loads((single_dir / "metrics.jsonl").read_text())
    for key in ("train_loss", "train_task", "train_rcs", "train_accuracy", "test_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert json.loads((member_dir / "config.json").read_text()) == json.loads((single_dir / "config.json").read_text())
    _, state_m, cfg_m, _ = checkpoint.restore(member_dir / "checkpoints")
    _, state_s, cfg_s, _ = checkpoint.restore(single_dir / "checkpoints")
    assert cfg_m == cfg_s and int(state_m.step) == int(state_s.step) == 11
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), state_m, state_s)
    other = json.loads((sweep_dir / "members" / "alpha=0.5_seed=0" / "metrics.jsonl").read_text())
    assert other["train_loss"] != pytest.approx(got["train_loss"], abs=1e-3)     # seeds really differ


def test_sweep_reports_and_summary(runs):
    root, results = runs
    assert [r.member.name for r in results] == ["alpha=0.5_seed=0", "alpha=0.5_seed=1"]
    assert [r.workdir for r in results] == [root / "sweep" / "members" / r.member.name for r in results]
    summary = training.summarise(SWEEP, results)
    assert summary["sweep"] == {"reg.alpha": [0.5], "seed": [0, 1]}
    (group,) = summary["groups"]
    assert group["settings"] == {"reg.alpha": 0.5} and group["seeds"] == [0, 1]
    for row, r in zip(summary["members"], results, strict=True):
        assert row["accuracy_at_T"] == r.report["accuracy_per_timestep"][-1]
        assert row["topk_mean_timestep@0"] == r.report["rules"]["topk"]["mean_timestep"][0]
        assert r.report["anytime"]["agrees_with_apply_topk"]
    assert group["accuracy_at_T"]["mean"] == pytest.approx(np.mean([r.report["accuracy_per_timestep"][-1]
                                                                      for r in results]))


def test_sweep_resumes_and_refuses_another_sweep(runs, ndigits_dir):
    root, _ = runs
    sweep_dir = root / "sweep"
    results = training.train_and_evaluate(tiny_config(ndigits_dir), sweep_dir, sweep=SWEEP, run_eval=False)
    assert [r.report for r in results] == [None, None]                    # at its last epoch: nothing to do
    assert len((sweep_dir / "members" / "alpha=0.5_seed=0" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match=r"alpha=0.5_seed=0 holds checkpoints of a different config "
                                         r"\(optim.lr: stored 0.1, requested 0.2\)"):
        training.train_and_evaluate(tiny_config(ndigits_dir, "optim.lr=0.2"), sweep_dir, sweep=SWEEP,
                                    run_eval=False)
