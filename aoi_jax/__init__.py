"""aoi-jax: anytime spiking neural networks in JAX (RCS regularisation, Top-K cutoff)."""

__version__ = "0.1.0"
