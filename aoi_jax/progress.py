"""Progress of a long pass (an epoch, an evaluation pass, a cache build) in a form that fits where it goes.

``progress(iterable, total=, desc=)`` is what ``train.py`` and ``evaluate.py`` pass as the ``progress``
argument of ``training.train_and_evaluate`` and ``evaluation.evaluate``::

    stderr is a terminal           a tqdm bar, redrawn in place and removed when the pass ends
    stderr is a file or a pipe     plain lines "HH:MM:SS <desc>: <i>/<total> (<p>%) after <s> s", at most one
                                   per INTERVAL seconds; none for a pass shorter than that
    $TQDM_DISABLE set (not "")     nothing (tqdm's own rule: any non-empty value disables)

so that a batch job's log holds no carriage returns and no bar frames, only the epoch lines the ``aoi_jax``
logger writes and, inside long passes, a line every half minute. ``as_callback`` turns such a ``progress`` into
the ``(done, total)`` callback of the data loaders' cache builds (``aoi_jax.data.load``).
"""

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

INTERVAL = 30.0  # seconds between two plain lines inside one pass


class PeriodicLines:
    """Wraps an iterable; writes a line to ``stream`` when at least ``interval`` seconds of ``clock`` have passed
    since the pass began or since the last line::

        HH:MM:SS <desc>: <i>/<total> (<p>%) after <s> s        (without total: HH:MM:SS <desc>: <i> after <s> s)

    ``i`` counts the items already handed out and processed (the line is written when the next one is asked
    for). ``clock`` is injectable so that tests need no sleeps; the time of day comes from ``time.strftime``.
    """

    def __init__(self, iterable: Iterable, total: int | None = None, desc: str = "", *, stream=None,
                 interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = interval, clock

    def line(self, done: int, elapsed: float) -> str:
        """The text of one report (without the time of day)."""
        count = f"{done}/{self.total} ({100 * done / self.total:.0f}%)" if self.total else f"{done}"
        return f"{self.desc}: {count} after {elapsed:.0f} s"

    def __iter__(self) -> Iterator:
        start = last = self.clock()
        for done, item in enumerate(self.iterable):
            if done:
                now = self.clock()
                if now - last >= self.interval:
                    self.stream.write(f"{time.strftime('%H:%M:%S')} {self.line(done, now - start)}\n")
                    self.stream.flush()
                    last = now
            yield item

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)


def disabled() -> bool:
    """``$TQDM_DISABLE`` is set to a non-empty value (tqdm reads it the same way: ``bool(value)``)."""
    return bool(os.environ.get("TQDM_DISABLE"))


def progress(iterable: Iterable, total: int | None = None, desc: str = "", *, stream=None,
             interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> Iterable:
    """``iterable`` wrapped to report its progress on ``stream`` (default ``sys.stderr``): a tqdm bar on a
    terminal, ``PeriodicLines`` otherwise, the iterable itself when ``$TQDM_DISABLE`` is set (module docstring).

    Args:
      iterable: the pass, e.g. the batches of one epoch.  total: its length, if ``len`` cannot tell.
      desc: what the pass is, e.g. ``"epoch 3/20"``.  stream: where to report.
      interval: seconds between plain lines.  clock: monotonic seconds (injectable for tests).
    """
    stream = sys.stderr if stream is None else stream
    if disabled():
        return iterable
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=stream)
    return PeriodicLines(iterable, total, desc, stream=stream, interval=interval, clock=clock)


def as_callback(progress: Callable[..., Iterable], desc: str) -> Callable[[int, int], None]:
    """The ``(done, total)`` callback of a cache build driving ``progress(range(total), total=, desc=)``.

    Each call advances that iterator to ``done`` items; ``done == total`` exhausts it (a bar closes). A call
    whose ``done`` goes back or whose ``total`` changes starts a new pass (a loader building several caches
    in turn counts each from 0).
    """
    state = {"it": None, "done": 0, "total": None}

    def report(done: int, total: int) -> None:
        if state["it"] is None or total != state["total"] or done < state["done"]:
            if state["it"] is not None:
                getattr(state["it"], "close", lambda: None)()    # an unfinished pass: its bar goes
            state.update(it=iter(progress(range(total), total=total, desc=desc)), done=0, total=total)
        while state["done"] < min(done, total):
            next(state["it"])
            state["done"] += 1
        if state["done"] >= total:
            next(state["it"], None)                  # ends the pass: tqdm removes its bar
            state["it"] = None

    return report


__all__ = ["INTERVAL", "PeriodicLines", "disabled", "progress", "as_callback"]
