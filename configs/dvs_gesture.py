"""DVS128 Gesture, the reference recipe (docs/semantics.md section 10): the VGG-like gesture net,
T = 16 (the paper also reports T = 10: --set data.timesteps=10), batch 32, 128x128, 11 classes, official
split (users 24-29 test), TET loss, SGD 0.1 with cosine decay over 100 epochs, +-25 px random translation,
RCS alpha = 0.002.

Window: the authors' preprocessing scripts (snncutoff snncutoff/preprocessing/dvs128gesture.py for T = 10 and
np2dataset.py for T = 16, on the per-gesture cuts of aedat2np.py) keep the first 1.3 s of each gesture,
time measured from its first event, and slice that part into T equal time bins. Edge differences to ours:
see aoi_jax/data/cache.py.

Data: tonic's DVSGesture layout under <data-dir>/DVSGesture/ (see aoi_jax/data/dvs_gesture.py).
python train.py --config configs/dvs_gesture.py --data-dir /path/with/DVSGesture --workdir runs/gesture
"""

from aoi_jax import config as c


def get_config() -> c.Config:
    return c.Config(
        seed=0,
        model=c.ModelConfig(name="gesture_snn", channels=(), num_classes=11),
        data=c.DataConfig(name="dvs_gesture", timesteps=16, translate=25,
                          window=(0, 1_300_000)),  # the first 1.3 s after the first event
        reg=c.RegConfig(alpha=0.002, window=0.3, rcs_n=0.3),
        optim=c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        train=c.TrainConfig(epochs=100, batch_size=32, loss="tet", tet_lambda=1e-3),
        eval=c.EvalConfig(calib_dropout=0.3, batch_size=64),
    )
