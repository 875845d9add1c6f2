"""Orbax checkpoints of a TrainState together with the config that built it, each step with a checksum record.

A step folder ``<directory>/<step>/`` holds ``state`` (the TrainState pytree), ``meta`` (JSON: the whole config,
with the neuron settings, the model's input shape, the caller's record of the epoch, e.g. its metrics, the
device count and the best metric it was saved with) and
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
  partial load; docs/semantics.md section 9).
- ``save`` refuses a step when that step or a newer one is in the folder (orbax would skip it silently) and
  raises when orbax does not save. A failure to write (no space, quota, file too large) is one
  ``integrity.StorageError`` naming the step folder: orbax's temporary folder is removed, the older steps are
  untouched, and what orbax's threads report afterwards is not printed again.
- Keeping: ``save(max_to_keep=N, best_metric=(name, mode))`` keeps the N newest steps and the best one by
  ``record[name]``; ``resolve_step`` turns ``"last" | "best" | N`` into a step; ``records`` gives every intact
  step's record (e.g. to restore ``metrics.jsonl``).
- Devices: the meta stores the device count; ``restore`` places every array replicated over the current
  devices (``parallel.data_mesh``), so a checkpoint saved on D devices restores on any number.
"""

import contextlib
import gc
import json
import logging
import math
import pathlib
import shutil
import sys
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from aoi_jax import config as config_lib
from aoi_jax import integrity, models, parallel, step as step_lib

RECORD = "sha256.json"  # in each step folder: {relative path: {"size", "sha256"}} of its other files

log = logging.getLogger("aoi_jax")
_FAILED = []  # not empty once a save failed in this process (orbax's leftovers then are not reported)


class DamagedCheckpointError(ValueError):
    """A checkpoint step that is not intact: a file differs from its checksum record, or it has no record."""


def _manager(directory):
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_handlers=handlers)


def save(directory, state: step_lib.TrainState, cfg: config_lib.Config, input_shape, *, record: dict | None = None,
         max_to_keep: int | None = 2, best_metric: tuple[str, str] | None = None) -> None:
    """Saves ``state`` at step ``int(state.step)`` with the config, the input shape (H, W, C), ``record``
    (strict JSON, e.g. the epoch's metrics), the device count and ``best_metric``, then writes the step's
    checksum record and removes the steps no longer kept.

    Kept: the ``max_to_keep`` newest steps (None: every step) and, with ``best_metric = (name, mode)``, the
    intact step whose ``record[name]`` is best (mode ``"max"`` or ``"min"``; the first step to reach it;
    steps without a finite ``record[name]`` never count as best).

    Raises:
      FileExistsError: ``directory`` holds that step or a newer one.
      ValueError: ``max_to_keep`` < 1, or ``best_metric`` not ``(name, "max" | "min")``.
      StorageError: a file of the step could not be written (no space, quota, file too large, read-only
        folder); the message names the step folder, the bytes of the state and the OS error. Nothing of the
        step is left (no half step; the older steps are untouched).
      RuntimeError: orbax did not save the step.
    """
    directory, step = pathlib.Path(directory), int(state.step)
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    best_metric = _check_metric(best_metric)
    meta = {"config": config_lib.to_dict(cfg), "input_shape": [int(d) for d in input_shape], "record": record,
            "devices": jax.device_count(), "best_metric": best_metric and list(best_metric)}
    folder = directory / str(step)
    nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    try:
        with integrity.writing(directory, 0):
            mngr = _manager(directory)
    except integrity.StorageError as e:
        raise integrity.StorageError(folder, nbytes, e.errno, e.strerror) from e
    try:
        newer = [s for s in mngr.all_steps() if s >= step]
        if newer:
            raise FileExistsError(f"cannot save step {step} into {str(directory)!r}: it already holds step(s) "
                                  f"{newer} (another run writing there, or one whose steps were left behind)")
        held, absl_log, err = _Held(), logging.getLogger("absl"), None
        absl_log.addFilter(held)
        _quiet_orbax_failures()
        try:
            saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))
            mngr.wait_until_finished()
        except Exception as e:
            err = integrity.storage_error(folder, nbytes, e)
            if err is None:
                held.release(absl_log)
                raise
        finally:
            absl_log.removeFilter(held)
        if err is not None:
            # raised outside the handler, without orbax's exception: its traceback holds orbax's unfinished
            # write coroutines, which are then freed now rather than complaining at interpreter shutdown
            _after_failure()
            raise err
        if not saved:
            raise RuntimeError(f"orbax did not save step {step} into {str(directory)!r}")
    except integrity.StorageError:
        with contextlib.suppress(Exception):      # the failure is reported; closing only joins orbax's threads
            mngr.close()
        _remove_half_step(directory, step)
        raise
    except BaseException:
        mngr.close()
        raise
    mngr.close()
    if jax.process_index() == 0:
        try:
            integrity.write_json_atomic(folder / RECORD, integrity.folder_records(folder, exclude=(RECORD,)))
        except integrity.StorageError:
            _remove_half_step(directory, step)
            raise
        _prune(directory, max_to_keep, best_metric)


