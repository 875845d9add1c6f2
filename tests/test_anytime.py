"""Continuous batching (anytime.serve) equals every exit rule applied to the multistep logits of the same
trained model: LIF, TEBN and a converted IF network, a queue that is not a multiple of S and S above N."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aoi_jax import anytime, config, convert, cutoff, evaluation, models, step, xla_tuning

T, N_TEST = 6, 64
IF = config.NeuronConfig(tau=1.0, vth=1.0, reset="soft", v0=0.5)


def batch(rng, n):
    """Synthetic events: class = hot pixel position (3 classes); the evidence arrives at random steps."""
    labels = rng.integers(0, 3, n)
    frames = rng.poisson(0.3, (T, n, 8, 8, 2)).astype(np.float32)
    on = rng.random((T, n)) < 0.6
    frames[:, np.arange(n), labels * 3, labels * 3, 0] += 2.0 * on
    return {"frames": jnp.asarray(frames), "label": jnp.asarray(labels, jnp.int32)}


def train(kind):
    """(graphdef, state, cfg) of a small SNN trained for 30 steps: ``lif``; ``tebn`` (TEBN, p_t per step);
    ``if``: a QCFS ANN trained on each recording's first frame, then converted to IF neurons (soft reset,
    v0 = lam / 2)."""
    model_cfg = config.ModelConfig(channels=(4, 8), num_classes=3)
    if kind == "tebn":
        model_cfg = dataclasses.replace(model_cfg, tebn_steps=T)
    if kind == "if":
        model_cfg = dataclasses.replace(model_cfg, activation="qcfs", neuron=IF)
    cfg = config.Config(model=model_cfg, optim=config.OptimConfig(lr=0.05, schedule="constant"))
    model = models.build(cfg.model, (8, 8, 2), rngs=nnx.Rngs(0))
    opt = step.make_optimizer(cfg.optim, 100)
    graphdef, state = step.init_state(model, opt)
    train_step = step.make_train_step(graphdef, cfg, opt)
    rng = np.random.default_rng(0)
    for _ in range(30):
        b = batch(rng, 16)
        if kind == "if":
            b = {"frames": b["frames"][:1], "label": b["label"]}
        state, _ = train_step(state, b, step.loss_weights(cfg))
    if kind == "if":
        return convert.to_snn(state, cfg, (8, 8, 2))
    return graphdef, state, cfg


def prepare(kind):
    """A trained model of ``kind`` with its evaluation functions (the XLA options evaluation uses), the
    calibration split's cumulative logits and the test split's per-step logits and spike counts (L, T, N)."""
    graphdef, state, cfg = train(kind)
    fns = evaluation.make_eval_functions(graphdef, cfg, compiler_options=xla_tuning.compiler_options("auto"))
    rng = np.random.default_rng(1)
    calib, test = batch(rng, 64), batch(rng, N_TEST)
    logits_c, _ = fns.test_step(state.params, state.batch_stats, calib["frames"], jax.random.key(0))
    logits, counts = fns.test_step(state.params, state.batch_stats, test["frames"], jax.random.key(0))
    return {"kind": kind, "graphdef": graphdef, "state": state, "fns": fns, "frames": test["frames"],
            "cum_c": cutoff.cumulative(logits_c), "labels_c": calib["label"], "logits": logits,
            "counts": np.asarray(counts), "queue": jnp.swapaxes(test["frames"], 0, 1), "labels": test["label"]}


@pytest.fixture(scope="module")
def prepared():
    """prepared(kind): ``prepare(kind)``, once per module."""
    cache = {}
    return lambda kind: cache[kind] if kind in cache else cache.setdefault(kind, prepare(kind))


@pytest.fixture(params=["lif", "tebn", "if"])
def run(request, prepared):
    return prepared(request.param)


@pytest.fixture
def lif(prepared):
    return prepared("lif")


def slot_schedule(timesteps, slots):
    """Iterations of S slots serving samples in queue order, sample n holding a slot for timesteps[n]
    iterations; leaving slots take the next samples in slot order (a plain simulation of the scheduler)."""
    N = len(timesteps)
    remaining = [int(timesteps[n]) if n < N else 0 for n in range(slots)]
    following, iterations = min(slots, N), 0
    while any(remaining):
        iterations += 1
        for s in range(slots):
            if remaining[s]:
                remaining[s] -= 1
                if remaining[s] == 0 and following < N:
                    remaining[s], following = int(timesteps[following]), following + 1
    return iterations


def spikes_up_to(counts, timesteps):
    """numpy: spikes[l, n] = sum_{t < timesteps[n]} counts[l, t, n]."""
    mask = np.arange(counts.shape[1])[:, None] < np.asarray(timesteps)[None, :]       # (T, N)
    return (counts * mask[None]).sum(1)


def rule_cases(run, epsilon):
    """(name, fires, param, the rule function on the multistep cumulative logits) for every rule and fixed T."""
    cum = cutoff.cumulative(run["logits"])
    beta = cutoff.calibrate_topk(run["cum_c"], run["labels_c"], epsilon)
    qhat = cutoff.calibrate_spikecp(run["cum_c"], run["labels_c"], epsilon)
    threshold = cutoff.entropy_threshold(epsilon, 3)
    return [("topk", cutoff.topk_fires, beta, cutoff.apply_topk(cum, beta)),
            ("confidence", cutoff.confidence_fires, jnp.float32(epsilon), cutoff.confidence_cutoff(cum, epsilon)),
            ("entropy", cutoff.entropy_fires, threshold, cutoff.entropy_cutoff(cum, threshold)),
            ("spikecp", cutoff.spikecp_fires, qhat, cutoff.spikecp_cutoff(cum, qhat)),
            ("fixed T", cutoff.never_fires, None, (jnp.argmax(cum[-1], -1), jnp.full(N_TEST, T)))]


@pytest.mark.parametrize("slots", [5, 100])                         # 64 = 12 x 5 + 4;  S > N: idle slots
def test_serve_equals_every_rule_on_the_multistep_logits(run, slots):
    cum = cutoff.cumulative(run["logits"])
    if run["kind"] != "if":                                          # it did learn
        assert float(cutoff.accuracy_per_timestep(cum, run["labels"])[-1]) > 0.6
    early = {}
    for epsilon in (0.0, 0.05, 0.2, 0.5):
        for name, fires, param, (want_pred, want_t) in rule_cases(run, epsilon):
            got = run["fns"].serve(fires, slots)(run["state"].params, run["state"].batch_stats, run["queue"], param)
            np.testing.assert_array_equal(got.predictions, want_pred, err_msg=f"{name} eps {epsilon}")
            np.testing.assert_array_equal(got.timesteps, want_t, err_msg=f"{name} eps {epsilon}")
            np.testing.assert_array_equal(got.spikes, spikes_up_to(run["counts"], want_t))
            assert int(got.slot_steps) == slots * slot_schedule(np.asarray(want_t), slots)
            assert int(got.slot_steps) >= int(np.sum(want_t))
            early[name] = early.get(name, False) or bool(np.any(np.asarray(want_t) < T))
    # the exits vary: every rule but fixed T lets some sample go early at some epsilon
    assert early == {"topk": True, "confidence": True, "entropy": True, "spikecp": True, "fixed T": False}


def test_serve_saves_work_and_compiles_once_per_rule(lif):
    """Work is S x iterations, about the sum of the exits, not N x T; the parameter is traced (one compile).
    Here serve and the multistep logits are compiled with XLA's default options."""
    run, traces = lif, []

    def counting_topk(y, t, beta):
        traces.append(y.shape)
        return cutoff.topk_fires(y, t, beta)

    serve = anytime.make_serve(run["graphdef"], counting_topk, slots=4)
    logits, _ = step.make_eval_step(run["graphdef"])(run["state"].params, run["state"].batch_stats, run["frames"],
                                                     jax.random.key(0))
    for epsilon in (0.0, 0.2):
        beta = cutoff.calibrate_topk(run["cum_c"], run["labels_c"], epsilon)
        got = serve(run["state"].params, run["state"].batch_stats, run["queue"], beta)
        want_pred, want_t = cutoff.apply_topk(cutoff.cumulative(logits), beta)
        np.testing.assert_array_equal(got.predictions, want_pred)
        np.testing.assert_array_equal(got.timesteps, want_t)
        assert int(got.slot_steps) < N_TEST * T and int(got.slot_steps) == 4 * slot_schedule(np.asarray(want_t), 4)
    assert traces == [(3,)]                                           # traced once, on one slot's (K,) logits
    exit_now = serve(run["state"].params, run["state"].batch_stats, run["queue"], jnp.full(T, -1.0))
    np.testing.assert_array_equal(exit_now.timesteps, 1)             # every gap > -1: all leave at step 1
    assert int(exit_now.slot_steps) == N_TEST                        # 16 iterations of 4 slots


