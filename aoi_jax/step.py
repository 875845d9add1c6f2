"""The regularised train step and the evaluation forward pass (docs/semantics.md sections 4, 5, 10).

The NNX model is split once into ``graphdef`` (static structure), ``params`` and ``batch_stats``; the
steps are plain ``jax.jit`` functions of those pytrees, and the model is re-merged inside the loss
(``nnx.merge(..., copy=True)``), so there is one compiled function per config and no Python loop over
time anywhere in training.

The loss weights that a sweep may vary (``reg.alpha``, ``train.tet_lambda``) are not read from the config
inside the loss: they arrive as a ``LossWeights`` pytree, always, so a single run and the members of a sweep
(``aoi_jax.ablation``) run one code path. ``run_keys`` is the one place that derives PRNG keys from a seed.
XLA compiler options are the caller's choice (``compiler_options=``; ``aoi_jax.xla_tuning`` has the
measured XLA:CPU ones), never hard-wired here.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aoi_jax import losses, method, regularisers
from aoi_jax.config import Config, OptimConfig


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree (orbax saves it as is)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of nnx.BatchStat
    opt_state: Any  # optax state


class LossWeights(NamedTuple):
    """The loss weights a sweep may vary, passed to the loss as (traced) arrays.

    A field per sweepable config key (``WEIGHT_KEYS``): scalars for one run, (M,) for M members of a sweep.
    """

    alpha: Any  # reg.alpha: weight of the RCS loss
    tet_lambda: Any  # train.tet_lambda: TET's MSE weight (read only by the TET loss)


WEIGHT_KEYS = {"reg.alpha": "alpha", "train.tet_lambda": "tet_lambda"}  # config key -> LossWeights field


def loss_weights(cfg: Config) -> LossWeights:
    """The ``LossWeights`` of one run: its config's values as float32 scalars."""
    return LossWeights(jnp.float32(cfg.reg.alpha), jnp.float32(cfg.train.tet_lambda))


class RunKeys(NamedTuple):
    """The PRNG keys of a run, all derived from its seed by ``run_keys``."""

    init: jax.Array  # model initialisation
    calibration: jax.Array  # Top-K calibration dropout


def run_keys(seed: int) -> RunKeys:
    """``RunKeys`` of a run of ``seed``: ``jax.random.split(jax.random.key(seed))``, in field order.

    Training, evaluation and every member of a sweep draw from these, so a re-evaluation (``evaluate.py``)
    calibrates exactly as the training run did.
    """
    return RunKeys(*jax.random.split(jax.random.key(seed)))


