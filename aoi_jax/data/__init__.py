"""Data sets of event frames: event checks and integration, frame sets and batching, a name registry.

``DATASETS`` maps ``DataConfig.name`` to a ``load_splits(data_cfg) -> (train, test)`` function returning two
``FrameSet``s; ``load(data_cfg)`` resolves it and raises listing the valid names.
"""

from aoi_jax.data import events, ndigits
from aoi_jax.data.events import FrameSet, batches, check_events, integrate, num_batches

DATASETS = {"ndigits": ndigits.load_splits}


def load(data_cfg) -> tuple[FrameSet, FrameSet]:
    """The (train, test) frame sets of ``data_cfg.name`` (an ``aoi_jax.config.DataConfig``).

    Raises:
      ValueError: unknown data set name; the message lists the valid ones.
    """
    if data_cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {data_cfg.name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[data_cfg.name](data_cfg)


__all__ = ["events", "ndigits", "FrameSet", "batches", "check_events", "integrate", "num_batches", "DATASETS", "load"]
