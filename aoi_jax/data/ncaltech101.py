"""N-Caltech101 (Orchard et al. 2015): ATIS recordings of Caltech101 images, 101 classes, seeded split.

Read through ``tonic.datasets.NCALTECH101`` from ``<data_dir>/NCALTECH101/`` (docs/data.md section 3.2),
never downloaded::

    <data_dir>/NCALTECH101/N-Caltech101-archive.zip          archive or empty placeholder
    <data_dir>/NCALTECH101/Caltech101/<class>/image_NNNN.bin  5-byte ATIS events, 8709 files

Classes: the 101 folder names of ``CLASSES`` (100 objects and ``BACKGROUND_Google``; N-Caltech101 has no
``Faces``, only ``Faces_easy``), label = position in that fixed tuple, which is Python's ``sorted`` order of
the names (upper case first, as torchvision's ImageFolder and SpikingJelly number them). A folder of another
name is an error; tonic's string targets are not used as labels.

Recordings: the ``.bin`` files under ``Caltech101/`` only (tonic walks the whole ``NCALTECH101`` folder, where
the official archive's ``Caltech101_annotations/<class>/annotation_NNNN.bin`` bounding boxes may also lie),
in natural sorted path order.

Canvas: recordings differ in size; tonic shifts each so that its smallest x and y are 0. Frames place the
events at those coordinates on a fixed ``CANVAS_HW`` = 180 x 240 (H x W) canvas, the data set's native
extent (docs/semantics.md section 10), i.e. top-left aligned, zero elsewhere; an event beyond it is an
error naming the file (nothing is cropped). ``data.size`` downsamples the canvas.

Split: stratified and seeded (``data.seed``): per class ``round(TEST_FRACTION * n_c)`` recordings, drawn
with ``ndigits.split_indices``, form the test split; both splits keep sorted path order.
"""

import os
import pathlib
from collections.abc import Callable

import numpy as np

from aoi_jax.data import cache
from aoi_jax.data import events as events_lib
from aoi_jax.data.ndigits import split_indices

NAME = "ncaltech101"
READER_VERSION = 1  # bump when the reading or framing below changes frames
CANVAS_HW = (180, 240)
SENSOR_SIZE = (240, 180, 2)  # the canvas as tonic's (W, H, P)
TEST_FRACTION = 0.1
OFFICIAL_COUNT = 8709
CLASSES = (
    "BACKGROUND_Google", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera",
    "cannon", "car_side", "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body", "cougar_face",
    "crab", "crayfish", "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin",
    "dragonfly", "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog",
    "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama",
    "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus",
    "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster",
    "saxophone", "schooner", "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler",
    "starfish", "stegosaurus", "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella",
    "watch", "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)
HOW_TO_GET = ("N-Caltech101: N-Caltech101-archive.zip from Orchard et al., Mendeley Data doi 10.17632/cy6cvx3ryv "
              "(linked from garrickorchard.com/datasets/n-caltech101), with its inner Caltech101.zip extracted to "
              "Caltech101/<class>/image_NNNN.bin; or run tonic.datasets.NCALTECH101(save_to=<data_dir>) once on a "
              "machine with network.")


def _read(ds, index: int) -> np.ndarray:
    """One recording; an empty file is an empty recording (tonic's min-shift would fail on it)."""
    if cache.check_atis_file(ds.data[index]) == 0:
        return np.zeros(0, ds.dtype)
    return cache.read_recording(ds, index)


def label_of(path: str) -> int:
    """Class index of a recording from its folder name; ValueError naming the file for an unknown class."""
    name = os.path.basename(os.path.dirname(path))
    if name not in CLASS_INDEX:
        raise ValueError(f"{path}: folder {name!r} is not an N-Caltech101 class (expected one of {list(CLASSES)})")
    return CLASS_INDEX[name]


def load_splits(data_cfg, *, progress: Callable[[int, int], None] | None = None):
    """``(train, test)`` FrameSets of N-Caltech101 for an ``aoi_jax.config.DataConfig``.

    Uses ``data_dir``, ``timesteps``, ``size`` (() = 180x240), ``window`` (() = whole recordings) and
    ``seed`` (the split).

    Raises:
      FileNotFoundError: the archive or the extracted files are missing (says what is expected where).
      ValueError naming the file: an unknown class folder, a truncated or corrupt file, an event beyond the
        180x240 canvas, a negative or unsorted timestamp. An empty recording gives zero frames and a
        warning naming it.
    """
    root = pathlib.Path(data_cfg.data_dir).expanduser()
    base = root / "NCALTECH101"
    reader = cache.offline("NCALTECH101")
    cache.require_files(base, [reader.filename], [(reader.folder_name, "*/*.bin")], HOW_TO_GET)
    out_hw = cache.output_hw(CANVAS_HW, data_cfg.size)
    ds = cache.open_dataset(reader, root)
    inside = os.path.normpath(base / reader.folder_name) + os.sep
    order = sorted((i for i in range(len(ds.data)) if os.path.normpath(ds.data[i]).startswith(inside)),
                   key=lambda i: cache.natural_key(ds.data[i]))
    sources = [ds.data[i] for i in order]
    cache.warn_if_incomplete(base / reader.folder_name, len(sources), OFFICIAL_COUNT, "N-Caltech101")
    labels = cache.check_labels([label_of(p) for p in sources], sources, NUM_CLASSES)
    train_idx, test_idx = split_indices(labels, TEST_FRACTION, data_cfg.seed)
    out = []
    for split, idx in (("train", train_idx), ("test", test_idx)):
        frames, lab, bin_us = cache.cached_frames(
            root, dataset=NAME, split=split, sources=[sources[i] for i in idx], labels=labels[idx],
            read=lambda j, idx=idx: _read(ds, order[idx[j]]), sensor_size=SENSOR_SIZE,
            timesteps=data_cfg.timesteps, out_hw=out_hw, window=data_cfg.window, base=base,
            settings={"reader": f"{NAME}-{READER_VERSION}", "split_rule": "stratified",
                      "test_fraction": TEST_FRACTION, "seed": int(data_cfg.seed)}, progress=progress)
        out.append(events_lib.FrameSet(frames, lab, NUM_CLASSES, CANVAS_HW, bin_us))
    return tuple(out)


__all__ = ["load_splits", "label_of", "CLASSES", "CLASS_INDEX", "NUM_CLASSES", "CANVAS_HW",
           "SENSOR_SIZE", "TEST_FRACTION"]
