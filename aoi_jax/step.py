"""The regularised train step and the evaluation forward pass (reference-semantics.md sections 4, 5, 10).

The NNX model is split once into ``graphdef`` (static structure), ``params`` and ``batch_stats``; the
steps are plain ``jax.jit`` functions of those pytrees, and the model is re-merged inside the loss
(``nnx.merge(..., copy=True)``), so there is one compiled function per config and no Python loop over
time anywhere in training.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aoi_jax import losses, qcfs, regularisers
from aoi_jax.config import Config, OptimConfig


TRACEABLE = ("reg.alpha", "train.tet_lambda")  # config scalars the loss may take as traced arrays


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree (orbax saves it as is)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of nnx.BatchStat
    opt_state: Any  # optax state


def scalar(cfg: Config, key: str, scalars=None):
    """The loss weight ``key`` (one of ``TRACEABLE``): ``scalars[key]`` when given, else the config's value.

    ``scalars`` lets one compiled step serve several values of a weight (``aoi_jax.ablation`` passes one
    traced scalar per member); without it the value is the Python float of the config, as before.
    """
    if key not in TRACEABLE:
        raise KeyError(f"{key!r} is not a traceable loss weight; valid: {list(TRACEABLE)}")
    if scalars is not None and key in scalars:
        return scalars[key]
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def task_loss(logits, labels, cfg: Config, scalars=None):
    """The configured task loss: ``mean_loss`` or ``tet_loss`` (lam = ``scalar(cfg, "train.tet_lambda")``)."""
    if cfg.train.loss == "tet":
        return losses.tet_loss(logits, labels, lam=scalar(cfg, "train.tet_lambda", scalars))
    return losses.mean_loss(logits, labels)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay (PyTorch's ``SGD(weight_decay=...)``), or AdamW.

    Learning rate ``lr`` either constant or cosine-decayed to 0 over ``total_steps``::

        sgd:   g <- g + wd * p;  m <- momentum * m + g;  p <- p - lr_t * m
        adamw: optax.adamw(lr_t, b1=momentum, weight_decay=wd)
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    lr = optax.cosine_decay_schedule(cfg.lr, total_steps) if cfg.schedule == "cosine" \
        else optax.constant_schedule(cfg.lr)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum))


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation):
    """Splits ``model`` once; returns ``(graphdef, TrainState)`` at step 0."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params))


def loss_fn(params, batch_stats, batch, *, graphdef, cfg: Config, scalars=None):
    """Total loss ``task_loss + alpha * rcs_loss`` on one batch, training-mode BatchNorm.

    Args:
      params, batch_stats: the model's state.  batch: {"frames": (T, N, H, W, C), "label": (N,)}.
      scalars: optional {key: scalar} for keys of ``TRACEABLE`` (alpha, TET's lambda), else the config's.
    Returns:
      (loss, (new batch_stats, metrics dict with task, rcs, accuracy at T)).
    """
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    score = functools.partial(regularisers.rcs_scores, vth=cfg.model.neuron.vth, window=cfg.reg.window)
    logits, scores = model(batch["frames"], train=True, layer_fn=score)   # scores: (N,) per layer
    task = task_loss(logits, batch["label"], cfg, scalars)
    scores = jnp.stack(scores)                                                # (L, N)
    reg = regularisers.rcs_loss(scores, logits, batch["label"], rcs_n=cfg.reg.rcs_n)
    acc = jnp.mean(jnp.argmax(logits.sum(0), -1) == batch["label"])
    loss = task + scalar(cfg, "reg.alpha", scalars) * reg
    return loss, (nnx.state(model, nnx.BatchStat), {"loss": loss, "task": task, "rcs": reg, "accuracy": acc})


def make_update(graphdef, cfg: Config, optimizer: optax.GradientTransformation):
    """Returns the (not jitted) ``update(state, batch, scalars=None) -> (state, metrics)``.

    The loss is ``loss_fn`` for spiking models and ``ann_loss_fn`` for a QCFS ANN
    (``cfg.model.activation == "qcfs"``, batches of one static frame); ``scalars`` as in ``loss_fn``.
    ``make_train_step`` jits it; ``aoi_jax.ablation`` runs several members of it in one program.
    """
    objective = ann_loss_fn if cfg.model.activation == "qcfs" else loss_fn

    def update(state: TrainState, batch, scalars=None):
        grads, (batch_stats, metrics) = jax.grad(objective, has_aux=True)(
            state.params, state.batch_stats, batch, graphdef=graphdef, cfg=cfg, scalars=scalars)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    return update


