"""A run's folder: the lock, resuming, setting damaged steps aside, and the files ``config.json`` and
``metrics.jsonl``. The epoch loop (``aoi_jax.training``) asks ``RunDir`` where to start and hands it each
epoch's state and metrics record; nothing else there touches the folder.

Per member, in its folder (``member_dir``: the workdir itself for a single run, ``workdir/members/<name>/``
in a sweep):

- ``config.json``: the member's whole config, and under ``"xla_options"`` the XLA options its train and
  evaluation programs were compiled with (``aoi_jax.xla_tuning``; ``{}``: XLA's defaults); rewritten when a
  run starts or resumes;
- ``checkpoints/<step>/``: the state after each epoch (``aoi_jax.checkpoint``, with a checksum record and the
  epoch's metrics record), the newest ``train.checkpoint_keep`` kept (and the best by ``train.best_metric``);
- ``metrics.jsonl``: one strict-JSON line per epoch, the record its checkpoint keeps, appended once that
  checkpoint is saved.

Reliability (README, "Reliability"):

- One run at a time: ``workdir_lock`` holds the workdir for the whole run.
- Resuming: a folder whose members hold checkpoints continues from the newest step that is intact in every
  member (``resume_step``); newer steps (damaged, unfinished, or missing from another member) are set aside
  and ``metrics.jsonl`` is made to hold exactly the epochs up to that step, each line missing from it
  restored from the checkpoint that keeps it (``reconcile_metrics``).
- The checkpoint's stored config must equal the requested one, except ``train.epochs`` (more epochs continue
  a run; fewer than already trained is an error) and ``data.data_dir``: where the data live is not what the
  run is. What the data are is their digest (``data_digest``, kept in every metrics record): a moved data
  folder holding the same data continues (with a log line), other data are refused naming both digests.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib

import jax
import numpy as np

from aoi_jax import checkpoint, config as config_lib, integrity

log = logging.getLogger("aoi_jax")

LOCK_FILE = ".lock"  # in the workdir: holds the PID of the run that has it locked
CONTINUABLE = ("train.epochs",)  # the keys a resumed run may change
LOCATION = ("data.data_dir",)  # keys that say where the data live, not what they are (``data_digest`` does)


def member_dir(workdir: pathlib.Path, member) -> pathlib.Path:
    """The folder of a member: ``workdir`` for a single run (name ""), else ``workdir/members/<name>``."""
    return workdir / "members" / member.name if member.name else workdir


@contextlib.contextmanager
def workdir_lock(workdir):
    """Holds an exclusive lock on ``workdir`` while the block runs.

    ``fcntl.flock`` on ``workdir/.lock`` (created), which then holds this process's PID. The kernel releases
    the lock when the process ends in any way (kill -9 included), so a stale lock file never blocks a rerun.

    Raises:
      RuntimeError: "workdir ... in use by PID N": another process holds the lock.
    """
    path = pathlib.Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(f"workdir {workdir} in use by PID {pid} (it holds the lock {path}); wait for that "
                               "run to end or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)                                            # releases the lock


def check_resumable(stored: config_lib.Config, requested: config_lib.Config, folder: pathlib.Path) -> None:
    """Checks that a run of ``requested`` may continue the checkpoints of ``stored`` in ``folder``.

    Raises:
      ValueError: the configs differ in a key outside ``CONTINUABLE`` and ``LOCATION``; the message names
        each such key with its stored and requested values.
    """
    diff = [d for d in config_lib.differences(stored, requested) if d[0] not in CONTINUABLE + LOCATION]
    if diff:
        keys = ", ".join(f"{k}: stored {a!r}, requested {b!r}" for k, a, b in diff)
        raise ValueError(f"{folder} holds checkpoints of a different config ({keys}); use another --workdir "
                         f"(a run continues only with the same config; {', '.join(CONTINUABLE)} may change)")


def resume_step(members, dirs) -> int | None:
    """The step a run continues from: the newest checkpoint step intact in every member folder (None: none
    holds a checkpoint; a fresh start).

    Raises:
      ValueError: some member holds checkpoints but no step is intact in every member; the message lists
        each member's steps and what is wrong with them.
    """
    surveys = [{s: checkpoint.check(d / "checkpoints", s) for s in checkpoint.all_steps(d / "checkpoints")}
               for d in dirs]
    if not any(surveys):
        return None
    common = set.intersection(*({s for s, problem in sv.items() if problem is None} for sv in surveys))
    if common:
        return max(common)
    held = "; ".join(f"{m.name or d / 'checkpoints'}: " + (", ".join(
        f"step {s}" + (f" damaged ({problem})" if problem else "") for s, problem in sv.items()) or "none")
        for m, d, sv in zip(members, dirs, surveys))
    where, every = (dirs[0].parent, " in every member") if len(dirs) > 1 else (dirs[0], "")
    raise ValueError(f"cannot resume in {where}: no checkpoint step is intact{every} ({held}); train in a new "
                     "workdir, or delete the checkpoints to start afresh")


def reconcile_metrics(path: pathlib.Path, step: int, records: dict[int, dict], epochs: int) -> None:
    """Makes the metrics file ``path`` hold exactly the epochs up to optimiser step ``step`` (the checkpoint a
    run continues from, after ``epochs`` epochs; 0 for a fresh start).

    Drops the lines of later steps (their checkpoints were lost or set aside) and lines cut short by a kill,
    and puts back every line of an epoch up to ``step`` that is missing, from ``records`` ({step: record} of
    the checkpoints that keep them, ``checkpoint.records``): the line of ``step`` itself after a kill between
    its save and its append, or every epoch whose checkpoint is still on disk after ``metrics.jsonl`` was
    lost. Rewrites the file atomically when it changes and logs what it dropped and restored, and each epoch
    it could not restore (no line and no checkpoint holds it); ``train.log`` keeps its lines (it is the log
    of what happened).
    """
    lines = path.read_text().splitlines() if path.exists() else []
    kept, beyond, cut = {}, [], 0
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            cut += 1
            continue
        if rec["step"] <= step:
            kept[rec["step"]] = rec
        else:
            beyond.append(rec["epoch"])
    restored = sorted((r for s, r in records.items() if 0 < s <= step and s not in kept), key=lambda r: r["step"])
    kept.update({r["step"]: r for r in restored})
    lost = sorted(set(range(1, epochs + 1)) - {r["epoch"] for r in kept.values()})
    changes = [f"dropped the lines of epochs {beyond} (beyond step {step})"] if beyond else []
    changes += [f"dropped {'a line' if cut == 1 else f'{cut} lines'} cut short"] if cut else []
    if len(restored) == 1:
        changes.append(f"restored the line of epoch {restored[0]['epoch']} from its checkpoint")
    elif restored:
        changes.append(f"restored the lines of epochs {[r['epoch'] for r in restored]} from their checkpoints")
    if beyond or cut or restored:
        text = "".join(integrity.to_json(kept[s]) + "\n" for s in sorted(kept)).encode()
        integrity.write_atomic(path, lambda f: f.write(text))
    if lost:
        what = f"lines of epochs {lost} (no checkpoint keeps them)" if len(lost) > 1 else \
            f"line of epoch {lost[0]} (no checkpoint keeps it)"
        changes.append(f"could not restore the {what}")
    if changes:
        log.warning("%s: %s", path, "; ".join(changes))


def append_metrics(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` as one strict-JSON line to ``path``, flushed to disk (``integrity.append_line``).

    Raises:
      integrity.StorageError: the line could not be written.
    """
    integrity.append_line(path, integrity.to_json(record))
