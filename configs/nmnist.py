"""N-MNIST with the small conv SNN: 34x34, T = 10, 10 classes, official split, mean loss, RCS alpha = 0.002,
SGD 0.1 with cosine decay, no augmentation. Not a recipe of the paper (which has no N-MNIST run): the
N-Digits settings (configs/ndigits.py) on the real recordings, with the mean loss (configs/ndigits.py
trains with TET since the RCS study on N-Digits, docs/results.md).

Data: tonic's NMNIST layout under <data-dir>/NMNIST/ (see aoi_jax/data/nmnist.py).
python train.py --config configs/nmnist.py --data-dir /path/with/NMNIST --workdir runs/nmnist
"""

from aoi_jax import config as c


def get_config() -> c.Config:
    return c.Config(
        seed=0,
        model=c.ModelConfig(name="small_snn", channels=(16, 32, 64), num_classes=10),
        data=c.DataConfig(name="nmnist", timesteps=10),
        reg=c.RegConfig(alpha=0.002, window=0.3, rcs_n=0.3),
        optim=c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        train=c.TrainConfig(epochs=20, batch_size=32, loss="mean"),
        eval=c.EvalConfig(calib_dropout=0.3),
    )
