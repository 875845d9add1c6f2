"""N-Digits Hard: configs/ndigits.py on the harder built-in variant (``ndigits.HARD``: lower contrast,
fewer events, more background noise, slower saccades), where evidence accumulates over the T = 10 steps.

python train.py --config configs/ndigits_hard.py --workdir runs/ndigits_hard [--set reg.alpha=0 ...]
"""

import dataclasses
import pathlib
import runpy

from aoi_jax import config as c


def get_config() -> c.Config:
    base = runpy.run_path(str(pathlib.Path(__file__).with_name("ndigits.py")))["get_config"]()
    return dataclasses.replace(base, data=dataclasses.replace(base.data, name="ndigits_hard"))
