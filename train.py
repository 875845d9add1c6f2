"""``python train.py ...`` in a checkout is ``aoi-train ...``: see aoi_jax/commands/train.py or ``--help``."""
from aoi_jax.commands.train import main

if __name__ == "__main__":
    main()
