"""RCS and the task losses against direct numpy transcriptions (docs/semantics.md sections 4, 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aoi_jax import losses, regularisers


def rcs_scores_reference(s, m, vth=1.0, window=0.3):
    T, N = s.shape[:2]
    r = (s + np.maximum(m / vth, 0.0)).reshape(T, N, -1).astype(np.float64)
    k = int(T * window)
    r_d = r[T - k:].mean(0) if k > 0 else r.mean(0)
    scores = np.zeros(N)
    for n in range(N):
        cos = [np.dot(r[t, n], r_d[n]) / (np.sqrt((r[t, n] ** 2).sum() + 1e-5)
                                          * np.sqrt((r_d[n] ** 2).sum() + 1e-5)) for t in range(T)]
        scores[n] = 1.0 / (np.mean(cos) + 1e-5)
    return scores


def rcs_loss_reference(scores, logits, labels, rcs_n=0.3):
    T = logits.shape[0]
    j = int(T * rcs_n)
    steps = range(T - j, T) if j > 0 else range(T)
    mask = np.array([all(np.argmax(logits[t, n]) == labels[n] for t in steps) for n in range(len(labels))])
    return np.mean([max(scores[l, n] * mask[n] for n in range(len(labels))) for l in range(len(scores))])


def layer(key, T, N, shape=(4, 4, 3)):
    k1, k2 = jax.random.split(key)
    s = (jax.random.uniform(k1, (T, N, *shape)) < 0.3).astype(jnp.float32)
    m = jax.random.normal(k2, (T, N, *shape)) * 0.6
    return s, m


@pytest.mark.parametrize("T", [2, 3, 10])
@pytest.mark.parametrize("vth,window", [(1.0, 0.3), (0.5, 0.5)])
def test_rcs_scores_matches_reference(T, vth, window, key):
    s, m = layer(key, T, 5)
    got = jax.jit(lambda s, m: regularisers.rcs_scores(s, m, vth=vth, window=window))(s, m)
    np.testing.assert_allclose(got, rcs_scores_reference(np.asarray(s), np.asarray(m), vth, window), rtol=1e-5)


def test_rcs_scores_constant_response_scores_one(key):
    r = jnp.abs(jax.random.normal(key, (1, 3, 8))) + 0.1
    s = jnp.zeros((6, 3, 8))
    m = jnp.broadcast_to(r, (6, 3, 8))
    # r_t == r_d for every t, so cos = |r|^2 / (|r|^2 + 1e-5) ~ 1 and the score ~ 1
    np.testing.assert_allclose(regularisers.rcs_scores(s, m), np.ones(3), atol=1e-4)


def test_rcs_scores_window_is_detached(key):
    """The gradient (w.r.t. spikes and membranes; ``rcs_scores`` writes its reductions' gradient by hand)
    equals autodiff of the formula written with an einsum, the target r_d held constant."""
    s, m = layer(key, 10, 2)
    g = jax.jit(jax.grad(lambda s, m: regularisers.rcs_scores(s, m).sum(), argnums=(0, 1)))(s, m)
    # numerical check of the stop-gradient: the target r_d is treated as a constant
    def with_fixed_target(s, m):
        r = s + jax.nn.relu(m)
        r_d = jax.lax.stop_gradient(r[7:].mean(0)).reshape(2, -1)
        r = r.reshape(10, 2, -1)
        cos = jnp.einsum("tnd,nd->tn", r, r_d) / (jnp.sqrt((r ** 2).sum(-1) + 1e-5)
                                                  * jnp.sqrt((r_d ** 2).sum(-1) + 1e-5)[None, :])
        return (1.0 / (cos.mean(0) + 1e-5)).sum()
    want = jax.jit(jax.grad(with_fixed_target, argnums=(0, 1)))(s, m)
    assert float(jnp.abs(want[0]).max()) > 1e-3 and float(jnp.abs(want[1]).max()) > 1e-3
    np.testing.assert_allclose(g[0], want[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g[1], want[1], rtol=1e-5, atol=1e-7)


def logits_for(labels, correct, K=4):
    """Per-step logits with argmax == label where correct[t, n], else label + 1."""
    T, N = correct.shape
    target = np.where(correct, labels[None, :], (labels[None, :] + 1) % K)
    return jnp.asarray(np.eye(K)[target] * 3.0 + 0.1, jnp.float32)


@pytest.mark.parametrize("T", [2, 10])
def test_rcs_loss_matches_reference(T, rng):
    labels = rng.integers(0, 4, 6)
    correct = rng.random((T, 6)) < 0.8
    correct[:, 0] = True       # at least one sample qualifies
    correct[-1, 1] = False     # and one certainly does not
    logits = logits_for(labels, correct)
    scores = jnp.asarray(rng.random((3, 6)) * 5 + 1, jnp.float32)
    got = regularisers.rcs_loss(scores, logits, jnp.asarray(labels))
    want = rcs_loss_reference(np.asarray(scores), np.asarray(logits), labels)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rcs_loss_mask_keeps_only_some():
    labels = np.array([0, 1, 2])
    # T=10 -> the last 3 steps count. Sample 0 correct throughout; sample 1 wrong at t=8;
    # sample 2 wrong early only (t < 7), so it qualifies.
    correct = np.ones((10, 3), bool)
    correct[8, 1] = False
    correct[:7, 2] = False
    scores = jnp.array([[1.0, 9.0, 2.0], [3.0, 9.0, 1.5]])
    np.testing.assert_array_equal(regularisers.correct_late_mask(logits_for(labels, correct), labels), [1, 0, 1])
    got = regularisers.rcs_loss(scores, logits_for(labels, correct), jnp.asarray(labels))
    np.testing.assert_allclose(got, (2.0 + 3.0) / 2)   # the masked 9.0 never counts


def test_rcs_loss_no_sample_correct_is_zero():
    labels = np.array([0, 1])
    logits = logits_for(labels, np.zeros((4, 2), bool))
    assert float(regularisers.rcs_loss(jnp.ones((2, 2)) * 7, logits, jnp.asarray(labels))) == 0.0


def test_rcs_loss_T2_uses_all_steps():
    """int(2 * 0.3) == 0 -> all steps must be correct: wrong at t=0 only disqualifies."""
    labels = np.array([0, 1])
    correct = np.array([[False, True], [True, True]])
    mask = regularisers.correct_late_mask(logits_for(labels, correct), jnp.asarray(labels))
    np.testing.assert_array_equal(mask, [0, 1])


def test_rcs_ann_scores(key):
    x = jax.random.normal(key, (4, 3, 3, 2))
    xp = np.maximum(np.asarray(x, np.float64), 0).reshape(4, -1)
    want = xp.max() / np.sqrt((xp ** 2).mean(-1) + 1e-5)
    np.testing.assert_allclose(regularisers.rcs_ann_scores(x), want, rtol=1e-5)


def test_rcs_loss_bad_shapes():
    with pytest.raises(ValueError, match=r"expected scores \(L, N\)"):
        regularisers.rcs_loss(jnp.ones((2, 3)), jnp.ones((4, 5, 2)), jnp.zeros(5, jnp.int32))


def test_mean_loss_by_hand():
    logits = jnp.array([[[2.0, 0.0]], [[0.0, 0.0]]])            # mean over T: [1, 0]
    want = -np.log(np.exp(1.0) / (np.exp(1.0) + 1.0))
    np.testing.assert_allclose(losses.mean_loss(logits, jnp.array([0])), want, rtol=1e-6)


def test_tet_loss_by_hand():
    logits = jnp.array([[[2.0, 0.0]], [[0.0, 1.0]]])            # T=2, N=1, K=2, label 0
    ce0 = -np.log(np.exp(2.0) / (np.exp(2.0) + 1.0))
    ce1 = -np.log(1.0 / (1.0 + np.exp(1.0)))
    mse = ((2 - 1) ** 2 + (0 - 1) ** 2 + (0 - 1) ** 2 + (1 - 1) ** 2) / 4
    for lam in (1e-3, 0.5):
        want = (1 - lam) * (ce0 + ce1) / 2 + lam * mse
        np.testing.assert_allclose(losses.tet_loss(logits, jnp.array([0]), lam=lam), want, rtol=1e-6)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"logits \(T, N, K\)"):
        losses.tet_loss(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32))


def test_rcs_scores_gradient_equals_float64_sums(key):
    """Values and gradients of ``rcs_scores`` (einsums, autodiff) against the formula written with two plain
    sums in float64, r_d held constant (what the former hand-written reduction and its VJP computed)."""
    s, m = layer(key, 6, 3, shape=(2, 5))
    f32 = jax.jit(jax.grad(lambda s, m: regularisers.rcs_scores(s, m, vth=0.8, window=0.5).sum(), argnums=(0, 1)))(s, m)

    def sums(s, m):
        r = (s + jax.nn.relu(m / 0.8)).reshape(6, 3, -1)
        r_d = jax.lax.stop_gradient(r[3:].mean(0))
        cos = jnp.sum(r * r_d[None], -1) / (jnp.sqrt(jnp.sum(r * r, -1) + 1e-5)
                                            * jnp.sqrt(jnp.sum(r_d * r_d, -1) + 1e-5)[None, :])
        return 1.0 / (cos.mean(0) + 1e-5)

    with jax.enable_x64(True):
        s64, m64 = np.asarray(s, np.float64), np.asarray(m, np.float64)
        want = np.asarray(jax.jit(sums)(s64, m64))
        g64 = [np.asarray(g) for g in jax.jit(jax.grad(lambda s, m: sums(s, m).sum(), argnums=(0, 1)))(s64, m64)]
    np.testing.assert_allclose(regularisers.rcs_scores(s, m, vth=0.8, window=0.5), want, rtol=1e-6)
    for a, b in zip(f32, g64):
        assert np.abs(b).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rcs_scores_per_channel_threshold(key):
    """vth may be one value per channel (a learnt threshold): r = s + relu(V / vth_c); the gradient reaches it."""
    s, m = layer(key, 5, 2, shape=(3, 4))
    vth = jnp.array([0.5, 1.0, 2.0, 1.5])
    want = rcs_scores_reference(np.asarray(s), np.asarray(m) / np.asarray(vth), 1.0, 0.3)
    np.testing.assert_allclose(regularisers.rcs_scores(s, m, vth=vth), want, rtol=1e-5)
    g = jax.jit(jax.grad(lambda v: regularisers.rcs_scores(s, m, vth=v).sum()))(vth)
    assert g.shape == (4,) and float(jnp.abs(g).min()) > 0
