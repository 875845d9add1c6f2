"""Default: the built-in N-Digits event data set, the small conv SNN, T = 10, TET loss, RCS alpha = 0.002.

The loss is TET (not the mean loss) and the calibration the training samples with dropout 0.3 by the RCS
study's rules (docs/results.md, "Decisions"); alpha stays the reference's 0.002 by the second experiment's
pre-registered rule (docs/results.md, "Second experiment": no alpha shortens latency).

python train.py --config configs/ndigits.py --workdir runs/ndigits [--set reg.alpha=0 ...]
"""

from aoi_jax import config as c


def get_config() -> c.Config:
    return c.Config(
        seed=0,
        model=c.ModelConfig(name="small_snn", channels=(16, 32, 64), num_classes=10),
        data=c.DataConfig(name="ndigits", timesteps=10),
        reg=c.RegConfig(alpha=0.002, window=0.3, rcs_n=0.3),
        optim=c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        train=c.TrainConfig(epochs=20, batch_size=32, loss="tet"),
        eval=c.EvalConfig(calib_dropout=0.3),
    )
