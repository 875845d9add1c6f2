"""What an answer costs: synaptic operations and energy up to each sample's exit, and decision time.

An anytime SNN stops computing a sample at its exit timestep tau_n (``aoi_jax.cutoff``, ``aoi_jax.anytime``),
so its cost is counted up to tau_n only, from the per-sample per-step spike counts of the multistep pass
(``step.make_eval_step``: counts (L, T, N)) or of ``anytime.serve``::

    spikes[l, n]  = sum_{t < tau_n} counts[l, t, n]                     (spikes of layer l up to the exit)
    synops[n]     = sum_l fan_out_l spikes[l, n]                         (docs/semantics.md section 9.3)
    energy_snn[n] = E_AC synops[n] + E_MAC tau_n macs_0                  (pJ)
    energy_ann    = E_MAC sum_i macs_i                                   (pJ, one pass of the equivalent ANN)
    decision[n]   = tau_n bin_us[n] / 1000                               (ms of sensor time)

Per-operation energies: 45 nm CMOS, 32-bit floating point, Horowitz, "Computing's energy problem (and what we
can do about it)", ISSCC 2014: an add 0.9 pJ, a multiply 3.7 pJ, so an accumulate (the synaptic operation of
a spike: add the weight) ``E_AC = 0.9`` pJ and a multiply-accumulate ``E_MAC = 3.7 + 0.9 = 4.6`` pJ, the figures
used for SNN-vs-ANN estimates since Rathi & Roy (DIET-SNN, IEEE TNNLS 2021) and throughout the SNN literature.

``macs`` (``layer_macs``) are the multiply-accumulates of the architecture's convolutions and dense layers
for one frame, read from the traced forward pass: ``macs_i`` those of spiking layer i's pre-activation
(its conv or Linear), ``macs_L`` those after the last spiking layer (the head). ``macs_0`` reads the input
frame (event counts or pixel values, not spikes), so the SNN pays it as dense MACs at every step it computes
(as Rathi & Roy count a directly encoded first layer); every later layer receives spikes and costs one
accumulate per spike and synapse (``fan_out``, border effects ignored, as in ``aoi_jax.models``). The
equivalent ANN is the same architecture with a real-valued activation (ReLU, QCFS), run once: all its convs
and dense layers, ``sum_i macs_i``. Bias additions, BatchNorm (foldable into the weights), pooling and the
neurons' own updates are not counted in either.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

E_AC_PJ = 0.9  # pJ per 32-bit float accumulate, 45 nm (Horowitz, ISSCC 2014)
E_MAC_PJ = 4.6  # pJ per 32-bit float multiply-accumulate (3.7 + 0.9), 45 nm (Horowitz, ISSCC 2014)


def _jaxpr_macs(jaxpr) -> int:
    """Multiply-accumulates of the convolutions and dot products of a jaxpr (sub-jaxprs included)::

        conv_general_dilated:  prod(out shape) * prod(kernel shape) / out_features   (= kh kw C_in / groups)
        dot_general:           prod(out shape) * prod(lhs contracting sizes)
    """
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            total += math.prod(out) * math.prod(kernel) // kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            total += math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _jaxpr_macs(inner)
    return total


def layer_macs(model, input_shape) -> tuple[int, ...]:
    """Multiply-accumulates per frame of each affine stage of a ``models.SpikingNet`` (any activation).

    ``forward`` is traced on one frame (1, H, W, C) with every cell replaced by the identity
    (``SpikingNet.probe``, shapes only)::

        macs_i = MACs of spiking layer i's pre-activation pre(*inputs),   i = 0..L-1
        macs_L = MACs of the whole forward pass - sum_i macs_i            (the head)

    Args:
      model: a ``models.SpikingNet``.  input_shape: (H, W, C) of one frame.
    Returns:
      (L + 1,) Python ints.
    """
    stages = {}

    def probe(layer, pre, *inputs):
        specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)
        stages[layer.index] = _jaxpr_macs(jax.make_jaxpr(lambda xs: pre(*xs))(specs).jaxpr)

    frame = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    total = _jaxpr_macs(jax.make_jaxpr(lambda f: model.probe(f, probe)[0])(frame).jaxpr)
    macs = [stages[i] for i in range(len(stages))]
    return (*macs, total - sum(macs))


def spikes_to_exit(counts, timesteps) -> np.ndarray:
    """Spikes of each layer and sample up to its exit: ``spikes[..., l, n] = sum_{t < timesteps[..., n]}
    counts[l, t, n]`` (in int64: the counts are whole numbers).

    Args:
      counts: spike counts per layer, step and sample, (L, T, N).  timesteps: 1-based exits, (..., N).
    Returns:
      (..., L, N) int64.
    """
    counts = np.asarray(counts)
    upto = np.cumsum(np.rint(counts).astype(np.int64), axis=1)                      # (L, T, N)
    timesteps = np.asarray(timesteps)
    return np.moveaxis(upto[:, timesteps - 1, np.arange(counts.shape[2])], 0, -2)


def synops(spikes, fan_out) -> np.ndarray:
    """Synaptic operations per sample, ``sum_l fan_out_l spikes[..., l, n]``: (..., L, N) -> (..., N) float64."""
    return np.einsum("...ln,l->...n", np.asarray(spikes, np.float64), np.asarray(fan_out, np.float64))


def snn_energy_uj(synops_, timesteps, first_layer_macs) -> np.ndarray:
    """SNN energy per sample in microjoules, ``(E_AC synops + E_MAC timesteps macs_0) 1e-6``, (..., N)."""
    return (E_AC_PJ * np.asarray(synops_, np.float64)
            + E_MAC_PJ * first_layer_macs * np.asarray(timesteps, np.float64)) * 1e-6


def ann_energy_uj(macs) -> float:
    """Energy of one pass of the equivalent ANN in microjoules, ``E_MAC sum_i macs_i 1e-6``."""
    return E_MAC_PJ * float(sum(macs)) * 1e-6


def decision_ms(timesteps, bin_us) -> np.ndarray:
    """Milliseconds of sensor time until the answer: ``timesteps[..., n] bin_us[n] / 1000``, (..., N)."""
    return np.asarray(timesteps, np.float64) * np.asarray(bin_us, np.float64) / 1000.0


def exit_costs(counts, timesteps, fan_out, macs, bin_us=None) -> dict:
    """Means over the samples of the costs of exiting at ``timesteps``.

    Args:
      counts: (L, T, N) spike counts.  timesteps: 1-based exits, (..., N).  fan_out: (L,).
      macs: ``layer_macs``, (L + 1,).  bin_us: (N,) microseconds per frame bin, or None (static images).
    Returns:
      {"synops": (...), "energy_uj": (...), "decision_ms": (...) or None}, float64 numpy arrays.
    """
    ops = synops(spikes_to_exit(counts, timesteps), fan_out)
    return {"synops": ops.mean(-1), "energy_uj": snn_energy_uj(ops, timesteps, macs[0]).mean(-1),
            "decision_ms": None if bin_us is None else decision_ms(timesteps, bin_us).mean(-1)}
