"""Orbax checkpoints of a TrainState together with the config that built it.

Each checkpoint holds ``state`` (the TrainState pytree) and ``meta`` (JSON: the whole config, with the
neuron settings, and the model's input shape). Restoring rebuilds the model from the *stored* config
and restores into its abstract tree; any difference in structure, shape or dtype is an error naming the
checkpoint and the offending entries (never a silent partial load; reference-semantics.md section 9).
Orbax writes each step to a temporary folder and renames it when complete, so a crash mid-save keeps
the last good checkpoint.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from aoi_jax import config as config_lib
from aoi_jax import models, step as step_lib


def _manager(directory, max_to_keep=None):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_handlers=handlers)


def save(directory, state: step_lib.TrainState, cfg: config_lib.Config, input_shape, *, max_to_keep=2):
    """Saves ``state`` at step ``int(state.step)`` with the config and the input shape (H, W, C)."""
    meta = {"config": config_lib.to_dict(cfg), "input_shape": [int(d) for d in input_shape]}
    mngr = _manager(directory, max_to_keep)
    try:
        mngr.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    finally:
        mngr.close()


def latest_step(directory) -> int | None:
    """The newest complete checkpoint step in ``directory``, or None."""
    if not pathlib.Path(directory).is_dir():
        return None
    mngr = _manager(directory)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


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
    """{path: (shape, dtype)} of every array leaf (ShapeDtypeStructs and orbax metadata alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: not isinstance(x, nnx.Variable) and hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {_path(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def restore(directory, step: int | None = None) -> tuple[Any, step_lib.TrainState, config_lib.Config, tuple]:
    """Restores the checkpoint at ``step`` (default: the latest).

    Returns:
      (graphdef, state, cfg, input_shape): the model structure built from the stored config, the
      restored TrainState, the stored Config and input shape (H, W, C).
    Raises:
      FileNotFoundError: no checkpoint in ``directory`` (or not that step).
      ValueError: the stored state does not match the model the stored config builds.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    mngr = _manager(directory)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                                    f"{str(directory)!r} (found steps {list(mngr.all_steps())})")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        cfg = config_lib.from_dict(meta["config"])
        input_shape = tuple(meta["input_shape"])
        graphdef, abstract = abstract_state(cfg, input_shape)
        where = directory / str(step)
        want, have = _describe(abstract), _describe(mngr.item_metadata(step)["state"])   # None: {}
        if not have:
            raise ValueError(f"checkpoint {str(where)!r} has no readable state metadata (expected "
                             f"{str(where / 'state' / '_METADATA')!r}): an incomplete or damaged copy; remove "
                             "this step to resume from an older one")
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:10]
            raise ValueError(f"checkpoint {str(where)!r} does not match the model its "
                             f"config builds ({cfg.model.name}); differing entries: {diff}")
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        mngr.close()
    return graphdef, state, cfg, input_shape
