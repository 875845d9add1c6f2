"""Progress reports (aoi_jax/progress.py): a bar on a terminal, periodic plain lines elsewhere, nothing under
$TQDM_DISABLE; cache builds reported through ``data.load``; and a training run whose output goes to a file
holds no carriage returns and one line per epoch."""

import io
import re
import warnings

from tqdm import tqdm

import fake_event_data as fake
from aoi_jax import config, data, progress


class FakeClock:
    """Monotonic seconds that advance by ``step`` each time they are read."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


LINE = re.compile(r"^\d\d:\d\d:\d\d (.*)$")


def lines(stream):
    return [LINE.match(x).group(1) for x in stream.getvalue().splitlines()]


def test_periodic_lines_at_most_one_per_interval(monkeypatch):
    """10 s of clock per item, a 30 s interval: a line after items 3, 6 and 9 (clock read once at the start
    and once per later item: 30 s have passed at each of them), the items unchanged."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    items = list(progress.progress(range(10), total=10, desc="epoch 1/2", stream=out, clock=FakeClock(10.0)))
    assert items == list(range(10))
    assert lines(out) == ["epoch 1/2: 3/10 (30%) after 30 s", "epoch 1/2: 6/10 (60%) after 60 s",
                          "epoch 1/2: 9/10 (90%) after 90 s"]
    assert "\r" not in out.getvalue()


def test_periodic_lines_slower_clock_and_unknown_total(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    list(progress.progress(iter(range(5)), desc="test", stream=out, clock=FakeClock(7.0), interval=15.0))
    # clock 7 at the start, then 14, 21 (14 s < 15), 28 (21 s: a line after 3 items), 35 (7 s since it)
    assert lines(out) == ["test: 3 after 21 s"]


def test_a_short_pass_writes_nothing(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    assert list(progress.progress([1, 2, 3], desc="eval", stream=out, clock=FakeClock(1.0))) == [1, 2, 3]
    assert out.getvalue() == ""


def test_bar_on_a_terminal_lines_elsewhere_nothing_when_disabled(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    term = Terminal()
    bar = progress.progress(range(3), total=3, desc="epoch 1/1", stream=term)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    assert "\r" in term.getvalue() and "epoch 1/1" in term.getvalue()          # tqdm redraws in place
    assert isinstance(progress.progress(range(3), stream=io.StringIO()), progress.PeriodicLines)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    items = range(3)
    assert progress.progress(items, stream=term) is items and progress.progress(items) is items
    monkeypatch.setenv("TQDM_DISABLE", "")                                     # empty: not disabled
    assert isinstance(progress.progress(items, stream=io.StringIO()), progress.PeriodicLines)


def recorder():
    """A ``progress`` that records (desc, total, items handed out) of each pass."""
    passes = []

    def record(iterable, total=None, desc=""):
        passes.append([desc, total, 0])
        for item in iterable:
            passes[-1][2] += 1
            yield item

    return record, passes


def test_as_callback_drives_one_pass_per_build():
    record, passes = recorder()
    report = progress.as_callback(record, "cache")
    for done in (1, 4, 4, 10):
        report(done, 10)
    assert passes == [["cache", 10, 10]]
    report(2, 5)                                         # a second build: a new pass
    report(1, 5)                                         # goes back: a third one (the second left unfinished)
    report(5, 5)
    assert passes == [["cache", 10, 10], ["cache", 5, 2], ["cache", 5, 5]]


def test_as_callback_with_periodic_lines(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    clock = FakeClock(20.0)
    report = progress.as_callback(lambda it, total=None, desc="": progress.progress(
        it, total=total, desc=desc, stream=out, clock=clock), "nmnist cache")
    for done in range(1, 5):
        report(done, 4)
    # clock 20 at the start, then 40 (20 s < 30), 60 (40 s: a line after 2 items), 80 (20 s since it)
    assert lines(out) == ["nmnist cache: 2/4 (50%) after 40 s"]


def test_data_load_reports_cache_builds(tmp_path):
    fake.write_fake_nmnist(tmp_path, n_per_class=2, classes=(0, 3))
    record, passes = recorder()
    cfg = config.DataConfig(name="nmnist", data_dir=str(tmp_path), timesteps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                     # "found 4 recordings ... has 60000"
        train, test = data.load(cfg, progress=record)
        build = "building the nmnist cache"
        assert passes == [[build, 4, 4], [build, 4, 4]]        # train, then test: 4 recordings each
        data.load(cfg, progress=record)                                  # cached: nothing to report
    assert len(passes) == 2 and train.frames.shape[:2] == (4, 2)


def test_training_log_in_a_file_has_no_bar_frames(reference_run):
    """train.py (two epochs) with stdout and stderr to a file, TQDM_DISABLE unset (the session's
    ``reference_run``, tests/conftest.py): no carriage return, exactly one line per epoch, no bar text."""
    text = (reference_run.parent / "reference_run.log").read_text()
    assert "\r" not in text and "it/s" not in text
    epoch_lines = [x for x in text.splitlines() if re.search(r" epoch +\d+ +loss ", x)]
    assert [re.search(r"epoch +(\d+)", x).group(1) for x in epoch_lines] == ["1", "2"]
