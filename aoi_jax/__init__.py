"""aoi-jax: anytime spiking neural networks in JAX (RCS regularisation, Top-K cutoff).

``load_run``, ``logits`` and ``enable_logging`` (``aoi_jax.notebook``) are the notebook path: README, "Notebook".
"""

from aoi_jax.notebook import Run, enable_logging, load_run, logits

__version__ = "0.1.0"

__all__ = ["Run", "enable_logging", "load_run", "logits", "__version__"]
