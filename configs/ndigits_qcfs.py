"""N-Digits as static images (each recording's events summed over its duration) through a QCFS ANN
(small conv net, L = 4, learnt thresholds from 8.0), converted to IF neurons and evaluated over T = 8 steps
with the cutoff. RCS in its ANN form, alpha = 0.002 (alpha = 0 for the baseline).

python train.py --config configs/ndigits_qcfs.py --workdir runs/ndigits_qcfs [--set reg.alpha=0]
"""

from aoi_jax import config as c


def get_config() -> c.Config:
    return c.Config(
        seed=0,
        model=c.ModelConfig(name="small_snn", channels=(16, 32, 64), num_classes=10, activation="qcfs", levels=4,
                            neuron=c.NeuronConfig(tau=1.0, vth=1.0, reset="soft", v0=0.5)),
        data=c.DataConfig(name="ndigits_summed", timesteps=8),
        reg=c.RegConfig(alpha=0.002, window=0.3, rcs_n=0.3),
        optim=c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        train=c.TrainConfig(epochs=20, batch_size=32, loss="mean"),
        eval=c.EvalConfig(calib_dropout=0.3),
    )
