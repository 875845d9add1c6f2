"""Orbax checkpoints of a TrainState together with the config that built it, each step with a checksum record.

A step folder ``<directory>/<step>/`` holds ``state`` (the TrainState pytree), ``meta`` (JSON: the whole config,
with the neuron settings, the model's input shape and the caller's record of the epoch, e.g. its metrics) and
``sha256.json``: the size and SHA-256 of every other file of the step (``aoi_jax.integrity``), written
atomically once orbax's save has completed. A step is *intact* when that record exists and every file matches
it:

- Orbax writes a step into a temporary folder and renames it when complete, so a crash mid-save leaves no step
  folder (a leftover ``<step>.orbax-checkpoint-tmp-*`` folder is never listed); a crash between the rename and
  the record leaves a step without a record, which is not intact.
- ``restore(directory)`` restores the newest intact step and logs one warning naming each newer step it
  skipped and what is wrong with it (truncated or altered file, missing file, no record);
  ``restore(directory, step)`` of a step that is not intact raises ``DamagedCheckpointError`` naming the step
  and what to do. A damaged file is found by its checksum before orbax reads it: a short message, never an
  orbax traceback, and never a silent load of altered values.
- Restoring rebuilds the model from the *stored* config and restores into its abstract tree; any difference in
  structure, shape or dtype is an error naming the checkpoint and the offending entries (never a silent
  partial load; reference-semantics.md section 9).
- ``save`` refuses a step when that step or a newer one is in the folder (orbax would skip it silently) and
  raises when orbax does not save.
"""

import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from aoi_jax import config as config_lib
from aoi_jax import integrity, models, step as step_lib

RECORD = "sha256.json"  # in each step folder: {relative path: {"size", "sha256"}} of its other files

log = logging.getLogger("aoi_jax")


class DamagedCheckpointError(ValueError):
    """A checkpoint step that is not intact: a file differs from its checksum record, or it has no record."""


def _manager(directory, max_to_keep=None):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_handlers=handlers)


def save(directory, state: step_lib.TrainState, cfg: config_lib.Config, input_shape, *, record: dict | None = None,
         max_to_keep=2) -> None:
    """Saves ``state`` at step ``int(state.step)`` with the config, the input shape (H, W, C) and ``record``
    (strict JSON, e.g. the epoch's metrics), then writes the step's checksum record.

    Raises:
      FileExistsError: ``directory`` holds that step or a newer one.
      RuntimeError: orbax did not save the step.
    """
    directory, step = pathlib.Path(directory), int(state.step)
    meta = {"config": config_lib.to_dict(cfg), "input_shape": [int(d) for d in input_shape], "record": record}
    mngr = _manager(directory, max_to_keep)
    try:
        newer = [s for s in mngr.all_steps() if s >= step]
        if newer:
            raise FileExistsError(f"cannot save step {step} into {str(directory)!r}: it already holds step(s) "
                                  f"{newer} (another run writing there, or one whose steps were left behind)")
        saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax did not save step {step} into {str(directory)!r}")
    finally:
        mngr.close()
    if jax.process_index() == 0:
        folder = directory / str(step)
        integrity.write_json_atomic(folder / RECORD, integrity.folder_records(folder, exclude=(RECORD,)))


def all_steps(directory) -> list[int]:
    """Every step folder orbax lists in ``directory`` (intact or not), ascending; [] if there is none."""
    if not pathlib.Path(directory).is_dir():
        return []
    mngr = _manager(directory)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def check(directory, step: int) -> str | None:
    """What is wrong with step ``step`` of ``directory`` in words (None: it is intact)."""
    folder = pathlib.Path(directory) / str(step)
    try:
        records = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return f"no readable checksum record {RECORD} (its save did not finish)"
    problems = integrity.folder_problems(folder, records)
    if len(problems) > 3:
        problems = problems[:3] + [f"{len(problems) - 3} more files"]
    return "; ".join(problems) or None


def latest_step(directory) -> int | None:
    """The newest intact step in ``directory``, or None."""
    return next((s for s in reversed(all_steps(directory)) if check(directory, s) is None), None)