def data_digest(*framesets) -> str:
    """16 hex digits of the SHA-256 of what the frame sets hold, in order: for each, its class count, frame
    shape and dtype, the frames (a static set repeated over T as a broadcast view: its one frame per sample),
    labels and bin durations. Independent of where the data live."""
    h = hashlib.sha256()
    for fs in framesets:
        frames = fs.frames
        repeated = frames.ndim == 5 and frames.shape[1] > 1 and frames.strides[1] == 0
        h.update(f"{fs.num_classes} {frames.shape} {frames.dtype} {repeated}\n".encode())
        rows = frames[:, :1] if repeated else frames
        for i in range(0, len(rows), 256):
            h.update(np.ascontiguousarray(rows[i:i + 256]).data)
        h.update(np.ascontiguousarray(fs.labels, np.int32).data)
        if fs.bin_us is not None:
            h.update(np.ascontiguousarray(fs.bin_us, np.float64).data)
    return h.hexdigest()[:16]


@dataclasses.dataclass
class RunDir:
    """The folders of one run's members and what their checkpoints say about resuming.

    Use: ``with run.locked():`` then ``survey()`` (before loading data), ``check_data(digest)`` (after),
    ``prepare(xla_options, steps_per_epoch)`` (the first write), ``restore()`` when continuing, then
    ``save(i, state, input_shape, record)`` per member and epoch.

    Attributes:
      workdir: the run's folder.  members: the sweep's members (``aoi_jax.sweep.members``).
      dirs: each member's folder (``member_dir``).
      step: the optimiser step the run continues from (0: a fresh start), set by ``survey``.
      records: each member's metrics record of that step (None: a fresh start).
    """

    workdir: pathlib.Path
    members: list
    dirs: list = dataclasses.field(init=False)
    step: int = dataclasses.field(init=False, default=0)
    records: list | None = dataclasses.field(init=False, default=None)
    _stored: list | None = dataclasses.field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.workdir = pathlib.Path(self.workdir)
        self.dirs = [member_dir(self.workdir, m) for m in self.members]

    def locked(self):
        """``workdir_lock`` on process 0 (the one that writes the folder); a no-op elsewhere."""
        return workdir_lock(self.workdir) if jax.process_index() == 0 else contextlib.nullcontext()

    def survey(self) -> int | None:
        """Finds the step to continue from (``resume_step``) and checks each member's stored config against
        its requested one (``check_resumable``). Reads only.

        Returns:
          the step (None: a fresh start).
        Raises:
          ValueError: as ``resume_step`` and ``check_resumable``.
        """
        resume = resume_step(self.members, self.dirs)
        if resume is None:
            return None
        metas = [checkpoint.stored_meta(d / "checkpoints", resume) for d in self.dirs]
        self._stored = [config_lib.from_stored(meta["config"], f"the config of {d / 'checkpoints'} step {resume}")
                        for meta, d in zip(metas, self.dirs)]
        for m, d, stored in zip(self.members, self.dirs, self._stored):
            check_resumable(stored, m.cfg, d)
        self.step, self.records = resume, [meta["record"] for meta in metas]
        return resume

    @property
    def stored_epochs(self) -> int | None:
        """``train.epochs`` of the checkpoints continued from (None: a fresh start)."""
        return None if self._stored is None else self._stored[0].train.epochs

    def check_data(self, digest: str) -> None:
        """Checks that the data loaded now (``data_digest``) are those the checkpoints were trained on; logs a
        moved ``data.data_dir`` that holds the same data. Reads only.

        Raises:
          ValueError: the digest differs from the one the resumed step's record holds; the message names
            both digests and both data folders.
        """
        if self._stored is None:
            return
        stored_dir, requested_dir = self._stored[0].data.data_dir, self.members[0].cfg.data.data_dir
        held = (self.records[0] or {}).get("data_digest")
        where = f"data.data_dir: stored {stored_dir!r}, requested {requested_dir!r}"
        if held is not None and held != digest:
            raise ValueError(f"{self.dirs[0]} holds checkpoints trained on other data (data digest: stored {held}, "
                             f"now {digest}; {where}); point data.data_dir at the data it was trained on, or use "
                             "another --workdir")
        if stored_dir != requested_dir:
            same = f"the same data (digest {digest})" if held is not None else "no data digest recorded to compare"
            log.info("the data moved (%s): %s; continuing", where, same)

    def prepare(self, xla_options: dict, steps_per_epoch: int) -> None:
        """The run's first writes (process 0): sets aside every step newer than the one continued from (logging
        why), writes each member's ``config.json`` with ``xla_options``, and reconciles its ``metrics.jsonl``
        with its checkpoints (``reconcile_metrics``)."""
        if jax.process_index() != 0:
            return
        for m, d in zip(self.members, self.dirs):
            ckpts = d / "checkpoints"
            for s in checkpoint.all_steps(ckpts):
                if s > self.step:
                    problem = checkpoint.check(ckpts, s)
                    moved = checkpoint.set_aside(ckpts, s)
                    log.warning("checkpoint step %d %s: moved to %s; continuing from step %d", s,
                                f"is damaged ({problem})" if problem else "is missing in another member",
                                moved, self.step)
            text = json.dumps({**config_lib.to_dict(m.cfg), "xla_options": xla_options}, indent=2, sort_keys=True,
                              allow_nan=False).encode()
            integrity.write_atomic(d / "config.json", lambda f, t=text: f.write(t))
            reconcile_metrics(d / "metrics.jsonl", self.step, {k: r for k, r in checkpoint.records(ckpts).items() if r is not None and k <= self.step} if self.step else {},
                              self.step // steps_per_epoch)

    def restore(self) -> list:
        """Each member's ``TrainState`` at the step continued from (``checkpoint.restore``)."""
        return [checkpoint.restore(d / "checkpoints", self.step)[1] for d in self.dirs]

    def save(self, i: int, state, input_shape, record: dict) -> None:
        """Saves member ``i``'s ``state`` with ``record`` (its checkpoint keeps the newest
        ``train.checkpoint_keep`` steps and the best by ``train.best_metric``), then appends ``record`` to its
        ``metrics.jsonl`` (after the save: a line always has its checkpoint)."""
        m, d = self.members[i], self.dirs[i]
        train = m.cfg.train
        best = (train.best_metric, config_lib.BEST_METRICS[train.best_metric]) if train.best_metric else None
        checkpoint.save(d / "checkpoints", state, m.cfg, input_shape, record=integrity.strict(record),
                        max_to_keep=train.checkpoint_keep, best_metric=best)
        if jax.process_index() == 0:
            append_metrics(d / "metrics.jsonl", record)
