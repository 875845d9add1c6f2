"""``python evaluate.py ...`` in a checkout is ``aoi-evaluate ...``: see aoi_jax/commands/evaluate.py or ``--help``."""
from aoi_jax.commands.evaluate import main

if __name__ == "__main__":
    main()