def _closed_loop_report(kind, value, tb) -> bool:
    """Whether an error report is tensorstore's: "RuntimeError: Event loop is closed" raised in asyncio's
    ``call_soon_threadsafe`` called from tensorstore's own thread (a write completing after a failed save
    closed orbax's event loop)."""
    return (kind is RuntimeError and str(value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _quiet_orbax_failures() -> None:
    """When a save fails, orbax's threads and tensorstore's writes still in flight end on their own, each
    with its own traceback: tensorstore reports "Event loop is closed" (a write completing on orbax's
    closed event loop) through ``sys.unraisablehook``, and after a failure orbax's unfinished write
    coroutines complain when they are finalised (at interpreter shutdown). This hook drops those two (every
    other report is passed on). The failure itself is reported once, as a ``StorageError``
    (``_after_failure``)."""
    previous = sys.unraisablehook
    if getattr(previous, "_aoi_jax_quiet", False):
        return

    def hook(unraisable):
        orbax_leftover = _FAILED and "orbax" in getattr(getattr(unraisable.object, "cr_code", None),
                                                        "co_filename", "")
        if not (orbax_leftover or _closed_loop_report(unraisable.exc_type, unraisable.exc_value,
                                                      unraisable.exc_traceback)):
            previous(unraisable)

    hook._aoi_jax_quiet = True
    sys.unraisablehook = hook


def _orbax_failure_record(record) -> bool:
    """False (drop) for the errors orbax logs after a failed save: its threads' errors with their tracebacks
    (logger ``absl``: the storage error again, "cannot schedule new futures after shutdown") and its
    unfinished asyncio tasks and futures ("Task exception was never retrieved", likewise "Future ..." and
    "_GatheringFuture ...", whichever is finalised first)."""
    if record.levelno < logging.ERROR:
        return True
    if record.name == "asyncio":
        first = str(record.msg).split("\n", 1)[0]
        return not (first.endswith(" exception was never retrieved") and "orbax" in record.getMessage())
    return "orbax" not in record.pathname


# orbax's write coroutines (orbax/checkpoint/_src/serialization): after a failed save, one not yet started
# when the write failed is finalised unawaited, sometimes only at interpreter shutdown ("sys:1: RuntimeWarning:
# coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited", seen under load)
_ORBAX_UNAWAITED = r"coroutine '[^']*(serializ|write_fragment|_open_and_write)[^']*' was never awaited"


def _after_failure() -> None:
    """Installs ``_orbax_failure_record`` on the ``absl`` and ``asyncio`` loggers (once), ignores the
    "never awaited" warnings of orbax's write coroutines, and frees orbax's unfinished write tasks now rather
    than at interpreter shutdown (where they complain)."""
    if not _FAILED:
        warnings.filterwarnings("ignore", message=_ORBAX_UNAWAITED, category=RuntimeWarning)
    _FAILED.append(True)
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _orbax_failure_record not in logger.filters:
            logger.addFilter(_orbax_failure_record)
    gc.collect()


class _Held(logging.Filter):
    """Holds back the error records orbax's threads log (with their tracebacks) while a save runs: a failure
    of the storage is reported once, as a ``StorageError``; ``release`` logs them for any other failure."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True

    def release(self, logger):
        logger.removeFilter(self)
        for record in self.records:
            logger.handle(record)


def _remove_half_step(directory: pathlib.Path, step: int, *, quiet: float = 0.5, limit: float = 30.0) -> None:
    """Deletes what a failed save of ``step`` left: orbax's temporary folder(s) and a step folder without
    its checksum record. A write of tensorstore's still in flight may create a file or the folder again while
    it goes (seen on a loaded machine after the removal had ended), so the leftovers must stay absent for
    ``quiet`` seconds in a row, checked every 10 ms, for at most ``limit`` seconds in all."""
    if jax.process_index() != 0:
        return

    def leftovers():
        half = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        if (directory / str(step)).is_dir() and not (directory / str(step) / RECORD).exists():
            half.append(directory / str(step))
        return half

    start = absent_since = time.monotonic()
    while (now := time.monotonic()) - absent_since < quiet and now - start < limit:
        half = leftovers()
        if half:
            for p in half:
                shutil.rmtree(p, ignore_errors=True)
            absent_since = time.monotonic()
        time.sleep(0.01)


def _check_metric(best_metric) -> tuple[str, str] | None:
    if best_metric is None:
        return None
    if (not isinstance(best_metric, (tuple, list)) or len(best_metric) != 2 or not isinstance(best_metric[0], str)
            or best_metric[1] not in ("max", "min")):
        raise ValueError(f"best_metric must be None or (name, 'max' | 'min'), got {best_metric!r}")
    return str(best_metric[0]), str(best_metric[1])


def _best(recs: dict[int, dict], best_metric: tuple[str, str]) -> int | None:
    """The step whose ``record[name]`` is best (the first to reach it), or None when no step has it."""
    name, mode = best_metric
    values = {s: r[name] for s, r in sorted(recs.items()) if isinstance(r, dict)
              and isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)
              and math.isfinite(r[name])}
    if not values:
        return None
    if mode == "max":
        return max(values, key=lambda s: (values[s], -s))
    return min(values, key=lambda s: (values[s], s))


def _prune(directory: pathlib.Path, max_to_keep: int | None, best_metric) -> None:
    """Removes every step folder but the ``max_to_keep`` newest and the best by ``best_metric``."""
    if max_to_keep is None:
        return
    steps = all_steps(directory)
    keep = set(steps[-max_to_keep:])
    if best_metric is not None:
        best = _best(records(directory), best_metric)
        if best is not None:
            keep.add(best)
    for s in steps:
        if s not in keep:
            shutil.rmtree(directory / str(s))


def records(directory) -> dict[int, dict | None]:
    """``{step: record}``: the ``record`` saved with every intact step of ``directory``, ascending (None for a
    step saved without one); {} when there is no checkpoint."""
    directory = pathlib.Path(directory)
    steps = [s for s in all_steps(directory) if check(directory, s) is None]
    if not steps:
        return {}
    mngr = _manager(directory)
    try:
        return {s: _read_meta(mngr, s).get("record") for s in steps}
    finally:
        mngr.close()


def resolve_step(directory, step: int | str | None = "last") -> int:
    """The intact step ``step`` names: ``"last"`` (or None) the newest intact step (logging the newer
    damaged ones skipped), ``"best"`` the intact step with the best value of the metric it was saved with
    (``save(best_metric=...)``: the newest intact step's setting), an int (or its digits) that step.

    Raises:
      FileNotFoundError: no checkpoint in ``directory`` (or not that step).
      DamagedCheckpointError: the step asked for is not intact, or (``"last"``) no step is.
      ValueError: ``step`` is none of these; ``"best"`` and no step was saved with a best metric, or no intact
        step carries a finite value of it.
    """
    directory = pathlib.Path(directory)
    if step is None or step == "last":
        return _choose_step(directory, None)
    if step == "best":
        last = _choose_step(directory, None)
        recs = records(directory)
        mngr = _manager(directory)
        try:
            metric = _read_meta(mngr, last).get("best_metric")
        finally:
            mngr.close()
        if not metric:
            raise ValueError(f"checkpoint {str(directory)!r}: step 'best' needs a best metric, but step {last} was "
                             "saved without one (train.best_metric); name a step number or 'last'")
        best = _best(recs, tuple(metric))
        if best is None:
            raise ValueError(f"checkpoint {str(directory)!r}: no intact step carries a finite {metric[0]!r} in its "
                             f"record (steps {sorted(recs)}); name a step number or 'last'")
        return best
    if isinstance(step, str) and step.strip().isdigit():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"checkpoint step must be 'last', 'best' or a step number, got {step!r}")
    return _choose_step(directory, step)


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
    """(graphdef, TrainState of ShapeDtypeStructs) for the model and optimiser ``cfg`` describes, nothing
    initialised (``step.abstract_init``)."""
    return step_lib.abstract_init(lambda: step_lib.init_state(
        models.build(cfg.model, input_shape, rngs=nnx.Rngs(0)), step_lib.make_optimizer(cfg.optim, total_steps)))


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


def restore(directory, step: int | str | None = None) -> tuple[Any, step_lib.TrainState, config_lib.Config, tuple]:
    """Restores the checkpoint at ``step`` (``resolve_step``: default the newest intact one) onto the current
    devices, whatever the number of devices it was saved on: every array is restored replicated over
    ``parallel.data_mesh()`` (one log line when the saved device count differs).

    Returns:
      (graphdef, state, cfg, input_shape): the model structure built from the stored config, the
      restored TrainState, the stored Config and input shape (H, W, C).
    Raises:
      FileNotFoundError: no checkpoint in ``directory`` (or not that step).
      DamagedCheckpointError: ``step`` is not intact, or (``step`` None) no step is.
      ValueError: the stored state does not match the model the stored config builds; ``step`` names no step
        (``resolve_step``).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    step = resolve_step(directory, step)
    mngr = _manager(directory)
    try:
        meta = _read_meta(mngr, step)
        cfg = config_lib.from_stored(meta["config"], f"the config of {directory} step {step}")
        input_shape = tuple(meta["input_shape"])
        graphdef, abstract = abstract_state(cfg, input_shape)
        want, have = _describe(abstract), _describe(mngr.item_metadata(step)["state"])
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:10]
            raise ValueError(f"checkpoint {str(directory / str(step))!r} does not match the model its "
                             f"config builds ({cfg.model.name}); differing entries: {diff}")
        saved_on = meta.get("devices")
        if saved_on is not None and saved_on != jax.device_count():
            log.info("checkpoint %s step %d was saved on %d devices; restoring it onto %d", directory, step,
                     saved_on, jax.device_count())
        replicated = NamedSharding(parallel.data_mesh(), PartitionSpec())
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        mngr.close()
    return graphdef, state, cfg, input_shape