# XLA:CPU runs dots and reductions through its YNNPACK library and convolutions through its default kernels
# (a field of XLA's DebugOptions, passed on XLA:CPU only: ``compiler_options``). Measured with
# benchmarks/train_step.py on 2 cores, train step, one device:
# - convolutions off YNNPACK (the default has them on): VGGSNN (T=10, batch 8, 128x128) 1.43 s against 1.69 s;
# - reductions on YNNPACK (BatchNorm statistics, gradient sums, RCS; XLA's own kernels otherwise split each
#   into a strided reduce-window): VGGSNN 1.11 -> 0.95 s, with remat 1.48 -> 1.20 s, N-Digits 0.079 ->
#   0.069 s; it costs XLA temporaries in the plain step (VGGSNN T=10 459 -> 603 MiB, T=40 1644 -> 2220 MiB),
#   not with remat (192 -> 198 MiB, 640 -> 642 MiB; benchmarks/memory.py).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(cfg: Config | None = None) -> dict:
    """XLA options for the compiled steps (train, evaluation, ``aoi_jax.ablation``'s) on the default backend.

    On XLA:CPU: ``CPU_OPTIONS``, and for a train step with ``model.remat`` (``cfg`` given) the
    memory-optimised scheduler with the pass that removes optimisation barriers off. Other backends get
    none (these are XLA:CPU's fields; only XLA:CPU was measured). Measured on the VGGSNN train step with
    remat (T=40, batch 8; XLA's temporaries):

    - ``xla_disable_hlo_passes="cse_barrier_expander"``: XLA:CPU otherwise removes optimisation barriers
      early, ``jax.checkpoint``'s among them, and then merges each recomputation with the forward pass
      (``models._remat``): 1511 MiB with it (no recomputation left), 761 MiB without.
    - ``xla_cpu_scheduler_type``: XLA:CPU's default scheduler favours concurrency: 806 MiB against 761.

    Measured by ``benchmarks/memory.py``.

    Args:
      cfg: the train step's config, or None for an evaluation function.
    Returns:
      a dict for ``jax.jit(..., compiler_options=...)``.
    """
    if jax.default_backend() != "cpu":
        return {}
    options = dict(CPU_OPTIONS)
    if cfg is not None and cfg.model.remat:
        options["xla_cpu_scheduler_type"] = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
        options["xla_disable_hlo_passes"] = "cse_barrier_expander"
    return options


def make_train_step(graphdef, cfg: Config, optimizer: optax.GradientTransformation, *, compiler_options=None):
    """Returns the jit-compiled ``train_step(state, batch) -> (state, metrics)`` (``make_update``).

    ``compiler_options``: XLA options for ``jax.jit`` (machine tuning, chosen by the caller); None: none.
    """
    update = make_update(graphdef, cfg, optimizer)

    def train_step(state: TrainState, batch):
        return update(state, batch)

    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options)


def make_eval_step(graphdef, *, dropout: float = 0.0):
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

    return jax.jit(eval_step, compiler_options=compiler_options())


def ann_loss_fn(params, batch_stats, batch, *, graphdef, cfg: Config, scalars=None):
    """QCFS ANN loss ``CE + alpha * rcs_ann`` on one batch, training-mode BatchNorm.

    reference-semantics.md sections 3 and 5 (ANN form): the ANN sees one static frame per sample; its
    logits are one time step, so the task loss (``task_loss``; "mean" is plain cross-entropy) and RCS's
    correctness mask read the ANN's own prediction::

        loss = CE(o, y) + alpha * rcs_loss([rcs_ann_scores(x_l) for each QCFS layer l], o (1, N, K), y)

    Args:
      params, batch_stats: the model's state (``ModelConfig.activation == "qcfs"``).
      batch: {"frames": (1, N, H, W, C), "label": (N,)}.  scalars: as in ``loss_fn``.
    Returns:
      (loss, (new batch_stats, metrics dict with loss, task, rcs, accuracy)).
    Raises:
      ValueError: frames with more than one time step.
    """
    if batch["frames"].shape[0] != 1:
        raise ValueError(f"the ANN sees one static frame: frames must be (1, N, H, W, C), got "
                         f"{batch['frames'].shape}")
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits, layers = model(batch["frames"], train=True)                      # (1, N, K); (y, x) per layer
    task = task_loss(logits, batch["label"], cfg, scalars)
    reg = qcfs.ann_rcs_loss([x[0] for _, x in layers], logits, batch["label"], rcs_n=cfg.reg.rcs_n)
    acc = jnp.mean(jnp.argmax(logits[0], -1) == batch["label"])
    loss = task + scalar(cfg, "reg.alpha", scalars) * reg
    return loss, (nnx.state(model, nnx.BatchStat), {"loss": loss, "task": task, "rcs": reg, "accuracy": acc})
