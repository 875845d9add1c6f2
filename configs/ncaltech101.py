"""N-Caltech101, the reference recipe (docs/semantics.md section 10): VGGSNN on the native 180x240
canvas, T = 10, 101 classes, TET loss, SGD 0.1 with cosine decay over 100 epochs, +-25 px random
translation, RCS alpha = 0.002. Split: stratified, 10 % of each class to test, seeded by data.seed.
Window: the whole recording (data.window = ()); the authors' repositories (SNN-Regularisation-Cutoff,
snncutoff) hold no N-Caltech101 preprocessing to take one from.

The reference trains with batch 128 on GPUs; pass e.g. --set train.batch_size=16 on smaller machines, or
--set "data.size=(90,120)" to halve the frames (event coordinates are scaled before integrating).
Data: tonic's NCALTECH101 layout under <data-dir>/NCALTECH101/ (see aoi_jax/data/ncaltech101.py).
python train.py --config configs/ncaltech101.py --data-dir /path/with/NCALTECH101 --workdir runs/ncaltech
"""

from aoi_jax import config as c


def get_config() -> c.Config:
    return c.Config(
        seed=0,
        model=c.ModelConfig(name="vggsnn", channels=(), num_classes=101),
        data=c.DataConfig(name="ncaltech101", timesteps=10, translate=25),
        reg=c.RegConfig(alpha=0.002, window=0.3, rcs_n=0.3),
        optim=c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        train=c.TrainConfig(epochs=100, batch_size=128, loss="tet", tet_lambda=1e-3),
        eval=c.EvalConfig(calib_dropout=0.3, batch_size=64),
    )