def task_loss(logits, labels, cfg: Config, weights: LossWeights):
    """The configured task loss: ``mean_loss``, or ``tet_loss`` with ``lam = weights.tet_lambda``."""
    if cfg.train.loss == "tet":
        return losses.tet_loss(logits, labels, lam=weights.tet_lambda)
    return losses.mean_loss(logits, labels)


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate ``lr_t`` after t optimiser steps: ``lr`` constant, or cosine-decayed to 0 at
    ``total_steps``::

        cosine: lr_t = lr * (1 + cos(pi * min(t, total_steps) / total_steps)) / 2

    Raises:
      ValueError: total_steps < 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return optax.cosine_decay_schedule(cfg.lr, total_steps) if cfg.schedule == "cosine" \
        else optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay (PyTorch's ``SGD(weight_decay=...)``), or AdamW, at the
    learning rate ``lr_t = learning_rate(cfg, total_steps)(t)``::

        sgd:   g <- g + wd * p;  m <- momentum * m + g;  p <- p - lr_t * m
        adamw: optax.adamw(lr_t, b1=momentum, weight_decay=wd)

    Raises:
      ValueError: total_steps < 1.
    """
    lr = learning_rate(cfg, total_steps)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum))


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation):
    """Splits ``model`` once; returns ``(graphdef, TrainState)`` at step 0."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params))


def abstract_init(init: Callable[[], tuple[Any, Any]]):
    """``init() -> (graphdef, state)`` traced once with ``jax.eval_shape``: the same graphdef (static structure)
    and the state as ShapeDtypeStructs, without initialising or computing anything."""
    graphdefs = []

    def state_only():
        graphdef, state = init()
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(state_only)
    return graphdefs[0], state


def loss_fn(params, batch_stats, batch, weights: LossWeights, *, graphdef, cfg: Config):
    """Total loss ``task_loss + alpha * rcs_loss`` on one batch, training-mode BatchNorm, for either training
    method (``aoi_jax.method``: its input and its per-layer RCS score)::

        loss = task_loss(o, y) + alpha * rcs_loss([score(pair_l) for each spiking layer l], o, y)

    A directly trained SNN scores each layer's spikes and membranes (``regularisers.rcs_scores``); a QCFS
    ANN sees one static frame, its logits are one time step (the task loss is then plain cross-entropy) and
    it scores each layer's pre-activation (``regularisers.rcs_ann_scores``, docs/semantics.md section 5).

    Args:
      params, batch_stats: the model's state.  batch: {"frames": (T, N, H, W, C), "label": (N,)}, T = 1 for
        a QCFS ANN.  weights: ``LossWeights`` (alpha, TET's lambda), scalars.
    Returns:
      (loss, (new batch_stats, metrics dict with loss, task, rcs, accuracy at T)).
    Raises:
      ValueError: frames with a number of steps the method does not train on (a QCFS ANN's T > 1).
    """
    how = method.of(cfg)
    how.check_batch(batch["frames"])
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits, scores = model(batch["frames"], train=True, layer_fn=how.layer_score(cfg))   # scores: (N,) per layer
    task = task_loss(logits, batch["label"], cfg, weights)
    reg = regularisers.rcs_loss(jnp.stack(scores), logits, batch["label"], rcs_n=cfg.reg.rcs_n)   # (L, N)
    acc = jnp.mean(jnp.argmax(logits.sum(0), -1) == batch["label"])
    loss = task + weights.alpha * reg
    return loss, (nnx.state(model, nnx.BatchStat), {"loss": loss, "task": task, "rcs": reg, "accuracy": acc})


def make_update(graphdef, cfg: Config, optimizer: optax.GradientTransformation):
    """Returns the (not jitted) ``update(state, batch, weights) -> (state, metrics)``: one optimiser step.

    The objective is ``loss_fn``. ``make_train_step`` jits it; ``aoi_jax.ablation`` runs several members of it
    in one program.
    """

    def update(state: TrainState, batch, weights: LossWeights):
        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch, weights, graphdef=graphdef, cfg=cfg)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    return update


def make_train_step(graphdef, cfg: Config, optimizer: optax.GradientTransformation, *,
                    compiler_options: dict | None = None):
    """Returns the jit-compiled ``train_step(state, batch, weights) -> (state, metrics)`` (``make_update``).

    ``state`` is donated. ``compiler_options``: XLA options for ``jax.jit`` (None: XLA's defaults).
    """
    return jax.jit(make_update(graphdef, cfg, optimizer), donate_argnums=0, compiler_options=compiler_options)


def make_eval_step(graphdef, *, dropout: float = 0.0, compiler_options: dict | None = None):
    """Returns the jit-compiled ``eval_step(params, batch_stats, frames, key) -> (logits, spikes)``.

    BatchNorm uses its running statistics. With ``dropout > 0`` every spiking layer's output is dropped
    out (inverted scaling) with keys drawn from ``key``, as in the reference's Top-K calibration.

    Returns:
      logits: per-step logits (T, N, K).  spikes: spike counts per layer, step and sample, summed over
      the layer's units, (L, T, N).
    """

    def eval_step(params, batch_stats, frames, key):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits, layers = model(frames, train=False, dropout=dropout, key=key)
        counts = jnp.stack([s.reshape(*s.shape[:2], -1).sum(-1) for s, _ in layers])
        return logits, counts

    return jax.jit(eval_step, compiler_options=compiler_options)
