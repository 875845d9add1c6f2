"""A finished run from Python (a notebook): its network, config and report; the network's logits for a batch of
frames; the library's log lines on stderr.

    run = aoi_jax.load_run("runs/ndigits")              # step="last" | "best" | an int
    out = aoi_jax.logits(run.model, frames)             # frames (T, N, H, W, C) -> logits (T, N, K)
    aoi_jax.enable_logging()                            # the "aoi_jax" logger's INFO lines, once

The README's section "Notebook" runs these on a small run (tests/test_notebook.py executes that block).
"""

import json
import logging
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aoi_jax import checkpoint, config as config_lib, evaluation

LOGGER = "aoi_jax"
HANDLER = "aoi_jax.enable_logging"  # the name of the handler enable_logging adds (at most one)


class Run(NamedTuple):
    """A trained run as ``load_run`` gives it; unpacks as ``model, cfg, report = run``."""

    model: nnx.Module  # the network that is evaluated: for a QCFS ANN, the IF SNN it converts to
    config: config_lib.Config  # that network's config (for a QCFS ANN the converted one: activation "if")
    report: dict[str, Any] | None  # the run folder's report.json, None if the run was not evaluated


def load_run(workdir, step="last") -> Run:
    """The network, config and report of the run in ``workdir`` (a ``train.py --workdir`` folder, or one
    member's folder ``workdir/members/<name>`` of a sweep), restored from ``workdir/checkpoints``.

    Args:
      workdir: the run folder.  step: "last" (the newest intact step), "best" (the best one by
        ``train.best_metric``) or a step number.
    Returns:
      ``Run(model, config, report)``; a QCFS ANN comes back as the IF SNN it is evaluated as
      (``evaluation.spiking_run``).
    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoints (for a sweep: names its members).
      ValueError: an unknown ``step``; see also ``checkpoint.restore``.
    """
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        members = sorted(p.name for p in (workdir / "members").glob("*") if p.is_dir())
        hint = f"; a sweep: load one member, e.g. {str(workdir / 'members' / members[0])!r}" if members else ""
        raise FileNotFoundError(f"{str(workdir)!r} holds no checkpoints/ folder{hint}")
    graphdef, state, cfg, input_shape = checkpoint.restore(ckpt_dir, step)
    graphdef, state, cfg = evaluation.spiking_run(graphdef, state, cfg, input_shape)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    report_path = workdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return Run(model, cfg, report)


@nnx.jit
def _logits(model, frames):
    return model(frames, train=False)[0]


def logits(model: nnx.Module, frames) -> jax.Array:
    """Per-step logits of ``model`` (e.g. ``load_run(...).model``) for a batch of frames, time-major::

        logits[t, n] = the network's output at step t for sample n     (no dropout, BatchNorm statistics)

    The cumulative output is ``cutoff.cumulative(logits)`` (docs/semantics.md section 6).

    Args:
      frames: (T, N, H, W, C), as ``aoi_jax.data.batches`` yields them (a ``FrameSet`` holds (N, T, ...):
        ``frames.swapaxes(0, 1)``).
    Returns:
      (T, N, K) float32.
    Raises:
      ValueError: ``frames`` is not 5-dimensional.
    """
    frames = jnp.asarray(frames, jnp.float32)
    if frames.ndim != 5:
        raise ValueError(f"frames must be (T, N, H, W, C), got shape {frames.shape}")
    return _logits(model, frames)


def enable_logging(level: int = logging.INFO) -> logging.Logger:
    """Shows the library's log lines (the ``aoi_jax`` logger: data, epochs, evaluation) on ``sys.stderr`` as
    ``HH:MM:SS message``, which a notebook prints under the cell. Calling it again only sets ``level``.

    The logger stops propagating to the root logger (so that a root handler, e.g. absl's, does not print each
    line twice), as ``train.py`` does.
    """
    log = logging.getLogger(LOGGER)
    log.setLevel(level)
    log.propagate = False
    if not any(h.get_name() == HANDLER for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(HANDLER)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    return log


__all__ = ["Run", "load_run", "logits", "enable_logging"]