def set_aside(directory, step: int) -> pathlib.Path:
    """Renames step folder ``step`` to ``<step>.set-aside-<k>`` (the first free k >= 1), which orbax never
    lists, so that the step can be saved anew; returns the new path."""
    folder = pathlib.Path(directory) / str(step)
    k = 1
    while folder.with_name(f"{step}.set-aside-{k}").exists():
        k += 1
    return folder.rename(folder.with_name(f"{step}.set-aside-{k}"))


def abstract_state(cfg: config_lib.Config, input_shape, total_steps: int = 1):
    """(graphdef, TrainState of ShapeDtypeStructs) for the model and optimiser ``cfg`` describes."""
    def init():
        model = models.build(cfg.model, input_shape, rngs=nnx.Rngs(0))
        return step_lib.init_state(model, step_lib.make_optimizer(cfg.optim, total_steps))

    graphdef, _ = init()
    return graphdef, jax.eval_shape(lambda: init()[1])


def _path(path) -> str:
    """A tree path as 'params/convs/0/kernel/value', the same for live trees and orbax metadata."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _describe(tree) -> dict[str, tuple]:
    """{path: (shape, dtype)} of every array leaf (ShapeDtypeStructs and orbax metadata alike; None: {})."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: not isinstance(x, nnx.Variable) and hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {_path(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def _choose_step(directory: pathlib.Path, step: int | None) -> int:
    """``step`` if it is intact, or for None the newest intact step (logging the newer ones skipped)."""
    steps = all_steps(directory)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint at step {step} in {str(directory)!r} (found steps {steps})")
        problem = check(directory, step)
        if problem is not None:
            intact = [s for s in steps if s != step and check(directory, s) is None]
            raise DamagedCheckpointError(
                f"checkpoint step {step} in {str(directory)!r} is damaged: {problem}; restore another step "
                f"(intact: {intact}) or delete {str(directory / str(step))!r}")
        return step
    skipped = []
    for s in reversed(steps):
        problem = check(directory, s)
        if problem is None:
            if skipped:
                log.warning("checkpoint %s: %s; using step %d, the newest intact one", directory,
                            "; ".join(skipped), s)
            return s
        skipped.append(f"step {s} is damaged ({problem})")
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r}")
    raise DamagedCheckpointError(f"no intact checkpoint in {str(directory)!r}: {'; '.join(reversed(skipped))}; "
                                 "train again in a new workdir (or delete these step folders)")


def stored_meta(directory, step: int) -> dict:
    """The ``meta`` item of step ``step``: {"config": dict, "input_shape": list, "record": dict | None}.

    Raises:
      FileNotFoundError / DamagedCheckpointError: as ``restore``.
    """
    directory = pathlib.Path(directory)
    step = _choose_step(directory, step)
    mngr = _manager(directory)
    try:
        return _read_meta(mngr, step)
    finally:
        mngr.close()


def _read_meta(mngr, step: int) -> dict:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore(directory, step: int | None = None) -> tuple[Any, step_lib.TrainState, config_lib.Config, tuple]:
    """Restores the checkpoint at ``step`` (default: the newest intact one).

    Returns:
      (graphdef, state, cfg, input_shape): the model structure built from the stored config, the
      restored TrainState, the stored Config and input shape (H, W, C).
    Raises:
      FileNotFoundError: no checkpoint in ``directory`` (or not that step).
      DamagedCheckpointError: ``step`` is not intact, or (``step`` None) no step is.
      ValueError: the stored state does not match the model the stored config builds.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    step = _choose_step(directory, step)
    mngr = _manager(directory)
    try:
        meta = _read_meta(mngr, step)
        cfg = config_lib.from_dict(meta["config"])
        input_shape = tuple(meta["input_shape"])
        graphdef, abstract = abstract_state(cfg, input_shape)
        want, have = _describe(abstract), _describe(mngr.item_metadata(step)["state"])
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:10]
            raise ValueError(f"checkpoint {str(directory / str(step))!r} does not match the model its "
                             f"config builds ({cfg.model.name}); differing entries: {diff}")
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        mngr.close()
    return graphdef, state, cfg, input_shape
