"""Each epoch's metrics as TensorBoard scalars: a ``training.train_and_evaluate`` callback (optional extra).

``TensorBoard(workdir)`` writes every number of each epoch's metrics record (``aoi_jax.training``: losses,
accuracies, the learning rate, throughput) at global step = the epoch, into ``workdir/tensorboard/``
(``workdir/tensorboard/<member>/`` for each member of a sweep, so TensorBoard shows the members side by
side); ``tensorboard --logdir WORKDIR/tensorboard`` reads them. The writer is tensorboardX (the
``[tensorboard]`` extra: ``pip install aoi-jax[tensorboard]``), which needs no TensorFlow.
"""

import pathlib

SUBDIR = "tensorboard"  # in the workdir


class TensorBoard:
    """``callback(member, record)`` writing ``record``'s numbers as scalars tagged by their field names.

    Use as a context manager (or call ``close``) so that the event files are closed.

    Raises (on construction):
      ImportError: tensorboardX is not installed; the message says how to install it.
    """

    def __init__(self, workdir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard logging needs tensorboardX: pip install 'aoi-jax[tensorboard]' "
                              "(or pip install tensorboardX)") from e
        self._writer_class = SummaryWriter
        self.root = pathlib.Path(workdir) / SUBDIR
        self._writers = {}

    def __call__(self, member, record: dict) -> None:
        name = getattr(member, "name", "")
        if name not in self._writers:
            self._writers[name] = self._writer_class(str(self.root / name if name else self.root))
        writer = self._writers[name]
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, record["epoch"])
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
