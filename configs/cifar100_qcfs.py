"""CIFAR-100, ANN-to-SNN conversion: configs/cifar10_qcfs.py with CIFAR-100 (fine labels, its own
normalisation) and 100 classes.

python train.py --config configs/cifar100_qcfs.py --data-dir DIR_WITH_cifar-100-python \
    --workdir runs/cifar100_qcfs
"""

import dataclasses
import pathlib
import runpy

from aoi_jax import config as c


def get_config() -> c.Config:
    base = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_qcfs.py")))["get_config"]()
    return dataclasses.replace(base, model=dataclasses.replace(base.model, num_classes=100),
                               data=dataclasses.replace(base.data, name="cifar100"))
