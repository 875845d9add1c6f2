"""CIFAR-10, ANN-to-SNN conversion, the reference recipe (docs/semantics.md sections 3 and 10):
ResNet-18 with QCFS (L = 4, thresholds from 8.0), SGD 0.1 with cosine decay over 300 epochs, batch 128,
random crop (padding 4), horizontal flip and Cutout 16 (AutoAugment is not implemented), RCS ANN form
alpha = 0.002; the converted IF SNN is evaluated at T = 4 (raise data.timesteps for more steps).
Variants: --set model.name=vgg16 / model.name=resnet20, --set model.levels=8, --set reg.alpha=0.

python train.py --config configs/cifar10_qcfs.py --data-dir DIR_WITH_cifar-10-batches-py \
    --workdir runs/cifar10_qcfs
"""

from aoi_jax import config as c


def get_config() -> c.Config:
    return c.Config(
        seed=0,
        model=c.ModelConfig(name="resnet18", channels=(), num_classes=10, activation="qcfs", levels=4,
                            neuron=c.NeuronConfig(tau=1.0, vth=1.0, reset="soft", v0=0.5)),
        data=c.DataConfig(name="cifar10", timesteps=4, translate=4, hflip=True, cutout=16),
        reg=c.RegConfig(alpha=0.002, window=0.3, rcs_n=0.3),
        optim=c.OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        train=c.TrainConfig(epochs=300, batch_size=128, loss="mean"),
        eval=c.EvalConfig(calib_dropout=0.3, batch_size=256),
    )
