"""ANN-to-SNN conversion of a trained QCFS network (docs/semantics.md section 3, section 9 item 2).

Each QCFS activation ``lam_l * clip(floor(L relu(u) / lam_l + 0.5) / L, 0, 1)`` becomes an IF neuron
(``tau = 1``) with soft reset, threshold ``lam_l``, initial membrane ``lam_l / 2``, emitting ``lam_l`` per
spike; the SNN then runs for any T. Everything between activations is affine on each time step and
stays as it is, as in the reference's conversion (which swaps only the activations): Conv and Linear
with their biases, BatchNorm with its running statistics (an affine map per channel in evaluation mode),
average pooling and the residual additions. So the converted SNN is the same architecture with
``ModelConfig.activation = "if"``, holding the very same parameters, thresholds and BatchNorm statistics.
Its time-averaged logits approach the ANN's as T grows (tests/test_convert.py measures it).

The result is an ordinary ``models.SpikingNet`` (``__call__``, ``init_membranes``, ``step``,
``fan_out``): the training-free evaluation path of directly trained SNNs (``step.make_eval_step``,
``cutoff``, ``anytime``) runs it unchanged. ``to_snn`` is what ``aoi_jax.method.QCFS.evaluated`` calls on a
trained run.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from aoi_jax import models
from aoi_jax.config import Config, ModelConfig


def snn_config(ann_cfg: ModelConfig) -> ModelConfig:
    """The ``ModelConfig`` of the SNN converted from the QCFS ANN ``ann_cfg``: ``activation = "if"``.

    ``ann_cfg.neuron`` already describes the IF cell in units of the threshold (``models.IF_NEURON``,
    ``v0`` = initial membrane as a fraction of lam, 0.5 by default); it is kept.

    Raises:
      ValueError: ``ann_cfg`` is not a QCFS ANN.
    """
    if not ann_cfg.is_ann:
        raise ValueError(f"only a QCFS ANN (model.activation 'qcfs') converts, got {ann_cfg.activation!r}")
    return dataclasses.replace(ann_cfg, activation="if")


def convert(ann_cfg: ModelConfig, input_shape, params, batch_stats):
    """Converts a trained QCFS ANN into an SNN of IF neurons.

    Args:
      ann_cfg: the ANN's model config (activation "qcfs").  input_shape: (H, W, C) of one frame.
      params, batch_stats: the trained ANN's ``nnx.State``s (e.g. ``TrainState.params``,
        ``TrainState.batch_stats``).
    Returns:
      (snn_cfg, graphdef, params, batch_stats): the SNN's config and structure, and its state, which is
      the ANN's (``nnx.merge(graphdef, params, batch_stats)`` gives the SNN).
    Raises:
      ValueError: not a QCFS ANN; the state does not fit the model ``ann_cfg`` builds (named entries);
        a threshold is not positive (an IF neuron needs lam > 0).
    """
    snn_cfg = snn_config(ann_cfg)
    abstract = nnx.eval_shape(lambda: models.build(snn_cfg, input_shape, rngs=nnx.Rngs(0)))
    graphdef, want_params, want_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    for name, want, have in (("params", want_params, params), ("batch_stats", want_stats, batch_stats)):
        w, h = _describe(want), _describe(have)
        if w != h:
            diff = sorted(set(w.items()) ^ set(h.items()))[:10]
            raise ValueError(f"ANN {name} do not fit {snn_cfg.name} with input {tuple(input_shape)}; "
                             f"differing entries: {diff}")
    lam = np.asarray(params["thresholds"][...])
    if not np.all(lam > 0):
        raise ValueError(f"IF thresholds must be positive; learnt lam per layer: {lam.tolist()}")
    return snn_cfg, graphdef, params, batch_stats


def _describe(state) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def to_snn(state, cfg: Config, input_shape):
    """The SNN a trained QCFS ANN run converts to, as ``(graphdef, state, cfg)`` of an ``activation = "if"`` run.

    ``state`` (a ``step.TrainState``) keeps its step and its parameters and BatchNorm statistics
    (``convert``); the optimiser state is dropped (the SNN is not trained).

    Raises:
      ValueError: as ``convert``.
    """
    snn_model, graphdef, params, batch_stats = convert(cfg.model, input_shape, state.params, state.batch_stats)
    return graphdef, state._replace(params=params, batch_stats=batch_stats, opt_state=()), \
        dataclasses.replace(cfg, model=snn_model)
