"""Costs of an answer: MACs read from the architecture against hand counts, spikes and synaptic operations up
to each exit against a loop, energies and decision times against hand-computed numbers."""

import numpy as np
import pytest
from flax import nnx

from aoi_jax import config, cost, models


def small_snn(activation="lif"):
    neuron = config.NeuronConfig(tau=1.0, reset="soft", v0=0.5) if activation != "lif" else config.NeuronConfig()
    cfg = config.ModelConfig(channels=(4, 8), num_classes=3, activation=activation, neuron=neuron)
    return models.build(cfg, (8, 8, 2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("activation", ["lif", "qcfs", "if"])
def test_layer_macs_of_a_small_snn_by_hand(activation):
    """Conv 3x3 2->4 on 8x8: 8*8*4 outputs x 9*2; pool to 4x4; conv 3x3 4->8: 4*4*8 x 9*4; pool to 2x2;
    Linear(2*2*8 -> 3): 3 x 32. The same for the LIF SNN, the QCFS ANN and the converted IF SNN."""
    assert cost.layer_macs(small_snn(activation), (8, 8, 2)) == (8 * 8 * 4 * 18, 4 * 4 * 8 * 36, 3 * 32)


def test_layer_macs_of_resnet20_by_hand():
    """ResNet-20 on 32x32x3 (He et al. 2016): stem 32*32*16 x 27; per stage of width w on an s x s map, six
    3x3 convs of s*s*w x 9w, except the first conv of stages 2 and 3 (stride 2, input width w/2: 9w/2) and
    their 1x1 projection shortcut (s*s*w x w/2); Linear(64 -> 10). 40.8 M MACs in all."""
    model = models.build(config.ModelConfig(name="resnet20", channels=(), num_classes=10), (32, 32, 3),
                         rngs=nnx.Rngs(0))
    macs = cost.layer_macs(model, (32, 32, 3))
    stem = 32 * 32 * 16 * 27
    stage1 = [32 * 32 * 16 * 144] * 6
    stage2 = [16 * 16 * 32 * 144] + [16 * 16 * 32 * 288 + 16 * 16 * 32 * 16] + [16 * 16 * 32 * 288] * 4
    stage3 = [8 * 8 * 64 * 288] + [8 * 8 * 64 * 576 + 8 * 8 * 64 * 32] + [8 * 8 * 64 * 576] * 4
    assert macs == (stem, *stage1, *stage2, *stage3, 64 * 10)
    assert sum(macs) == 40_813_184


def test_spikes_and_synops_up_to_the_exit_against_a_loop(rng):
    counts = rng.integers(0, 50, (3, 5, 7)).astype(np.float32)          # (L, T, N)
    timesteps = rng.integers(1, 6, (4, 7))                                # (E, N)
    fan_out = np.array([9 * 8, 9 * 16, 10])
    got = cost.spikes_to_exit(counts, timesteps)
    assert got.shape == (4, 3, 7) and got.dtype == np.int64
    for e in range(4):
        for n in range(7):
            for layer in range(3):
                assert got[e, layer, n] == sum(counts[layer, t, n] for t in range(timesteps[e, n]))
            assert cost.synops(got, fan_out)[e, n] == sum(fan_out[layer] * got[e, layer, n] for layer in range(3))
    np.testing.assert_array_equal(cost.spikes_to_exit(counts, np.full(7, 5)), counts.sum(1))   # fixed T


def test_energy_and_decision_time_by_hand():
    """Two samples exit at steps 2 and 5; 1000 and 3000 synaptic operations; first layer 100 MACs per step;
    bins of 10 ms and 2 ms of sensor time::

        energy  = (0.9 * 1000 + 4.6 * 100 * 2) pJ = 1.82 nJ,   (0.9 * 3000 + 4.6 * 100 * 5) pJ = 5.0 nJ
        decision = 2 * 10 ms = 20 ms,  5 * 2 ms = 10 ms
    """
    np.testing.assert_allclose(cost.snn_energy_uj([1000.0, 3000.0], [2, 5], 100), [1.82e-3, 5.0e-3], rtol=1e-12)
    np.testing.assert_allclose(cost.decision_ms([2, 5], [10_000.0, 2_000.0]), [20.0, 10.0])
    assert cost.ann_energy_uj((100, 200, 10)) == pytest.approx(4.6 * 310 * 1e-6)
    assert (cost.E_AC_PJ, cost.E_MAC_PJ) == (0.9, 4.6)


def test_exit_costs_are_means_over_the_samples(rng):
    counts = rng.integers(0, 20, (2, 4, 6)).astype(np.float32)
    timesteps = np.array([[1, 2, 3, 4, 4, 1], [4, 4, 4, 4, 4, 4]])
    fan_out, macs, bin_us = np.array([5, 3]), (50, 7, 3), np.full(6, 1500.0)
    got = cost.exit_costs(counts, timesteps, fan_out, macs, bin_us)
    ops = cost.synops(cost.spikes_to_exit(counts, timesteps), fan_out)
    np.testing.assert_allclose(got["synops"], ops.mean(-1))
    np.testing.assert_allclose(got["energy_uj"], (0.9 * ops + 4.6 * 50 * timesteps).mean(-1) * 1e-6)
    np.testing.assert_allclose(got["decision_ms"], [15 / 6 * 1.5, 6.0])
    assert cost.exit_costs(counts, timesteps, fan_out, macs)["decision_ms"] is None     # static images