def test_serve_on_integer_counts_and_a_one_sample_queue(lif):
    """The queue may hold uint8 counts (as the frame caches do): frames are cast per step; N = 1 works."""
    run = lif
    serve = run["fns"].serve(cutoff.never_fires, 5)
    as_float = serve(run["state"].params, run["state"].batch_stats, run["queue"], None)
    as_counts = serve(run["state"].params, run["state"].batch_stats, run["queue"].astype(jnp.uint8), None)
    assert np.all(np.asarray(run["queue"]) == np.asarray(run["queue"].astype(jnp.uint8)))   # whole counts
    np.testing.assert_array_equal(as_counts.predictions, as_float.predictions)
    np.testing.assert_array_equal(as_counts.spikes, as_float.spikes)
    one = run["fns"].serve(cutoff.never_fires, 5)(run["state"].params, run["state"].batch_stats,
                                                  run["queue"][:1], None)
    np.testing.assert_array_equal(one.predictions, as_float.predictions[:1])
    assert int(one.slot_steps) == 5 * T


def test_serve_bad_arguments(lif):
    run = lif
    args = (run["graphdef"], run["state"].params, run["state"].batch_stats)
    with pytest.raises(ValueError, match=r"queue must be recordings \(N, T, H, W, C\) with N, T >= 1, got shape "
                                         r"\(64, 6, 8, 8\)"):
        anytime.serve(*args, run["queue"][..., 0], None, fires=cutoff.never_fires, slots=4)
    with pytest.raises(ValueError, match="slots must be an int >= 2, got 1 .with one row XLA:CPU computes the dense"):
        anytime.serve(*args, run["queue"], None, fires=cutoff.never_fires, slots=1)
